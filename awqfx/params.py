"""Parameters by fully qualified name, and the per-channel tensor math every stage shares.

Every stage that changes weights *replaces* a parameter (``set_param``) instead of writing into
it: the caller's model may share its tensors with the graph being rewritten.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.graph import fetch_attr
from awqfx.groups import ScaleGroup
from awqfx.quant import QuantSpec, clamp_to_range, fake_quantize, quantize_weight

__all__ = [
    "fetch_attr", "get_param", "set_param", "has_param", "move_to", "release_parameters", "full_scale",
    "column_scale", "along", "fold_parameters", "input_scales_of", "rows_view", "from_rows", "fake_quantize_param",
    "clamp_param",
]


def get_param(module: nn.Module, name: str) -> torch.Tensor:
    return fetch_attr(module, name)


def has_param(module: nn.Module, name: str) -> bool:
    try:
        get_param(module, name)
        return True
    except AttributeError:
        return False


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter by a new tensor (never writes into the old storage, which the caller's
    model may share)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    new = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    setattr(owner, attr, new)


def move_to(module: nn.Module, device) -> None:
    """Move every tensor a graph reads (or a module holds) to ``device`` by *replacing* it
    (``nn.Module.to`` would rewrite shared Parameter objects in place, i.e. the caller's model)."""
    device = torch.device(device)
    if isinstance(module, fx.GraphModule):
        targets = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    else:
        targets = {k for k, _ in module.named_parameters()} | {k for k, _ in module.named_buffers()}
    for t in targets:
        v = fetch_attr(module, t)
        if isinstance(v, torch.Tensor) and v.device != device:
            set_param(module, t, v.to(device))


def release_parameters(module: nn.Module) -> None:
    """Replace every parameter of ``module`` by a meta tensor of its shape (by *replacing*, so a
    tensor shared with another module stays there; one held nowhere else is freed at once)."""
    for name, p in list(module.named_parameters()):
        set_param(module, name, torch.empty_like(p, device="meta"))


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


def along(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """``v`` shaped to broadcast along ``dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


def fold_parameters(module: nn.Module, group: ScaleGroup, s_full: torch.Tensor) -> None:
    """The parameter part of one group's transform, on any module holding the parameters by FQN
    (a GraphModule or the model's own module tree): the producer's weight (norm ``(w + offset)/s
    - offset``, linear rows ``/ s``) and bias ``/ s``, and every consumer's columns ``* s[channel]``.
    An activation producer has no parameter: its ``1/s`` is an input scale of the consumers
    (``awqfx.passes.input_scales``). Math in float64, stored back in each parameter's dtype.
    """
    s = s_full.to(torch.float64)
    p = group.producer
    if p.kind == "norm":
        w = get_param(module, p.weight).detach().to(torch.float64)
        set_param(module, p.weight, (w + p.offset) / s - p.offset)
    elif p.kind == "linear":
        w = get_param(module, p.weight).detach()
        set_param(module, p.weight, _in_float64(w, torch.div, along(s, p.out_dim, w.dim())))
    if p.bias is not None:
        b = get_param(module, p.bias).detach().to(torch.float64)
        set_param(module, p.bias, b / s)
    for c in group.consumers:
        w = get_param(module, c.weight).detach()
        set_param(module, c.weight, _in_float64(w, torch.mul, along(column_scale(c.columns, s), c.in_dim, w.dim())))


_CHUNK_VALUES = 1 << 22


def _in_float64(w: torch.Tensor, op, factor: torch.Tensor) -> torch.Tensor:
    """``op(w, factor)`` computed in float64 and stored in ``w``'s dtype, a slab of dim 0 at a time
    (a float64 copy of a whole 7B-model MLP weight would be 360 MB)."""
    if w.dim() == 0:
        return op(w.to(torch.float64), factor).to(w.dtype)
    out = torch.empty_like(w)
    step = max(1, _CHUNK_VALUES // max(1, w[0].numel()))
    for r in range(0, w.shape[0], step):
        f = factor[r : r + step] if factor.dim() == w.dim() and factor.shape[0] > 1 else factor
        out[r : r + step] = op(w[r : r + step].to(torch.float64), f.to(w.device)).to(w.dtype)
    return out


def input_scales_of(group: ScaleGroup, s_full: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{consumer weight: 1/s per input column}`` of an activation group (float32)."""
    inv = 1.0 / full_scale(group, s_full).to(torch.float64)
    return {c.weight: column_scale(c.columns, inv).to(torch.float32) for c in group.consumers}


def rows_view(w: torch.Tensor, in_dim: int) -> torch.Tensor:
    """``w`` with its input dim moved last: ``[out, in]`` / ``[E, out, in]`` (a view)."""
    return w.movedim(in_dim % w.dim(), -1)


def from_rows(w_rows: torch.Tensor, in_dim: int) -> torch.Tensor:
    """Inverse of :func:`rows_view`."""
    return w_rows.movedim(-1, in_dim % w_rows.dim())


def fake_quantize_param(w: torch.Tensor, in_dim: int, spec: QuantSpec, max_val: torch.Tensor | None = None,
                        min_val: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` with groups along ``in_dim``; same shape/dtype as ``w``.

    ``max_val``/``min_val`` (``[..., out, n_groups]`` in the rows view) override the group range
    (the clip search result); ``codes`` (rows view) replace rounding to nearest on that grid (a
    refinement's integers).
    """
    rows = rows_view(w.detach(), in_dim)
    dev = rows.device
    mx = None if max_val is None else max_val.to(dev)
    mn = None if min_val is None else min_val.to(dev)
    if codes is None:
        q = fake_quantize(rows, spec, max_val=mx, min_val=mn)
    else:
        q = quantize_weight(rows.float(), spec, mx, mn, codes=codes).dequantize(rows.dtype)
    return from_rows(q, in_dim).contiguous()


def clamp_param(w: torch.Tensor, in_dim: int, spec: QuantSpec, max_val: torch.Tensor | None = None,
                min_val: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` clamped per (row, group) to its clip range (groups along ``in_dim``, range in the rows
    view as for :func:`fake_quantize_param`), not quantized; same shape/dtype as ``w``."""
    if max_val is None and min_val is None:
        return w.detach()
    rows = rows_view(w.detach(), in_dim)
    dev = rows.device
    out = clamp_to_range(rows, spec, None if max_val is None else max_val.to(dev),
                         None if min_val is None else min_val.to(dev))
    return from_rows(out, in_dim).contiguous()
