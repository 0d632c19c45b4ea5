"""Benchmark: held-out perplexity of an AWQ-searched GGUF against plain GGUF quantization.

    python benchmarks/gguf_quality.py [--model MODEL] [--types q4_0,q4_1] [--samples 128] [--seq-len 512]
        [--calib plays] [--n-grid 20] [--eval-windows 16] [--device cpu|cuda] [--out DIR] [--json FILE]

On MODEL (default: the bundled SmolLM2-135M-Instruct, a Q4_1 GGUF dequantized to float32: the "fp"
weights; or a llama Hugging Face directory / .gguf), for each GGUF type:

* plain: ``awqfx quantize --format gguf --gguf-type T --method rtn`` (run in-process, as every row), the ``gguf`` package's own
  quantization of the unsmoothed weights (``gguf.quants.quantize``, what llama.cpp's converter
  writes), with the same Q8_0 token embedding and F32 norms;
* awq: ``awqfx quantize --format gguf --gguf-type T`` with the default search (scales, clip with
  the type's quantizer), ``--samples`` x ``--seq-len`` calibration tokens from ``--calib`` (default ``plays``, the
  calibration plays, as the numbers in docs/results.md; ``mix`` is awqfx's default since issue #16).

Both files are loaded back by transformers (``from_pretrained(dir, gguf_file="model.gguf")``,
dequantized to float32) and evaluated on ``--eval-windows`` x ``--seq-len`` windows of the held-out
plays (never used for calibration), as ``awqfx quantize --eval`` does. Printed: perplexity of fp,
plain and awq per type, the share of plain's gap to fp that AWQ recovers, file sizes and times.

Caveat of the default model: its "fp" weights *are* Q4_1 blocks, and the gguf package's Q4_1 of a
dequantized Q4_1 block gives the block back, so plain q4_1 equals fp there (no gap to recover) and
any rescaling (AWQ) can only move away from it; q4_0 and q8_0 are real comparisons, and a float
MODEL makes q4_1 one too.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from awqfx.app import assets
from awqfx.app.cli import main as awqfx_main
from awqfx.app.evaluate import perplexity, windows_for_eval
from awqfx.config import AWQConfig
from awqfx.formats.gguf import GGUF_NAME, load_gguf
from awqfx.gguf_blocks import GGUF_TYPES


def run(args: argparse.Namespace) -> dict:
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise SystemExit(f"--types: unknown {unknown}; choose from {', '.join(GGUF_TYPES)}")
    model, tok = assets.load_model(args.model, dtype=torch.float32)
    wins = windows_for_eval(tok, assets.eval_text(), args.seq_len, max_windows=args.eval_windows)
    t0 = time.perf_counter()
    fp = perplexity(model, wins, progress=False)
    rows = [{"type": "fp", "method": "fp", "ppl": fp, "eval_s": time.perf_counter() - t0}]
    print(f"fp ({args.model or assets.DEFAULT_GGUF_NAME}, float32): {fp:.3f}  [{wins.shape[0]} x {wins.shape[1]} "
          "tokens]", flush=True)
    del model
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="awqfx-gguf-quality-"))
    for type_name in types:
        for method, label in (("rtn", "plain"), ("awq", "awq")):
            out = root / f"{type_name}-{label}"
            argv = ["quantize", *([args.model] if args.model else []), "--out", str(out), "--overwrite", "--quiet",
                    "--format", "gguf", "--gguf-type", type_name, "--method", method, "--samples", str(args.samples),
                    "--seq-len", str(args.seq_len), "--n-grid", str(args.n_grid), "--calib", args.calib]
            argv += ["--device", args.device] if args.device else []
            t0 = time.perf_counter()
            if awqfx_main(argv) != 0:
                raise SystemExit(f"awqfx {' '.join(argv)} failed")
            q_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ppl = perplexity(load_gguf(out), wins, progress=False)
            row = {"type": type_name, "method": label, "ppl": ppl, "quantize_s": q_s,
                   "eval_s": time.perf_counter() - t0, "file_bytes": (out / GGUF_NAME).stat().st_size}
            rows.append(row)
            print(f"{type_name} {label:5s}: ppl {ppl:.3f}  ({row['file_bytes'] / 2**20:.1f} MiB, "
                  f"quantize {q_s:.0f} s)", flush=True)
    for type_name in types:
        plain = next(r["ppl"] for r in rows if r["type"] == type_name and r["method"] == "plain")
        awq = next(r for r in rows if r["type"] == type_name and r["method"] == "awq")
        no_gap = abs(plain - fp) <= 1e-3 * fp  # e.g. q4_1 of the bundled Q4_1 model: plain reproduces fp
        awq["gap_recovered"] = float("nan") if no_gap else (plain - awq["ppl"]) / (plain - fp)
    return {"model": args.model or assets.DEFAULT_GGUF_NAME, "samples": args.samples, "calib": args.calib,
            "seq_len": args.seq_len,
            "n_grid": args.n_grid, "eval_windows": int(wins.shape[0]), "rows": rows, "out": str(root)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="llama HF directory or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--types", default="q4_0,q4_1", help="comma-separated GGUF types (default q4_0,q4_1)")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration / evaluation window (default 512)")
    p.add_argument("--calib", default="plays",
                   help="calibration source: plays (default, as docs/results.md), mix, or a file / directory")
    p.add_argument("--n-grid", type=int, default=AWQConfig().scales.n_grid, help="scale grid points")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows (default 16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="calibration and search device")
    p.add_argument("--out", help="directory for the .gguf outputs (default: a temporary directory, kept)")
    p.add_argument("--json", help="also write the rows as JSON")
    args = p.parse_args()
    res = run(args)
    print(f"\n{'type':6s} {'plain':>8s} {'awq':>8s} {'gap recovered':>14s}   (fp {res['rows'][0]['ppl']:.3f})")
    for r in res["rows"]:
        if r["method"] == "awq":
            plain = next(x["ppl"] for x in res["rows"] if x["type"] == r["type"] and x["method"] == "plain")
            print(f"{r['type']:6s} {plain:8.3f} {r['ppl']:8.3f} {r['gap_recovered']:13.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
