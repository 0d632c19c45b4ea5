"""The packed weight-activation linear: integer weights, activations quantized at run time, int8
matmuls (:mod:`awqfx.kernels_int8`).

:class:`Int8Linear` replaces ``nn.Linear`` for the weights a plan quantizes together with their
input activations (``WeightPlan.act``). Its state dict is the compressed-tensors ``int-quantized``
layout, held as buffers:

* ``int_weight``  int8 ``[out, in]``: the signed codes ``q - 2^(bits-1)`` of the plan's
  :class:`~awqfx.quant.QuantizedWeight` (bits 2..8; W8A8: ``round(w / scale)`` in ``[-127, 127]``).
* ``weight_scale`` float32 ``[out, n_groups]`` (``[out, 1]`` per output channel), kept float32
  under ``module.half()`` / ``.to(torch.bfloat16)``.
* ``weight_zero``  int8 ``[out, n_groups]``: signed zero points ``zero - 2^(bits-1)``; absent
  (None) for a symmetric weight, whose zero is 0.
* ``bias``         optional, float.

``forward`` calls ``torch.ops.awqfx.int8_linear`` under graph capture (a graph that holds the
module re-exports with ``torch.export`` and saves as ``.pt2``), the same function directly otherwise.
On the CPU it multiplies the integers in float32 instead of with ``torch._int_mm`` from the input
length where that is faster, timed per shape on the machine (:mod:`awqfx.kernel_choice`).
:func:`pack_int8_model` swaps a module tree's linears for them (the module-tree applier's
``weights="packed"`` for a weight-activation plan).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from awqfx import kernel_choice
from awqfx.config import ActSpec
from awqfx.kernels_int8 import int8_linear_eager  # importing it registers torch.ops.awqfx.int8_linear
from awqfx.modules import capturing
from awqfx.packed_model import pack_model, parent_map
from awqfx.quant import QuantizedWeight, QuantSpec, num_groups

__all__ = ["Int8Linear", "pack_int8_model", "int8_modules"]


class Int8Linear(nn.Module):
    """``nn.Linear`` with integer weights whose input activations are quantized too (module doc).

    Build it with :meth:`from_quantized`; the constructor allocates zero-filled buffers of the
    right shapes (a skeleton to ``load_state_dict`` into).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int = -1,
                 symmetric: bool = True, act: ActSpec | None = None, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        spec = QuantSpec(bits, group_size, symmetric)
        spec.validate(in_features)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size, self.symmetric = bits, group_size, bool(symmetric)
        self.act = act or ActSpec()
        ng = num_groups(in_features, group_size)
        self.register_buffer("int_weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, ng, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero", None if symmetric else
                             torch.zeros(out_features, ng, dtype=torch.int8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self._dense_from: int | None = None  # the kernel choice, made at the first call (dense_from)
        self._dense_device: torch.device | None = None

    @property
    def spec(self) -> QuantSpec:
        """The weight quantizer."""
        return QuantSpec(self.bits, self.group_size, self.symmetric)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, act: ActSpec, bias: Tensor | None = None) -> "Int8Linear":
        """From the plan's integers (``[out, in]``, any int spec of 2..8 bits) and the activation spec."""
        if len(qw.shape) != 2:
            raise ValueError(f"Int8Linear takes a 2-D [out, in] weight, got shape {tuple(qw.shape)}")
        spec = qw.spec
        spec.require_int("Int8Linear")
        out_features, in_features = (int(d) for d in qw.shape)
        half = 1 << (spec.bits - 1)
        m = cls(in_features, out_features, spec.bits, spec.group_size, spec.symmetric, act, bias is not None,
                device="meta")
        dev = qw.q.device
        m.int_weight = (qw.q.to(torch.int16) - half).to(torch.int8).contiguous()
        m.weight_scale = qw.scale.detach().to(device=dev, dtype=torch.float32).contiguous()
        if not spec.symmetric:
            m.weight_zero = (qw.zero.to(device=dev, dtype=torch.int16) - half).to(torch.int8).contiguous()
        if bias is not None:
            m.bias = bias.detach().to(dev).clone()
        return m

    def quantized_weight(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` this module holds (unsigned codes and zero points, as the plan made them)."""
        half = 1 << (self.bits - 1)
        zero = (torch.full(self.weight_scale.shape, half, dtype=torch.int32, device=self.int_weight.device)
                if self.weight_zero is None else self.weight_zero.to(torch.int32) + half)
        return QuantizedWeight(q=(self.int_weight.to(torch.int16) + half).to(torch.uint8),
                               scale=self.weight_scale.float(), zero=zero, spec=self.spec,
                               shape=(self.out_features, self.in_features))

    def dequantize_weight(self) -> Tensor:
        """The exact float32 weight ``(q - zero) * scale`` (== ``QuantizedWeight.dequantize()``)."""
        return self.quantized_weight().dequantize()

    def weight_bytes(self) -> int:
        """Resident bytes of the packed weight (codes, scales, zero points); the bias is not counted."""
        return sum(t.numel() * t.element_size() for t in (self.int_weight, self.weight_scale, self.weight_zero)
                   if t is not None)

    @property
    def dense_from(self) -> int:
        """From how many input rows this layer multiplies in float32 instead of with ``torch._int_mm``
        (0: never), chosen for its shape on its device by :func:`awqfx.kernel_choice.choice`."""
        dev = self.int_weight.device
        if self._dense_from is None or self._dense_device != dev:
            chosen = kernel_choice.choice(self.out_features, self.in_features, self.group_size, dev, kind="int8")
            self._dense_from, self._dense_device = chosen.dense_from or 0, dev
        return self._dense_from

    def forward(self, x: Tensor) -> Tensor:
        if capturing():  # the op: what a traced or exported graph records (the choice made before, or none)
            return torch.ops.awqfx.int8_linear(x, self.int_weight, self.weight_scale, self.weight_zero, self.group_size,
                                               self.act.bits, self.act.per_token, self.bias, self._dense_from or 0)
        return int8_linear_eager(x, self.int_weight, self.weight_scale, self.weight_zero, self.group_size,
                                 self.act.bits, self.act.per_token, self.bias, self.dense_from)

    def _apply(self, fn, recurse: bool = True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:  # a dtype cast must not round the quantization scales
            self.weight_scale = scale.to(device=self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={g}, "
                f"symmetric={self.symmetric}, act_bits={self.act.bits}, act={self.act.granularity}, "
                f"bias={self.bias is not None}")


def int8_modules(model: nn.Module) -> dict[str, Int8Linear]:
    """``{module name: Int8Linear}`` in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def pack_int8_model(model: nn.Module, qweights: Mapping[str, QuantizedWeight], acts: Mapping[str, ActSpec],
                    in_dims: Mapping[str, int] | None = None) -> nn.Module:
    """Replace the owner of every weight in ``qweights`` with an :class:`Int8Linear` quantizing its
    input with ``acts[fqn]``, in place; returns ``model``.

    The modules are first packed by :func:`awqfx.packed_model.pack_model`, which checks them
    (2-D weights, matching shapes and ``in_dims``, no tied weights, a forward that is the plain
    matmul) and keeps their forward pre-hooks (activation input scales); each is then swapped
    for the int8 module holding the same integers.
    """
    owners = {fqn: model.get_submodule(fqn.rpartition(".")[0]) for fqn in qweights}
    where = {fqn: (m.weight.device, getattr(m, "bias", None)) for fqn, m in owners.items()}
    pack_model(model, qweights, in_dims=in_dims, backend="dequant")
    parents = parent_map(model)
    for fqn, qw in qweights.items():
        packed = model.get_submodule(fqn.rpartition(".")[0])
        dev, bias = where[fqn]
        qw = QuantizedWeight(qw.q.to(dev), qw.scale.to(dev), qw.zero.to(dev), qw.spec, tuple(qw.shape))
        m = Int8Linear.from_quantized(qw, acts[fqn], bias)
        m._forward_pre_hooks.update(packed._forward_pre_hooks)
        for parent, child in parents.get(id(packed), []):
            setattr(parent, child, m)
    return model
