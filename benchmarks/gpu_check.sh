#!/usr/bin/env bash
# GPU check for one machine with an H100/H200-class GPU (about 8 minutes with 16 cores):
#   a) the CUDA tests (pytest -k cuda; must pass, not skip)
#   b) quantize the bundled SmolLM2-135M on CUDA and on CPU with the same small calibration; the
#      perplexities after quantization must agree within PPL_TOL (the CPU run overlaps a and the CUDA run)
#   c) benchmarks/big_model.py --shape tinyllama-1.1b (sequential mode) with --device cuda
#   d) awqfx bench --device cuda
# then prints one table of the numbers (also in $OUT/summary.txt).
#
#   bash benchmarks/gpu_check.sh
#
# Needs the repository's .venv (bash scripts/setup.sh) or PY. Each step's output goes to $OUT/<step>.log.
# Exit status: 0 every check passed, 1 a check failed, 2 torch sees no CUDA device (for example the
# CPU-only torch wheel is installed: then nothing else runs).
# Environment (all optional):
#   PY        the Python with awqfx installed (default .venv/bin/python)
#   MODEL     model of steps b and d (default: the bundled SmolLM2-135M; any HF model directory, e.g. one
#             written by `benchmarks/big_model.py --shape tiny --write-only --dir DIR`)
#   OUT       log and result folder (default /tmp/gpu_check)
#   PPL_TOL   largest relative difference of the perplexities after quantization (default 0.01)
#   PPL_ARGS  awqfx quantize flags of step b
#             (default: --samples 32 --seq-len 512 --group-size 64 --eval - --eval-windows 16 --compute-dtype float32)
#   BIG_ARGS  big_model.py flags of step c before its `--` (default: --extrapolate)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
MODEL=${MODEL:-}
OUT=${OUT:-/tmp/gpu_check}
PPL_TOL=${PPL_TOL:-0.01}
PPL_ARGS=${PPL_ARGS:---samples 32 --seq-len 512 --group-size 64 --eval - --eval-windows 16 --compute-dtype float32}
BIG_ARGS=${BIG_ARGS:---extrapolate}
mkdir -p "$OUT"
if ! "$PY" -c 'import awqfx' 2>/dev/null; then
    echo "gpu_check: $PY cannot import awqfx; run scripts/setup.sh or set PY" >&2
    exit 2
fi
rm -f "$OUT"/status.tsv "$OUT"/*.log "$OUT"/*.json
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T_START=$SECONDS

# step NAME LIMIT_S CMD...: run CMD with its output in $OUT/NAME.log; record "NAME rc seconds" in status.tsv
step() {
    local name=$1 limit=$2 t0=$SECONDS rc cmd
    shift 2
    cmd="$*"
    cmd=${cmd//$'\n'/ }
    echo "[$(date +%T)] $name: ${cmd:0:160}"
    { echo "\$ $*"; timeout "$limit" "$@"; } >"$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/status.tsv"
    [ "$rc" -eq 0 ] || echo "    $name failed (exit $rc); see $OUT/$name.log"
    return "$rc"
}

summary() {
    "$PY" - "$OUT" "$PPL_TOL" "$((SECONDS - T_START))" <<'EOF' | tee "$OUT/summary.txt"
import json, re, sys
from pathlib import Path

out, tol, total = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
status = {}
for line in (out / "status.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    status[name] = (int(rc), int(secs))
log = lambda name: (out / f"{name}.log").read_text(errors="replace") if (out / f"{name}.log").is_file() else ""
def js(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
def ppl(name, which):
    m = re.search(rf"perplexity {which}\s+([0-9.]+)", log(name))
    return float(m.group(1)) if m else None

rows, failed = [], False
def row(step, ok, detail):
    global failed
    failed |= not ok
    rc, secs = status.get(step, (None, 0))
    rows.append((step, "ok" if ok else "FAIL", f"{secs} s", detail))

rc, _ = status.get("env", (1, 0))
row("env", rc == 0, log("env").strip().splitlines()[-1] if log("env").strip() else "no output")
if "convert" in status:
    row("convert", status["convert"][0] == 0, "bundled SmolLM2 GGUF -> HF checkpoint (once, cached)")
if "tests" in status:
    summ = [l for l in log("tests").splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
    line = summ[-1].strip("= ") if summ else "no pytest summary"
    row("tests", status["tests"][0] == 0 and "passed" in line and "skipped" not in line, f"pytest -k cuda: {line}")
if "ppl_cuda" in status or "ppl_cpu" in status:
    a, b = ppl("ppl_cuda", "after"), ppl("ppl_cpu", "after")
    fa, fb = ppl("ppl_cuda", "before"), ppl("ppl_cpu", "before")
    for name, v, f in (("ppl_cuda", a, fa), ("ppl_cpu", b, fb)):
        row(name, status.get(name, (1, 0))[0] == 0 and v is not None, f"perplexity {f} -> {v} after quantization")
    ok = a is not None and b is not None and abs(a - b) / b <= tol
    rel = f"{abs(a - b) / b:.3%}" if a is not None and b is not None else "n/a"
    rows.append(("ppl_agree", "ok" if ok else "FAIL", "", f"CUDA vs CPU after quantization: {rel} (limit {tol:.1%}); "
                 f"before: {fa} vs {fb}"))
    failed |= not ok
if "big_model" in status:
    r = js("big_model.json") or {}
    blk, ext = r.get("block_seconds", {}), r.get("extrapolate_128x512", {})
    detail = [f"{r.get('shape')} {r.get('mode')} on {r.get('device')}: checkpoint {r.get('checkpoint_bytes', 0) / 1e9:.2f} GB",
              f"peak RSS {r.get('peak_rss_mb', 0):,.0f} MB ({r.get('peak_rss_over_checkpoint', 0):.2f} x checkpoint)",
              f"wall {r.get('wall_seconds', 0):.1f} s, output {r.get('output_bytes', 0) / 1e9:.2f} GB"]
    if blk:
        detail += [f"block s first/median/last/max {blk['first']:.2f}/{blk['median']:.2f}/{blk['last']:.2f}/{blk['max']:.2f}, "
                   f"{blk['flat']}", f"{r.get('gflops_per_s', 0):,.0f} forward-equivalent GFLOP/s per block"]
    if ext:
        detail.append(f"ESTIMATE 128 x 512: {ext['device_seconds']:,.0f} s on this device")
    row("big_model", status["big_model"][0] == 0 and bool(r), detail)
if "bench" in status:
    b = js("bench.json") or {}
    detail = [f"{x['model']}: prefill {x['prefill_tok_s']:,.0f} tok/s, decode {x['decode_tok_s']:,.1f} tok/s "
              f"({x['decode_vs_bf16']:.2f}x bf16), resident {x['resident_bytes'] / 2**20:,.0f} MiB" for x in b.get("rows", [])]
    row("bench", status["bench"][0] == 0 and bool(b), detail or "no JSON")

print(f"\ngpu_check: {'FAILED' if failed else 'all checks passed'} in {total} s (logs in {out})\n")
w = [max(len(str(r[i])) for r in rows) for i in range(3)]
for name, res, secs, detail in rows:
    lines = detail if isinstance(detail, list) else [detail]
    print(f"{name:<{w[0]}}  {res:<{w[1]}}  {secs:>{w[2]}}  {lines[0]}")
    for extra in lines[1:]:
        print(f"{'':<{w[0] + w[1] + w[2] + 6}}{extra}")
sys.exit(1 if failed else 0)
EOF
}

# environment: is there a CUDA device torch can use?
step env 120 "$PY" -c '
import torch
import sys
print(sys.executable, "| torch", torch.__version__, "built with CUDA", torch.version.cuda, "| cpu threads", torch.get_num_threads())
if not torch.cuda.is_available():
    why = ("the CPU-only torch wheel is installed (torch.version.cuda is None)" if torch.version.cuda is None
           else "no CUDA device is visible or the driver does not match")
    print(f"torch.cuda.is_available() is False: {why}")
    raise SystemExit(2)
p = torch.cuda.get_device_properties(0)
print(f"CUDA device: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm{p.major}{p.minor}, torch CUDA {torch.version.cuda}")
'
if [ $? -ne 0 ]; then
    echo
    echo "torch.cuda.is_available() is False on this machine: no CUDA check can run." >&2
    tail -n 2 "$OUT/env.log" >&2
    echo "Install a CUDA build of torch 2.13.0 into .venv (scripts/setup.sh may have installed the CPU-only wheel)." >&2
    command -v nvidia-smi >/dev/null && nvidia-smi >>"$OUT/env.log" 2>&1
    summary
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.log" 2>&1

# the bundled model's one-time GGUF -> HF conversion, before two runs need it at once
[ -n "$MODEL" ] || step convert 300 "$PY" -c 'from awqfx.app.assets import load_model; load_model()'

# b) on CPU, in the background while a) and the CUDA run use the GPU
# shellcheck disable=SC2086
step ppl_cpu 480 "$PY" -m awqfx quantize ${MODEL:+"$MODEL"} --out "$OUT/quant-cpu" --overwrite --device cpu --quiet $PPL_ARGS &
CPU_PID=$!

# a) the CUDA tests
step tests 300 "$PY" -m pytest -q -n 0 -p no:cacheprovider -rA -k cuda tests

# b) on CUDA
# shellcheck disable=SC2086
step ppl_cuda 300 "$PY" -m awqfx quantize ${MODEL:+"$MODEL"} --out "$OUT/quant-cuda" --overwrite --device cuda --quiet $PPL_ARGS
wait "$CPU_PID"

# c) the big-model benchmark, sequential, on CUDA (the machine is quiet again)
# shellcheck disable=SC2086
step big_model 480 "$PY" benchmarks/big_model.py --shape tinyllama-1.1b --json "$OUT/big_model.json" $BIG_ARGS -- --device cuda

# d) size and speed on CUDA
# shellcheck disable=SC2086
step bench 300 "$PY" -m awqfx bench ${MODEL:+"$MODEL"} --device cuda --json "$OUT/bench.json"

summary
