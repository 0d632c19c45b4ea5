"""Bit packing and the two foreign checkpoint layouts (AutoAWQ GEMM, compressed-tensors).

Every exporter here is a pure re-layout of the integers in a
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

AutoAWQ GEMM (``quant_method: awq, version: gemm``)
---------------------------------------------------
4-bit, asymmetric. Tensors are laid out per *input* row (transposed relative to
``nn.Linear.weight``):

* ``qweight`` int32 ``[in, out/8]``: word ``j`` of input row ``i`` holds output
  columns ``8j .. 8j+7``; nibble ``k`` (bits ``4k .. 4k+3``) holds column
  ``8j + AWQ_ORDER[k]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
* ``qzeros`` int32 ``[n_groups, out/8]``: same packing of the integer zeros.
* ``scales`` float16 ``[n_groups, out]``.
* dequant: ``(q - zero) * scale``; requires ``in % group_size == 0`` and
  ``out % 8 == 0``.

compressed-tensors ``pack-quantized`` (verified against compressed-tensors 0.20)
--------------------------------------------------------------------------------
* ``weight_packed`` int32 ``[out, ceil(in*b/32)]``: the dense stream above,
  along ``in``. compressed-tensors holds signed ``q_s in [-2^(b-1), 2^(b-1)-1]``
  and packs ``q_s + 2^(b-1)``, which is exactly our unsigned ``q``.
* ``weight_scale`` ``[out, n_groups]`` (``[out, 1]`` for channel). Its dtype is
  the original weight's dtype in compressed-tensors (fp16 / bf16 / fp32); its
  decompressor computes ``(q_s - zp_s) * scale`` *in the scale's dtype*.
* ``weight_zero_point`` (asymmetric only; dropped for symmetric): signed
  ``zp_s = zero - 2^(b-1)``, packed the same way (``+ 2^(b-1)``, i.e. our
  unsigned zero bits) but along the **output** dim: int32
  ``[ceil(out*b/32), n_groups]``.
* ``weight_shape`` int64 ``[2]`` (``torch.tensor(weight.shape)``; vLLM declares
  it int64 too).
* Group strategy requires ``in % group_size == 0`` (its ``_process_group``
  raises otherwise), so ragged groups cannot be exported to this format.
* 3-D tensors (fused experts ``[E, out, in]``) are packed per expert; we do the
  same (``weight_shape`` then has 3 entries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from awqfx.quant import QuantizedWeight, QuantSpec, num_groups

__all__ = [
    "pack_int32",
    "unpack_int32",
    "packed_length",
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "to_autoawq_gemm",
    "from_autoawq_gemm",
    "to_compressed_tensors",
    "from_compressed_tensors",
    "compressed_tensors_config",
    "CT_FORMAT_VERSION",
]

#: Nibble k of an AutoAWQ word holds output column 8j + AWQ_ORDER[k].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Inverse permutation: output column 8j + c lives in nibble AWQ_REVERSE_ORDER[c].
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

#: The compressed-tensors release whose pack-quantized layout and config schema
#: this module was verified against (written as the config's "version").
CT_FORMAT_VERSION = "0.20.0"

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
    v = v.reshape(-1, n).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(
            f"values must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits, "
            f"got range [{int(v.min())}, {int(v.max())}]."
        )
    rows = v.shape[0]
    n_words = packed_length(n, bits)
    n_blocks = -(-n // 32)
    v = torch.nn.functional.pad(v, (0, n_blocks * 32 - n)).reshape(rows, n_blocks, 32)
    word_idx, offset = _bit_layout(bits, v.device)
    # Each value shifted to its offset inside its word; an int64 accumulator
    # keeps the bits that spill past bit 31, which then carry into the next word.
    # Fields never overlap, so addition is bitwise OR.
    acc = torch.zeros(rows, n_blocks, bits, dtype=torch.int64, device=v.device)
    acc.index_add_(2, word_idx, v << offset)
    words = acc & _MASK32
    words[..., 1:] |= acc[..., :-1] >> 32
    words = words.reshape(rows, n_blocks * bits)[:, :n_words]
    words = torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)
    return words.reshape(*lead, n_words).movedim(-1, dim)


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


# --------------------------------------------------------------------------- AutoAWQ GEMM


def _check_autoawq(bits: int, group_size: int, out_features: int, in_features: int, where: str) -> int:
    """Validate AutoAWQ GEMM constraints; return the effective group size."""
    if bits != 4:
        raise ValueError(f"{where}: AutoAWQ GEMM stores 4-bit weights only, got bits={bits}.")
    g = in_features if group_size == -1 else group_size
    if g <= 0 or in_features % g != 0:
        raise ValueError(
            f"{where}: AutoAWQ GEMM needs in_features % group_size == 0, got in_features="
            f"{in_features} with group_size={group_size} (ragged last group)."
        )
    if out_features % 8 != 0:
        raise ValueError(
            f"{where}: AutoAWQ GEMM needs out_features % 8 == 0, got out_features={out_features}."
        )
    return g


def _awq_pack_cols(x: Tensor) -> Tensor:
    """``[rows, out]`` 4-bit values -> int32 ``[rows, out/8]`` with AWQ nibble order."""
    rows, out = x.shape
    order = torch.tensor(AWQ_ORDER, device=x.device)
    permuted = x.reshape(rows, out // 8, 8)[:, :, order].reshape(rows, out)
    return pack_int32(permuted, 4, dim=-1)


def _awq_unpack_cols(words: Tensor, out: int) -> Tensor:
    """Inverse of :func:`_awq_pack_cols`: int32 ``[rows, out/8]`` -> uint8 ``[rows, out]``."""
    rows = words.shape[0]
    nib = unpack_int32(words, 4, out, dim=-1)
    rev = torch.tensor(AWQ_REVERSE_ORDER, device=words.device)
    return nib.reshape(rows, out // 8, 8)[:, :, rev].reshape(rows, out)


def to_autoawq_gemm(qw: QuantizedWeight) -> dict[str, Tensor]:
    """AutoAWQ GEMM tensors ``{"qweight", "qzeros", "scales"}`` for one linear layer.

    A symmetric 4-bit weight is exported exactly as zero points all equal to 8
    (AutoAWQ always stores zeros). Scales are rounded to float16, as AutoAWQ
    stores them; a scale outside float16's range raises.
    """
    if len(qw.shape) != 2:
        raise ValueError(f"AutoAWQ GEMM exports 2-D linear weights only, got shape {qw.shape}.")
    out_f, in_f = qw.shape
    _check_autoawq(qw.spec.bits, qw.spec.group_size, out_f, in_f, "to_autoawq_gemm")
    scales16 = qw.scale.to(torch.float16)
    if not torch.isfinite(scales16).all():
        raise ValueError("to_autoawq_gemm: a scale exceeds the float16 range (65504) AutoAWQ stores.")
    return {
        "qweight": _awq_pack_cols(qw.q.t()),  # [in, out/8]
        "qzeros": _awq_pack_cols(qw.zero.t()),  # [G, out/8]
        "scales": scales16.t().contiguous(),  # [G, out]
    }


def from_autoawq_gemm(tensors: Mapping[str, Tensor], group_size: int, in_features: int) -> QuantizedWeight:
    """Read AutoAWQ GEMM tensors back into a :class:`QuantizedWeight` (asymmetric, 4-bit).

    The scale is the stored float16 value widened to float32.
    """
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    out_f = scales.shape[1]
    _check_autoawq(4, group_size, out_f, in_features, "from_autoawq_gemm")
    n_groups = num_groups(in_features, group_size)
    expected = {
        "qweight": (in_features, out_f // 8),
        "qzeros": (n_groups, out_f // 8),
        "scales": (n_groups, out_f),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"from_autoawq_gemm: {name} has shape {tuple(tensors[name].shape)}, expected {shape}."
            )
    q = _awq_unpack_cols(qweight, out_f).t().contiguous()
    zero = _awq_unpack_cols(qzeros, out_f).t().to(torch.int32).contiguous()
    spec = QuantSpec(bits=4, group_size=group_size, symmetric=False)
    return QuantizedWeight(
        q=q,
        scale=scales.to(torch.float32).t().contiguous(),
        zero=zero,
        spec=spec,
        shape=(out_f, in_features),
    )


# --------------------------------------------------------------------------- compressed-tensors


def _check_ct(spec: QuantSpec, in_features: int, where: str) -> None:
    if spec.group_size != -1 and in_features % spec.group_size != 0:
        raise ValueError(
            f"{where}: compressed-tensors group quantization needs in_features % group_size == 0, "
            f"got in_features={in_features} with group_size={spec.group_size} (ragged last group)."
        )


def to_compressed_tensors(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """compressed-tensors ``pack-quantized`` tensors for one weight (local names).

    Returns ``weight_packed``, ``weight_scale``, ``weight_shape`` and, for
    asymmetric specs, ``weight_zero_point``. ``scale_dtype``: compressed-tensors
    gives the scale the dtype of the original weight (what llm-compressor
    writes); pass the model dtype for a like-for-like checkpoint. With float32
    its decompressor reproduces :meth:`QuantizedWeight.dequantize` bit for bit;
    with fp16/bf16 the scale (and the dequant arithmetic) is rounded to that dtype.
    """
    spec = qw.spec
    in_f = qw.shape[-1]
    _check_ct(spec, in_f, "to_compressed_tensors")
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"to_compressed_tensors: scale_dtype must be a float dtype, got {scale_dtype}.")
    half = 1 << (spec.bits - 1)
    if spec.symmetric and not bool((qw.zero == half).all()):
        raise ValueError(
            f"to_compressed_tensors: a symmetric weight must have every zero point == {half}."
        )
    out: dict[str, Tensor] = {
        "weight_packed": pack_int32(qw.q, spec.bits, dim=-1),
        "weight_scale": qw.scale.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if not spec.symmetric:
        # Signed zp_s = zero - 2^(b-1) is packed as zp_s + 2^(b-1): our unsigned zero.
        out["weight_zero_point"] = pack_int32(qw.zero, spec.bits, dim=-2).contiguous()
    return out


def from_compressed_tensors(tensors: Mapping[str, Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Read compressed-tensors ``pack-quantized`` tensors (local names) back into a QuantizedWeight.

    ``spec`` must match the checkpoint's config (num_bits, group_size or -1 for
    channel, symmetric). The scale is widened to float32.
    """
    shape = tuple(int(x) for x in tensors["weight_shape"].tolist())
    if len(shape) < 2:
        raise ValueError(f"from_compressed_tensors: weight_shape must have >= 2 entries, got {shape}.")
    in_f = shape[-1]
    spec.validate(in_f)
    _check_ct(spec, in_f, "from_compressed_tensors")
    n_groups = num_groups(in_f, spec.group_size)
    scale = tensors["weight_scale"].to(torch.float32)
    if tuple(scale.shape) != (*shape[:-1], n_groups):
        raise ValueError(
            f"from_compressed_tensors: weight_scale has shape {tuple(scale.shape)}, "
            f"expected {(*shape[:-1], n_groups)} for {spec}."
        )
    q = unpack_int32(tensors["weight_packed"], spec.bits, in_f, dim=-1)
    if tuple(q.shape) != shape:
        raise ValueError(f"from_compressed_tensors: weight_packed does not unpack to {shape}.")
    if spec.symmetric:
        zero = torch.full(scale.shape, 1 << (spec.bits - 1), dtype=torch.int32)
    else:
        if "weight_zero_point" not in tensors:
            raise ValueError("from_compressed_tensors: asymmetric spec but no weight_zero_point.")
        zero = unpack_int32(tensors["weight_zero_point"], spec.bits, shape[-2], dim=-2).to(torch.int32)
    return QuantizedWeight(q=q, scale=scale.contiguous(), zero=zero.contiguous(), spec=spec, shape=shape)


def compressed_tensors_config(
    spec: QuantSpec,
    ignore: Sequence[str] = (),
    targets: Sequence[str] = ("Linear",),
) -> dict:
    """The ``quantization_config`` dict of a compressed-tensors ``pack-quantized`` checkpoint.

    Mirrors what compressed-tensors 0.20 writes (``QuantizationConfig.model_dump``
    plus ``version``/``sparsity_config``/``transform_config``). ``ignore`` lists
    module names left in full precision (e.g. ``lm_head``); ``targets`` are the
    module class names or ``re:`` patterns the scheme applies to.
    Channel-wise specs (``group_size == -1``) use ``strategy: channel`` with no
    group size. Does not know in_features, so ragged groups are rejected by
    :func:`to_compressed_tensors`, not here.
    """
    if spec.group_size == -1:
        strategy, group_size = "channel", None
    else:
        strategy, group_size = "group", spec.group_size
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "group_size": group_size,
        "strategy": strategy,
        "dynamic": False,
    }
    return {
        "config_groups": {
            "group_0": {
                "targets": list(targets),
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_FORMAT_VERSION,
    }
