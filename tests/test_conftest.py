"""The ``slow`` marker does what pyproject says: skipped unless AWQFX_SLOW=1."""
from __future__ import annotations

import pytest
from conftest import pytest_collection_modifyitems


class _Item:
    def __init__(self, *marks: str):
        self.keywords = dict.fromkeys(marks, True)
        self.added = []

    def add_marker(self, mark):
        self.added.append(mark)


@pytest.mark.parametrize("env, skipped", [(None, True), ("0", True), ("1", False)])
def test_slow_marker_skips_unless_awqfx_slow_is_1(monkeypatch, env, skipped):
    if env is None:
        monkeypatch.delenv("AWQFX_SLOW", raising=False)
    else:
        monkeypatch.setenv("AWQFX_SLOW", env)
    slow, plain = _Item("slow"), _Item("real")
    pytest_collection_modifyitems(None, [slow, plain])
    assert [m.mark.name for m in slow.added] == (["skip"] if skipped else [])
    assert plain.added == []
