"""Fold AWQ scales into the graph: producers divide by ``s``, consumers multiply their columns.

``Y = W X = (W diag(s)) (diag(s)^-1 X)``: dividing the producer's output channels and scaling
the consumer's matching weight columns leaves the graph's function unchanged (exactly, up to
float rounding), which is what makes the quantization of ``W diag(s)`` activation-aware.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.graph import example_value, fetch_attr
from awqfx.groups import ScaleGroup

__all__ = ["fold_scales", "fold_parameters", "get_param", "set_param", "full_scale", "column_scale"]


def get_param(gm: nn.Module, name: str) -> torch.Tensor:
    return fetch_attr(gm, name)


def set_param(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter by a new tensor (never writes into the old storage, which the caller's
    model may share)."""
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, attr)
    new = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    setattr(owner, attr, new)


def full_scale(group: ScaleGroup, s: torch.Tensor) -> torch.Tensor:
    """A scale over all producer channels: ``s`` given per group channel (or already full), 1 elsewhere."""
    C = group.producer.num_channels
    s = torch.as_tensor(s, dtype=torch.float32).flatten()
    if s.numel() == C:
        full = s.clone()
        keep = torch.zeros(C, dtype=torch.bool)
        keep[group.channels] = True
        full[~keep] = 1.0
        return full
    if s.numel() != group.channels.numel():
        raise ValueError(
            f"scale for {group.name} has {s.numel()} entries; expected {group.channels.numel()} "
            f"(group channels) or {C} (all producer channels)"
        )
    full = torch.ones(C)
    full[group.channels] = s
    return full


def column_scale(columns: torch.Tensor, s_full: torch.Tensor) -> torch.Tensor:
    """Per-column factor of a consumer weight: ``s[channel]`` for mapped columns, 1 for the rest."""
    out = torch.ones(columns.numel(), dtype=s_full.dtype)
    ok = columns >= 0
    out[ok] = s_full[columns[ok]]
    return out


def _along(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


def fold_parameters(module: nn.Module, group: ScaleGroup, s_full: torch.Tensor) -> None:
    """The parameter part of one group's transform, on any module holding the parameters by FQN
    (a GraphModule or the model's own module tree): the producer's weight (norm ``(w + offset)/s
    - offset``, linear rows ``/ s``) and bias ``/ s``, and every consumer's columns ``* s[channel]``.
    An activation producer has no parameter: its ``1/s`` is applied by the caller (a graph node or
    a hook). Math in float64, stored back in each parameter's dtype.
    """
    s = s_full.to(torch.float64)
    p = group.producer
    if p.kind == "norm":
        w = get_param(module, p.weight).detach().to(torch.float64)
        set_param(module, p.weight, (w + p.offset) / s - p.offset)
    elif p.kind == "linear":
        w = get_param(module, p.weight).detach().to(torch.float64)
        set_param(module, p.weight, w / _along(s, p.out_dim, w.dim()))
    if p.bias is not None:
        b = get_param(module, p.bias).detach().to(torch.float64)
        set_param(module, p.bias, b / s)
    for c in group.consumers:
        w = get_param(module, c.weight).detach().to(torch.float64)
        set_param(module, c.weight, w * _along(column_scale(c.columns, s), c.in_dim, w.dim()))


def _insert_scale_node(gm: fx.GraphModule, node: fx.Node, s: torch.Tensor, attr: str) -> None:
    """``node -> mul(node, 1/s)`` for every user of ``node`` (AutoAWQ's ScaledActivation as a node)."""
    dtype = getattr(example_value(node), "dtype", torch.float32)
    while hasattr(gm, attr):
        attr += "_"
    gm.register_buffer(attr, (1.0 / s.to(torch.float64)).to(dtype))
    with gm.graph.inserting_after(node):
        inv = gm.graph.get_attr(attr)
    with gm.graph.inserting_after(inv):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, inv))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    scaled.meta = dict(node.meta)
    inv.meta["val"] = getattr(gm, attr)


def fold_scales(
    gm: fx.GraphModule,
    groups: Sequence[ScaleGroup],
    scales: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
) -> fx.GraphModule:
    """Apply the equivalence transform of each group with its scale, rewriting ``gm`` in place.

    ``scales`` is a list aligned with ``groups`` or a mapping from ``group.name``; each entry has
    one value per group channel (or per producer channel). Parameters are replaced, not written
    into, so a model that shares tensors with ``gm`` is untouched. Activation producers get an
    explicit ``mul`` node (the ScaledActivation of AutoAWQ, as a graph node).
    """
    if not isinstance(scales, Mapping):
        if len(scales) != len(groups):
            raise ValueError(f"got {len(scales)} scales for {len(groups)} groups")
        scales = {g.name: s for g, s in zip(groups, scales)}
    by_name = {n.name: n for n in gm.graph.nodes}
    inserted = False
    for k, g in enumerate(groups):
        if g.name not in scales:
            continue
        s = full_scale(g, scales[g.name]).to(torch.float64)
        if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError(f"scales for {g.name} must be finite and positive")
        if g.producer.kind == "activation":
            _insert_scale_node(gm, by_name[g.producer.node], s, f"awqfx_scale_{k}")
            inserted = True
        fold_parameters(gm, g, s)
    if inserted:
        gm.recompile()
    return gm
