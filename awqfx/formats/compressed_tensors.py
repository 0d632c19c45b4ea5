"""compressed-tensors ``pack-quantized`` (vLLM, transformers, the compressed-tensors package),
verified against compressed-tensors 0.20::

    quantization_config = compressed_tensors_config(spec, ignore=[...])

* ``weight_packed`` int32 ``[out, ceil(in*b/32)]``: the dense stream of
  :func:`awqfx.packing.pack_int32`, along ``in``. compressed-tensors holds signed
  ``q_s in [-2^(b-1), 2^(b-1)-1]`` and packs ``q_s + 2^(b-1)``, which is exactly our unsigned ``q``.
* ``weight_scale`` ``[out, n_groups]`` (``[out, 1]`` for channel). Its dtype is
  the original weight's dtype in compressed-tensors (fp16 / bf16 / fp32); its
  decompressor computes ``(q_s - zp_s) * scale`` *in the scale's dtype*. The writer gives it the
  model's float dtype (as llm-compressor writes it), so with an fp32 model the package's
  decompressor reproduces our dequantized weights bit for bit.
* ``weight_zero_point`` (asymmetric only; dropped for symmetric): signed
  ``zp_s = zero - 2^(b-1)``, packed the same way (``+ 2^(b-1)``, i.e. our
  unsigned zero bits) but along the **output** dim: int32
  ``[ceil(out*b/32), n_groups]``.
* ``weight_shape`` int64 ``[2]`` (``torch.tensor(weight.shape)``; vLLM declares
  it int64 too).
* ``bias`` as in the float model.
* Group strategy requires ``in % group_size == 0`` (its ``_process_group``
  raises otherwise), so ragged groups cannot be exported to this format.
* 3-D tensors (fused experts ``[E, out, in]``) are packed per expert by compressed-tensors; the
  layout functions here do the same (``weight_shape`` then has 3 entries), but awqfx keeps
  expert weights in float, so the writer refuses them.

What it can hold (:func:`check`): ``nn.Linear`` layers (``[out, in]`` weights, no activation
scale nodes) with ``in % group_size == 0`` and one spec for all layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from awqfx.formats.common import (
    CONFIG_NAME, Layer, QuantizedFileError, divisor_hint, linear_only_problems, mismatch,
    packed_layers, packing_problems, read_all, refuse, split_state, unquantized_linears,
)
from awqfx.modules import QuantLinear
from awqfx.graph import float_dtype
from awqfx.packed_model import quantized_weight_of
from awqfx.packing import pack_int32, unpack_int32
from awqfx.quant import QuantizedWeight, QuantSpec, num_groups

NAME = "compressed-tensors"

#: The compressed-tensors release whose pack-quantized layout and config schema
#: this module was verified against (written as the config's "version").
CT_FORMAT_VERSION = "0.20.0"


def _ragged_problems(layer: Layer) -> list[str]:
    if not layer.ragged():
        return []
    g = layer.spec.group_size
    hint = divisor_hint(layer.in_features).capitalize()
    return [
        f"{layer.where} has a ragged last group: compressed-tensors group quantization needs "
        f"in_features % group_size == 0, got {layer.in_features} % {g} = {layer.in_features % g}. "
        f"{hint}use --format awqfx"
    ]

UNQUANTIZED_KEY = "ignore"  # the quantization_config list of linears left in float


def check(layers: list[Layer]) -> list[str]:
    """Every reason compressed-tensors cannot hold ``layers`` (empty: it can), one string per problem."""
    problems = packing_problems(layers) + linear_only_problems(NAME, layers)
    for layer in layers:
        problems += _ragged_problems(layer)
    specs = sorted({(s.bits, s.group_size, bool(s.symmetric)) for s in (layer.spec for layer in layers)})
    if len(specs) > 1:
        problems.append(
            f"layers use different quantization specs {specs} (bits, group_size, symmetric); this exporter "
            "writes one config group. Use --format awqfx"
        )
    return problems


def _require_whole_groups(shape: tuple[int, ...], spec: QuantSpec, where: str) -> None:
    problems = _ragged_problems(Layer("weight", tuple(shape), len(shape) - 1, spec))
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def payload(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    refuse(NAME, check(packed_layers(model, qmods)))
    m0 = next(iter(qmods.values()))
    spec = QuantSpec(bits=m0.bits, group_size=m0.group_size, symmetric=bool(m0.symmetric))
    scale_dtype = float_dtype(model) or torch.float32
    tensors = split_state(model, qmods)
    for prefix, m in qmods.items():
        for local, t in to_compressed_tensors(quantized_weight_of(m), scale_dtype=scale_dtype).items():
            tensors[f"{prefix}.{local}"] = t.contiguous().cpu()
        if m.bias is not None:
            tensors[f"{prefix}.bias"] = m.bias.detach().contiguous().cpu()
    qcfg = compressed_tensors_config(spec, ignore=unquantized_linears(model), targets=("Linear",))
    return tensors, qcfg


# --------------------------------------------------------------------------- tensor layout


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
    _require_whole_groups(tuple(qw.shape), spec, "to_compressed_tensors")
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
    _require_whole_groups(shape, spec, "from_compressed_tensors")
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
    :func:`check` and :func:`to_compressed_tensors`, not here.
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


# --------------------------------------------------------------------------- read


def _ct_spec(path: Path, qcfg: dict) -> QuantSpec:
    groups = qcfg.get("config_groups") or {}
    if qcfg.get("quant_method") != "compressed-tensors" or qcfg.get("format") != "pack-quantized":
        raise QuantizedFileError(f"{path} is not a compressed-tensors pack-quantized export.")
    if len(groups) != 1:
        raise QuantizedFileError(f"{path}: expected one config group, found {len(groups)}.")
    w = next(iter(groups.values())).get("weights") or {}
    try:
        g = w.get("group_size")
        return QuantSpec(
            bits=int(w["num_bits"]),
            group_size=-1 if g is None or w.get("strategy") == "channel" else int(g),
            symmetric=bool(w["symmetric"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise QuantizedFileError(f"{path / CONFIG_NAME}: bad weights scheme {w!r}: {err}") from err


def load_compressed_tensors_qweights(path: str | os.PathLike) -> dict[str, QuantizedWeight]:
    """``{weight FQN: QuantizedWeight}`` of every layer of a compressed-tensors pack-quantized export."""
    path = Path(path)
    qcfg, tensors = read_all(path)
    spec = _ct_spec(path, qcfg)
    out: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        prefix = key[: -len(".weight_packed")]
        local = {
            n: tensors[f"{prefix}.{n}"]
            for n in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
            if f"{prefix}.{n}" in tensors
        }
        try:
            out[f"{prefix}.weight"] = from_compressed_tensors(local, spec)
        except (KeyError, ValueError) as err:
            raise mismatch(path, [f"layer {prefix}: {err}"]) from err
    return out
