"""AutoAWQ GEMM (``quant_method: awq, version: gemm``; transformers / vLLM ``awq``)::

    quantization_config = {"quant_method": "awq", "version": "gemm", "bits": 4,
                           "group_size": g, "zero_point": true,
                           "modules_to_not_convert": [linear modules left in float]}

4-bit, asymmetric (symmetric weights are written as zero points of 8, which is exact). Tensors
are laid out per *input* row (transposed relative to ``nn.Linear.weight``):

* ``qweight`` int32 ``[in, out/8]``: word ``j`` of input row ``i`` holds output
  columns ``8j .. 8j+7``; nibble ``k`` (bits ``4k .. 4k+3``) holds column
  ``8j + AWQ_ORDER[k]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
* ``qzeros`` int32 ``[n_groups, out/8]``: same packing of the integer zeros.
* ``scales`` float16 ``[n_groups, out]``.
* ``bias`` as in the float model.
* dequant: ``(q - zero) * scale``.

What it can hold (:func:`check`): 4-bit ``nn.Linear`` layers (``[out, in]`` weights, no 3-D
experts, no activation scale nodes) with ``in % group_size == 0`` and ``out % 8 == 0``, one
group size for all layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from awqfx.formats.common import (
    Layer, QuantizedFileError, activation_problems, divisor_hint, integer_grid_problems, linear_only_problems,
    load_packed, mismatch, packed_layers, packing_problems, read_all, refuse, split_state, unquantized_linears,
)
from awqfx.modules import QuantLinear
from awqfx.packed_model import quantized_weight_of
from awqfx.packing import pack_int32, unpack_int32
from awqfx.quant import QuantizedWeight, QuantSpec, num_groups

NAME = "autoawq"

#: Nibble k of an AutoAWQ word holds output column 8j + AWQ_ORDER[k].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Inverse permutation: output column 8j + c lives in nibble AWQ_REVERSE_ORDER[c].
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
#: What a quantized layer ``prefix`` stores its weight as (``prefix.<name>``; its bias is ``prefix.bias``).
LAYER_TENSORS = ("qweight", "qzeros", "scales")


def _gemm_problems(layer: Layer) -> list[str]:
    """The GEMM layout's own limits for one 2-D layer: 4 bits, whole groups, 8 outputs per word."""
    problems = []
    if layer.spec.bits != 4:
        problems.append(
            f"{layer.where}: AutoAWQ GEMM stores 4-bit weights only, got bits={layer.spec.bits}; "
            "use --format awqfx or --format compressed-tensors"
        )
    if layer.ragged():
        g = layer.spec.group_size
        problems.append(
            f"{layer.where} has a ragged last group: AutoAWQ GEMM needs in_features % group_size == 0, got "
            f"{layer.in_features} % {g} = {layer.in_features % g}; {divisor_hint(layer.in_features)}use --format awqfx"
        )
    if layer.out_features % 8 != 0:
        problems.append(
            f"{layer.where}: AutoAWQ GEMM needs out_features % 8 == 0 (it packs 8 outputs per int32), got "
            f"out_features={layer.out_features}; use --format awqfx or --format compressed-tensors"
        )
    return problems

UNQUANTIZED_KEY = "modules_to_not_convert"  # the quantization_config list of linears left in float


def check(layers: list[Layer]) -> list[str]:
    """Every reason AutoAWQ GEMM cannot hold ``layers`` (empty: it can), one string per problem."""
    problems = packing_problems(layers) + linear_only_problems(NAME, layers) + activation_problems(NAME, layers)
    problems += integer_grid_problems(layers)
    for layer in layers:
        if len(layer.shape) == 2:
            problems += _gemm_problems(layer)
    group_sizes = sorted({layer.spec.group_size for layer in layers})
    if len(group_sizes) > 1:
        problems.append(
            f"layers use different group sizes {group_sizes}, but the AutoAWQ config has a single group_size; "
            "use --format awqfx"
        )
    return problems


def _require_gemm(qw_shape: tuple[int, int], spec: QuantSpec, where: str) -> None:
    problems = _gemm_problems(Layer("weight", qw_shape, 1, spec))
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def payload(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    refuse(NAME, check(packed_layers(model, qmods)))
    tensors = split_state(model, qmods)
    for prefix, m in qmods.items():
        for local, t in to_autoawq_gemm(quantized_weight_of(m)).items():
            tensors[f"{prefix}.{local}"] = t.contiguous().cpu()
        if m.bias is not None:
            tensors[f"{prefix}.bias"] = m.bias.detach().contiguous().cpu()
    (g,) = {m.group_size for m in qmods.values()}
    qcfg = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": int(g),
        "zero_point": True,
        "modules_to_not_convert": unquantized_linears(model),
    }
    return tensors, qcfg


# --------------------------------------------------------------------------- tensor layout


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
    _require_gemm(tuple(qw.shape), qw.spec, "to_autoawq_gemm")
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
    spec = QuantSpec(bits=4, group_size=group_size, symmetric=False)
    _require_gemm((out_f, in_features), spec, "from_autoawq_gemm")
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
    return QuantizedWeight(
        q=q,
        scale=scales.to(torch.float32).t().contiguous(),
        zero=zero,
        spec=spec,
        shape=(out_f, in_features),
    )


# --------------------------------------------------------------------------- read


def load_autoawq_qweights(path: str | os.PathLike) -> dict[str, QuantizedWeight]:
    """``{weight FQN: QuantizedWeight}`` of every layer of an AutoAWQ GEMM export.

    Scales are the stored float16 values widened to float32; the spec is 4-bit asymmetric
    (a symmetric export reads back as zero points of 8, which dequantizes identically).
    """
    path = Path(path)
    return _qweights(path, *read_all(path))


def _qweights(path: Path, qcfg: dict, tensors: Mapping[str, Tensor]) -> dict[str, QuantizedWeight]:
    """:func:`load_autoawq_qweights` of the export ``path`` read into ``qcfg`` and ``tensors``."""
    if qcfg.get("quant_method") != "awq" or str(qcfg.get("version", "")).lower() != "gemm":
        raise QuantizedFileError(f"{path} is not an AutoAWQ GEMM export (quantization_config={qcfg!r}).")
    g = int(qcfg.get("group_size", 128))
    out: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        try:
            parts = {n: tensors[f"{prefix}.{n}"] for n in LAYER_TENSORS}
            out[f"{prefix}.weight"] = from_autoawq_gemm(parts, g, int(parts["qweight"].shape[0]))
        except (KeyError, ValueError) as err:
            raise mismatch(path, [f"layer {prefix}: {err}"]) from err
    return out


def load(out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The AutoAWQ GEMM export in ``out_dir`` as a packed model (``QuantLinear`` layers, the other
    tensors in ``dtype``): the format's reader (:func:`awqfx.formats.load_written`)."""
    path = Path(out_dir)
    qcfg, tensors = read_all(path)
    return load_packed(path, tensors, _qweights(path, qcfg, tensors), LAYER_TENSORS, dtype)
