"""The native awqfx format: any bits 2..8, any group size, ragged last groups, GPT-2 ``Conv1D``
layers, activation scale nodes; read back by :func:`load_quantized`::

    quantization_config = {"quant_method": "awqfx", "format_version": 1,
                           "modules": {prefix: {"bits", "group_size", "symmetric",
                                                "in_features", "out_features", "bias"}},
                           "input_scales": [prefix, ...],   # only when there are any
                           "int8_modules": {prefix: {"bits", "group_size", "symmetric", "in_features",
                                                     "out_features", "bias", "act_bits",
                                                     "act_granularity"}}}   # only when there are any

Tensors: ``QuantLinear``'s state dict, i.e. ``prefix.qweight`` (int32 ``[out, ceil(in*b/32)]``,
dense LSB-first along ``in``), ``prefix.scales`` (fp32 ``[out, G]``), ``prefix.qzeros`` (uint8
``[out, G]``), ``prefix.bias`` (if any), ``prefix.awqfx_input_scale`` (fp32 ``[in]``, the ``1/s``
of an activation scale node); 3-D MoE expert weights as
:class:`~awqfx.packed_experts.PackedExperts` (``owner.awqfx_packed_<name>.qweight`` int32
``[E, out, ceil(in*b/32)]``, ``.scales`` fp32 / ``.qzeros`` uint8 ``[E, out, G]``), listed in
``quantization_config.experts`` (``{weight: {"shape", "in_dim", "dtype", "bits", "group_size",
"symmetric"}}``); every other tensor of the model under its own name.

Precision: every tensor the model keeps unquantized (embeddings, norms, the LM head, biases) is
stored in the model's own dtype, and ``config.json``'s ``dtype`` names it. The quantizer's scales
(``scales``) and the activation input scales (``awqfx_input_scale``) stay float32 whatever the
model's dtype, by decision: they are the numbers the search evaluated (the quantizer works in
float32, :mod:`awqfx.quant`), so a loaded layer dequantizes to exactly
``QuantizedWeight.dequantize()`` and a bf16 and an fp32 model quantized with the same plan hold
the same weights; a bf16/fp16 runtime rounds them where it uses them (the int4 kernels' bf16
scale/zero cache, ``x * factor.to(x.dtype)``). The cost over bf16 scales is 2 bytes per group (at
4 bits, group 64: 37 bytes per group of codes, scale and zero point instead of 35).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from awqfx.apply import InputScale
from awqfx.config import ActSpec
from awqfx.formats.common import (
    CONFIG_NAME, INPUT_SCALE, INT8_TENSORS, QL_TENSORS, Layer, QuantizedFileError, SafeFile, alias_groups, build_skeleton,
    dedupe_state, fill_skeleton, hf_config, input_scales, integer_grid_problems, mismatch, packed_layers,
    packing_problems, read_config, read_generation_config, refuse, refuse_unloaded, weight_files,
)
from awqfx.int8_linear import Int8Linear, int8_modules
from awqfx.modules import QuantLinear
from awqfx.packed_experts import PackedExperts, attach, packed_experts
from awqfx.packed_model import parent_map
from awqfx.quant import QuantSpec

NAME = "awqfx"
NATIVE_FORMAT_VERSION = 1
_NATIVE_KEYS = ("bits", "group_size", "symmetric", "in_features", "out_features", "bias")
_QL_DTYPES = {"qweight": torch.int32, "scales": torch.float32, "qzeros": torch.uint8,
              "int_weight": torch.int8, "weight_scale": torch.float32, "weight_zero": torch.int8}
_ST_DTYPES = {
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float32: "F32",
}
_INT8_KEYS = (*_NATIVE_KEYS, "act_bits", "act_granularity")


def check(layers: list[Layer]) -> list[str]:
    """Every reason the native format cannot hold ``layers`` (tied weights: nothing packs them; GGUF
    block specs: no integer grid)."""
    return packing_problems(layers) + integer_grid_problems(layers)


def payload(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    refuse(NAME, check(packed_layers(model, qmods)))
    tensors = dedupe_state(model.state_dict())
    modules = {
        prefix: {
            "bits": int(m.bits),
            "group_size": int(m.group_size),
            "symmetric": bool(m.symmetric),
            "in_features": int(m.in_features),
            "out_features": int(m.out_features),
            "bias": m.bias is not None,
        }
        for prefix, m in qmods.items()
    }
    qcfg = {"quant_method": "awqfx", "format_version": NATIVE_FORMAT_VERSION, "modules": modules}
    int8 = {prefix: {"bits": int(m.bits), "group_size": int(m.group_size), "symmetric": bool(m.symmetric),
                     "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                     "act_bits": m.act.bits, "act_granularity": m.act.granularity}
            for prefix, m in int8_modules(model).items()}
    if int8:
        qcfg["int8_modules"] = int8
    experts = packed_experts(model)
    if experts:
        qcfg["experts"] = {name: {"shape": list(m.shape), "in_dim": m.in_dim, "dtype": str(m.dtype).removeprefix("torch."),
                                  "bits": m.spec.bits, "group_size": m.spec.group_size, "symmetric": m.spec.symmetric}
                           for name, m in experts.items()}
    scales = input_scales(model)
    for prefix, inv in scales.items():
        tensors[f"{prefix}.{INPUT_SCALE}"] = inv.detach().float().cpu().contiguous()
    if scales:
        qcfg["input_scales"] = sorted(scales)
    return tensors, qcfg


# =========================================================================== load


def _native_modules(path: Path, qcfg: dict) -> dict[str, dict]:
    version = qcfg.get("format_version")
    if version != NATIVE_FORMAT_VERSION:
        raise QuantizedFileError(
            f"{path / CONFIG_NAME}: unknown awqfx format_version {version!r}; this awqfx reads version "
            f"{NATIVE_FORMAT_VERSION}. Upgrade awqfx or re-export the model."
        )
    modules = qcfg.get("modules")
    int8 = qcfg.get("int8_modules", {})
    if not isinstance(modules, dict) or not isinstance(int8, dict) or not (modules or int8):
        raise QuantizedFileError(f"{path / CONFIG_NAME}: quantization_config.modules is missing or empty.")
    for section, keys, entries in (("modules", _NATIVE_KEYS, modules), ("int8_modules", _INT8_KEYS, int8)):
        for prefix, entry in entries.items():
            if not isinstance(entry, dict) or any(k not in entry for k in keys):
                raise QuantizedFileError(
                    f"{path / CONFIG_NAME}: quantization_config.{section}[{prefix!r}] must have the keys "
                    f"{', '.join(keys)}; got {entry!r}."
                )
            ints = ("bits", "group_size", "in_features", "out_features")
            if any(isinstance(entry[k], bool) or not isinstance(entry[k], int) for k in ints):
                raise QuantizedFileError(f"{path / CONFIG_NAME}: {section}[{prefix!r}] has non-integer fields: {entry!r}.")
    return modules


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto") -> nn.Module:
    """Load a model saved with ``save_quantized(..., fmt="awqfx")``, in eval mode.

    Rebuilds the architecture from ``config.json`` with parameters on the meta device, swaps the
    listed modules for ``QuantLinear`` skeletons (``backend`` as in ``QuantLinear``), checks the
    safetensors file against that skeleton (names, shapes, integer dtypes) before reading any
    data, loads it with ``assign=True`` (no float copy of the quantized layers is ever made),
    re-ties tied weights and moves the model to ``device``.

    Raises :class:`QuantizedFileError` for a missing directory/file, a corrupt or truncated
    ``config.json`` / ``model.safetensors``, a checkpoint of another format, an unknown
    ``format_version``, or tensors that are missing, unexpected or of the wrong shape.
    """
    if backend not in ("auto", "int4pack", "dequant"):
        raise ValueError(f"backend must be 'auto', 'int4pack' or 'dequant', got {backend!r}.")
    path = Path(path)
    cfg = read_config(path)
    qcfg = cfg["quantization_config"]
    method = qcfg.get("quant_method")
    if method != "awqfx":
        other = {
            "awq": "an AutoAWQ export (load it with transformers/vLLM, or read its weights with "
            "load_autoawq_qweights)",
            "compressed-tensors": "a compressed-tensors export (load it with transformers/vLLM, or read its "
            "weights with load_compressed_tensors_qweights)",
        }.get(method, f"quant_method {method!r}")
        raise QuantizedFileError(f"{path} is {other}, not an awqfx checkpoint.")
    modules = _native_modules(path, qcfg)
    int8 = qcfg.get("int8_modules", {})
    quantized = {**modules, **int8}
    wfiles = weight_files(path)
    dev = torch.device(device)

    with SafeFile(wfiles, device=str(dev) if dev.type != "meta" else "cpu") as f:
        file_meta = {k: f.meta(k) for k in f.keys()}

        model = build_skeleton(hf_config(path, cfg))
        parents = parent_map(model)
        problems: list[str] = []
        for prefix, e in quantized.items():
            try:
                orig = model.get_submodule(prefix)
            except AttributeError:
                problems.append(f"config lists quantized module {prefix!r}, which this architecture does not have")
                continue
            w = getattr(orig, "weight", None)
            dims = {(e["out_features"], e["in_features"]), (e["in_features"], e["out_features"])}
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or tuple(w.shape) not in dims:
                problems.append(
                    f"module {prefix} has weight shape {tuple(w.shape) if isinstance(w, torch.Tensor) else None}, "
                    f"but the config says in_features={e['in_features']}, out_features={e['out_features']}"
                )
                continue
            try:
                QuantSpec(bits=e["bits"], group_size=e["group_size"], symmetric=bool(e["symmetric"])).validate(
                    e["in_features"]
                )
            except ValueError as err:
                raise QuantizedFileError(f"{path / CONFIG_NAME}: bad entry for {prefix}: {err}") from err
            if prefix in int8:
                try:
                    act = ActSpec(e["act_bits"], e["act_granularity"])
                except ValueError as err:
                    raise QuantizedFileError(f"{path / CONFIG_NAME}: bad entry for {prefix}: {err}") from err
                ql = Int8Linear(e["in_features"], e["out_features"], e["bits"], e["group_size"], bool(e["symmetric"]),
                                act, bool(e["bias"]), device="meta")
            else:  # a ValueError from here is about `backend` (e.g. int4pack on a layer it can't run)
                ql = QuantLinear(
                    e["in_features"],
                    e["out_features"],
                    bits=e["bits"],
                    group_size=e["group_size"],
                    bias=bool(e["bias"]),
                    backend=backend,
                    symmetric=bool(e["symmetric"]),
                    device="meta",
                )
            for parent, child_name in parents.get(id(orig), []):
                setattr(parent, child_name, ql)
        problems += _attach_experts(model, qcfg.get("experts", {}))
        if problems:
            raise mismatch(path, problems)

        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for prefix in qcfg.get("input_scales", []):
            if prefix not in quantized:
                problems.append(f"input scale for {prefix!r}, which is not a quantized module")
            else:
                expected[f"{prefix}.{INPUT_SCALE}"] = (quantized[prefix]["in_features"],)
        quantized_keys = {f"{p}.{t}": t for p in modules for t in QL_TENSORS}
        quantized_keys.update({f"{p}.{t}": t for p in int8 for t in INT8_TENSORS})
        groups = alias_groups(model)
        alias_of = {n: g for g in groups for n in g}
        for k, (shape, _dt) in file_meta.items():
            if k not in expected:
                problems.append(f"unexpected tensor {k} {list(shape)}")
            elif shape != expected[k]:
                problems.append(f"tensor {k} has shape {list(shape)}, expected {list(expected[k])}")
            elif k in quantized_keys and quantized_keys[k] in _QL_DTYPES:
                want = _ST_DTYPES[_QL_DTYPES[quantized_keys[k]]]
                if _dt != want:
                    problems.append(f"tensor {k} has dtype {_dt}, expected {want}")
        missing = []
        for k in expected:
            if k in file_meta:
                continue
            if k in alias_of and any(n in file_meta for n in alias_of[k]):
                continue  # tied: another name of the same tensor is stored
            missing.append(k)
        if missing:
            problems.insert(0, f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if problems:
            raise mismatch(path, problems)

        state = {k: f.tensor(k) for k in file_meta}

    for prefix in qcfg.get("input_scales", []):
        inv = state.pop(f"{prefix}.{INPUT_SCALE}")
        model.get_submodule(prefix).register_forward_pre_hook(InputScale(inv, prefix + ".weight"))
    fill_skeleton(path, model, state, groups)
    refuse_unloaded(path, model)
    model.to(dev)
    read_generation_config(path, model)
    return model.eval()


def _attach_experts(model: nn.Module, experts: dict) -> list[str]:
    """Swap each listed 3-D expert parameter of the skeleton for a :class:`PackedExperts` skeleton."""
    problems = []
    for name, e in experts.items():
        owner_name, _, attr = name.rpartition(".")
        try:
            w = getattr(model.get_submodule(owner_name), attr)
        except AttributeError:
            problems.append(f"config lists packed experts {name!r}, which this architecture does not have")
            continue
        rows = list(w.shape)
        rows.append(rows.pop(int(e["in_dim"]) % len(rows)))
        if w.dim() != 3 or rows != list(e["shape"]):
            problems.append(f"experts {name} have shape {list(w.shape)}, but the config says {e['shape']} "
                            f"(input dim {e['in_dim']} last)")
            continue
        attach(model.get_submodule(owner_name), attr,
               PackedExperts(tuple(e["shape"]), int(e["bits"]), int(e["group_size"]), bool(e["symmetric"]),
                             int(e["in_dim"]), getattr(torch, e["dtype"]), device="meta"))
    return problems


def load(out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The format's reader (:func:`awqfx.formats.load_written`): :func:`load_quantized`, every
    tensor in the dtype it was written in (the model's: ``dtype`` is not needed)."""
    return load_quantized(out_dir)
