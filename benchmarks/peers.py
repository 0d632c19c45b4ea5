"""Benchmark: awqfx against auto-round on the same calibration and evaluation windows (#16).

    bash scripts/peers-env.sh                      # once: a separate venv with auto-round (default /work/peers-venv)
    /work/peers-venv/bin/python benchmarks/peers.py [--model MODEL] [--bits 4] [--group-size 64]
        [--samples 8] [--seq-len 512] [--calib SOURCE] [--text FILE|NAME] [--max-windows 16]
        [--iters 200] [--methods fp,rtn,awqfx,awqfx+gptq,autoround] [--autoround-bf16] [--json OUT]

auto-round is never a dependency of awqfx: it is imported only when a method needs it, from the
interpreter running this script (the peers venv, which also holds an editable awqfx). Without it,
the awqfx methods still run (e.g. with awqfx's own .venv).

Every method starts from the same float32 model (MODEL, default the bundled SmolLM2-135M-Instruct,
converted once by ``awqfx.app.assets``) and is scored by the same code on the same windows:
``awqfx.app.evaluate.perplexity`` of the captured graph (``awqfx.capture``) on
``windows_for_eval(tok, text, seq_len, max_windows)``. Methods:

* ``fp``: the float model.
* ``rtn``: awqfx round-to-nearest (``AWQConfig.of(method="rtn")``), asymmetric, ``--group-size``.
* ``awqfx``: prepare / calibrate / search / convert with ``AWQConfig.of(bits, group_size)`` (the
  library defaults, as ``awqfx eval``), calibrated on the ``--samples`` x ``--seq-len`` windows of
  ``assets.calibration_samples(tok, samples, seq_len, source=--calib)`` (``--calib`` omitted:
  awqfx's default source).
* ``awqfx+gptq`` / ``awqfx+block``: the same with ``refine="gptq"`` / ``refine="block"``
  (``--refine-iters`` / ``--refine-batch`` set the block refine's steps and batch; it learns on
  all ``--samples`` windows, as auto-round does).
* ``autoround``: ``AutoRound(model, tok, bits, group_size, sym=False, iters, nsamples, seqlen,
  dataset=<those same windows as a list of [1, seq_len] tensors>, device_map="cpu")`` then
  ``quantize()``, which leaves the fake-quantized (quantize-dequantize) weights in the model. The
  windows auto-round iterates over are recorded and checked against ours (count, shape, values).
  ``amp=False`` (float32 tuning, as awqfx computes on a CPU without fast bf16) unless
  ``--autoround-bf16`` (auto-round's own CPU default: bf16 tuning; the model is cast back to float32
  for scoring).
* ``autoround-rtn``: auto-round with ``iters=0`` (its RTN path), a cross-check of the two RTNs (not
  in the default list).

Quantize time (``time.perf_counter``) per method: awqfx's includes the one ``torch.export`` capture
(done once, added to each awqfx method), prepare, calibrate, search and convert; auto-round's the
``AutoRound(...)`` constructor and ``quantize()``. Model loading and scoring are not in it.
Recovery = (ppl_rtn - ppl) / (ppl_rtn - ppl_fp), the share of RTN's gap to fp a method closes.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from awqfx.api import calibrate, convert, prepare, search
from awqfx.app import assets
from awqfx.app.evaluate import perplexity, windows_for_eval
from awqfx.capture import capture
from awqfx.config import AWQConfig
from awqfx.search.driver import gap_recovered

METHODS = ("fp", "rtn", "awqfx", "awqfx+gptq", "awqfx+block", "autoround", "autoround-rtn")
DEFAULT_METHODS = "fp,rtn,awqfx,awqfx+gptq,autoround"
PEERS_HINT = ("auto-round is not installed in this interpreter ({python}); create its venv with "
              "`bash scripts/peers-env.sh` and run this script with /work/peers-venv/bin/python")

log = logging.getLogger("peers")


# ------------------------------------------------------------------------------------ helpers


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods takes a comma-separated subset of {','.join(METHODS)} (got {spec!r})")
    return list(dict.fromkeys(methods))


def recovery(fp: float | None, rtn: float | None, ppl: float) -> float | None:
    """(rtn - ppl) / (rtn - fp): the share of RTN's perplexity gap to fp that a method closes."""
    if fp is None or rtn is None or rtn == fp or not math.isfinite(ppl):
        return None
    return gap_recovered(fp, rtn, ppl)


def resolve_text(spec: str | None) -> tuple[str, str]:
    """``(eval text, label)``, as ``awqfx eval --text``: None -> the held-out plays; a name of
    ``assets.named_eval_text`` (plays / prose / licenses, where this awqfx has it; a name wins over a
    file of that name) -> that text; otherwise a file -> its text."""
    named = getattr(assets, "named_eval_text", None)
    names = getattr(assets, "EVAL_TEXTS", ())
    if spec is None:
        return assets.eval_text(), "the held-out plays"
    if named is not None and spec in names:
        return named(spec), f"{spec!r} (assets.named_eval_text)"
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    what = f"a named text ({', '.join(names)})" if named is not None else "a file (this awqfx has no named texts)"
    raise SystemExit(f"--text {spec!r} is neither {what} nor a file")


def calib_label(source: str | None) -> str:
    label = getattr(assets, "calibration_source_label", None)
    if label is not None:
        return label(source)
    return "the calibration plays" if source is None else str(source)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "auto-round", "awqfx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the result rows."""
    lines = ["| method | perplexity | recovery of RTN's gap | quantize time (s) | notes |",
             "|---|---|---|---|---|"]
    for r in rows:
        ppl = "skipped" if r.get("ppl") is None else f"{r['ppl']:.3f}"
        rec = "" if r.get("recovery") is None else f"{100 * r['recovery']:.1f} %"
        sec = "" if r.get("quantize_s") is None else f"{r['quantize_s']:.1f}"
        lines.append(f"| {r['method']} | {ppl} | {rec} | {sec} | {r.get('note', '')} |")
    return "\n".join(lines)


class ServedWindows(list):
    """The calibration windows as auto-round takes a custom dataset (a list of ``[1, L]`` token
    tensors), recording every item it is served so the run can prove it used exactly these."""

    def __init__(self, windows: torch.Tensor):
        super().__init__(w.unsqueeze(0).clone() for w in windows)
        self.served: list[torch.Tensor] = []

    def __iter__(self):
        for item in super().__iter__():
            self.served.append(item)
            yield item


def check_served(served: list[torch.Tensor], calib: torch.Tensor) -> dict[str, Any]:
    """What auto-round consumed, against our windows: count, shapes, and whether the values match."""
    same = len(served) == calib.shape[0] and all(
        isinstance(s, torch.Tensor) and s.shape == (1, calib.shape[1]) and torch.equal(s[0].cpu(), c)
        for s, c in zip(served, calib))
    return {"served": len(served), "shapes": sorted({tuple(s.shape) for s in served if isinstance(s, torch.Tensor)}),
            "identical_to_ours": same}


def qdq_levels(model: torch.nn.Module, group_size: int, max_groups: int = 256) -> dict[str, int]:
    """Most distinct values in one weight group of each quantized-looking linear (a fake-quantized
    b-bit group has at most 2**b): a check that the model holds quantize-dequantized weights."""
    worst: dict[str, int] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "lm_head" in name:
            continue
        w = mod.weight.detach().float()
        cols = w.shape[1] - w.shape[1] % group_size  # full groups only
        g = w[:, :cols].reshape(w.shape[0], -1, group_size).reshape(-1, group_size)[:max_groups]
        worst[name] = max(int(torch.unique(row).numel()) for row in g)
    return worst


# ---------------------------------------------------------------------------------- the methods


def run_awqfx(gm, calib: torch.Tensor | None, bits: int, group_size: int, method: str,
              refine: str = "none", **refine_fields: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg = AWQConfig.of(bits=bits, group_size=group_size, method=method, refine=refine,
                       **(refine_fields if refine != "none" else {}))
    t0 = time.perf_counter()
    observed = prepare(gm, cfg)
    if cfg.needs_calibration:
        calibrate(observed, calib, progress=False)
    plan = search(observed, cfg, progress=False)
    qgm = convert(gm, plan)
    return qgm, {"quantize_s": time.perf_counter() - t0, "quantized_weights": len(plan.weights),
                 "config": {k: v for k, v in cfg.flat().items() if not isinstance(v, tuple)}}


def run_autoround(model_dir: Path, calib: torch.Tensor, bits: int, group_size: int, iters: int,
                  bf16: bool, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    try:
        from auto_round import AutoRound
    except ImportError:
        raise SystemExit(PEERS_HINT.format(python=sys.executable)) from None
    model, tok = assets.load_model(model_dir, torch.float32)
    data = ServedWindows(calib)
    n, seq_len = calib.shape
    log.info("auto-round: %d calibration windows of shape %s (the awqfx windows), iters=%d", n, (1, seq_len), iters)
    t0 = time.perf_counter()
    ar = AutoRound(model, tok, bits=bits, group_size=group_size, sym=False, iters=iters, nsamples=n,
                   seqlen=seq_len, dataset=data, batch_size=min(8, n), device_map="cpu", amp=bf16,
                   low_cpu_mem_usage=False, seed=seed)
    compile_on = getattr(ar, "enable_torch_compile", None)
    qmodel, layer_config = ar.quantize()
    seconds = time.perf_counter() - t0
    served = check_served(data.served, calib)
    log.info("auto-round consumed %d windows, shapes %s, identical to ours: %s",
             served["served"], served["shapes"], served["identical_to_ours"])
    if served["served"] == 0 and iters == 0:
        served["note"] = "iters=0: auto-round's zero-shot RTN path reads no calibration data"
    elif not served["identical_to_ours"]:
        raise RuntimeError(f"auto-round did not calibrate on exactly our windows: {served}")
    quantized = sorted(k for k, v in layer_config.items() if isinstance(v, dict) and (v.get("bits") or 16) < 16)
    ragged_names = sorted(k for k in quantized
                          if isinstance(layer_config[k].get("group_size"), int) and layer_config[k]["group_size"] > 0
                          and qmodel.get_submodule(k).weight.shape[1] % layer_config[k]["group_size"])
    qmodel = qmodel.to(torch.float32).eval()
    levels = qdq_levels(qmodel, group_size)
    qlinears = {k: v for k, v in levels.items() if k in quantized}
    info = {"quantize_s": seconds, "quantized_weights": len(quantized), "calibration": served,
            "ragged_layers": len(ragged_names), "ragged_examples": ragged_names[:3],
            "max_levels_per_group": max(qlinears.values()) if qlinears else None,
            "tuning_dtype": "bfloat16" if bf16 else "float32", "torch_compile": compile_on,
            "group_sizes": sorted({str(layer_config[k].get("group_size")) for k in quantized})}
    if info["max_levels_per_group"] is not None and info["max_levels_per_group"] > 2 ** bits:
        raise RuntimeError(f"auto-round's model does not hold {bits}-bit fake-quantized weights "
                           f"({info['max_levels_per_group']} distinct values in a group)")
    return qmodel, info


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib", default=None, help="calibration source, passed to assets.calibration_samples "
                                                  "(a name or a path; default: awqfx's default source)")
    p.add_argument("--text", default=None, help="eval text: a file, or a name for assets.named_eval_text "
                                                "(default: the held-out plays, assets.eval_text())")
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--iters", type=int, default=200, help="auto-round iterations (default 200, its own default; on the "
                                                         "shared 2-core CPU 200 would take 3-4 h, docs/results.md uses 50)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"subset of {','.join(METHODS)} (default {DEFAULT_METHODS})")
    p.add_argument("--autoround-bf16", action="store_true",
                   help="tune auto-round in bf16 (amp=True, its CPU default) instead of float32")
    p.add_argument("--seed", type=int, default=42, help="auto-round's seed (default 42, its own)")
    p.add_argument("--refine-iters", type=int, default=None, help="awqfx+block: steps per block (default awqfx's)")
    p.add_argument("--refine-batch", type=int, default=None, help="awqfx+block: sequences per step (default awqfx's)")
    p.add_argument("--json", default=None, help="write the result here")
    return p


def add_recovery(rows: list[dict[str, Any]]) -> None:
    """Set each quantized row's ``recovery`` from the fp and rtn rows (where both were measured)."""
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    rtn = next((r["ppl"] for r in rows if r["method"] == "rtn"), None)
    for r in rows:
        if r["method"] not in ("fp", "rtn") and r.get("ppl") is not None:
            r["recovery"] = recovery(fp, rtn, r["ppl"])


def write_json(path: str | None, res: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=2, default=str))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method of ``args.methods`` in order; the JSON (``args.json``) is rewritten after each
    one (``"complete": false`` until the last), so a long run that is stopped keeps what it measured."""
    methods = parse_methods(args.methods)
    text, text_label = resolve_text(args.text)
    model_dir = assets.resolve_model_dir(args.model)
    model, tok = assets.load_model(model_dir, torch.float32)
    wins = windows_for_eval(tok, text, args.seq_len, max_windows=args.max_windows)
    calib = assets.calibration_samples(tok, args.samples, args.seq_len, source=args.calib)
    log.info("eval windows %s from %s; calibration windows %s", tuple(wins.shape), text_label, tuple(calib.shape))
    t0 = time.perf_counter()
    gm = capture(model)
    capture_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    res = {"bits": args.bits, "group_size": args.group_size, "sym": False,
           "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                           "source": calib_label(args.calib)},
           "eval": {"windows": int(wins.shape[0]), "seq_len": int(wins.shape[1]), "text": text_label},
           "iters": args.iters, "methods": methods, "capture_s": capture_s, "threads": torch.get_num_threads(),
           "versions": versions(), "argv": sys.argv[1:], "complete": False, "rows": rows}

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        add_recovery(rows)
        write_json(args.json, res)

    def score(method: str, net, info: dict[str, Any], note: str = "") -> None:
        t = time.perf_counter()
        ppl = perplexity(net, wins, progress=False)
        row = {"method": method, "ppl": ppl, **info, "eval_s": time.perf_counter() - t}
        if note:
            row["note"] = note
        print(f"{method}: ppl {ppl:.3f}" + ("" if info.get("quantize_s") is None
                                             else f", quantize {info['quantize_s']:.1f} s"), flush=True)
        done(row)

    for m in methods:
        if m == "fp":
            score(m, gm, {"quantize_s": None})
        elif m == "rtn" or m.startswith("awqfx"):
            method, _, refine = ("rtn", "", "none") if m == "rtn" else ("awq", *m.partition("+")[1:])
            qgm, info = run_awqfx(gm, calib, args.bits, args.group_size, method, refine or "none",
                                  refine_iters=args.refine_iters, refine_batch=args.refine_batch,
                                  refine_samples=args.samples)  # every window, as auto-round
            info["quantize_s"] += capture_s
            info["capture_s"] = capture_s
            score(m, qgm, info)
            del qgm
        else:
            iters = 0 if m == "autoround-rtn" else args.iters
            qmodel, info = run_autoround(model_dir, calib, args.bits, args.group_size, iters,
                                         args.autoround_bf16, args.seed)
            note = f"{iters} iters, {info['tuning_dtype']}"
            if info["ragged_layers"]:
                note += f", {info['ragged_layers']} layers with a ragged last group (zero-padded)"
            score(m, capture(qmodel), info, note)
            del qmodel
    res["complete"] = True
    write_json(args.json, res)
    return res


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    res = run(args)
    v = res["versions"]
    print(f"\nw{res['bits']} g{res['group_size']} asymmetric; calibration {res['calibration']['samples']} x "
          f"{res['calibration']['seq_len']} tokens ({res['calibration']['source']}); perplexity on "
          f"{res['eval']['windows']} x {res['eval']['seq_len']} tokens of {res['eval']['text']}; "
          f"torch {v['torch']}, transformers {v['transformers']}, auto-round {v['auto-round']}\n")
    print(table(res["rows"]))
    if args.json:
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
