"""benchmarks/peers.py (awqfx against auto-round, #16): its helpers, without auto-round or a model."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_methods_are_checked(peers):
    assert peers.parse_methods("fp, rtn,awqfx,fp") == ["fp", "rtn", "awqfx"]
    assert set(peers.parse_methods(peers.DEFAULT_METHODS)) <= set(peers.METHODS)
    for bad in ("", "fp,awq", "autoround,gptq"):
        with pytest.raises(SystemExit, match="--methods"):
            peers.parse_methods(bad)


def test_recovery_is_the_share_of_rtns_gap(peers):
    assert peers.recovery(40.0, 50.0, 42.5) == pytest.approx(0.75)
    assert peers.recovery(40.0, 50.0, 50.0) == 0.0
    assert peers.recovery(40.0, 50.0, 55.0) == pytest.approx(-0.5)  # worse than RTN
    assert peers.recovery(None, 50.0, 42.0) is None and peers.recovery(40.0, None, 42.0) is None
    assert peers.recovery(40.0, 40.0, 42.0) is None  # no gap
    assert peers.recovery(40.0, 50.0, math.nan) is None


def test_rows_get_recovery_and_a_table(peers):
    rows = [{"method": "fp", "ppl": 40.0, "quantize_s": None}, {"method": "rtn", "ppl": 50.0, "quantize_s": 1.0},
            {"method": "awqfx", "ppl": 42.5, "quantize_s": 12.25},
            {"method": "autoround", "ppl": 45.0, "quantize_s": 300.0, "note": "200 iters, float32"},
            {"method": "awqfx+gptq", "ppl": None, "note": "skipped: ..."}]
    peers.add_recovery(rows)
    assert [r.get("recovery") for r in rows] == [None, None, pytest.approx(0.75), pytest.approx(0.5), None]
    lines = peers.table(rows).splitlines()
    assert lines[0].startswith("| method | perplexity | recovery")
    assert lines[4] == "| awqfx | 42.500 | 75.0 % | 12.2 |  |"
    assert lines[5] == "| autoround | 45.000 | 50.0 % | 300.0 | 200 iters, float32 |"
    assert lines[6] == "| awqfx+gptq | skipped |  |  | skipped: ... |"


def test_served_windows_record_what_autoround_reads(peers):
    calib = torch.arange(12).view(3, 4)
    data = peers.ServedWindows(calib)
    assert isinstance(data, list) and len(data) == 3 and data[0].shape == (1, 4)
    assert peers.check_served(data.served, calib)["served"] == 0
    consumed = [x for x in data]  # what auto-round's calibration loop does
    assert len(consumed) == 3
    ok = peers.check_served(data.served, calib)
    assert ok == {"served": 3, "shapes": [(1, 4)], "identical_to_ours": True}
    assert not peers.check_served(data.served[:2], calib)["identical_to_ours"]
    assert not peers.check_served(data.served, calib.flip(0))["identical_to_ours"]


def test_qdq_levels_counts_values_per_group(peers):
    lin = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1, 2, 3, 0, 0, 0, 0], [5, 5, 5, 5, 1, 2, 3, 4.5]]))
    model = torch.nn.Sequential()
    model.add_module("proj", lin)
    model.add_module("lm_head", torch.nn.Linear(8, 2))  # never counted
    assert peers.qdq_levels(model, 4) == {"proj": 4}
    assert peers.qdq_levels(model, 3) == {"proj": 3}  # full groups only: columns 0..5


def test_text_by_name_or_file(peers, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert peers.resolve_text(str(f)) == ("hello", str(f))
    with pytest.raises(SystemExit, match="--text"):
        peers.resolve_text(str(tmp_path / "missing.txt"))


def test_autoround_missing_says_how_to_get_it(peers, monkeypatch):
    monkeypatch.setitem(sys.modules, "auto_round", None)  # import fails as where it is not installed
    with pytest.raises(SystemExit, match="peers-env.sh"):
        peers.run_autoround(Path("unused"), torch.zeros(1, 4, dtype=torch.long), 4, 64, 0, False, 42)


def test_flags(peers):
    a = peers.build_parser().parse_args([])
    assert (a.bits, a.group_size, a.samples, a.seq_len, a.max_windows, a.iters) == (4, 64, 8, 512, 16, 200)
    assert a.calib is None and a.text is None and not a.autoround_bf16
