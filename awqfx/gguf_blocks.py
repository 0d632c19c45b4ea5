"""GGUF block quantizers (llama.cpp's Q4_0, Q4_1, Q8_0) as torch fake quantization.

The AWQ search must optimise the numbers llama.cpp will compute with, so this module reproduces,
operation for operation in float32, how the ``gguf`` package (``gguf.quants``, bit-exact with
ggml's reference quantizers) turns a block of 32 weights into a scale, integers and back
(docs/design.md, "GGUF"). Blocks run along the input dim; a row's length must be a multiple of 32.

=====  ==========================================  ===========================================
type   quantize (per block ``x`` of 32 weights)      value
=====  ==========================================  ===========================================
q4_0   ``m`` = the signed element of largest |x|     ``d16 * (q - 8)``
       (the first one on ties), ``d = m / -8``,
       ``q = clamp(trunc(x / d + 8.5), 0, 15)``
q4_1   ``d = (max - min) / 15``,                     ``d16 * q + m16``
       ``q = clamp(trunc((x - min) / d + 0.5), 0, 15)``
q8_0   ``d = max|x| / 127``,                         ``d16 * q``
       ``q`` = round half away from zero of ``x / d``
=====  ==========================================  ===========================================

``/ d`` is ``* (1 / d)`` (0 when ``d == 0``, an all-zero or constant block), every product and sum
is a separate float32 rounding, and ``d16`` / ``m16`` are ``d`` / ``min`` rounded to float16 (round
to nearest even, as numpy's ``astype(float16)``): :func:`fake_quantize` equals
``gguf.quants.dequantize(gguf.quants.quantize(w, type), type)`` exactly.

Clipping. A block quantizer takes its range from the block itself, so a clip range
(``max_val``/``min_val`` per (row, block), from the clip search) is applied by clamping the
weight to it first (:func:`clamp_blocks`); the quantizer then sees the clamped block. The GGUF
writer clamps with the same function before it calls ``gguf.quants.quantize``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BLOCK_SIZE", "GGUF_TYPES", "BlockType", "block_type", "clamp_blocks", "fake_quantize"]

#: Weights per block along the input dim, the same for every type here.
BLOCK_SIZE = 32


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: its name (``"q4_0"``), bits per weight code, whether it has no offset
    (the range is symmetric about 0) and the name of its ``gguf.GGMLQuantizationType`` member."""

    name: str
    bits: int
    symmetric: bool
    ggml_name: str


GGUF_TYPES: dict[str, BlockType] = {
    "q4_0": BlockType("q4_0", 4, True, "Q4_0"),
    "q4_1": BlockType("q4_1", 4, False, "Q4_1"),
    "q8_0": BlockType("q8_0", 8, True, "Q8_0"),
}


def block_type(name: str) -> BlockType:
    """The :class:`BlockType` called ``name``; a ValueError naming the supported ones otherwise."""
    if name not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {name!r}; awqfx quantizes to {', '.join(GGUF_TYPES)}.")
    return GGUF_TYPES[name]


def _blocks(w: Tensor) -> Tensor:
    """``[..., in]`` as float32 ``[rows, in / 32, 32]``."""
    n = w.shape[-1]
    if n % BLOCK_SIZE:
        raise ValueError(f"GGUF blocks hold {BLOCK_SIZE} weights along the input dim; a row of {n} is not a multiple "
                         f"of {BLOCK_SIZE}.")
    return w.reshape(-1, n // BLOCK_SIZE, BLOCK_SIZE).to(torch.float32)


def _per_block(p: Tensor, x: Tensor, name: str) -> Tensor:
    if p.numel() != x.shape[0] * x.shape[1]:
        raise ValueError(f"{name} has {p.numel()} elements; expected one per (row, block): "
                         f"{x.shape[0]} x {x.shape[1]}.")
    return p.reshape(x.shape[0], x.shape[1], 1).to(device=x.device, dtype=torch.float32)


def clamp_blocks(w: Tensor, max_val: Tensor | None = None, min_val: Tensor | None = None) -> Tensor:
    """``w`` (``[..., in]``) clamped per (row, block) to ``[min_val, max_val]`` (``[..., in / 32]``
    each, either may be None), as float32 of ``w``'s shape. Where ``min_val > max_val`` the result is
    ``max_val`` (``torch.clamp``'s rule)."""
    x = _blocks(w)
    if max_val is not None or min_val is not None:
        lo = None if min_val is None else _per_block(min_val, x, "min_val")
        hi = None if max_val is None else _per_block(max_val, x, "max_val")
        x = torch.clamp(x, min=lo, max=hi)
    return x.reshape(w.shape)


def _reciprocal(d: Tensor) -> Tensor:
    """``1 / d``, 0 where ``d == 0`` (numpy: ``np.where(d == 0, 0, 1 / d)``)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _half(t: Tensor) -> Tensor:
    """Rounded to float16 and back: what the block stores and the dequantizer reads."""
    return t.to(torch.float16).to(torch.float32)


def _q4_0(x: Tensor) -> Tensor:
    m = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))  # the signed value of largest magnitude
    d = m / -8.0
    q = torch.trunc(x * _reciprocal(d) + 8.5).clamp_(0.0, 15.0)
    return _half(d) * (q - 8.0)


def _q4_1(x: Tensor) -> Tensor:
    mx = x.amax(dim=-1, keepdim=True)
    mn = x.amin(dim=-1, keepdim=True)
    d = (mx - mn) / 15.0
    q = torch.trunc((x - mn) * _reciprocal(d) + 0.5).clamp_(0.0, 15.0)
    return _half(d) * q + _half(mn)


def _q8_0(x: Tensor) -> Tensor:
    d = x.abs().amax(dim=-1, keepdim=True) / 127.0
    n = x * _reciprocal(d)
    a = n.abs()
    whole = a.floor()
    q = torch.sign(n) * (whole + (2.0 * (a - whole)).floor())  # round half away from zero, exactly
    return q * _half(d)


_QDQ = {"q4_0": _q4_0, "q4_1": _q4_1, "q8_0": _q8_0}


def fake_quantize(w: Tensor, type_name: str, max_val: Tensor | None = None, min_val: Tensor | None = None) -> Tensor:
    """Quantize ``w`` (``[..., in]``, blocks along the last dim) to GGUF type ``type_name`` and back;
    ``w``'s shape and dtype. ``max_val``/``min_val`` (``[..., in / 32]``): the clip range, applied by
    :func:`clamp_blocks` first."""
    qdq = _QDQ[block_type(type_name).name]
    x = clamp_blocks(w, max_val, min_val).reshape(-1, w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    return qdq(x).reshape(w.shape).to(w.dtype)
