"""End-to-end jobs behind the CLI: quantize a model to disk, compare methods by perplexity.

Each function is usable from Python too; the CLI only parses flags and prints.
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from awqfx import distributed
from awqfx.api import calibrate, convert, prepare, search
from awqfx.app import assets, budget
from awqfx.app.evaluate import perplexity, windows_for_eval
from awqfx.apply import apply_plan, check_module_tree
from awqfx.capture import capture
from awqfx.checkpoint import Checkpoint, CheckpointError
from awqfx.config import AWQConfig, ConfigError
from awqfx.formats import (
    FormatError,
    Layer,
    ModelSource,
    check_format,
    eval_note,
    format_modes,
    load_written,
    model_problems,
    reads_back,
    save_model,
    weights_mode,
    writes_from_plan,
)
from awqfx.formats.common import alias_groups
from awqfx.memory import peak_rss_mb
from awqfx.params import get_param
from awqfx.search import gap_recovered
from awqfx.search.block_rounding import blocks_to_refine
from awqfx.sequential import compute_dtype_for, open_sequential, quantize_sequential

log = logging.getLogger(__name__)


def dir_size(path: str | Path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


@dataclass
class Report:
    """What a job did: stage timings, sizes, perplexities; printed as the CLI summary."""

    stages: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.stages[name] = time.perf_counter() - t0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``awqfx quantize --report``)."""
        return {"stages": dict(self.stages), "facts": {k: str(v) for k, v in self.facts.items()},
                "blocks": list(self.blocks), "total_s": sum(self.stages.values()), "peak_rss_mb": peak_rss_mb()}

    def table(self) -> str:
        rows = [(k, v) for k, v in self.facts.items()]
        rows += [(f"time: {k}", f"{v:.1f} s") for k, v in self.stages.items()]
        rows.append(("time: total", f"{sum(self.stages.values()):.1f} s"))
        rss = peak_rss_mb()
        rows.append(("peak memory (RSS)", "n/a" if rss is None else f"{rss:.0f} MB"))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def layers_to_quantize(observed, cfg: AWQConfig) -> list[Layer]:
    """The weights the search will quantize, described for the format checks (shapes and spec only)."""
    tied = {name for names in alias_groups(observed.gm) for name in names}
    scaled = {c.weight for g in observed.groups if g.producer.kind == "activation" for c in g.consumers}
    return [Layer(w, tuple(get_param(observed.gm, w).shape), observed.linears[w][2], cfg.spec, tied=w in tied,
                  input_scale=cfg.scaled and w in scaled, act=cfg.activations)
            for w in observed.discovery.quantizable if w in observed.linears]


def warn_if_half_is_slow(model: nn.Module, device: str | None) -> None:
    """Log a warning when a bf16/fp16 model is to run on a CPU without native matmuls in its dtype
    (no avx512_bf16 / AMX / avx512_fp16): there they take several times as long as float32's."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16) or torch.device(device or "cpu").type != "cpu":
        return
    try:
        fast = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16
                else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return
    if not fast:
        log.warning("this CPU (%s) has no native %s matmuls: the %s model runs several times slower than in "
                    "float32 (--dtype float32 is faster here)", torch.backends.cpu.get_cpu_capability(),
                    str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Refuse a sequence length the model cannot attend over (its ``max_position_embeddings``),
    before any calibration work: such a run only grows until the OS kills it."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} is longer than {type(model).__name__}'s {limit} positions "
                          f"(config.max_position_embeddings); use --seq-len {limit} or less")


def refuse_unfit_format(fmt: str, observed, cfg: AWQConfig, model: nn.Module | None = None,
                        source: ModelSource | None = None) -> None:
    """Raise :class:`FormatError` listing every layer ``fmt`` cannot hold and, given the ``model``
    and its ``source``, every other reason the format cannot write it (:func:`model_problems`:
    architecture, metadata), before any long work."""
    problems = check_format(fmt, layers_to_quantize(observed, cfg))
    if model is not None:
        problems += model_problems(fmt, model, source or ModelSource())
    if problems:
        raise FormatError(f"--format {fmt} cannot hold this model: " + "; ".join(problems) + ".")


def report_dropped(rep: Report, observed) -> None:
    """One warning line naming the groups ``--drop-unfoldable`` leaves unscaled, and their count in
    the summary (nothing when none is dropped)."""
    if not observed.dropped:
        return
    n = len(observed.dropped)
    log.warning("--drop-unfoldable: %d scale group%s after an activation left unscaled (s = 1): %s", n,
                "" if n == 1 else "s", "; ".join(g.site for g in observed.dropped))
    rep.facts["scale groups"] += f", {n} dropped (--drop-unfoldable)"




MODES = ("auto", "whole", "sequential")


def choose_mode(mode: str, ckpt_bytes: int, device: str | None, dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """``(mode, why)``: ``auto`` runs block by block when a half-precision model meets a device
    without fast half matmuls (each block is computed in float32 there, never the whole model) or
    when three copies of the weights do not fit comfortably (80 %) in the device's memory."""
    if mode != "auto":
        return mode, "asked for"
    if compute_dtype_for(dtype, device) != dtype:
        return "sequential", f"{str(dtype).removeprefix('torch.')} is slow on {device or 'cpu'}: blocks compute in float32"
    avail, where = budget.available_memory(device)
    need = budget.RUNTIME_BYTES + 3 * ckpt_bytes
    if need <= 0.8 * avail:
        return "whole", f"3 x {ckpt_bytes / 2**30:.2f} GiB of weights fit in {avail / 2**30:.1f} GiB {where}"
    return "sequential", f"3 x {ckpt_bytes / 2**30:.2f} GiB of weights do not fit in {avail / 2**30:.1f} GiB {where}"


def quantize_model(
    model_path: str | None,
    out_dir: str,
    cfg: AWQConfig,
    fmt: str = "awqfx",
    calib_source: str | None = None,
    samples: int = assets.DEFAULT_SAMPLES,
    seq_len: int = 512,
    eval_file: str | None = None,
    eval_windows: int = 16,
    overwrite: bool = False,
    progress: bool = True,
    mode: str = "auto",
    dtype: str | torch.dtype = "auto",
    offload_dir: str | None = None,
) -> Report:
    """Load, capture, calibrate, search, pack and save; returns the report for the summary.

    ``mode``: ``whole`` (the whole graph in memory), ``sequential`` (block by block from the
    checkpoint's safetensors, :mod:`awqfx.sequential`) or ``auto`` (:func:`choose_mode`).
    ``dtype``: the precision the model is quantized in (``"auto"``: the checkpoint's own,
    :func:`awqfx.app.assets.resolve_dtype`); the saved model keeps it for every unquantized tensor.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if cfg.refine is not None and weights_mode(fmt) == "smoothed":
        raise ConfigError(f"--format {fmt} writes float weights that round-to-nearest reproduces; refined codes "
                          f"(--refine {cfg.refine.method}) are not round-to-nearest: use a packed format or --refine none")
    rep = Report()
    with rep.stage("open checkpoint"):
        model_dir = assets.resolve_model_dir(model_path)
        try:
            ckpt = Checkpoint(model_dir)
        except CheckpointError:
            if mode == "sequential":
                raise
            ckpt = None  # not safetensors: whole-graph mode only (transformers reads it)
        dtype = assets.resolve_dtype(model_dir, dtype)
        if ckpt is None:
            mode, why = "whole", "the checkpoint is not in safetensors"
        else:
            stored = (ckpt.dtype() or torch.float32).itemsize
            mode, why = choose_mode(mode, ckpt.nbytes() * dtype.itemsize // stored, cfg.runtime.device, dtype)
        if mode not in format_modes(fmt):  # e.g. GGUF: one file, written from the whole folded model
            if why == "asked for":
                raise ConfigError(f"--format {fmt} is written from the whole model; block by block (--mode {mode}) "
                                  "it is not supported: use --mode whole or auto")
            mode, why = "whole", f"--format {fmt} is written from the whole model; auto would run {mode}: {why}"
        if cfg.activations is not None and mode == "sequential":  # the block writer packs weight-only layers
            if why == "asked for":
                raise ConfigError("activation quantization (--act-bits) runs on the whole graph; block by block "
                                  "(--mode sequential) it is not supported: use --mode whole or auto")
            mode, why = "whole", f"--act-bits runs on the whole graph; auto would run sequential: {why}"
        if eval_file is not None:
            refuse_unreadable_eval(fmt, mode)
    rep.facts["mode"] = f"{'block by block' if mode == 'sequential' else 'whole graph'} ({why})"
    source = ModelSource(model_dir, gguf_source(model_path))
    if mode == "sequential":
        _quantize_blocks(rep, model_dir, out, cfg, fmt, calib_source, samples, seq_len, dtype, offload_dir,
                         overwrite, progress, source)
        model = packed = None
        tok = assets.load_tokenizer(model_dir)
    else:
        model, tok, packed = _quantize_whole(rep, model_dir, out, cfg, fmt, calib_source, samples, seq_len, dtype,
                                             overwrite, progress, source)
    if not distributed.is_main():
        return rep
    rep.facts["size after"] = f"{dir_size(out) / 2**20:.1f} MiB on disk ({out})"
    if eval_file is not None:
        text = Path(eval_file).read_text(encoding="utf-8", errors="replace") if eval_file != "-" else assets.eval_text()
        wins = windows_for_eval(tok, text, seq_len, max_windows=eval_windows)
        with rep.stage("evaluate"):
            if model is None:
                model, _ = assets.load_model(model_dir, dtype=dtype)
            if evaluates_written(fmt, mode):  # block by block, or a file its writer quantized: read back
                packed = load_written(fmt, out, dtype)
            compute = compute_dtype_for(dtype, cfg.runtime.device)
            if compute != dtype:  # e.g. bf16 on a CPU without bf16 matmuls: the same values, evaluated in float32
                model, packed = model.to(compute), packed.to(compute)
            before = perplexity(model, wins, progress=progress)
            after = perplexity(packed, wins, progress=progress)
        computed = "" if compute == dtype else f", computed in {compute}"
        rep.facts["perplexity before"] = f"{before:.3f} ({wins.shape[0]} x {wins.shape[1]} tokens{computed})"
        note = eval_note(fmt)  # e.g. the smoothed float model, or the GGUF file as transformers loads it
        rep.facts["perplexity after"] = f"{after:.3f}" + (f" ({note})" if note else "")
    return rep


def evaluates_written(fmt: str, mode: str) -> bool:
    """Whether ``--eval`` evaluates the output read back from disk, not the model in memory: block by
    block (none is kept), or a format whose writer quantizes the float model itself (GGUF)."""
    return mode == "sequential" or writes_from_plan(fmt)


def refuse_unreadable_eval(fmt: str, mode: str) -> None:
    """Raise :class:`ConfigError` (before any work) when ``--eval`` would read back what format
    ``fmt`` writes in ``mode`` and awqfx has no reader for it."""
    if evaluates_written(fmt, mode) and not reads_back(fmt):
        where = "block by block, no model is kept in memory" if mode == "sequential" else "the file is the model"
        raise ConfigError(f"--eval evaluates what --format {fmt} wrote, read back from --out ({where}), and awqfx "
                          f"cannot read {fmt}: drop --eval" + (", or use --mode whole" if mode == "sequential" else ""))


def gguf_source(model_path: str | None) -> Path | None:
    """The ``.gguf`` file MODEL names (the bundled SmolLM2 when None), or None for a HF directory."""
    path = assets.default_model_gguf() if model_path is None else Path(model_path)
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def _quantize_whole(rep: Report, model_dir: Path, out: Path, cfg: AWQConfig, fmt: str, calib_source, samples: int,
                    seq_len: int, dtype: torch.dtype, overwrite: bool, progress: bool, source: ModelSource):
    with rep.stage("load model"):
        model, tok = assets.load_model(model_dir, dtype=dtype)
    check_seq_len(model, seq_len)
    warn_if_half_is_slow(model, cfg.runtime.device)
    n_params = sum(p.numel() for p in model.parameters())
    rep.facts["model"] = f"{type(model).__name__} ({n_params / 1e6:.1f}M parameters)"
    with rep.stage("calibration text"):
        calib = assets.calibration_samples(tok, samples, seq_len, source=calib_source) if cfg.needs_calibration else None
    if calib is not None:
        rep.facts["calibration"] = (f"{calib.shape[0]} x {calib.shape[1]} tokens from "
                                    f"{assets.calibration_source_label(calib_source)}")
    with rep.stage("capture + discover"):
        # a model that exports only with static shapes is captured at the calibration batch shape
        gm = capture(model, static_inputs=None if calib is None else (calib[: cfg.runtime.batch_size],))
        observed = prepare(gm, cfg)
    d = observed.discovery
    rep.facts["scale groups"] = f"{len(d.groups)} found, {len(d.rejected)} rejected candidates"
    refuse_unfit_format(fmt, observed, cfg, model, source)
    report_dropped(rep, observed)
    check_module_tree(observed.groups, observed.linears)  # the plan is applied to the module tree below
    fp_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    est = budget.estimate_memory(gm, samples=samples if calib is not None else 0, seq_len=seq_len,
                                 batch_size=cfg.runtime.batch_size,
                                 loss_samples=cfg.replayed_samples if calib is not None else 0,
                                 weight_bytes=fp_bytes, refine_samples=cfg.refine_samples,
                                 refine_blocks=blocks_to_refine(gm, observed.groups) if cfg.refine_samples else None)
    budget.check_fits(est, cfg.runtime.device, "lower --seq-len or --samples, or quantize block by block (--sequential)")
    rep.facts["memory estimate"] = f"{est.total / 2**30:.2f} GiB ({est.describe()})"
    if cfg.needs_calibration:
        with rep.stage("calibrate"):
            calibrate(observed, calib, progress=progress)
    with rep.stage("search"):
        plan = search(observed, cfg, progress=progress)
    if not distributed.is_main():  # every rank holds the plan; rank 0 packs, saves and evaluates
        return model, tok, None
    _describe_weights(rep, plan, cfg)
    weights = weights_mode(fmt)  # "smoothed": the float model, folded and clamped, not quantized
    with rep.stage({"packed": "pack", "smoothed": "fold + clamp"}.get(weights, "fold")):
        packed = apply_plan(model, plan, weights=weights)
    with rep.stage("save"), tempfile.TemporaryDirectory() as tmp:
        plan.save(Path(tmp) / "plan")
        save_model(fmt, packed, plan, out, source, tokenizer=tok, plan_dir=Path(tmp) / "plan", overwrite=overwrite)
    rep.facts["size before"] = f"{fp_bytes / 2**20:.1f} MiB ({next(model.parameters()).dtype}, in memory)"
    return model, tok, packed


def _describe_weights(rep: Report, plan, cfg: AWQConfig) -> None:
    if cfg.activations is not None:
        rep.facts["quantized activations"] = (f"inputs of every quantized linear, {cfg.activations.bits}-bit "
                                              f"{cfg.activations.granularity}, dynamic, symmetric")
    if cfg.weights.is_gguf:
        rep.facts["quantized weights"] = f"{len(plan.weights)} (GGUF {cfg.weights.scheme}: {cfg.weights.bits}-bit " \
                                         f"blocks of {cfg.weights.group_size})"
        return
    refined = sum(wp.codes is not None for wp in plan.weights.values())
    rep.facts["quantized weights"] = f"{len(plan.weights)} ({cfg.weights.bits}-bit, group {cfg.weights.group_size}, " \
                                     f"{'symmetric' if cfg.weights.symmetric else 'asymmetric'}" + \
                                     (f"; {refined} rounded by {cfg.refine.method})" if cfg.refine else ")")
    gains = [r for r in plan.group_gains() if r["held_gain"] is not None]
    if cfg.guard_samples and plan.groups:
        rejected = [r["name"] for r in gains if r["rejected"]]
        kept = [r["held_gain"] for r in gains if not r["rejected"]]
        rep.facts["scale guard"] = (
            f"{len(gains)} scaled groups checked on {cfg.guard_samples} held-back sequences; "
            + (f"kept {len(kept)} (median held-out gain {statistics.median(kept):.1%} of the round-to-nearest error)"
               if kept else "kept none")
            + (f"; {len(rejected)} left unscaled (no held-out gain): {', '.join(rejected[:4])}"
               + (" ..." if len(rejected) > 4 else "") if rejected else "; none left unscaled"))
    blocks = plan.metadata.get("refine_blocks")
    if blocks:
        ratios = [b["loss_final"] / b["loss_start"] for b in blocks if b["loss_start"] > 0]
        kept = sum(b["kept"] for b in blocks)
        rep.facts["block rounding"] = (f"{len(blocks)} blocks, output error {statistics.median(ratios):.2f}x of round to "
                                       f"nearest on the searched grid (median), {len(blocks) - kept} left unrefined "
                                       f"(no gain); {cfg.refine.iters} steps of {cfg.refine.batch} sequences")


def _quantize_blocks(rep: Report, model_dir: Path, out: Path, cfg: AWQConfig, fmt: str, calib_source, samples: int,
                     seq_len: int, dtype: torch.dtype, offload_dir: str | None, overwrite: bool,
                     progress: bool, source: ModelSource) -> None:
    with rep.stage("capture + discover"):
        sm = open_sequential(model_dir, dtype=dtype, quantize_head=cfg.quantize_head, device=cfg.runtime.device,
                             config=cfg)
    check_seq_len(sm.skeleton, seq_len)
    n_params = sum(p.numel() for p in sm.skeleton.parameters())
    rep.facts["model"] = (f"{type(sm.skeleton).__name__} ({n_params / 1e6:.1f}M parameters, {dtype}, "
                          f"computed in {sm.compute_dtype})")
    d = sm.discovery
    rep.facts["scale groups"] = f"{len(d.groups)} found, {len(d.rejected)} rejected candidates"
    is_quantized = [sm.quantizes(b) for b in sm.blocks]
    rep.facts["blocks"] = f"{len(sm.blocks)} ({sum(is_quantized)} quantized)"
    view = sm.observed_view(cfg)
    refuse_unfit_format(fmt, view, cfg, sm.skeleton, source)
    report_dropped(rep, view)
    sizes = [sm.block_bytes(b) for b in sm.blocks]
    last = max(i for i, q in enumerate(is_quantized) if q) if any(is_quantized) else -1
    est = budget.estimate_memory(sm.gm, samples=samples if cfg.needs_calibration else 0, seq_len=seq_len,
                                 batch_size=cfg.runtime.batch_size,
                                 loss_samples=cfg.replayed_samples, refine_samples=cfg.refine_samples,
                                 weight_bytes=sum(sizes), blocks=sm.blocks[: last + 1],
                                 block_bytes=[s for s, q in zip(sizes, is_quantized) if q],
                                 outside_bytes=max((s for s, q in zip(sizes, is_quantized) if not q), default=0),
                                 offload=offload_dir is not None)
    budget.check_fits(est, cfg.runtime.device, "lower --seq-len or --samples, or keep the boundary on disk "
                      "(--offload-dir)")
    rep.facts["memory estimate"] = f"{est.total / 2**30:.2f} GiB ({est.describe()})"
    tok = assets.load_tokenizer(model_dir)
    with rep.stage("calibration text"):
        calib = assets.calibration_samples(tok, samples, seq_len, source=calib_source)
    rep.facts["calibration"] = (f"{calib.shape[0]} x {calib.shape[1]} tokens from "
                                f"{assets.calibration_source_label(calib_source)}")
    with rep.stage("blocks"):
        plan, records = quantize_sequential(sm, calib, cfg, out, fmt=fmt, tokenizer=tok, offload_dir=offload_dir,
                                            overwrite=overwrite, progress=progress)
    _describe_weights(rep, plan, cfg)
    rep.blocks = [asdict(r) for r in records]
    times = [r.seconds for r in records if r.weights]
    if times:
        rep.facts["time per quantized block"] = (f"first {times[0]:.1f} s, median {statistics.median(times):.1f} s, "
                                                 f"last {times[-1]:.1f} s")
    rep.facts["size before"] = f"{sm.checkpoint.nbytes() / 2**20:.1f} MiB (checkpoint on disk)"


def compare_methods(
    model_path: str | None,
    text: str,
    bits: list[int],
    group_size: int,
    methods: list[str],
    max_windows: int | None = 16,
    seq_len: int = 512,
    samples: int = assets.DEFAULT_SAMPLES,
    calib_source: str | None = None,
    base_config: dict | None = None,
    progress: bool = True,
    dtype: str | torch.dtype = "auto",
) -> dict[str, Any]:
    """Perplexity of fp / RTN / SmoothQuant / GPTQ / AWQ at each bit width on ``text`` (the ``awqfx eval``
    table), with the model loaded in ``dtype`` (``"auto"``: the checkpoint's own). ``base_config``'s
    ``act_bits`` / ``act_granularity`` quantize the activations too (every method but fp).

    The model is captured and calibrated once; each bit width is a new search on the same
    statistics (they do not depend on the quantizer), so ``--bits 3,4`` costs one calibration.
    """
    model, tok = assets.load_model(model_path, dtype)
    check_seq_len(model, seq_len)
    warn_if_half_is_slow(model, (base_config or {}).get("device"))
    wins = windows_for_eval(tok, text, seq_len, max_windows=max_windows)
    gm = capture(model)
    observed = None
    rows = []
    if "fp" in methods:
        t0 = time.perf_counter()
        rows.append({"method": "fp", "bits": 16 if next(model.parameters()).dtype != torch.float32 else 32,
                     "ppl": perplexity(gm, wins, progress=progress), "seconds": time.perf_counter() - t0})
    for b in bits:
        for m in methods:
            if m == "fp":
                continue
            cfg = AWQConfig.of(**{**(base_config or {}), "bits": b, "group_size": group_size, "method": m})
            t0 = time.perf_counter()
            if observed is None:
                observed = prepare(gm, cfg.with_(method="awq"))
                if any(x in methods for x in ("awq", "smoothquant", "gptq")):
                    calibrate(observed, assets.calibration_samples(tok, samples, seq_len, source=calib_source),
                              progress=progress)
            qgm = convert(gm, search(observed, cfg, progress=progress))
            t1 = time.perf_counter()
            ppl = perplexity(qgm, wins, progress=progress)
            row = {"method": m, "bits": b, "group_size": group_size, "ppl": ppl, "quantize_seconds": t1 - t0}
            if cfg.activations is not None:
                row.update(act_bits=cfg.activations.bits, act_granularity=cfg.activations.granularity)
            rows.append(row)
            del qgm
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    for r in rows:
        if r["method"] in ("awq", "smoothquant", "gptq") and fp is not None:
            rtn = next((x["ppl"] for x in rows if x["method"] == "rtn" and x["bits"] == r["bits"]), None)
            if rtn is not None and rtn != fp:
                r["gap_recovered"] = gap_recovered(fp, rtn, r["ppl"])
    act = AWQConfig.of(**{**(base_config or {}), "method": "rtn"}).activations
    return {"windows": int(wins.shape[0]), "seq_len": int(wins.shape[1]), "group_size": group_size,
            "samples": samples, "calibration": assets.calibration_source_label(calib_source),
            "act_bits": None if act is None else act.bits,
            "act_granularity": None if act is None else act.granularity, "rows": rows}


def plot_results(result: dict[str, Any], path: str | Path) -> None:
    """Perplexity vs bits, one line per method (fp as a horizontal line)."""
    # here, not at the top: only `awqfx eval --plot` draws, and matplotlib is ~26 MB resident in every command
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    for m in sorted({r["method"] for r in rows if r["method"] != "fp"}):
        pts = sorted((r["bits"], r["ppl"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    fp = [r["ppl"] for r in rows if r["method"] == "fp"]
    if fp:
        ax.axhline(fp[0], color="gray", linestyle="--", label="fp")
    ax.set_xlabel("weight bits")
    ax.set_xticks(sorted({r["bits"] for r in rows if r["method"] != "fp"}))
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f"group size {result['group_size']}, {result['windows']} x {result['seq_len']} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

