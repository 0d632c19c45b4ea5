"""Integer weight quantizer math (pure torch, vectorized).

This module is the single source of truth for how a float weight becomes
integers and back. Everything else (the AWQ scale/clip search, the quantized
modules, the exporters in :mod:`awqfx.formats`) calls into it, so the search
optimises exactly the numbers that end up on disk. A spec whose ``scheme`` is a
GGUF block type fake-quantizes with llama.cpp's quantizer instead
(:mod:`awqfx.gguf_blocks`); it has no integer zero-point form.

Conventions
-----------
* A weight is ``[out, in]`` (``nn.Linear`` layout). Groups run along ``in``:
  group ``k`` of row ``r`` covers columns ``[k*g, min((k+1)*g, in))``.
* ``group_size == -1`` means one group per row (per-output-channel).
* When ``in % group_size != 0`` the **last group is ragged** (shorter). For
  example ``in=576, g=128`` gives 4 groups of 128 and one of 64. Its min/max are
  taken over its real elements only; we never pad with zeros, because padding
  would change the group's min/max (and therefore its scale and zero point).
  AutoAWQ and llm-compressor refuse such shapes; we do not.
* Stored integers are always **unsigned**, ``q in [0, 2^b - 1]`` (uint8), with
  an integer zero point ``zero`` (int32) and a float32 ``scale``; the
  dequantized weight is ``(q - zero) * scale``. Symmetric quantization is the
  special case ``zero == 2^(b-1)`` for every group, i.e. the signed value
  ``q - 2^(b-1)`` lies in ``[-2^(b-1), 2^(b-1) - 1]``. Keeping one convention
  makes every exporter a pure re-layout of the same integers.
* Math is done in float32 regardless of the weight dtype (fp16/bf16 min/max and
  divisions would round differently from the reference implementations).
* Tensors with more than two dims (fused MoE experts ``[E, out, in]``) are
  treated as ``E*out`` independent rows: groups never cross a row, so this is
  the same as quantizing each expert's ``[out, in]`` matrix on its own. Scale
  and zero keep the leading dims: ``[E, out, n_groups]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from awqfx import gguf_blocks
from awqfx.gguf_blocks import BLOCK_SIZE, GGUF_TYPES, block_type

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "group_bounds",
    "num_groups",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "clamp_to_range",
    "quantize_weight",
    "SCALE_EPS",
]

#: Lower bound of a group's range (asymmetric: max - min; symmetric: max |w|).
#: AutoAWQ uses the same 1e-5 clamp. It keeps all-zero (or constant) groups
#: from producing a zero scale, hence 0/0 = NaN in ``w / scale``.
SCALE_EPS = 1e-5


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized.

    bits:        2..8 bits per weight.
    group_size:  number of consecutive input columns sharing one scale/zero;
                 -1 means the whole row (per-output-channel).
    symmetric:   if True, zero is fixed at 2^(bits-1) and the scale comes from
                 max |w|; otherwise (AWQ default) scale/zero come from min/max.
    scheme:      ``"int"`` (default): the integer grid of this module. Or a GGUF block
                 type, ``"q4_0"``, ``"q4_1"`` or ``"q8_0"`` (:mod:`awqfx.gguf_blocks`): the
                 quantizer is then llama.cpp's for that type, and bits / group_size /
                 symmetric must be the type's own (:meth:`gguf` builds such a spec).

    The spec is validated on construction (bits and group_size on their own);
    :meth:`validate` with ``in_features`` also checks it against a layer.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scheme: str = "int"

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def gguf(cls, type_name: str) -> QuantSpec:
        """The spec of GGUF block type ``type_name`` (``"q4_0"``, ``"q4_1"``, ``"q8_0"``)."""
        t = block_type(type_name)
        return cls(bits=t.bits, group_size=BLOCK_SIZE, symmetric=t.symmetric, scheme=t.name)

    @property
    def is_gguf(self) -> bool:
        """Whether the quantizer is a GGUF block type rather than the integer grid."""
        return self.scheme != "int"

    def validate(self, in_features: int | None = None) -> None:
        """Raise ``ValueError`` if the spec is unusable (for a layer with ``in_features``)."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}.")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g == 0 or g < -1:
            raise ValueError(
                f"group_size must be a positive integer or -1 (one group per output row), got {g!r}."
            )
        if self.scheme != "int":
            self._validate_gguf(in_features)
        if in_features is not None:
            if in_features <= 0:
                raise ValueError(f"in_features must be positive, got {in_features}.")
            if g > in_features:
                raise ValueError(
                    f"group_size {g} is larger than in_features {in_features}; "
                    "use group_size=-1 for one group per row."
                )

    def _validate_gguf(self, in_features: int | None) -> None:
        if self.scheme not in GGUF_TYPES:
            raise ValueError(f"scheme must be 'int' or a GGUF type ({', '.join(GGUF_TYPES)}), got {self.scheme!r}.")
        t = GGUF_TYPES[self.scheme]
        if (self.bits, self.group_size, self.symmetric) != (t.bits, BLOCK_SIZE, t.symmetric):
            raise ValueError(
                f"GGUF {self.scheme} has bits={t.bits}, group_size={BLOCK_SIZE}, symmetric={t.symmetric}; got "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric} "
                f"(QuantSpec.gguf({self.scheme!r}) builds the spec)."
            )
        if in_features is not None and in_features % BLOCK_SIZE:
            raise ValueError(f"GGUF {self.scheme} quantizes blocks of {BLOCK_SIZE} inputs; in_features {in_features} "
                             f"is not a multiple of {BLOCK_SIZE}.")

    def require_int(self, what: str) -> None:
        """Raise ``ValueError`` for a GGUF scheme: ``what`` needs the integer grid's scale and zero point."""
        if self.scheme != "int":
            raise ValueError(f"{what} needs the integer quantizer; GGUF {self.scheme} blocks have no integer zero "
                             "point form and are written by awqfx.formats.gguf (--format gguf).")

    @property
    def qmax(self) -> int:
        """Largest stored (unsigned) integer, 2^bits - 1."""
        return (1 << self.bits) - 1

    def effective_group_size(self, in_features: int) -> int:
        """The group length actually used for a layer (``in_features`` when -1)."""
        return in_features if self.group_size == -1 else self.group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups along ``in``, counting a ragged last group (ceil division)."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or -1, got {group_size}.")
    return -(-in_features // group_size)


def group_bounds(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` column ranges of each group; the last may be shorter."""
    if group_size == -1:
        return [(0, in_features)]
    n = num_groups(in_features, group_size)
    return [(k * group_size, min((k + 1) * group_size, in_features)) for k in range(n)]


# --------------------------------------------------------------------------- helpers


def _as_rows(w: Tensor) -> Tensor:
    """View ``[..., in]`` as float32 ``[rows, in]`` (rows = product of leading dims)."""
    if w.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [out, in], got shape {tuple(w.shape)}.")
    return w.reshape(-1, w.shape[-1]).to(torch.float32)


def _param_rows(p: Tensor, rows: int, n_groups: int, name: str) -> Tensor:
    """Bring a ``[..., n_groups]`` parameter to float32 ``[rows, n_groups]``."""
    if p.numel() != rows * n_groups:
        raise ValueError(
            f"{name} has shape {tuple(p.shape)}, expected {rows * n_groups} elements "
            f"(rows={rows} x n_groups={n_groups})."
        )
    return p.reshape(rows, n_groups).to(torch.float32)


def _split(x: Tensor, g: int) -> list[tuple[Tensor, slice]]:
    """Split ``[rows, in]`` into ``[rows, k, len]`` blocks of equal-length groups.

    Returns at most two blocks: all full groups reshaped to ``[rows, n_full, g]``
    (no copy when there is no tail) and the ragged tail as ``[rows, 1, in % g]``,
    each with the slice of group indices it covers. This keeps everything as a
    couple of large vectorized ops instead of a Python loop over groups.
    """
    rows, n = x.shape
    n_full = n // g
    out = []
    if n_full:
        out.append((x[:, : n_full * g].reshape(rows, n_full, g), slice(0, n_full)))
    if n_full * g < n:
        out.append((x[:, n_full * g :].unsqueeze(1), slice(n_full, n_full + 1)))
    return out


def _reduce_groups(x: Tensor, g: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a reduction over each group's last dim; returns ``[rows, n_groups]``."""
    return torch.cat([fn(blk) for blk, _ in _split(x, g)], dim=1)


def _map_groups(x: Tensor, g: int, fn: Callable[..., Tensor], *params: Tensor) -> Tensor:
    """Apply an elementwise ``fn(block, *params)`` with per-group params; returns ``[rows, in]``."""
    rows = x.shape[0]
    parts = [fn(blk, *(p[:, sl, None] for p in params)).reshape(rows, -1) for blk, sl in _split(x, g)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _check_finite(w2: Tensor) -> None:
    # aminmax propagates NaN and exposes +-Inf: one fused reduction, ~25x cheaper than
    # isfinite(w).all() (this runs for every candidate of the AWQ grid and clip searches)
    if w2.numel() and not torch.isfinite(torch.stack(torch.aminmax(w2))).all():
        raise ValueError("weight contains NaN or Inf; cannot compute quantization parameters.")


# --------------------------------------------------------------------------- qparams


def compute_qparams(
    w: Tensor,
    spec: QuantSpec,
    max_val: Tensor | None = None,
    min_val: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32), each ``[..., out, n_groups]``.

    Asymmetric (AutoAWQ convention; min/max are the group's own, 0 is not forced
    into the range)::

        scale = clamp(max - min, min=1e-5) / (2^b - 1)
        zero  = clamp(-round(min / scale), 0, 2^b - 1)

    Symmetric (stored unsigned with a fixed zero)::

        scale = clamp(max(|max|, |min|), min=1e-5) / (2^(b-1) - 1)
        zero  = 2^(b-1)

    ``max_val`` / ``min_val`` (``[..., out, n_groups]``), when given, replace
    the observed group max / min. The clip search uses them to try shrunken
    ranges: values outside the range then saturate in :func:`quantize`.
    The 1e-5 clamp guards all-zero and constant groups against 0/0.
    """
    in_features = w.shape[-1]
    spec.validate(in_features)
    spec.require_int("compute_qparams")
    w2 = _as_rows(w)
    _check_finite(w2)
    rows = w2.shape[0]
    g = spec.effective_group_size(in_features)
    n_groups = num_groups(in_features, spec.group_size)
    lead = tuple(w.shape[:-1])

    need_max = max_val is None
    need_min = min_val is None
    if need_max or need_min:
        if need_max and need_min:
            stats = _reduce_groups(w2, g, lambda b: torch.stack(torch.aminmax(b, dim=-1), dim=-1))
            mn, mx = stats[..., 0], stats[..., 1]
        elif need_max:
            mx = _reduce_groups(w2, g, lambda b: b.amax(dim=-1))
        else:
            mn = _reduce_groups(w2, g, lambda b: b.amin(dim=-1))
    if not need_max:
        mx = _param_rows(max_val, rows, n_groups, "max_val")
    if not need_min:
        mn = _param_rows(min_val, rows, n_groups, "min_val")

    if spec.symmetric:
        absmax = torch.maximum(mx.abs(), mn.abs()).clamp(min=SCALE_EPS)
        scale = absmax / float((1 << (spec.bits - 1)) - 1)
        zero = torch.full_like(scale, 1 << (spec.bits - 1), dtype=torch.int32)
    else:
        qmax = float(spec.qmax)
        scale = (mx - mn).clamp(min=SCALE_EPS) / qmax
        zero = torch.clamp(-torch.round(mn / scale), 0.0, qmax).to(torch.int32)
    if not torch.isfinite(scale).all():
        raise ValueError("quantization scale overflowed float32; the weight range is too large.")
    return scale.reshape(*lead, n_groups), zero.reshape(*lead, n_groups)


# --------------------------------------------------------------------------- (de)quantize


def _q_block(x: Tensor, s: Tensor, z: Tensor, qmax: float) -> Tensor:
    return torch.clamp(torch.round(x / s) + z, 0.0, qmax)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """``q = clamp(round(w / scale) + zero, 0, 2^b - 1)`` as uint8, same shape as ``w``.

    Values outside the group's [min, max] (e.g. after clipping) saturate.
    """
    in_features = w.shape[-1]
    spec.validate(in_features)
    spec.require_int("quantize")
    w2 = _as_rows(w)
    rows = w2.shape[0]
    n_groups = num_groups(in_features, spec.group_size)
    s = _param_rows(scale, rows, n_groups, "scale")
    z = _param_rows(zero, rows, n_groups, "zero")
    qmax = float(spec.qmax)
    q = _map_groups(w2, spec.effective_group_size(in_features), lambda x, s_, z_: _q_block(x, s_, z_, qmax), s, z)
    return q.to(torch.uint8).reshape(w.shape)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """``w_hat = (q - zero) * scale`` in float32, same shape as ``q``.

    ``q - zero`` is a small exact integer, so the only rounding is the one
    float32 multiply: every consumer that computes ``(q - zero) * scale`` in
    float32 (e.g. compressed-tensors' decompressor) gets bit-identical values.
    """
    spec.require_int("dequantize")
    in_features = q.shape[-1]
    q2 = q.reshape(-1, in_features).to(torch.float32)
    rows = q2.shape[0]
    n_groups = num_groups(in_features, spec.group_size)
    s = _param_rows(scale, rows, n_groups, "scale")
    z = _param_rows(zero, rows, n_groups, "zero")
    g = spec.effective_group_size(in_features)
    out = _map_groups(q2, g, lambda x, s_, z_: (x - z_) * s_, s, z)
    return out.reshape(q.shape)


def fake_quantize(w: Tensor, spec: QuantSpec, max_val: Tensor | None = None, min_val: Tensor | None = None) -> Tensor:
    """Quantize then dequantize in one pass; returns ``w``'s dtype and shape.

    This is what the AWQ search evaluates thousands of times, so it fuses the
    two steps per group block without materialising uint8 ``q``. The result is
    bit-identical to ``dequantize(quantize(w, ...), ...)`` (then cast to w's dtype).

    A GGUF ``spec.scheme`` quantizes with that block type instead
    (:func:`awqfx.gguf_blocks.fake_quantize`: ``max_val``/``min_val`` clamp the weight first).
    """
    if spec.scheme != "int":
        spec.validate(w.shape[-1])
        _check_finite(_as_rows(w))
        return gguf_blocks.fake_quantize(w, spec.scheme, max_val=max_val, min_val=min_val)
    scale, zero = compute_qparams(w, spec, max_val=max_val, min_val=min_val)
    in_features = w.shape[-1]
    w2 = _as_rows(w)
    rows = w2.shape[0]
    n_groups = scale.shape[-1]
    s = scale.reshape(rows, n_groups)
    z = zero.reshape(rows, n_groups).to(torch.float32)
    qmax = float(spec.qmax)

    def qdq(x: Tensor, s_: Tensor, z_: Tensor) -> Tensor:
        return (_q_block(x, s_, z_, qmax) - z_) * s_

    out = _map_groups(w2, spec.effective_group_size(in_features), qdq, s, z)
    return out.reshape(w.shape).to(w.dtype)


def clamp_to_range(w: Tensor, spec: QuantSpec, max_val: Tensor | None = None,
                   min_val: Tensor | None = None) -> Tensor:
    """``w`` with each group's values clamped to ``[min_val, max_val]`` (``[..., out, n_groups]``,
    either may be None: that side is left as is), not quantized; returns ``w``'s dtype and shape.

    Where the range lies inside the group's own ``[min, max]`` (every range the clip search
    finds), the clamped group's min/max *are* the range, so :func:`compute_qparams` of the
    clamped weight returns the qparams the range gives the unclamped one. The bounds are
    float32; in a half-precision ``w`` a clamped value is the bound rounded to that dtype.
    """
    if max_val is None and min_val is None:
        return w
    in_features = w.shape[-1]
    spec.validate(in_features)
    w2 = _as_rows(w)
    rows = w2.shape[0]
    n_groups = num_groups(in_features, spec.group_size)
    inf = torch.full((rows, n_groups), float("inf"), device=w2.device)
    hi = inf if max_val is None else _param_rows(max_val, rows, n_groups, "max_val").to(w2.device)
    lo = -inf if min_val is None else _param_rows(min_val, rows, n_groups, "min_val").to(w2.device)
    out = _map_groups(w2, spec.effective_group_size(in_features), lambda x, hi_, lo_: torch.clamp(x, lo_, hi_), hi, lo)
    return out.reshape(w.shape).to(w.dtype)


# --------------------------------------------------------------------------- container


@dataclass
class QuantizedWeight:
    """Integers + parameters of one quantized weight (the input of every exporter).

    q:      uint8 ``shape``, values in ``[0, 2^bits - 1]``.
    scale:  float32 ``[..., out, n_groups]``.
    zero:   int32 ``[..., out, n_groups]`` (``2^(bits-1)`` everywhere when symmetric).
    spec:   the :class:`QuantSpec` used.
    shape:  the original weight shape, ``(out, in)`` (or ``(E, out, in)`` for experts).
    """

    q: Tensor
    scale: Tensor
    zero: Tensor
    spec: QuantSpec
    shape: tuple[int, ...]

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def out_features(self) -> int:
        return self.shape[-2]

    @property
    def n_groups(self) -> int:
        return num_groups(self.in_features, self.spec.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q - zero) * scale`` computed in float32, returned as ``dtype``."""
        return dequantize(self.q, self.scale, self.zero, self.spec).to(dtype)


def quantize_weight(w: Tensor, spec: QuantSpec, max_val: Tensor | None = None,
                    min_val: Tensor | None = None, codes: Tensor | None = None) -> QuantizedWeight:
    """Compute qparams (optionally from an overridden range) and the integer weight: rounded to
    nearest, or ``codes`` (``w``'s shape, ``[0, 2^b - 1]``) chosen by a refinement on that grid."""
    scale, zero = compute_qparams(w, spec, max_val=max_val, min_val=min_val)
    if codes is None:
        q = quantize(w, scale, zero, spec)
    else:
        if tuple(codes.shape) != tuple(w.shape) or (codes.numel() and int(codes.max()) > spec.qmax):
            raise ValueError(f"refined codes must be integers in [0, {spec.qmax}] of the weight's shape "
                             f"{tuple(w.shape)}, got shape {tuple(codes.shape)}")
        q = codes.to(device=w.device, dtype=torch.uint8)
    return QuantizedWeight(q=q, scale=scale, zero=zero, spec=spec, shape=tuple(w.shape))
