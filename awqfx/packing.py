"""Generic bit packing of unsigned integers into int32 words.

The per-format tensor layouts built on it live in :mod:`awqfx.formats` (AutoAWQ GEMM,
compressed-tensors); they are pure re-layouts of the integers in a
:class:`~awqfx.quant.QuantizedWeight`: no requantization happens, so the
integers a loader unpacks are exactly the ones our quantizer chose.

Bit packing (:func:`pack_int32`)
--------------------------------
Values are written as one dense little-endian bit stream per row: element ``i``
occupies bits ``[i*b, (i+1)*b)`` of the row, word ``k`` holds stream bits
``[32k, 32k+32)``, LSB first. For ``b`` in {1, 2, 4, 8} that is the familiar
"``32 // b`` values per int32, first value in the lowest bits". For 3, 5, 6 and
7 bits a value may straddle two words and no bit is wasted (32 values of 3 bits
fill exactly 3 words). This is the layout of compressed-tensors 0.20
(``pack_to_int32``: "dense cross-element packing"); older compressed-tensors
releases packed ``32 // b`` values per word and wasted the top bits, so 3-, 5-,
6- and 7-bit checkpoints are NOT interchangeable between those versions.
A row whose length is not a multiple of the pack factor is padded with zero
bits; ``unpack_int32`` trims with ``n``. Words are reinterpreted as two's
complement int32 (a word whose top bit is set is negative).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_int32", "unpack_int32", "packed_length"]

_CHUNK_VALUES = 1 << 20
_MASK32 = (1 << 32) - 1


# --------------------------------------------------------------------------- bit packing


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` values of ``bits`` bits (dense packing)."""
    return -(-n * bits // 32)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}.")


def _bit_layout(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For the 32 values of one block (``bits`` words): word index and bit offset of each."""
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_int32(values: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Pack unsigned ``bits``-bit integers along ``dim`` into int32 words (dense, LSB first).

    ``values`` may have any integer dtype and any number of dims; every value
    must lie in ``[0, 2^bits)``. The result has ``dim`` shrunk to
    ``ceil(n * bits / 32)``. See the module docstring for the exact layout.
    """
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"pack_int32 expects an integer tensor, got {values.dtype}.")
    if values.dim() == 0:
        raise ValueError("pack_int32 needs at least one dimension.")
    v = values.movedim(dim, -1)
    lead, n = v.shape[:-1], v.shape[-1]
    v = v.reshape(-1, n)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(
            f"values must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits, "
            f"got range [{int(v.min())}, {int(v.max())}]."
        )
    n_words = packed_length(n, bits)
    # rows in chunks of about 2^20 values: the int64 work below takes ~32 bytes per value
    step = max(1, _CHUNK_VALUES // max(1, n))
    words = [_pack_rows(v[r : r + step], bits, n, n_words) for r in range(0, v.shape[0], step)]
    words = torch.cat(words) if words else torch.zeros(0, n_words, dtype=torch.int32, device=v.device)
    return words.reshape(*lead, n_words).movedim(-1, dim)


def _pack_rows(v: Tensor, bits: int, n: int, n_words: int) -> Tensor:
    rows = v.shape[0]
    n_blocks = -(-n // 32)
    v = torch.nn.functional.pad(v.to(torch.int64), (0, n_blocks * 32 - n)).reshape(rows, n_blocks, 32)
    word_idx, offset = _bit_layout(bits, v.device)
    # Each value shifted to its offset inside its word; an int64 accumulator
    # keeps the bits that spill past bit 31, which then carry into the next word.
    # Fields never overlap, so addition is bitwise OR.
    acc = torch.zeros(rows, n_blocks, bits, dtype=torch.int64, device=v.device)
    acc.index_add_(2, word_idx, v << offset)
    words = acc & _MASK32
    words[..., 1:] |= acc[..., :-1] >> 32
    words = words.reshape(rows, n_blocks * bits)[:, :n_words]
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, n: int, dim: int = -1) -> Tensor:
    """Inverse of :func:`pack_int32`: ``n`` unsigned values per row along ``dim`` as uint8."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32 expects int32 words, got {packed.dtype}.")
    p = packed.movedim(dim, -1)
    lead, n_words = p.shape[:-1], p.shape[-1]
    if n_words != packed_length(n, bits):
        raise ValueError(
            f"{n} values of {bits} bits need {packed_length(n, bits)} words, got {n_words}."
        )
    p = p.reshape(-1, n_words).to(torch.int64) & _MASK32
    rows = p.shape[0]
    n_blocks = -(-n // 32)
    # One extra zero word so the "next word" of the last word exists.
    p = torch.nn.functional.pad(p, (0, n_blocks * bits + 1 - n_words)).reshape(rows, -1)
    word_idx, offset = _bit_layout(bits, p.device)
    base = torch.arange(n_blocks, device=p.device, dtype=torch.int64)[:, None] * bits
    idx = (base + word_idx).reshape(-1)  # word index of every value, [n_blocks*32]
    # 64-bit window (word, next word): a value that straddles two words is
    # contiguous in it.
    window = p[:, idx] | (p[:, idx + 1] << 32)
    vals = (window >> offset.repeat(n_blocks)) & ((1 << bits) - 1)
    vals = vals[:, :n].to(torch.uint8)
    return vals.reshape(*lead, n).movedim(-1, dim)
