"""Distributed calibration: 2 gloo ranks under torchrun write exactly the tensors of one process;
one failing rank fails the run with its message and leaves no output; the helpers are no-ops
without a process group."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_model_dir

from awqfx import distributed
from awqfx.app.cli import main

HELPER = Path(__file__).with_name("dist_helper.py")
FLAGS = ["--group-size", "32", "--n-grid", "4", "--clip-grid", "4", "--samples", "20", "--seq-len", "16", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp: Path, out: Path, *flags: str, **env) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 tests/dist_helper.py quantize ...`` on the tiny model, one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(HELPER),
           "quantize", str(tmp / "src"), "--out", str(out), "--calib", str(tmp / "calib.txt")] + FLAGS + list(flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWQFX_DIST_TIMEOUT": "120", **env}
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama directory and 20 x 16 tokens of calibration text: 3 batches of 8, 8 and 4 sequences."""
    tmp = tmp_path_factory.mktemp("dist")
    save_model_dir(tmp / "src", "llama")
    (tmp / "calib.txt").write_text("".join(chr(32 + (i * 7919) % 95) for i in range(2000)))
    return tmp


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {f"{p.relative_to(out)}:{k}": v for p in sorted(out.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_two_gloo_ranks_write_the_tensors_of_one_process(tiny, one_thread):
    run = _torchrun(tiny, tiny / "two", AWQFX_TEST_TRACE=str(tiny))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("awqfx quantize: done") == 1  # rank 0's summary only
    assert "awqfx (rank" not in run.stderr
    # the reference: one process, one thread (as each torchrun rank), the same data
    assert main(["quantize", str(tiny / "src"), "--out", str(tiny / "one"), "--calib", str(tiny / "calib.txt")] + FLAGS) == 0
    one, two = _tensors(tiny / "one"), _tensors(tiny / "two")
    assert one.keys() == two.keys() and any(k.endswith(".qweight") for k in one)
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
    plans = [json.loads((tiny / d / "awq_plan" / "plan.json").read_text()) for d in ("one", "two")]
    assert [g["info"]["losses"] for g in plans[0]["groups"]] == [g["info"]["losses"] for g in plans[1]["groups"]]
    assert plans[1]["metadata"]["calibration"] == {"batches": 3, "sequences": 20, "tokens": 320}
    # each rank did its share: calibration batches 0-1 | 2, and part of the candidates and clip searches
    ranks = [json.loads((tiny / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [t["_record_sample"] for t in ranks] == [1, 2]  # batches of the other rank: loss sample only
    assert all(t["candidate_weight"] > 0 and t["search_clip"] > 0 for t in ranks)


def test_two_gloo_ranks_block_by_block_write_the_tensors_of_one_process(tiny, one_thread):
    trace = tiny / "seq-trace"
    trace.mkdir()
    run = _torchrun(tiny, tiny / "two-seq", "--mode", "sequential", AWQFX_TEST_TRACE=str(trace))
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["quantize", str(tiny / "src"), "--out", str(tiny / "one-seq"), "--calib", str(tiny / "calib.txt"),
                 "--mode", "sequential"] + FLAGS) == 0
    one, two = _tensors(tiny / "one-seq"), _tensors(tiny / "two-seq")
    assert one.keys() == two.keys() and any(k.endswith(".qweight") for k in one)
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
    # the embeddings and the first layer feed the next block: rank 0 runs them on batches 0-1 (its
    # share), rank 1 on batch 2 (its share) and batch 0 (the loss sample); one process runs all 3
    ranks = [json.loads((trace / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [t["after_block"] for t in ranks] == [4, 4]


def test_a_failing_rank_fails_the_run_with_its_message_and_no_output(tiny):
    out = tiny / "failed"
    run = _torchrun(tiny, out, AWQFX_TEST_FAIL_RANK="1")
    assert run.returncode != 0
    assert "awqfx (rank 1 of 2): RuntimeError: injected failure for the test" in run.stderr
    frames = [line for line in run.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "awqfx" in f]  # one paragraph per rank, no traceback (torchrun prints its own)
    assert not out.exists()
    assert "awqfx quantize: done" not in run.stdout


def test_without_a_process_group_everything_is_local(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main(), distributed.tag()) == (1, 0, True, "")
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t and distributed.all_gather(t)[0] is t and distributed.broadcast(t, 0) is t
    parts = [torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)]
    assert distributed.sum_in_order(parts, torch.tensor([0.3], dtype=torch.float64)).item() == (0.3 + 0.1) + 0.2
    assert distributed.sum_in_order([]) is None
    with distributed.launched() as dist_run:
        assert not dist_run


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_are_contiguous_and_cover_every_item(monkeypatch, world):
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for n in range(12):
        shares = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            shares.append(distributed.shard(n))
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_only_quantize_runs_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["inspect", "/nonexistent"]) == 2
    assert "only 'awqfx quantize' runs on several processes" in capsys.readouterr().err
