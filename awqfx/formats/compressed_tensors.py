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

Weight-activation layers (:class:`~awqfx.int8_linear.Int8Linear`, W8A8) are written
``int-quantized`` (the ``format`` of the config and its group), with the group's
``input_activations`` dynamic and symmetric, ``strategy`` ``token`` or ``tensor``:

* ``weight`` int8 ``[out, in]``: the signed codes ``q_s = q - 2^(b-1)`` themselves (not packed);
* ``weight_scale`` as above; ``weight_zero_point`` int8 ``[out, n_groups]`` (signed ``zp_s``,
  asymmetric only);
* the activation scale is computed at run time: awqfx and vLLM's int8 kernel use
  ``max|x| / (2^(b-1) - 1)`` (127 at 8 bits); compressed-tensors' own simulated activation
  quantization divides by ``(2^b - 1) / 2`` (127.5) and clamps at ``-2^(b-1)``, so its
  dequantize-and-run forward rounds a few activations to the neighbouring code.

What it can hold (:func:`check`): ``nn.Linear`` layers (``[out, in]`` weights, no activation
scale nodes) with ``in % group_size == 0`` and one spec (weights and activations) for all layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from awqfx.config import ActSpec
from awqfx.formats.common import (
    CONFIG_NAME, Layer, QuantizedFileError, divisor_hint, integer_grid_problems, linear_only_problems, load_packed,
    mismatch, packed_layers, packing_problems, read_all, refuse, split_state, unquantized_linears,
)
from awqfx.graph import float_dtype
from awqfx.int8_linear import int8_modules
from awqfx.modules import QuantLinear
from awqfx.packed_model import quantized_weight_of
from awqfx.packing import pack_int32, unpack_int32
from awqfx.quant import QuantizedWeight, QuantSpec, num_groups

NAME = "compressed-tensors"
#: What a quantized layer ``prefix`` stores its weight as (``prefix.<name>``; its bias is ``prefix.bias``):
#: pack-quantized ``weight_packed`` / ``weight_shape``, int-quantized ``weight``, both the scale and zero point.
LAYER_TENSORS = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
#: The ``input_activations`` strategies awqfx runs, as :class:`~awqfx.config.ActSpec` granularities.
ACT_GRANULARITY = {"token": "per-token", "tensor": "per-tensor"}

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
    problems = packing_problems(layers) + linear_only_problems(NAME, layers) + integer_grid_problems(layers)
    for layer in layers:
        problems += _ragged_problems(layer)
    specs = sorted({(layer.spec.bits, layer.spec.group_size, bool(layer.spec.symmetric), _act_label(layer.act))
                    for layer in layers})
    if len(specs) > 1:
        problems.append(
            f"layers use different quantization specs {specs} (bits, group_size, symmetric, activations); this "
            "exporter writes one config group. Use --format awqfx"
        )
    return problems


def _act_label(act: ActSpec | None) -> str:
    return "weights only" if act is None else f"a{act.bits} {act.granularity}"


def _require_whole_groups(shape: tuple[int, ...], spec: QuantSpec, where: str) -> None:
    problems = _ragged_problems(Layer("weight", tuple(shape), len(shape) - 1, spec))
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def payload(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    layers = packed_layers(model, qmods)
    refuse(NAME, check(layers))  # one spec: all layers pack-quantized, or all int-quantized
    spec, act = layers[0].spec, layers[0].act
    scale_dtype = float_dtype(model) or torch.float32
    tensors = split_state(model, qmods)
    weights = {prefix: (quantized_weight_of(m), m.bias) for prefix, m in qmods.items()}
    weights.update({prefix: (m.quantized_weight(), m.bias) for prefix, m in int8_modules(model).items()})
    layout = to_compressed_tensors if act is None else to_int_quantized
    for prefix, (qw, bias) in weights.items():
        for local, t in layout(qw, scale_dtype=scale_dtype).items():
            tensors[f"{prefix}.{local}"] = t.contiguous().cpu()
        if bias is not None:
            tensors[f"{prefix}.bias"] = bias.detach().contiguous().cpu()
    qcfg = compressed_tensors_config(spec, ignore=unquantized_linears(model), targets=("Linear",), act=act)
    return tensors, qcfg


# --------------------------------------------------------------------------- tensor layout


def _checked_scale(qw: QuantizedWeight, scale_dtype: torch.dtype, where: str) -> Tensor:
    """``qw.scale`` in ``scale_dtype``, after the checks every compressed-tensors layout needs."""
    spec = qw.spec
    _require_whole_groups(tuple(qw.shape), spec, where)
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{where}: scale_dtype must be a float dtype, got {scale_dtype}.")
    half = 1 << (spec.bits - 1)
    if spec.symmetric and not bool((qw.zero == half).all()):
        raise ValueError(f"{where}: a symmetric weight must have every zero point == {half}.")
    return qw.scale.to(scale_dtype).contiguous()


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
    out: dict[str, Tensor] = {
        "weight_packed": pack_int32(qw.q, spec.bits, dim=-1),
        "weight_scale": _checked_scale(qw, scale_dtype, "to_compressed_tensors"),
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if not spec.symmetric:
        # Signed zp_s = zero - 2^(b-1) is packed as zp_s + 2^(b-1): our unsigned zero.
        out["weight_zero_point"] = pack_int32(qw.zero, spec.bits, dim=-2).contiguous()
    return out


def to_int_quantized(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """compressed-tensors ``int-quantized`` tensors for one weight (local names): ``weight`` (int8
    signed codes), ``weight_scale`` and, for asymmetric specs, ``weight_zero_point`` (int8)."""
    half = 1 << (qw.spec.bits - 1)
    out = {"weight": (qw.q.to(torch.int16) - half).to(torch.int8),
           "weight_scale": _checked_scale(qw, scale_dtype, "to_int_quantized")}
    if not qw.spec.symmetric:
        out["weight_zero_point"] = (qw.zero.to(torch.int16) - half).to(torch.int8).contiguous()
    return out


def from_int_quantized(tensors: Mapping[str, Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Read compressed-tensors ``int-quantized`` tensors (local names) back into a QuantizedWeight."""
    q_s = tensors["weight"]
    shape = tuple(q_s.shape)
    spec.validate(shape[-1])
    _require_whole_groups(shape, spec, "from_int_quantized")
    half = 1 << (spec.bits - 1)
    scale = tensors["weight_scale"].to(torch.float32)
    n_groups = num_groups(shape[-1], spec.group_size)
    if q_s.dtype != torch.int8 or tuple(scale.shape) != (*shape[:-1], n_groups):
        raise ValueError(f"from_int_quantized: expected an int8 weight and a weight_scale of shape "
                         f"{(*shape[:-1], n_groups)}, got {q_s.dtype} and {tuple(scale.shape)}.")
    if spec.symmetric:
        zero = torch.full(scale.shape, half, dtype=torch.int32)
    elif "weight_zero_point" not in tensors:
        raise ValueError("from_int_quantized: asymmetric spec but no weight_zero_point.")
    else:
        zero = tensors["weight_zero_point"].to(torch.int32) + half
    return QuantizedWeight(q=(q_s.to(torch.int16) + half).to(torch.uint8), scale=scale.contiguous(),
                           zero=zero.contiguous(), spec=spec, shape=shape)


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
    act: ActSpec | None = None,
) -> dict:
    """The ``quantization_config`` dict of a compressed-tensors ``pack-quantized`` checkpoint, or
    with ``act`` (weight-activation mode) an ``int-quantized`` one whose ``input_activations`` are
    quantized dynamically, symmetric, per token or per tensor.

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
    inputs = None if act is None else {
        "num_bits": act.bits,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "token" if act.per_token else "tensor",
        "dynamic": True,
    }
    fmt = "pack-quantized" if act is None else "int-quantized"
    return {
        "config_groups": {
            "group_0": {
                "targets": list(targets),
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": fmt,
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": fmt,
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
    if qcfg.get("quant_method") != "compressed-tensors" or qcfg.get("format") not in ("pack-quantized",
                                                                                     "int-quantized"):
        raise QuantizedFileError(f"{path} is not a compressed-tensors pack-quantized or int-quantized export.")
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
    """``{weight FQN: QuantizedWeight}`` of every layer of a compressed-tensors pack-quantized or
    int-quantized export."""
    path = Path(path)
    return _qweights(path, *read_all(path))


def _qweights(path: Path, qcfg: dict, tensors: Mapping[str, Tensor]) -> dict[str, QuantizedWeight]:
    """:func:`load_compressed_tensors_qweights` of the export ``path`` read into ``qcfg`` and ``tensors``."""
    spec = _ct_spec(path, qcfg)
    packed = qcfg["format"] == "pack-quantized"
    marker, read = (".weight_packed", from_compressed_tensors) if packed else (".weight_scale", from_int_quantized)
    out: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if not key.endswith(marker):
            continue
        prefix = key[: -len(marker)]
        local = {n: tensors[f"{prefix}.{n}"] for n in LAYER_TENSORS if f"{prefix}.{n}" in tensors}
        try:
            out[f"{prefix}.weight"] = read(local, spec)
        except (KeyError, ValueError) as err:
            raise mismatch(path, [f"layer {prefix}: {err}"]) from err
    return out


def _ct_act(path: Path, qcfg: dict) -> ActSpec | None:
    """The input activation quantizer of the (one) config group of a read export: None for weights
    only; dynamic, symmetric, per token or per tensor on int-quantized weights, as awqfx runs it."""
    acts = next(iter(qcfg["config_groups"].values())).get("input_activations")
    if acts is None:
        return None
    runs = qcfg["format"] == "int-quantized" and acts.get("dynamic") is True and acts.get("symmetric") is True
    if not runs or acts.get("strategy") not in ACT_GRANULARITY:
        raise QuantizedFileError(f"{path / CONFIG_NAME}: input_activations {acts!r} on {qcfg['format']} weights are "
                                 "not what awqfx runs (dynamic, symmetric, strategy token or tensor, int-quantized "
                                 "weights).")
    try:
        return ActSpec(int(acts["num_bits"]), ACT_GRANULARITY[acts["strategy"]])
    except (KeyError, TypeError, ValueError) as err:
        raise QuantizedFileError(f"{path / CONFIG_NAME}: bad input_activations {acts!r}: {err}") from err


def load(out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The compressed-tensors export in ``out_dir`` as a packed model (``QuantLinear`` layers, or
    ``Int8Linear`` for int-quantized weights with quantized input activations; the other tensors in
    ``dtype``): the format's reader (:func:`awqfx.formats.load_written`)."""
    path = Path(out_dir)
    qcfg, tensors = read_all(path)
    qweights = _qweights(path, qcfg, tensors)  # checks the config first
    return load_packed(path, tensors, qweights, LAYER_TENSORS, dtype, act=_ct_act(path, qcfg))
