"""Run calibration batches through an observed graph (the observers collect the statistics).

Only the part of the graph the observers need is run: everything after the last observed
activation (the final norm and the LM head, whose group is never quantized) is dropped from a
private calibration copy of the graph, which saves ~20 % of the forward on a small-vocab-heavy
model like SmolLM2.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from awqfx import distributed
from awqfx.config import AWQConfig
from awqfx.graph import float_dtype, traced_input_shape
from awqfx.memory import release_memory
from awqfx.observed import ObservedGraph
from awqfx.params import move_to
from awqfx.passes.dtype_asserts import drop_dtype_asserts
from awqfx.passes.observers import is_observer

log = logging.getLogger(__name__)

__all__ = ["calibrate", "CalibrationError", "iter_batches", "loss_sample_order", "sample_order"]


class CalibrationError(ValueError):
    """The calibration data is unusable (empty, too short, wrong type)."""


def iter_batches(calib: Any, batch_size: int) -> Iterable[torch.Tensor]:
    """``[N, L]`` tensor -> chunks of ``batch_size`` rows; an iterable -> its items (1-D items get a batch dim)."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 1:
            calib = calib.unsqueeze(0)
        if calib.dim() != 2:
            raise CalibrationError(f"calibration tensor must be [N, L] token ids, got shape {tuple(calib.shape)}")
        if calib.shape[0] == 0 or calib.shape[1] == 0:
            raise CalibrationError(f"calibration data is empty (shape {tuple(calib.shape)}); pass [N, L] token ids "
                                   "with N >= 1 sequences of L >= 2 tokens")
        return (calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size))
    if calib is None:
        raise CalibrationError("no calibration data: pass [N, L] token ids (e.g. awqfx.app.assets.calibration_samples)")
    return calib


def _check_input_shapes(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> None:
    """Refuse a batch the graph cannot run: one whose shape differs from a dim the capture fixed."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, arg in zip(inputs, args):
        fixed = traced_input_shape(node)
        if fixed is None or not isinstance(arg, torch.Tensor):
            continue
        if len(fixed) == arg.dim() and all(f is None or f == s for f, s in zip(fixed, arg.shape)):
            continue
        shape = ", ".join("*" if f is None else str(f) for f in fixed)
        raise CalibrationError(
            f"calibration batch of shape {list(arg.shape)} does not fit the graph: it was captured with a static "
            f"input shape [{shape}] (its dynamic export failed). Capture it at the calibration batch shape, "
            "awqfx.capture(model, static_inputs=(calib[:batch_size],)), and give a number of sequences that is a "
            "multiple of the config's batch_size."
        )


def _batch_args(batch: Any) -> tuple:
    """A batch as graph arguments: a tensor (token ids; 1-D gets a batch dim) or a tuple of values
    (a block's inputs: tensors, and the sizes the graph reads as Python ints)."""
    if isinstance(batch, (list, tuple)):
        return tuple(b if isinstance(b, (torch.Tensor, int, float, bool)) or b is None else torch.as_tensor(b)
                     for b in batch)
    x = torch.as_tensor(batch)
    return (x.unsqueeze(0) if x.dim() == 1 else x,)


def _calibration_module(observed: ObservedGraph) -> fx.GraphModule:
    """A copy of the observed graph that returns the observer outputs, minus what they do not need."""
    if observed._calib_gm is not None:
        return observed._calib_gm
    src = observed.gm
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(src.graph, env)  # noqa: F841 - the original output is replaced below
    for n in list(g.nodes):
        if n.op == "output":
            g.erase_node(n)
    obs = [env[n] for n in src.graph.nodes if is_observer(src, n)]
    g.output(tuple(obs))
    cm = fx.GraphModule(src, g)
    cm.graph.eliminate_dead_code()
    drop_dtype_asserts(cm)  # they would fail under the bf16 autocast of calib_dtype
    cm.recompile()
    observed._calib_gm = cm
    return cm


def loss_sample_order(n: int, k: int, held: int = 0, more: int = 0) -> torch.Tensor:
    """An order of ``n`` rows whose first ``k`` are evenly spaced over all ``n``, the next
    ``held`` evenly spaced over the rest, and the next ``more`` evenly spaced over what is left.

    The search's loss sample is the first ``k`` calibration sequences, the guard's held-back
    sample the next ``held``, and the block refine's extra sequences the ``more`` after them;
    calibration windows are cut in text order, so the first ``k`` would all come from the
    beginning of the text (one or two plays of thirty). The first ``k`` do not depend on
    ``held`` or ``more``, and the per-channel statistics not on the order.
    """
    order = torch.arange(n)
    taken: list[torch.Tensor] = []
    for count in (k, held, more):
        if count <= 0 or order.numel() == 0:
            continue
        if order.numel() <= count:
            taken.append(order)
            order = order[:0]
            continue
        pick = torch.linspace(0, order.numel() - 1, count).round().long().unique()
        keep = torch.ones(order.numel(), dtype=torch.bool)
        keep[pick] = False
        taken.append(order[pick])
        order = order[keep]
    return torch.cat([*taken, order])


def sample_order(n: int, cfg: AWQConfig) -> torch.Tensor:
    """:func:`loss_sample_order` of ``n`` calibration sequences for what ``cfg`` records: its loss
    sample, the guard's, then the block refine's extra sequences."""
    loss, held = cfg.runtime.loss_samples, cfg.guard_samples
    return loss_sample_order(n, loss, held, cfg.recorded_samples - loss - held)


def _default_device(observed: ObservedGraph) -> torch.device:
    for p in observed.gm.parameters():
        return p.device
    return torch.device("cpu")


def calibrate(observed: ObservedGraph, batches: Any, device: str | torch.device | None = None,
              progress: bool = True) -> ObservedGraph:
    """Feed ``batches`` (``[N, L]`` token ids, or an iterable of ``[B, L]`` tensors) to the observers.

    Runs without gradients, with a tqdm bar. Raises :class:`CalibrationError` on empty data or
    sequences shorter than 2 tokens, and :class:`awqfx.passes.observers.NonFiniteActivationError` naming
    the node when an activation is NaN/Inf. Statistics accumulate over repeated calls.
    Returns ``observed``.
    """
    cfg = observed.config
    dev = torch.device(device or cfg.runtime.device or _default_device(observed))
    if dev != _default_device(observed):
        move_to(observed.gm, dev)  # replaces tensors: the caller's (shared) ones stay where they are
        observed._calib_gm = None
    cm = _calibration_module(observed)
    if isinstance(batches, torch.Tensor) and batches.dim() == 2 and observed.sample_observers:
        batches = batches[sample_order(batches.shape[0], cfg)]
    it = iter_batches(batches, cfg.runtime.batch_size)
    mine, before = None, None
    if distributed.world_size() > 1:  # a contiguous share of the batches (docs/design.md "Distributed calibration")
        it = list(it)
        mine, before = distributed.shard(len(it)), _keep_partials(observed)
    total = None
    if isinstance(batches, torch.Tensor):
        total = -(-batches.reshape(-1, batches.shape[-1]).shape[0] // cfg.runtime.batch_size)
    elif hasattr(batches, "__len__"):
        total = len(batches)
    t0 = time.perf_counter()
    seen = 0
    bar = tqdm(it, total=total, desc="awq calibrate", unit="batch", disable=not progress or not distributed.is_main())
    with torch.no_grad(), cfg.autocast("calib", dev, float_dtype(observed.gm)):
        for i, batch in enumerate(bar):
            args = _batch_args(batch)
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if x is None or x.numel() == 0:
                continue
            if x.dtype in (torch.int64, torch.int32) and x.dim() == 2 and x.shape[1] < 2:  # token ids
                raise CalibrationError(
                    f"calibration sequences of {x.shape[1]} token are too short: need at least 2 tokens per "
                    "sequence (512 is the reference length)"
                )
            _check_input_shapes(cm, args)
            if mine is not None and i not in mine:
                _record_sample(observed, args)  # every rank keeps the whole loss sample
                continue
            cm(*(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args))
            seen += 1
            observed.calibration["batches"] += 1
            observed.calibration["sequences"] += int(x.shape[0])
            observed.calibration["tokens"] += int(x.numel())
    bar.close()
    if mine is not None:
        seen = _merge_shards(observed, before, seen)
    if seen == 0:
        raise CalibrationError("calibration data is empty: no batch with tokens was given (pass [N, L] token ids, "
                               "e.g. awqfx.app.assets.calibration_samples(tokenizer, 128, 512))")
    release_memory()
    observed.timings["calibrate_s"] = observed.timings.get("calibrate_s", 0.0) + time.perf_counter() - t0
    return observed


def _record_sample(observed: ObservedGraph, args: tuple) -> None:
    """Show a batch to the loss-sample observers only: they record graph inputs, no forward needed."""
    inputs = [n.name for n in observed.gm.graph.nodes if n.op == "placeholder"]
    for name, arg in zip(inputs, args):
        if name in observed.sample_observers:
            observed.sample_observers[name](arg)


def _counts(observed: ObservedGraph) -> list[int]:
    """The calibration counters, flat: every mean observer's tokens and batches, then the totals."""
    return [v for o in observed.mean_observers.values() for v in (o.count, o.batches)] + list(observed.calibration.values())


def _set_counts(observed: ObservedGraph, values: list[int]) -> None:
    observers = list(observed.mean_observers.values())
    for i, o in enumerate(observers):
        o.count, o.batches = values[2 * i], values[2 * i + 1]
    observed.calibration.update(zip(list(observed.calibration), values[2 * len(observers):]))


def _keep_partials(observed: ObservedGraph) -> list[int]:
    """Before a rank calibrates its share: the mean observers keep per-batch sums; returns the counters so far."""
    for obs in observed.mean_observers.values():
        obs.partials = []
    return _counts(observed)


def _merge_shards(observed: ObservedGraph, before: list[int], seen: int) -> int:
    """After a rank calibrated its share: every observer's sum is the sum over all ranks' batches,
    added in batch order (exactly one process's sum), and the counters are totals. Returns the
    batches all ranks ran."""
    for obs in observed.mean_observers.values():
        obs.sum = distributed.sum_in_order(obs.partials, obs.sum, what="calibration statistics")
        obs.partials = None
    ranks = distributed.all_gather({k: None if o.amax is None else o.amax.cpu()
                                    for k, o in observed.mean_observers.items()}, what="calibration statistics")
    for k, obs in observed.mean_observers.items():  # max |x|: the largest of every rank's (exact in any order)
        maxima = [r[k] for r in ranks if r[k] is not None]
        obs.amax = torch.stack(maxima).amax(0) if maxima else None
    added = distributed.all_reduce_sum(torch.tensor([n - b for n, b in zip(_counts(observed), before)] + [seen]),
                                       what="calibration counts").tolist()
    _set_counts(observed, [b + a for b, a in zip(before, added)])
    return added[-1]
