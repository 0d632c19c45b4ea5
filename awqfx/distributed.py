"""Calibration and search over several processes (``torchrun``): everything awqfx does with torch.distributed.

Without an initialized process group every function here is a no-op (world size 1, rank 0), so
the single-process code paths are unchanged. With one (docs/design.md "Distributed calibration"):

- :mod:`awqfx.calibrate` runs a contiguous share of the calibration batches per rank
  (:func:`shard`) and adds the per-batch statistics of all ranks in batch order on every rank
  (:func:`sum_in_order`);
- the search scores a round-robin share of each group's candidate scales per rank (:func:`owns`)
  and exchanges the losses (:func:`all_reduce_sum` of zero-filled vectors), and searches the clip
  ranges of a share of the weights (:func:`all_gather`, :func:`broadcast`).

Every number a rank contributes is computed exactly as one process computes it and combined
without rounding (a sum with zeros, or additions in the single-process order), so N ranks write
the same tensors as one process running with the same number of threads per process.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankFailure", "world_size", "rank", "is_main", "tag", "requested", "owns", "owner", "shard",
           "all_reduce_sum", "all_gather", "broadcast", "sum_in_order", "init_from_env", "launched"]

TIMEOUT_ENV = "AWQFX_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class RankFailure(RuntimeError):
    """Another rank failed, was stopped or stopped answering during a collective operation."""


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the process group; 1 without one."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """Whether this is rank 0: the one that writes output and prints."""
    return rank() == 0


def tag() -> str:
    """`` (rank R of N)`` for messages in a distributed run, else empty."""
    return f" (rank {rank()} of {world_size()})" if world_size() > 1 else ""


def requested() -> bool:
    """Whether the environment describes a launch of more than one process (``torchrun``'s WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def owner(i: int) -> int:
    """The rank that computes work item ``i`` of a round-robin split."""
    return i % world_size()


def owns(i: int) -> bool:
    """Whether work item ``i`` of a round-robin split is this rank's."""
    return owner(i) == rank()


def shard(n: int) -> range:
    """This rank's contiguous share of ``range(n)``: ranks 0, 1, ... take consecutive slices of sizes
    differing by at most one, which together are ``range(n)``."""
    base, extra = divmod(n, world_size())
    r = rank()
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, fn: Callable, *args, **kwargs):
    """Run one collective call; a peer that failed or went away becomes a :class:`RankFailure`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo and nccl report a lost peer and a timeout as RuntimeError subclasses
        detail = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split()))  # drop the "[file.cc:123]" prefix
        raise RankFailure(f"another rank failed or stopped answering during {what}; see that rank's own error "
                          f"(collectives time out after {_timeout().total_seconds():.0f} s, {TIMEOUT_ENV}): "
                          f"{detail[:200]}") from e


def all_reduce_sum(t: torch.Tensor, what: str = "a reduction") -> torch.Tensor:
    """``t`` summed over the ranks, as a new tensor on ``t``'s device (``t`` itself without a group).

    Exact when, at every position, at most one rank contributes a value and the others zeros."""
    if world_size() == 1:
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    _collective(what, dist.all_reduce, buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather(obj: Any, what: str = "a gather") -> list[Any]:
    """Every rank's ``obj`` (picklable; put tensors on the CPU first), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective(what, dist.all_gather_object, out, obj)
    return out


def broadcast(obj: Any, src: int, what: str = "a broadcast") -> Any:
    """Rank ``src``'s ``obj`` (picklable; put tensors on the CPU first) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    _collective(what, dist.broadcast_object_list, box, src=src)
    return box[0]


def sum_in_order(parts: list[torch.Tensor], start: torch.Tensor | None = None,
                 what: str = "a reduction") -> torch.Tensor | None:
    """``start + p_0 + p_1 + ...`` over the ``parts`` of rank 0, then rank 1, ..., added one at a
    time in that order on every rank: the same additions, so the same bits, as one process adding
    all the parts in order. ``start`` (the same on every rank) may be None; so is the result when
    there is nothing to add."""
    acc = start
    for rank_parts in all_gather([p.cpu() for p in parts] if world_size() > 1 else parts, what):
        for p in rank_parts:
            acc = p if acc is None else acc + p.to(acc.device)
    return acc


def _timeout() -> datetime.timedelta:
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        seconds = DEFAULT_TIMEOUT_S
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group the environment describes (``torchrun``: WORLD_SIZE > 1, RANK,
    MASTER_ADDR, MASTER_PORT): nccl when ``device`` is CUDA (this process uses cuda:LOCAL_RANK),
    gloo on the CPU; every collective times out after ``$AWQFX_DIST_TIMEOUT`` seconds (default
    1800). Returns whether a group was joined (False: single process, or one already exists)."""
    if not requested() or _active():
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_timeout())
    return True


def _quiet() -> None:
    """Errors only: the ranks other than 0 print no warnings or log messages."""
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # its weight-loading progress bars
        hf_logging.disable_progress_bar()


@contextmanager
def launched(device: str | torch.device | None = None) -> Iterator[bool]:
    """Run a job as one rank of a multi-process launch, or as is without one; yields whether it is distributed.

    Joins the group (:func:`init_from_env`), silences the ranks other than 0, and leaves the group
    when the job succeeds. A failing rank's exception propagates to its caller (which reports it
    and exits non-zero) without tearing the group down collectively: its exit closes its
    connections, so the other ranks' next collective fails at once with a :class:`RankFailure`
    (``torchrun`` also stops them), and the timeout bounds the wait for a rank that hangs.
    """
    joined = init_from_env(device)
    if not joined:
        yield _active() and world_size() > 1
        return
    if not is_main():
        _quiet()
    yield True
    dist.destroy_process_group()
