"""Benchmark: llama.cpp's own perplexity and speed on GGUF files (awqfx's and others').

    bash scripts/llama-cpp.sh                      # once: builds llama-perplexity and llama-bench
    python benchmarks/gguf_quality.py --out DIR    # writes DIR/q4_0-plain/model.gguf, DIR/q4_0-awq/...
    python benchmarks/llama_cpp.py [--bin BUILD/bin] [--text plays] [--chunks 16] [--ctx 512]
        [--threads 2] [--prompt 128] [--gen 32] [--json FILE] LABEL=FILE.gguf [LABEL=FILE.gguf ...]

For each file: ``llama-perplexity`` on the first ``--chunks`` x ``--ctx`` tokens of ``--text`` (a name
of ``awqfx.app.assets.named_eval_text``, default the held-out plays, or a path; llama.cpp
tokenizes it and scores the second half of each chunk, so its perplexities are not comparable with
awqfx's own windows, only with each other), and ``llama-bench`` prompt processing of ``--prompt``
tokens and generation of ``--gen`` tokens (tokens/s, mean of its repetitions). Printed: one row per
file, with the perplexity ratio to the first file.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

from awqfx.app import assets

_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def perplexity(bin_dir: Path, model: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> tuple[float, float]:
    out = _run([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(ctx),
                "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx)])
    m = _PPL.search(out)
    if m is None:
        raise SystemExit(f"llama-perplexity printed no final estimate for {model}:\n{out[-2000:]}")
    return float(m.group(1)), float(m.group(2))


def speed(bin_dir: Path, model: Path, prompt: int, gen: int, threads: int) -> dict[str, float]:
    out = _run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(prompt), "-n", str(gen), "-t", str(threads),
                "-o", "json"])
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    return {("prompt" if r["n_prompt"] else "gen"): r["avg_ts"] for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="LABEL=FILE.gguf")
    p.add_argument("--bin", default="/work/llama-cpp/build/bin", help="directory of llama-perplexity and llama-bench")
    p.add_argument("--text", default="plays", help="evaluation text: a name (plays, prose, licenses) or a path")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    files = []
    for spec in args.files:
        label, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"expected LABEL=FILE.gguf with an existing file, got {spec!r}")
        files.append((label, Path(path)))
    bin_dir = Path(args.bin)
    if not (bin_dir / "llama-perplexity").is_file():
        raise SystemExit(f"no llama-perplexity in {bin_dir}: build it with `bash scripts/llama-cpp.sh`")
    named = not Path(args.text).is_file()
    text = assets.named_eval_text(args.text) if named else Path(args.text).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "eval.txt"
        text_file.write_text(text, encoding="utf-8")
        for label, path in files:
            ppl, err = perplexity(bin_dir, path, text_file, args.ctx, args.chunks, args.threads)
            rows.append({"label": label, "file": path.name, "bytes": path.stat().st_size, "ppl": ppl, "ppl_err": err,
                         **speed(bin_dir, path, args.prompt, args.gen, args.threads)})
            print(f"{label}: ppl {ppl:.4f} +/- {err:.4f}", flush=True)
    base = rows[0]["ppl"]
    print(f"\n| file | MiB | llama.cpp ppl ({args.chunks} x {args.ctx}, {args.text}) | vs {rows[0]['label']} "
          f"| prompt {args.prompt} tok/s | gen {args.gen} tok/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.3f} ± {r['ppl_err']:.3f} "
              f"| {r['ppl'] / base:.3f} | {r.get('prompt', float('nan')):.1f} | {r.get('gen', float('nan')):.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
