"""The weight-activation (W8A8) kernel, registered as a ``torch.library`` custom op.

``awqfx::int8_linear(Tensor x, Tensor int_weight, Tensor weight_scale, Tensor? weight_zero,
SymInt group_size, SymInt act_bits, bool per_token, Tensor? bias=None, SymInt dense_from=0) -> Tensor``

    ``F.linear`` with integer weights and integer activations:

    * ``x`` (any float dtype, ``[..., K]``) is quantized at run time, per token or per tensor, by
      :func:`awqfx.act_quant.quantize_activation` (the function the fake-quantized graph uses):
      int8 codes ``q_x`` and float32 scales ``s_x``.
    * ``int_weight`` int8 ``[N, K]``: signed weight codes (``bits <= 8``); ``weight_scale`` float32
      ``[N, G]`` and ``weight_zero`` int8 ``[N, G]`` (None: symmetric) per group of ``group_size``
      inputs (``-1``: one group per row, the W8A8 layout; a ragged last group is fine).
    * Per group ``g``: ``acc_g = q_x[:, g] @ int_weight[:, g].T`` in int32 with ``torch._int_mm``
      (exact), minus ``weight_zero[:, g] * sum(q_x[:, g])`` when asymmetric;
      ``y = s_x * sum_g(acc_g * weight_scale[:, g]) + bias``, float32, returned in ``x.dtype``.
    * On the CPU, from ``dense_from`` rows on (0: never), the same integers are multiplied in
      float32 instead (:func:`float_path`), chosen per shape by timing
      (:mod:`awqfx.kernel_choice`, ``kind="int8"``): same values up to float32 summation order.

    ``torch._int_mm`` takes any shape on the CPU. On CUDA it needs more than 16 rows (fewer are
    padded with zero rows) and ``K``, ``N`` multiples of 8 (other shapes multiply the same integers
    in float64, which is exact for these sizes). The fake (meta) implementation makes a graph
    that calls the op re-export with ``torch.export`` and save to ``.pt2``; a process that loads
    such a program must ``import awqfx.kernels_int8`` first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from awqfx.act_quant import quantize_activation
from awqfx.config import ActSpec
from awqfx.kernels import scratch_buffer, takes_dense_path
from awqfx.quant import group_bounds

__all__ = ["int_mm", "int8_linear", "int8_linear_eager", "int_path", "float_path"]

_CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: "self.size(0) needs to be greater than 16"


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for int8 ``a [M, K]`` and ``b [K, N]``, exactly, as int32 ``[M, N]``."""
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    M, K = a.shape
    if K % 8 or b.shape[1] % 8:
        return (a.double() @ b.double()).to(torch.int32)  # |sum| < 2^53: exact
    if M < _CUDA_MIN_ROWS:
        return torch._int_mm(F.pad(a, (0, 0, 0, _CUDA_MIN_ROWS - M)), b)[:M]
    return torch._int_mm(a, b)


def int8_linear_eager(x: Tensor, int_weight: Tensor, weight_scale: Tensor, weight_zero: Optional[Tensor], group_size: int,
                      act_bits: int, per_token: bool, bias: Optional[Tensor] = None, dense_from: int = 0) -> Tensor:
    """``F.linear(Q(x), (int_weight - weight_zero) * weight_scale, bias)`` on integers (module doc);
    on the CPU, inputs of ``dense_from`` rows or more (0: never) multiply the same integers in
    float32 instead (:func:`float_path`)."""
    K = x.shape[-1]
    N = int_weight.shape[0]
    spec = ActSpec(act_bits, "per-token" if per_token else "per-tensor")
    q, s_x = quantize_activation(x.reshape(-1, K), spec)
    if takes_dense_path(q.shape[0], dense_from, x.device):
        acc = float_path(q, int_weight, weight_scale, weight_zero, group_size)
    else:
        acc = int_path(q, int_weight, weight_scale, weight_zero, group_size)
    y = acc * s_x
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int_path(q: Tensor, int_weight: Tensor, weight_scale: Tensor, weight_zero: Tensor | None,
             group_size: int) -> Tensor:
    """``q @ ((int_weight - weight_zero) * weight_scale).T`` in float32, by exact int32 products per group."""
    K = q.shape[-1]
    wt = int_weight.t()
    acc = None
    for g, (a, b) in enumerate(group_bounds(K, group_size)):
        part = int_mm(q[:, a:b], wt[a:b])
        if weight_zero is not None:
            part = part - q[:, a:b].sum(1, keepdim=True, dtype=torch.int32) * weight_zero[:, g].to(torch.int32)
        term = part.float() * weight_scale[:, g].float()
        acc = term if acc is None else acc + term
    return acc


def float_path(q: Tensor, int_weight: Tensor, weight_scale: Tensor, weight_zero: Tensor | None,
               group_size: int) -> Tensor:
    """The same product as :func:`int_path` with float32 arithmetic: the weight dequantized into a
    reused ``[K, N]`` buffer (one per shape and thread), one dense matmul with the codes of ``q`` as
    floats. Equal to the integer path up to float32 summation order."""
    K, N = q.shape[-1], int_weight.shape[0]
    wt = scratch_buffer((K, N), torch.float32, q.device)
    wt.copy_(int_weight.t())
    for g, (a, b) in enumerate(group_bounds(K, group_size)):
        if weight_zero is not None:
            wt[a:b].sub_(weight_zero[:, g].float())
        wt[a:b].mul_(weight_scale[:, g].float())
    return q.float() @ wt


# The op and :func:`int8_linear_eager` are one function: ``Int8Linear`` calls the function itself
# outside graph capture (the custom op's dispatch costs about as much as a small layer's matmul).
int8_linear = torch.library.custom_op("awqfx::int8_linear", mutates_args=())(int8_linear_eager)


@int8_linear.register_fake
def _int8_linear_fake(x, int_weight, weight_scale, weight_zero, group_size, act_bits, per_token, bias=None,
                      dense_from=0):
    torch._check(x.shape[-1] == int_weight.shape[1], lambda: "x.shape[-1] must equal in_features")
    return x.new_empty((*x.shape[:-1], int_weight.shape[0]))
