"""The AWQ pass, staged like ``torch.ao.quantization.quantize_pt2e``::

    observed = prepare(gm, AWQConfig.of(bits=4, group_size=64))   # private copy + observers
    calibrate(observed, calib)                                  # [N, L] token ids (tqdm, no grad)
    plan = search(observed)                                     # AWQPlan: scales, clips, specs
    qgm = convert(gm, plan)                                     # copy: folded + fake-quantized

or all at once: ``qgm = apply_awq_pass(gm, calib, AWQConfig(...))``. The caller's graph and model
are never modified (every stage works on copies), also when a stage fails or is interrupted.
The plan is attached to the result as ``qgm.meta["awqfx_plan"]``.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.apply import apply_plan
from awqfx.calibrate import CalibrationError, calibrate, iter_batches
from awqfx.capture import capture
from awqfx.config import AWQConfig, ConfigError
from awqfx.graph import linear_table, shallow_copy
from awqfx.memory import release_memory
from awqfx.observed import ObservedGraph, searched_groups
from awqfx.params import get_param, move_to
from awqfx.passes.discover import discover
from awqfx.passes.observers import NonFiniteActivationError, insert_observers
from awqfx.plan import AWQPlan
from awqfx.search import search
from awqfx.targets import Targets, apply_targets, select_targets

__all__ = [
    "AWQConfig", "AWQPlan", "ObservedGraph", "prepare", "calibrate", "search", "convert", "apply_awq_pass",
    "apply_plan", "CalibrationError", "NonFiniteActivationError",
]


def _config(config: AWQConfig | Mapping | None) -> AWQConfig:
    if config is None:
        return AWQConfig()
    if isinstance(config, AWQConfig):
        return config
    if isinstance(config, Mapping):
        return AWQConfig.of(**config)
    raise TypeError(f"config must be an AWQConfig (or a dict of its flat fields, see AWQConfig.of), got {type(config).__name__}")


def _as_graph(gm: nn.Module) -> fx.GraphModule:
    if isinstance(gm, fx.GraphModule):
        return gm
    return capture(gm)


def prepare(gm: nn.Module, config: AWQConfig | Mapping | None = None, *, targets: Targets | None = None) -> ObservedGraph:
    """Copy ``gm``, discover its scale groups and insert the observers (``gm`` is not modified).

    The copy has its own graph and module containers; its tensors are the caller's, shared
    read-only (every later stage *replaces* tensors, never writes into them), which saves a full
    copy of the weights.

    ``gm``: a captured GraphModule (``awqfx.capture``); an ``nn.Module`` is captured first.
    Raises :class:`~awqfx.config.ConfigError` (a ``ValueError``) when the config does not fit the
    model (e.g. a group size larger than a layer's input features) before any calibration work.

    The config's targets (ignore / only / extra_groups / exclude_groups, :mod:`awqfx.targets`) are
    resolved on ``gm`` and declared groups checked on random inputs; ``targets``: the targets
    already resolved on the whole graph when ``gm`` is one block of it (block-by-block mode).
    """
    cfg = _config(config)
    t0 = time.perf_counter()
    work = shallow_copy(_as_graph(gm))
    disc = discover(work, quantize_head=cfg.quantize_head)
    if targets is None:
        disc, _ = select_targets(work, disc, cfg)
    else:
        disc = apply_targets(work, disc, targets)
    groups, dropped = searched_groups(disc, cfg)
    linears, data_of = linear_table(work)
    means, samples = insert_observers(work, groups, cfg.recorded_samples)
    observed = ObservedGraph(work, disc, cfg, groups, linears, data_of, means, samples, dropped=dropped)
    spec = cfg.spec
    for w in disc.quantizable:
        if not bool(torch.isfinite(get_param(work, w)).all()):
            raise ValueError(f"{w} has NaN or Inf values: the model's weights are broken before quantization "
                             "(check the checkpoint / dtype conversion)")
        if w in observed.linears:
            shape = get_param(work, w).shape
            try:
                spec.validate(shape[observed.linears[w][2]])
            except ValueError as e:
                raise ConfigError(f"{w} (shape {tuple(shape)}): {e}") from None
    if cfg.runtime.device is not None:
        move_to(work, cfg.runtime.device)
    observed.timings["prepare_s"] = time.perf_counter() - t0
    return observed


def convert(gm: nn.Module | ObservedGraph, plan: AWQPlan, weights: str = "fake") -> nn.Module:
    """A copy of ``gm`` with the plan applied: scales folded, weights fake-quantized, observers removed.

    ``gm`` is the captured GraphModule (or the observed graph, or the model's module tree: see
    :func:`awqfx.apply.apply_plan`). ``weights``: ``"fake"`` (fake-quantized float weights) or
    ``"packed"`` (packed integer weights and the int4 kernels).
    """
    t0 = time.perf_counter()
    target = gm.gm if isinstance(gm, ObservedGraph) else gm
    out = apply_plan(target, plan, weights=weights)
    plan.metadata.setdefault("timings", {})["convert_s"] = time.perf_counter() - t0
    if isinstance(out, fx.GraphModule):
        out.meta["awqfx_plan"] = plan
    out.train(False)  # export graphs come back in training mode; the rewritten graph is for inference
    return out


def _check_calib(calib: Any, cfg: AWQConfig) -> None:
    if not cfg.needs_calibration:
        return
    if calib is None:
        raise CalibrationError("no calibration data: pass [N, L] token ids (e.g. awqfx.app.assets.calibration_samples)")
    if isinstance(calib, torch.Tensor):
        iter_batches(calib, cfg.runtime.batch_size)  # raises on empty / wrong shape
        if calib.dim() >= 2 and calib.shape[-1] < 2:
            raise CalibrationError(f"calibration sequences of {calib.shape[-1]} token are too short: need at least "
                                   "2 tokens per sequence (512 is the reference length)")


def apply_awq_pass(gm: nn.Module, calib: Any = None, config: AWQConfig | Mapping | None = None,
                   progress: bool = True, weights: str = "fake") -> fx.GraphModule:
    """prepare -> calibrate -> search -> convert; returns the rewritten GraphModule (a new one).

    ``calib``: a LongTensor ``[N, L]`` of token ids (run in batches of ``config.runtime.batch_size``) or an
    iterable of ``[B, L]`` tensors; not needed without a search (``AWQConfig.rtn``). ``gm`` is left untouched,
    whatever happens (all work is on copies). ``weights="packed"`` returns packed int4 linears.
    """
    cfg = _config(config)
    _check_calib(calib, cfg)
    observed = prepare(gm, cfg)
    if cfg.needs_calibration:
        calibrate(observed, calib, progress=progress)
    plan = search(observed, cfg, progress=progress)
    target = gm if isinstance(gm, fx.GraphModule) else observed.gm
    del observed  # free the statistics and the working copies before the converted copy is made
    release_memory()
    return convert(target, plan, weights=weights)
