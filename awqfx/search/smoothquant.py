"""SmoothQuant's scales on the discovered groups: the baseline of weight-activation AWQ.

No search: per group, in graph order, per producer channel ``j``::

    s_j = max(max|X_j|^alpha / max(max|W_j|, 1e-5)^(1 - alpha), 1e-5)

(the reference's formula and clamps; alpha = ``AWQConfig.smoothquant.alpha``). ``max|X_j|`` is
the largest ``|x|`` of the channel over every calibration token at the group's consumer inputs
(``MeanAbsObserver.max``), ``max|W_j|`` the largest ``|w|`` over every row of the group's
quantized consumers in the columns that read channel ``j``, on the weights as earlier groups'
folds left them (each group is folded into a working copy before the next is computed, as the
AWQ search folds its choices). The scales go where AWQ's go (the same :class:`~awqfx.plan.GroupPlan`
entries, folded by the same applier), with no clip search.
"""
from __future__ import annotations

import time

import torch
import torch.fx as fx

import awqfx
from awqfx.graph import shallow_copy
from awqfx.groups import ScaleGroup
from awqfx.observed import ObservedGraph
from awqfx.params import get_param, rows_view
from awqfx.passes.fold import fold_scales
from awqfx.passes.observers import remove_observers
from awqfx.plan import AWQPlan, GroupPlan, WeightPlan

__all__ = ["smoothquant_plan", "smoothquant_scale", "channel_x_max", "channel_w_max"]

CLAMP = 1e-5  # the reference's lower bound of max|W| and of the scales


def _channel_max(g: ScaleGroup, per_column: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per producer channel, the largest of the values ``(columns, value per column)`` map to it (0 for none)."""
    out = torch.zeros(g.producer.num_channels, dtype=torch.float32)
    for cols, vals in per_column:
        ok = cols >= 0
        out.scatter_reduce_(0, cols[ok], vals[ok].float(), reduce="amax")
    return out


def channel_x_max(observed: ObservedGraph, g: ScaleGroup) -> torch.Tensor:
    """``max |x|`` per producer channel over every calibration token at the group's consumer inputs."""
    return _channel_max(g, [(c.columns, observed.x_max(observed.data_of[c.node])) for c in g.consumers])


def channel_w_max(work: fx.GraphModule, g: ScaleGroup) -> torch.Tensor:
    """``max |w|`` per producer channel over every row of the group's quantized consumers (all of them
    when none is quantized)."""
    cons = [c for c in g.consumers if c.quantize] or g.consumers
    cols = []
    for c in cons:
        w = rows_view(get_param(work, c.weight).detach(), c.in_dim).float().cpu()
        cols.append((c.columns, w.reshape(-1, w.shape[-1]).abs().amax(0)))
    return _channel_max(g, cols)


def smoothquant_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max(x_max^alpha / max(w_max, 1e-5)^(1 - alpha), 1e-5)``, float32."""
    return (x_max.float().pow(alpha) / w_max.float().clamp(min=CLAMP).pow(1 - alpha)).clamp(min=CLAMP)


def smoothquant_plan(observed: ObservedGraph, cfg, weights: dict[str, WeightPlan]) -> AWQPlan:
    """The plan of SmoothQuant's scales (``cfg.smoothquant``) for the calibrated ``observed`` graph:
    every group with a quantized consumer scaled, ``weights`` quantized without clipping."""
    t0 = time.perf_counter()
    alpha = cfg.smoothquant.alpha
    groups = [g for g in observed.groups if any(c.quantize and c.weight in weights for c in g.consumers)]
    work = shallow_copy(observed.gm)  # the folds replace its parameters, never the caller's
    remove_observers(work)
    plan_groups = []
    for g in groups:
        s = torch.ones(g.producer.num_channels)
        s[g.channels] = smoothquant_scale(channel_x_max(observed, g), channel_w_max(work, g), alpha)[g.channels]
        fold_scales(work, [g], [s])
        plan_groups.append(GroupPlan(g, s, {"choice": f"smoothquant alpha={alpha:g}", "alpha": alpha}))
    timings = dict(observed.timings)
    timings["search_s"] = time.perf_counter() - t0
    meta = {"awqfx_version": awqfx.__version__, "torch_version": torch.__version__, "method": "smoothquant",
            "timings": timings, "calibration": dict(observed.calibration),
            "groups_skipped": [g.name for g in observed.groups if g not in groups],
            "groups_dropped": [g.site for g in observed.dropped]}
    return AWQPlan(plan_groups, weights, cfg.to_dict(), meta)
