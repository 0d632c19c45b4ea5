"""Packed 3-D MoE expert weights: one grouped packed-expert module per fused expert parameter.

MoE blocks keep their experts as one 3-D parameter (``[E, 2I, H]`` gate/up, ``[E, H, I]`` down)
that their own forward multiplies with grouped matmuls; there is no linear module to swap.
:class:`PackedExperts` holds such a weight the way :class:`~awqfx.modules.QuantLinear` holds a
2-D one -- integer codes packed along the input dim, a float scale and an integer zero per
(expert, row, group) -- as a child module of the experts block. The float parameter is removed;
a forward pre-hook dequantizes it (in the model's dtype) right before the block runs and a
forward hook drops it right after, so only one block's experts are ever held in float.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from awqfx.packing import pack_int32, packed_length, unpack_int32
from awqfx.params import from_rows
from awqfx.quant import QuantizedWeight, QuantSpec, dequantize, num_groups

__all__ = ["PackedExperts", "attach", "pack_experts", "packed_experts", "PACKED_PREFIX"]

PACKED_PREFIX = "awqfx_packed_"


class PackedExperts(nn.Module):
    """A packed ``[E, out, in]`` expert weight (rows view: input dim last).

    ``in_dim`` is the input dim of the *parameter* (its layout is restored on dequantization);
    ``dtype`` the dtype the block computes in. Build with :meth:`from_quantized`; the
    constructor allocates zero buffers of the right shapes (a skeleton to load a state dict into).
    """

    def __init__(self, shape: tuple[int, int, int], bits: int, group_size: int, symmetric: bool, in_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        experts, out_f, in_f = (int(d) for d in shape)
        self.shape = (experts, out_f, in_f)
        self.spec = QuantSpec(bits, group_size, symmetric)
        self.in_dim = int(in_dim)
        self.dtype = dtype
        ng = num_groups(in_f, group_size)
        self.register_buffer("qweight", torch.zeros(experts, out_f, packed_length(in_f, bits), dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(experts, out_f, ng, dtype=torch.float32, device=device))
        self.register_buffer("qzeros", torch.zeros(experts, out_f, ng, dtype=torch.uint8, device=device))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, in_dim: int, dtype: torch.dtype) -> "PackedExperts":
        if len(qw.shape) != 3:
            raise ValueError(f"PackedExperts takes a 3-D [E, out, in] weight, got shape {tuple(qw.shape)}")
        spec = qw.spec
        m = cls(qw.shape, spec.bits, spec.group_size, spec.symmetric, in_dim, dtype, device="meta")
        m.qweight = pack_int32(qw.q.to(torch.int32), spec.bits, dim=-1).to(torch.int32).contiguous()
        m.scales = qw.scale.detach().to(torch.float32).contiguous()
        m.qzeros = qw.zero.to(torch.uint8).contiguous()
        return m

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the parameter this module replaces (input dim back at ``in_dim``)."""
        dims = list(self.shape[:-1])
        dims.insert(self.in_dim % 3, self.shape[-1])
        return tuple(dims)

    def quantized(self) -> QuantizedWeight:
        """The integers and qparams (the portable form every exporter reads)."""
        q = unpack_int32(self.qweight, self.spec.bits, self.shape[-1], dim=-1).to(torch.uint8)
        return QuantizedWeight(q, self.scales, self.qzeros.to(torch.int32), self.spec, self.shape)

    def weight(self) -> Tensor:
        """The dequantized weight in the parameter's own layout and the block's dtype."""
        q = unpack_int32(self.qweight, self.spec.bits, self.shape[-1], dim=-1)
        w = dequantize(q, self.scales, self.qzeros.to(torch.int32), self.spec)
        return from_rows(w, self.in_dim).to(self.dtype).contiguous()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.spec.bits}, group_size={self.spec.group_size}, in_dim={self.in_dim}"


class _Materialize:
    """Pre-hook: put the dequantized weight where the block's forward reads its parameter."""

    def __init__(self, attr: str):
        self.attr = attr

    def __call__(self, module: nn.Module, args) -> None:
        module.__dict__[self.attr] = getattr(module, PACKED_PREFIX + self.attr).weight()


class _Release:
    """Forward hook: drop the dequantized weight once the block has run."""

    def __init__(self, attr: str):
        self.attr = attr

    def __call__(self, module: nn.Module, args, output) -> None:
        module.__dict__.pop(self.attr, None)


def attach(owner: nn.Module, attr: str, packed: PackedExperts) -> None:
    """Replace parameter ``owner.<attr>`` by ``packed`` (a child ``awqfx_packed_<attr>``) and its hooks."""
    owner._parameters.pop(attr, None)
    owner.add_module(PACKED_PREFIX + attr, packed)
    owner.register_forward_pre_hook(_Materialize(attr))
    owner.register_forward_hook(_Release(attr))


def pack_experts(model: nn.Module, qweights: dict[str, QuantizedWeight], in_dims: dict[str, int]) -> nn.Module:
    """Pack every 3-D expert weight in ``qweights`` (FQN -> codes, rows view) into its block, in place."""
    for fqn, qw in qweights.items():
        owner_name, _, attr = fqn.rpartition(".")
        owner = model.get_submodule(owner_name)
        dtype = getattr(owner, attr).dtype
        attach(owner, attr, PackedExperts.from_quantized(qw, in_dims[fqn], dtype).to(getattr(owner, attr).device))
    return model


def packed_experts(model: nn.Module) -> dict[str, PackedExperts]:
    """``{weight FQN: PackedExperts}`` of a packed model."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PackedExperts):
            owner, _, child = name.rpartition(".")
            out[(owner + "." if owner else "") + child.removeprefix(PACKED_PREFIX)] = mod
    return out
