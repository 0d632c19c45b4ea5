"""Benchmark: each quality change of issue #16 alone and together, on texts of several domains.

    python benchmarks/quality.py [--model MODEL] [--bits 4] [--group-size 64[,128...]] [--calib plays,mix]
        [--configs rtn,gptq,awq,awq-clip,clip,awq+gptq,awq+block,awq+guard,awq+guard+block]
        [--texts plays,prose,licenses] [--samples 64] [--grid-stride 4] [--seq-len 512] [--max-windows 16]
        [--refine-iters N] [--refine-batch N] [--refine-samples N] [--guard-samples N] [--json FILE]

For each calibration source (``--calib``: ``plays``, the old default; ``mix``, the default since
#16; or a path) the model is captured and calibrated once, then each config is searched on those
statistics and evaluated on ``--max-windows`` x ``--seq-len`` windows of every text (``--texts``:
names of ``awqfx.app.assets.named_eval_text`` or paths), at every group size of ``--group-size``
(one calibration serves them all: the statistics do not depend on it). Configs: ``rtn`` (round to
nearest, the baseline, no calibration), ``gptq`` (GPTQ rounding on RTN's grid), ``awq`` (the
default search), ``awq-clip`` (the scale search alone), ``clip`` (the clip search alone),
``awq+gptq`` (``--refine gptq``), ``awq+block`` (``--refine block``), ``awq+guard``
(``--guard-samples``, the per-group guard) and ``awq+guard+block``. Printed: perplexity per
(calibration, group size, config, text), the share of RTN's gap to fp (at the same group size) each
config recovers on each text, and the quantization time (calibration once per source, then the
search).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from awqfx.api import calibrate, capture, convert, prepare, search
from awqfx.app import assets
from awqfx.app.evaluate import perplexity, windows_for_eval
from awqfx.config import AWQConfig
from awqfx.search.driver import gap_recovered

CONFIGS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "awq": {"method": "awq"},
    "awq-clip": {"method": "awq", "clip": "none"},
    "clip": {"method": "awq", "no_scales": True},
    "awq+gptq": {"method": "awq", "refine": "gptq"},
    "awq+block": {"method": "awq", "refine": "block"},
    "awq+guard": {"method": "awq", "guard": True},
    "awq+guard+block": {"method": "awq", "refine": "block", "guard": True},
}


def _config(name: str, group_size: int, args: argparse.Namespace) -> AWQConfig:
    kw = dict(CONFIGS[name])
    if kw.pop("guard", False):
        kw["guard_samples"] = args.guard_samples
    if "block" in name:
        kw.update(refine_iters=args.refine_iters, refine_batch=args.refine_batch, refine_samples=args.refine_samples)
    no_scales = kw.pop("no_scales", False)
    if kw["method"] == "awq":
        kw["grid_stride"] = args.grid_stride
    cfg = AWQConfig.of(bits=args.bits, group_size=group_size, **kw)
    return dataclasses.replace(cfg, scales=None) if no_scales else cfg


def _text(name: str) -> str:
    return Path(name).read_text(encoding="utf-8") if Path(name).is_file() else assets.named_eval_text(name)


def run(args: argparse.Namespace) -> dict:
    model, tok = assets.load_model(args.model, dtype=torch.float32)
    gm = capture(model)
    texts = [t.strip() for t in args.texts.split(",") if t.strip()]
    wins = {t: windows_for_eval(tok, _text(t), args.seq_len, max_windows=args.max_windows) for t in texts}
    fp = {t: perplexity(gm, w, progress=False) for t, w in wins.items()}
    print("fp: " + ", ".join(f"{t} {v:.3f}" for t, v in fp.items()), flush=True)
    rows = []
    rtn_ppl: dict[int, dict[str, float]] = {}  # by group size
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    configs = {(g, name): _config(name, g, args) for g in args.group_sizes for name in names}
    guard = max(c.guard_samples for c in configs.values())  # recorded once, for every config
    taught = max(c.refine_samples for c in configs.values())
    for calib in [c.strip() for c in args.calib.split(",") if c.strip()]:
        observed, calib_s = None, 0.0
        for (group, name), cfg in configs.items():
            if name == "rtn" and group in rtn_ppl:
                continue  # no calibration: the same model for every source
            t0 = time.perf_counter()
            if observed is None and cfg.needs_calibration:
                observed = prepare(gm, cfg.with_(method="awq", guard_samples=guard, refine="block" if taught else "none",
                                                 refine_samples=taught or None))
                calibrate(observed, assets.calibration_samples(tok, args.samples, args.seq_len, source=calib),
                          progress=False)
                calib_s = time.perf_counter() - t0
                t0 = time.perf_counter()
            plan = search(observed if cfg.needs_calibration else prepare(gm, cfg), cfg, progress=False)
            search_s = time.perf_counter() - t0
            qgm = convert(gm, plan)
            ppl = {t: perplexity(qgm, w, progress=False) for t, w in wins.items()}
            checked = [r for r in plan.group_gains() if r["held_gain"] is not None]
            del qgm, plan
            if name == "rtn":
                rtn_ppl[group] = ppl
            row = {"calib": "-" if name == "rtn" else calib, "group_size": group, "config": name, "ppl": ppl,
                   "calib_s": calib_s if cfg.needs_calibration else 0.0, "search_s": search_s}
            if cfg.guard_samples:
                row["guard"] = {"checked": len(checked), "rejected": [r["name"] for r in checked if r["rejected"]],
                                "held_gains": [r["held_gain"] for r in checked]}
                kept = sorted(r["held_gain"] for r in checked if not r["rejected"])
                msg = (f"  guard: {len(checked)} scaled groups checked, {len(row['guard']['rejected'])} left unscaled "
                       f"{row['guard']['rejected']}")
                if kept:
                    msg += f"; held-out gain of the kept: min {kept[0]:.1%}, median {kept[len(kept) // 2]:.1%}"
                print(msg, flush=True)
            if group in rtn_ppl and name != "rtn":
                row["recovery"] = {t: gap_recovered(fp[t], rtn_ppl[group][t], ppl[t]) for t in texts}
            rows.append(row)
            rec = row.get("recovery", {})
            print(f"{row['calib']:>6} g{group:<4} {name:<9} " + "  ".join(
                f"{t} {ppl[t]:.3f}" + (f" ({rec[t]:.1%})" if t in rec else "") for t in texts)
                + f"  [search {search_s:.0f} s]", flush=True)
    return {"bits": args.bits, "group_sizes": args.group_sizes, "samples": args.samples, "seq_len": args.seq_len,
            "windows": {t: int(w.shape[0]) for t, w in wins.items()}, "fp": fp, "rows": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(res: dict) -> str:
    texts = list(res["fp"])
    head = "| calibration | group | config | " + " | ".join(f"{t} ppl (recovery)" for t in texts) + " | search s |"
    lines = [head, "|" + "---|" * (len(texts) + 4),
             "| - | - | fp | " + " | ".join(f"{res['fp'][t]:.3f}" for t in texts) + " | |"]
    for r in res["rows"]:
        rec = r.get("recovery", {})
        cells = [f"{r['ppl'][t]:.3f}" + (f" ({rec[t]:.1%})" if t in rec else "") for t in texts]
        lines.append(f"| {r['calib']} | {r['group_size']} | {r['config']} | " + " | ".join(cells)
                     + f" | {r['search_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", default="64", help="group size, or several, comma-separated (default 64)")
    p.add_argument("--calib", default="plays,mix")
    p.add_argument("--configs", default="rtn,gptq,awq,awq+gptq")
    p.add_argument("--texts", default="plays,prose,licenses")
    p.add_argument("--samples", type=int, default=assets.DEFAULT_SAMPLES,
                   help=f"calibration sequences (default {assets.DEFAULT_SAMPLES}, awqfx's)")
    stride = AWQConfig().scales.grid_stride
    p.add_argument("--grid-stride", type=int, default=stride,
                   help=f"the scale search's grid stride (default {stride}, awqfx's; 1: the whole grid)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--refine-iters", type=int, default=None, help="awq+block: steps per block (default awqfx's)")
    p.add_argument("--refine-batch", type=int, default=None, help="awq+block: sequences per step (default awqfx's)")
    p.add_argument("--refine-samples", type=int, default=None,
                   help="awq+block: calibration sequences it learns on (default awqfx's)")
    p.add_argument("--guard-samples", type=int, default=4,
                   help="awq+guard: calibration sequences held back for the per-group guard (default 4)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    unknown = [c for c in args.configs.split(",") if c.strip() and c.strip() not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    try:
        args.group_sizes = [int(g) for g in args.group_size.split(",") if g.strip()]
    except ValueError:
        raise SystemExit(f"--group-size: integers separated by commas, got {args.group_size!r}") from None
    res = run(args)
    print("\n" + table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
