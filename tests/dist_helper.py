"""``python tests/dist_helper.py quantize ...``: the awqfx CLI, instrumented for tests/test_distributed.py.

``AWQFX_TEST_FAIL_RANK=R``: rank R raises in its first clip search (the other rank is then waiting
for it in the search's next exchange). ``AWQFX_TEST_TRACE=DIR``: each rank writes
``DIR/rank<R>.json``, how often it ran a few functions that show its share of the work.
"""
import atexit
import importlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from awqfx.app.cli import main

RANK = os.environ.get("RANK")
calibrate = importlib.import_module("awqfx.calibrate")
driver = importlib.import_module("awqfx.search.driver")
scales = importlib.import_module("awqfx.search.scales")
sequential = importlib.import_module("awqfx.sequential")


def _injected_failure(*args, **kwargs):
    raise RuntimeError("injected failure for the test")


def _count_calls(counts: Counter, module, name: str) -> None:
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] += 1
        return real(*args, **kwargs)

    setattr(module, name, counted)


if os.environ.get("AWQFX_TEST_FAIL_RANK") == RANK:
    driver.search_clip = _injected_failure

if os.environ.get("AWQFX_TEST_TRACE"):
    calls = Counter()
    for mod, fn in [(calibrate, "_record_sample"), (driver, "search_clip"), (scales, "candidate_weight"),
                    (sequential, "after_block")]:
        _count_calls(calls, mod, fn)
    atexit.register(lambda: (Path(os.environ["AWQFX_TEST_TRACE"]) / f"rank{RANK}.json").write_text(json.dumps(calls)))

if __name__ == "__main__":
    sys.exit(main())
