"""Quantized-linear kernels, registered as ``torch.library`` custom ops (namespace ``awqfx``).

Two ops, both plain functional ops with fake (meta) implementations, so a graph that calls them
survives ``torch.export.export`` (also with a dynamic batch dim) and ``torch.export.save`` /
``torch.export.load`` to a ``.pt2`` without pickling anything. A process that loads such a
``.pt2`` must ``import awqfx.kernels`` first so the ops are registered.

``awqfx::int4_linear(Tensor x, Tensor packed_weight, Tensor scale_zeros, SymInt group_size,
Tensor? bias=None, SymInt dense_from=0, ScalarType dense_dtype=float32) -> Tensor``
    4-bit group-wise linear on PyTorch's built-in int4 ("tinygemm") kernels:

    * CPU:  ``aten._weight_int4pack_mm_for_cpu(x_bf16[M, K], packed_weight, group_size,
      scale_zeros)``. ``packed_weight`` is ``aten._convert_weight_to_int4pack_for_cpu(q, 1)``
      of the int32 codes ``q[N, K]`` (values 0..15, one code per int32, not pre-packed); the
      result is an opaque uint8 ``[N, K/2]`` (blocked layout, *not* plain nibble pairs).
      ``innerKTiles`` is ignored by the CPU op (any of 1/2/4/8 gives the same bytes).
    * CUDA: ``aten._weight_int4pack_mm(x_bf16[M, K], packed_weight, group_size, scale_zeros)``.
      ``packed_weight`` is ``aten._convert_weight_to_int4pack(u8, innerKTiles)`` of
      ``u8[N, K/2] = (q[:, 0::2] << 4) | q[:, 1::2]`` (even k in the HIGH nibble); the result
      is int32 ``[N/8, K/(16*innerKTiles), 32, innerKTiles/2]``.
    * ``scale_zeros`` (both devices): ``[K/group_size, N, 2]`` in the activation dtype (we
      always use bf16): ``[..., 0]`` = scale, ``[..., 1]`` = float zero. The kernels dequantize
      ``w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]`` with ``g = k // group_size``, so
      an AWQ integer zero point ``zp`` maps via ``zero = (8 - zp) * scale``.
    * Constraints (checked by :func:`int4pack_supported`): 4 bits; group size in
      {32, 64, 128, 256}; ``K % group_size == 0``; CPU needs ``N % 16 == 0`` (``expect N to be
      dividable by 16``); CUDA needs ``N % 8 == 0``, ``K % 32 == 0``, sm80+ and no ROCm.
    * Activations are cast to bf16 and the output back to ``x.dtype``. The CPU op also accepts
      fp32 activations with fp32 scale_zeros, but that path is a slow reference loop (measured
      ~30x slower than bf16 for decode, ~65x for prefill), so it is not used.

    * Kernel choice (CPU): with ``dense_from > 0``, inputs of at least that many rows take the
      dense path instead: the layer's weight is read back out of the kernel layout
      (:func:`cpu_int4pack_layout` reads that layout from the running build), dequantized into a
      reused ``[K, N]`` buffer of ``dense_dtype`` and multiplied with one dense matmul. Who sets
      the threshold and dtype, and why: :mod:`awqfx.kernel_choice`.

``awqfx::dequant_linear(Tensor x, Tensor packed_qweight, Tensor scale, Tensor zero,
SymInt bits, SymInt group_size, SymInt in_features, Tensor? bias=None) -> Tensor``
    Generic fallback for 2..8 bits, any group size (ragged last group, per-channel ``-1``),
    any device: unpacks this one layer's weight (``packed_qweight`` int32 ``[out,
    ceil(in * bits / 32)]``, dense LSB-first bit stream along ``in``, see :mod:`awqfx.packing`),
    dequantizes ``(q - zero) * scale`` in fp32 (bit-identical to
    ``QuantizedWeight.dequantize()``), casts to ``x.dtype`` and calls ``F.linear``. Only one
    layer's float weight exists at a time, and only during the call.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "INT4PACK_GROUP_SIZES",
    "int4pack_layer_supported",
    "int4pack_supported",
    "cuda_inner_k_tiles",
    "pack_int4_weight",
    "pack_int4_scale_zeros",
    "int4pack_effective_weight",
    "int4pack_unpack_codes",
    "LayoutRun",
    "cpu_int4pack_layout",
    "int4pack_codes_t",
    "int4pack_dequantize_t",
    "int4pack_matmul",
    "dense_linear",
    "scratch_buffer",
    "expand_groups",
    "dequantize_packed",
    "unpack_codes",
    "int4_linear",
    "int4_linear_eager",
    "dequant_linear",
]

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
_INT4PACK_DTYPE = torch.bfloat16  # activation / scale_zeros dtype used with the int4 kernels
_MAX_LAYOUT_BLOCK = 256  # the CPU int4 layout's row blocks are 16..64 rows; larger is not that layout


# --------------------------------------------------------------------------------------------
# int4pack helpers (pack time)
# --------------------------------------------------------------------------------------------


def int4pack_layer_supported(in_features: int, bits: int, group_size: int) -> tuple[bool, str]:
    """The device-independent int4 kernel constraints; (ok, reason)."""
    if bits != 4:
        return False, f"bits={bits} (int4pack needs 4)"
    if group_size not in INT4PACK_GROUP_SIZES:
        return False, f"group_size={group_size} not in {INT4PACK_GROUP_SIZES}"
    if in_features % group_size != 0:
        return False, f"in_features={in_features} not divisible by group_size={group_size}"
    return True, ""


def int4pack_supported(
    out_features: int,
    in_features: int,
    bits: int,
    group_size: int,
    device: torch.device | str,
) -> tuple[bool, str]:
    """Whether the built-in int4 kernels can run this layer on ``device``; (ok, reason)."""
    ok, reason = int4pack_layer_supported(in_features, bits, group_size)
    if not ok:
        return ok, reason
    device = torch.device(device)
    if device.type == "cpu":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return False, "this torch has no aten._weight_int4pack_mm_for_cpu"
        if out_features % 16 != 0:
            return False, f"out_features={out_features} not divisible by 16 (CPU kernel)"
        return True, ""
    if device.type == "cuda":
        if getattr(torch.version, "hip", None):
            return False, "ROCm build (tinygemm int4 kernel not used)"
        if not torch.cuda.is_available():
            return False, "CUDA not available"
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(idx) < (8, 0):
            return False, "CUDA int4 kernel needs sm80+"
        if out_features % 8 != 0:
            return False, f"out_features={out_features} not divisible by 8 (CUDA kernel)"
        if in_features % 32 != 0:
            return False, f"in_features={in_features} not divisible by 32 (CUDA kernel)"
        return True, ""
    return False, f"no int4 kernel for device type {device.type!r}"


def cuda_inner_k_tiles(in_features: int) -> int:
    """Largest ``innerKTiles`` in (8, 4, 2) with ``in_features % (16 * tiles) == 0``."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"in_features={in_features} must be a multiple of 32 for the CUDA kernel")


def pack_int4_weight(q: Tensor, device: torch.device | str | None = None) -> Tensor:
    """Convert integer codes ``q[N, K]`` (0..15) to the int4 kernel layout of ``device``."""
    device = torch.device(device) if device is not None else q.device
    q = q.to(device=device, dtype=torch.int32).contiguous()
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    if device.type == "cuda":
        u8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(u8, cuda_inner_k_tiles(q.shape[1]))
    raise ValueError(f"no int4 kernel for device {device}")


def pack_int4_scale_zeros(scale: Tensor, zero: Tensor, dtype: torch.dtype = _INT4PACK_DTYPE) -> Tensor:
    """AWQ ``scale[N, G]`` (float) and integer ``zero[N, G]`` -> ``[G, N, 2]`` for the kernels.

    ``[..., 0] = scale``, ``[..., 1] = (8 - zero) * scale`` (computed in fp32, then rounded to
    ``dtype``), so ``(q - 8) * scale + zero_f == (q - zero) * scale`` up to that rounding.
    """
    s = scale.to(torch.float32)
    z = (8.0 - zero.to(torch.float32)) * s
    return torch.stack([s, z], dim=-1).transpose(0, 1).to(dtype).contiguous()


def int4pack_effective_weight(
    packed_weight: Tensor, scale_zeros: Tensor, group_size: int, in_features: int
) -> Tensor:
    """The weight the int4 kernel really multiplies by, fp32 ``[N, K]`` (for tests/debugging).

    Runs the kernel on an identity matrix (bf16 output, so values are the kernel's bf16 weight).
    """
    eye = torch.eye(in_features, dtype=scale_zeros.dtype, device=packed_weight.device)
    if packed_weight.device.type == "cpu":
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed_weight, group_size, scale_zeros)
    else:
        out = torch.ops.aten._weight_int4pack_mm(eye, packed_weight, group_size, scale_zeros)
    return out.t().to(torch.float32).contiguous()


def int4pack_unpack_codes(
    packed_weight: Tensor, group_size: int, in_features: int, out_features: int
) -> Tensor:
    """Recover the integer codes ``q[N, K]`` (int32) from the kernel layout."""
    return int4pack_codes_t(packed_weight, group_size, in_features, out_features).t().to(torch.int32)


@dataclass(frozen=True)
class LayoutRun:
    """``blocks`` consecutive row blocks of ``rows`` rows stored alike in the CPU int4 layout.

    Each block holds, for every input column ``k``, ``rows / 2`` bytes; their low nibbles then
    their high nibbles are that column's codes for the block's rows in the order ``order``
    (``None``: rows in order), so ``codes[order[i]] = nibble[i]``.
    """

    blocks: int
    rows: int
    order: tuple[int, ...] | None


@functools.lru_cache(maxsize=None)
def cpu_int4pack_layout(out_features: int) -> tuple[LayoutRun, ...] | None:
    """How ``_convert_weight_to_int4pack_for_cpu`` lays out ``out_features`` rows, or ``None``.

    The layout depends on the CPU build (row blocks of 64 with AVX-512, 32 with AVX2, pairs of
    adjacent rows in a 16-row tail or without vectors), so it is read, not assumed: three probes
    of two columns whose codes are the row index's base-16 digits give, for every nibble of the
    output, the row it holds; the nibble stream is then split into blocks (a block of ``r`` rows
    is two runs of the same ``r`` rows, one per column). ``None`` when no such split exists.
    """
    n = out_features
    rows = torch.arange(n, dtype=torch.int32)[:, None].expand(n, 2)
    lo_rows = torch.zeros(n, dtype=torch.int64)
    hi_rows = torch.zeros(n, dtype=torch.int64)
    digit = 0
    while 16**digit < n:
        codes = (rows // 16**digit % 16).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).view(-1).to(torch.int64)
        lo_rows += (packed & 15) * 16**digit
        hi_rows += (packed >> 4) * 16**digit
        digit += 1
    stream = torch.stack((lo_rows, hi_rows), -1).view(-1).tolist()  # the nibbles in memory order
    runs: list[LayoutRun] = []
    pos = row = 0
    while pos < len(stream):
        for size in range(2, min(n - row, _MAX_LAYOUT_BLOCK) + 1, 2):
            first = stream[pos:pos + size]
            if first == stream[pos + size:pos + 2 * size] and sorted(first) == list(range(row, row + size)):
                break
        else:
            return None
        pairs = torch.tensor(first).view(size // 2, 2) - row
        slots = torch.cat((pairs[:, 0], pairs[:, 1]))
        order = None if torch.equal(slots, torch.arange(size)) else tuple(slots.tolist())
        if runs and (runs[-1].rows, runs[-1].order) == (size, order):
            runs[-1] = LayoutRun(runs[-1].blocks + 1, size, order)
        else:
            runs.append(LayoutRun(1, size, order))
        pos += 2 * size
        row += size
    return tuple(runs)


def int4pack_codes_t(packed_weight: Tensor, group_size: int, in_features: int, out_features: int,
                     out: Tensor | None = None) -> Tensor:
    """The codes of an int4-kernel weight, transposed: ``[K, N]``, any integer or float dtype of ``out``.

    CPU: read straight from the layout (:func:`cpu_int4pack_layout`). CUDA or an unknown CPU
    layout: by running the kernel on an identity matrix with scale 1 and zero 8 (slow; for
    saving, never per call).
    """
    k, n = in_features, out_features
    layout = cpu_int4pack_layout(n) if packed_weight.device.type == "cpu" else None
    if out is None:
        out = torch.empty(k, n, dtype=torch.uint8, device=packed_weight.device)
    if layout is None:
        unit = torch.tensor([1.0, 8.0], dtype=_INT4PACK_DTYPE, device=packed_weight.device)
        unit = unit.expand(k // group_size, n, 2).contiguous()
        return out.copy_(int4pack_effective_weight(packed_weight, unit, group_size, k).round().t())
    flat = packed_weight.view(-1)
    byte = row = 0
    for run in layout:
        size = run.blocks * k * run.rows // 2
        chunk = flat[byte:byte + size].view(run.blocks, k, run.rows // 2)
        nibbles = torch.cat((chunk & 15, chunk >> 4), -1)  # [blocks, K, rows] in slot order
        if run.order is not None:
            nibbles = torch.empty_like(nibbles).index_copy_(-1, torch.tensor(run.order), nibbles)
        out[:, row:row + run.blocks * run.rows].view(k, run.blocks, run.rows).copy_(nibbles.transpose(0, 1))
        byte += size
        row += run.blocks * run.rows
    return out


def int4pack_dequantize_t(packed_weight: Tensor, scale_zeros: Tensor, group_size: int, in_features: int,
                          dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """The weight the int4 kernel multiplies by, transposed: ``[K, N]`` in ``dtype``.

    ``(q - 8) * scale + zero`` with the kernel's own (bf16) ``scale_zeros``, computed in ``dtype``
    (in float32 it is the kernel's weight before the kernel rounds to bf16). Writes into ``out``
    when given, so a caller can reuse one buffer per shape.
    """
    n = scale_zeros.shape[1]
    if out is None:
        out = torch.empty(in_features, n, dtype=dtype, device=packed_weight.device)
    int4pack_codes_t(packed_weight, group_size, in_features, n, out=out)
    per_group = out.view(in_features // group_size, group_size, n)
    sz = scale_zeros.to(dtype)
    per_group.sub_(8).mul_(sz[:, None, :, 0]).add_(sz[:, None, :, 1])
    return out


# --------------------------------------------------------------------------------------------
# generic dequantization
# --------------------------------------------------------------------------------------------


def expand_groups(t: Tensor, group_size: int, in_features: int) -> Tensor:
    """Per-group ``t[out, n_groups]`` -> per-column ``[out, in_features]``.

    Groups are ``[0, g), [g, 2g), ...`` with a shorter last group when ``in_features % g != 0``
    (same as ``awqfx.quant.group_bounds``); ``group_size == -1`` means one group per row.
    """
    if group_size == -1 or group_size >= in_features:
        return t[:, :1].expand(t.shape[0], in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize_packed(packed_qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                      in_features: int) -> Tensor:
    """Unpack and dequantize one layer: ``(q - zero) * scale`` as fp32 ``[out, in_features]``.

    The integer difference is exact in fp32, so this is bit-identical to
    ``QuantizedWeight.dequantize()`` for the same codes, zero points and fp32 scales.
    """
    q = unpack_codes(packed_qweight, bits, in_features).to(torch.float32)
    s = scale.to(torch.float32)
    z = zero.to(torch.float32)
    out_features = q.shape[0]
    g = in_features if group_size == -1 else group_size
    if in_features % g == 0:  # uniform groups: broadcast per group, no expanded copies
        n_groups = in_features // g
        qg = q.reshape(out_features, n_groups, g)
        return ((qg - z.view(out_features, n_groups, 1)) * s.view(out_features, n_groups, 1)).view(
            out_features, in_features
        )
    return (q - expand_groups(z, group_size, in_features)) * expand_groups(s, group_size, in_features)


def unpack_codes(packed_qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """Integer codes ``[out, in_features]`` from the dense LSB-first int32 packing.

    Same values as :func:`awqfx.packing.unpack_int32` (dtype aside: int32 or int64), computed
    faster: for 1/2/4/8 bits no value straddles two words, so one broadcast shift-and-mask is
    enough; otherwise two row gathers per 32-value block.
    """
    rows, n_words = packed_qweight.shape
    dev = packed_qweight.device
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=dev)
        vals = (packed_qweight.unsqueeze(-1) >> shifts) & mask
        return vals.reshape(rows, -1)[:, :in_features]
    # 3/5/6/7 bits: 32 values fill exactly `bits` words (a block), so a value may straddle two
    # words but never two blocks. Value i of a block takes `nlo` bits from word lo[i] (from bit
    # off[i]) and the remaining `nhi` bits from the bottom of word lo[i] + 1. int32 only, with
    # the block's words as rows so the gathers are whole-row copies.
    n_blocks = -(-in_features // 32)
    words = packed_qweight
    if n_words < n_blocks * bits:
        words = F.pad(words, (0, n_blocks * bits - n_words))
    words = words.reshape(rows * n_blocks, bits).t().contiguous()  # [bits, rows * n_blocks]
    start = torch.arange(32, device=dev, dtype=torch.int64) * bits
    lo_idx, off = start // 32, start % 32
    nlo = torch.clamp(32 - off, max=bits)
    nhi = bits - nlo
    hi_idx = torch.clamp(lo_idx + 1, max=bits - 1)
    lo_mask = ((1 << nlo) - 1).to(torch.int32)[:, None]
    hi_mask = ((1 << nhi) - 1).to(torch.int32)[:, None]
    lo = (words.index_select(0, lo_idx) >> off.to(torch.int32)[:, None]) & lo_mask
    hi = (words.index_select(0, hi_idx) & hi_mask) << nlo.to(torch.int32)[:, None]
    vals = (lo | hi).t()  # [rows * n_blocks, 32]
    return vals.reshape(rows, n_blocks * 32)[:, :in_features]


def _flatten_input(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


def int4pack_matmul(x2: Tensor, packed_weight: Tensor, scale_zeros: Tensor, group_size: int) -> Tensor:
    """The int4 kernel of ``x2``'s device on bf16 ``[M, K]`` rows; bf16 ``[M, N]``."""
    if x2.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed_weight, group_size, scale_zeros)
    if x2.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x2, packed_weight, group_size, scale_zeros)
    raise RuntimeError(f"awqfx::int4_linear: unsupported device {x2.device}")


_scratch = threading.local()


def scratch_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """One reused buffer per (shape, dtype, device) and thread: layers of one shape share it."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (shape, dtype, device)
    if key not in buffers:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffers[key]


def takes_dense_path(rows: int, dense_from: int, device: torch.device) -> bool:
    """Whether an input of ``rows`` rows takes a layer's dense path: on the CPU, from its
    threshold ``dense_from`` on (0: never; :mod:`awqfx.kernel_choice`)."""
    return 0 < dense_from <= rows and device.type == "cpu"


def dense_linear(x2: Tensor, packed_weight: Tensor, scale_zeros: Tensor, group_size: int,
                 dtype: torch.dtype) -> Tensor:
    """``x2 @ W.T`` by dequantizing the int4-kernel weight into a reused ``[K, N]`` buffer of
    ``dtype`` (:func:`int4pack_dequantize_t`) and one dense matmul in ``dtype``."""
    k, n = x2.shape[-1], scale_zeros.shape[1]
    wt = scratch_buffer((k, n), dtype, x2.device)
    int4pack_dequantize_t(packed_weight, scale_zeros, group_size, k, dtype, out=wt)
    return x2.to(dtype) @ wt


def int4_linear_eager(
    x: Tensor,
    packed_weight: Tensor,
    scale_zeros: Tensor,
    group_size: int,
    bias: Optional[Tensor] = None,
    dense_from: int = 0,
    dense_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The body of ``awqfx::int4_linear``, callable without the dispatcher: in eager decode the
    custom op's Python dispatch costs more than the int4 kernel itself (about 90 us a call
    against 60 us on SmolLM2's layers), so ``QuantLinear`` calls this directly unless a graph is
    being captured."""
    if packed_weight.device != x.device:
        raise RuntimeError(
            f"awqfx::int4_linear: packed_weight on {packed_weight.device}, x on {x.device}"
        )
    sz = scale_zeros if scale_zeros.dtype == _INT4PACK_DTYPE else scale_zeros.to(_INT4PACK_DTYPE)
    x2 = _flatten_input(x)
    if x2.dtype != _INT4PACK_DTYPE or not x2.is_contiguous():
        x2 = x2.to(_INT4PACK_DTYPE).contiguous()
    if takes_dense_path(x2.shape[0], dense_from, x.device):
        # same bf16 inputs and bf16 result as the kernel, so the choice does not change the numbers
        y = dense_linear(x2, packed_weight, sz, group_size, dense_dtype).to(_INT4PACK_DTYPE)
    else:
        y = int4pack_matmul(x2, packed_weight, sz, group_size)
    if bias is not None:
        y = y.to(x.dtype) + bias.to(x.dtype)
    elif y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], sz.shape[1])


# ``F.linear(x, W, bias)`` with ``W`` in PyTorch's int4 kernel layout (see the module doc); with
# ``dense_from > 0`` (CPU), inputs of that many rows or more take the dense path
# (:mod:`awqfx.kernel_choice`). The op and :func:`int4_linear_eager` are one function.
int4_linear = torch.library.custom_op("awqfx::int4_linear", mutates_args=())(int4_linear_eager)


@int4_linear.register_fake
def _int4_linear_fake(x, packed_weight, scale_zeros, group_size, bias=None, dense_from=0, dense_dtype=torch.float32):
    torch._check(scale_zeros.dim() == 3, lambda: "scale_zeros must be [K/group, N, 2]")
    torch._check(
        x.shape[-1] == scale_zeros.shape[0] * group_size,
        lambda: "x.shape[-1] must equal in_features = scale_zeros.shape[0] * group_size",
    )
    return x.new_empty((*x.shape[:-1], scale_zeros.shape[1]))


@torch.library.custom_op("awqfx::dequant_linear", mutates_args=())
def dequant_linear(x: Tensor, packed_qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                   in_features: int, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, (q - zero) * scale, bias)``, dequantizing only this layer, per call."""
    w = dequantize_packed(packed_qweight, scale, zero, bits, group_size, in_features)
    b = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, w.to(x.dtype), b)


@dequant_linear.register_fake
def _dequant_linear_fake(x, packed_qweight, scale, zero, bits, group_size, in_features, bias=None):
    torch._check(x.shape[-1] == in_features, lambda: "x.shape[-1] must equal in_features")
    return x.new_empty((*x.shape[:-1], packed_qweight.shape[0]))
