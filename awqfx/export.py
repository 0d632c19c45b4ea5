"""Save a packed model in three on-disk formats, and load the native one back.

All formats are a directory holding ``config.json`` (the HF model config plus a
``quantization_config``) and one ``model.safetensors`` (metadata ``{"format": "pt"}``); never
pickle. Optional extras: the tokenizer files (``tokenizer.save_pretrained``),
``generation_config.json``, and the AWQ plan copied into the ``awq_plan/`` sub-directory (a
sub-directory, not the top level, because vLLM loads every top-level ``*.safetensors`` file as
model weights and ``plan.safetensors`` would break it).

Formats (``fmt``)
-----------------
``"awqfx"`` (native, read by :func:`load_quantized`)::

    quantization_config = {"quant_method": "awqfx", "format_version": 1,
                           "modules": {prefix: {"bits", "group_size", "symmetric",
                                                "in_features", "out_features", "bias"}}}

  Tensors: ``QuantLinear``'s state dict, i.e. ``prefix.qweight`` (int32 ``[out, ceil(in*b/32)]``,
  dense LSB-first along ``in``), ``prefix.scales`` (fp32 ``[out, G]``), ``prefix.qzeros`` (uint8
  ``[out, G]``), ``prefix.bias`` (if any); every other tensor of the model under its own name.
  Any bits 2..8, any group size, ragged last groups, GPT-2 ``Conv1D`` layers.

``"autoawq"`` (AutoAWQ GEMM; transformers / vLLM ``awq``)::

    quantization_config = {"quant_method": "awq", "version": "gemm", "bits": 4,
                           "group_size": g, "zero_point": true,
                           "modules_to_not_convert": [linear modules left in float]}

  Tensors ``prefix.qweight`` / ``prefix.qzeros`` / ``prefix.scales`` (fp16) / ``prefix.bias``
  (:func:`awqfx.packing.to_autoawq_gemm`). Needs 4 bits, one group size for all layers,
  ``in % g == 0``, ``out % 8 == 0`` and ``nn.Linear`` layers; symmetric weights are written as
  zero points of 8 (exact).

``"compressed-tensors"`` (``pack-quantized``; vLLM, transformers, the compressed-tensors package)::

    quantization_config = awqfx.packing.compressed_tensors_config(spec, ignore=[...])

  Tensors ``prefix.weight_packed`` / ``weight_scale`` / ``weight_zero_point`` (asymmetric
  only) / ``weight_shape`` and ``prefix.bias`` (:func:`awqfx.packing.to_compressed_tensors`);
  the scale has the model's float dtype (as llm-compressor writes it), so with an fp32 model
  the package's decompressor reproduces our dequantized weights bit for bit. Needs one spec for
  all layers, ``in % g == 0`` and ``nn.Linear`` layers.

Tied weights are written once (safetensors refuses tensors that share memory): the first name
in ``state_dict`` order is kept (``model.embed_tokens.weight``; ``lm_head.weight`` is dropped),
as HF's ``save_pretrained`` does; loaders re-tie.

Atomicity: everything is written into a temporary directory beside ``out_dir`` which is then
renamed into place with ``os.replace``; on any error (disk full, Ctrl-C) the temporary directory
is removed and ``out_dir`` is untouched (with ``overwrite=True`` the old directory is only
removed after the new one is in place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from awqfx.modules import QuantLinear
from awqfx.packed_model import packed_modules, quantized_weight_of
from awqfx.packing import (
    compressed_tensors_config,
    from_autoawq_gemm,
    from_compressed_tensors,
    to_autoawq_gemm,
    to_compressed_tensors,
)
from awqfx.quant import QuantizedWeight, QuantSpec

__all__ = [
    "FORMATS",
    "NATIVE_FORMAT_VERSION",
    "WEIGHTS_NAME",
    "PLAN_SUBDIR",
    "QuantizedFileError",
    "save_quantized",
    "load_quantized",
    "load_autoawq_qweights",
    "load_compressed_tensors_qweights",
]

FORMATS = ("awqfx", "autoawq", "compressed-tensors")
NATIVE_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PLAN_SUBDIR = "awq_plan"
_NATIVE_KEYS = ("bits", "group_size", "symmetric", "in_features", "out_features", "bias")
_QL_TENSORS = ("qweight", "scales", "qzeros", "bias")
_QL_DTYPES = {"qweight": torch.int32, "scales": torch.float32, "qzeros": torch.uint8}


class QuantizedFileError(ValueError):
    """A quantized checkpoint directory is missing files, corrupt, or does not match its config."""


# =========================================================================== helpers


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create module *parameters* on the meta device, buffers where they would normally go.

    Building the skeleton entirely under ``torch.device("meta")`` would also put computed
    non-persistent buffers (rotary ``inv_freq``) on meta, and those are not in any checkpoint.
    Only parameters are redirected here (``nn.Module.register_parameter`` is patched for the
    duration; not thread-safe against other threads building modules at the same time).
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _build_skeleton(config: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` with every parameter on the meta device."""
    from transformers import AutoModelForCausalLM

    with _params_on_meta():
        return AutoModelForCausalLM.from_config(config)


def _parent_map(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, child_name))
    return out


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to the same parameter/buffer object (tied weights), groups of 2+."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _dedupe_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop exact aliases (tied weights: same storage, offset, shape, strides); keep the first name.

    Partial overlaps (two different views of one storage) are cloned, since safetensors refuses
    any shared memory. Everything is made contiguous and moved to the CPU.
    """
    out: dict[str, torch.Tensor] = {}
    exact: set[tuple] = set()
    storages: set[tuple] = set()
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"save_quantized: tensor {name!r} is on the meta device (it has no data).")
        t = t.detach()
        sid = (t.device, t.untyped_storage().data_ptr())
        key = (*sid, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in exact:
            continue
        if sid in storages and t.numel() > 0:
            t = t.clone()
        else:
            exact.add(key)
            storages.add(sid)
        out[name] = t.contiguous().cpu()
    # contiguous()/cpu() may return the same tensor; a final pass guarantees no sharing remains
    seen: set[int] = set()
    for name, t in out.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            out[name] = t.clone()
        seen.add(ptr)
    return out


def _split_state(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """The model's state dict without the tensors of the packed modules, deduplicated."""
    state = model.state_dict()
    quantized_keys = {f"{p}.{t}" for p in qmods for t in _QL_TENSORS}
    return _dedupe_state({k: v for k, v in state.items() if k not in quantized_keys})


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _unquantized_linears(model: nn.Module) -> list[str]:
    """Names of ``nn.Linear`` modules still in float (``lm_head``, MoE routers, ...)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _check_linear_sources(model: nn.Module, qmods: Mapping[str, QuantLinear], fmt: str) -> None:
    """Foreign loaders only convert ``nn.Linear`` layers: refuse packed ``Conv1D`` (x @ W) layers."""
    try:
        skeleton = _build_skeleton(model.config)
    except Exception:  # noqa: BLE001 - not constructible from its config: nothing to compare with
        return
    for prefix in qmods:
        try:
            original = skeleton.get_submodule(prefix)
        except AttributeError:
            continue
        if not isinstance(original, nn.Linear):
            raise ValueError(
                f"cannot export {prefix} as {fmt}: in this architecture it is a "
                f"{type(original).__name__}, not an nn.Linear, and {fmt} loaders only convert nn.Linear "
                "layers. Use --format awqfx (fmt='awqfx') for this model."
            )


def _divisor_hint(in_features: int) -> str:
    ok = [g for g in (64, 32) if in_features % g == 0]
    if ok:
        return "re-quantize with " + " or ".join(f"--group-size {g}" for g in ok) + ", or "
    return ""


def _autoawq_payload(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    group_sizes = {m.group_size for m in qmods.values()}
    for prefix, m in qmods.items():
        where = f"layer {prefix} (in_features={m.in_features}, out_features={m.out_features})"
        if m.bits != 4:
            raise ValueError(
                f"cannot export as autoawq: {where} has bits={m.bits}, but AutoAWQ GEMM stores 4-bit weights "
                "only; use --format awqfx or --format compressed-tensors."
            )
        g = m.in_features if m.group_size == -1 else m.group_size
        if m.in_features % g != 0:
            raise ValueError(
                f"cannot export as autoawq: {where} has a ragged last group: AutoAWQ GEMM needs "
                f"in_features % group_size == 0, got {m.in_features} % {m.group_size} = {m.in_features % g}; "
                f"{_divisor_hint(m.in_features)}use --format awqfx."
            )
        if m.out_features % 8 != 0:
            raise ValueError(
                f"cannot export as autoawq: {where}: AutoAWQ GEMM needs out_features % 8 == 0; "
                "use --format awqfx or --format compressed-tensors."
            )
    if len(group_sizes) != 1:
        raise ValueError(
            f"cannot export as autoawq: layers use different group sizes {sorted(group_sizes)}, but the "
            "AutoAWQ config has a single group_size; use --format awqfx."
        )
    _check_linear_sources(model, qmods, "autoawq")
    tensors = _split_state(model, qmods)
    for prefix, m in qmods.items():
        for local, t in to_autoawq_gemm(quantized_weight_of(m)).items():
            tensors[f"{prefix}.{local}"] = t.contiguous().cpu()
        if m.bias is not None:
            tensors[f"{prefix}.bias"] = m.bias.detach().contiguous().cpu()
    (g,) = group_sizes
    qcfg = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": int(g),
        "zero_point": True,
        "modules_to_not_convert": _unquantized_linears(model),
    }
    return tensors, qcfg


def _compressed_tensors_payload(
    model: nn.Module, qmods: Mapping[str, QuantLinear]
) -> tuple[dict[str, torch.Tensor], dict]:
    specs = {(m.bits, m.group_size, bool(m.symmetric)) for m in qmods.values()}
    if len(specs) != 1:
        raise ValueError(
            "cannot export as compressed-tensors: layers use different quantization specs "
            f"{sorted(specs)} (bits, group_size, symmetric); this exporter writes one config group. "
            "Use --format awqfx."
        )
    for prefix, m in qmods.items():
        if m.group_size != -1 and m.in_features % m.group_size != 0:
            raise ValueError(
                f"cannot export as compressed-tensors: layer {prefix} (in_features={m.in_features}) has a "
                f"ragged last group with group_size={m.group_size}; compressed-tensors group quantization "
                f"needs in_features % group_size == 0. {_divisor_hint(m.in_features).capitalize()}"
                "use --format awqfx."
            )
    _check_linear_sources(model, qmods, "compressed-tensors")
    (bits, group_size, symmetric) = next(iter(specs))
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    scale_dtype = _float_dtype(model)
    tensors = _split_state(model, qmods)
    for prefix, m in qmods.items():
        for local, t in to_compressed_tensors(quantized_weight_of(m), scale_dtype=scale_dtype).items():
            tensors[f"{prefix}.{local}"] = t.contiguous().cpu()
        if m.bias is not None:
            tensors[f"{prefix}.bias"] = m.bias.detach().contiguous().cpu()
    qcfg = compressed_tensors_config(spec, ignore=_unquantized_linears(model), targets=("Linear",))
    return tensors, qcfg


INPUT_SCALE = "awqfx_input_scale"


def input_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module prefix: 1/s per input column}`` of modules whose input is scaled by a pre-hook
    (the module-tree form of an activation group's inserted scale node)."""
    from awqfx.apply import InputScale

    out = {}
    for name, m in model.named_modules():
        for h in m._forward_pre_hooks.values():
            if isinstance(h, InputScale):
                out[name] = h.factor
    return out


def _native_payload(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = _dedupe_state(model.state_dict())
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
    return tensors, qcfg


def _config_dict(model: nn.Module, qcfg: dict) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = qcfg
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    dtype = _float_dtype(model)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


# =========================================================================== save


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    fmt: str = "awqfx",
    tokenizer: Any = None,
    plan_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a packed HF model (``QuantLinear`` modules inside) to ``out_dir`` in format ``fmt``.

    ``fmt``: ``"awqfx"`` (native), ``"autoawq"`` or ``"compressed-tensors"`` (see the module
    docstring for the exact layouts). ``tokenizer``: saved with ``save_pretrained`` when given.
    ``plan_dir``: its files are copied into ``out_dir/awq_plan/``. Returns ``Path(out_dir)``.

    Raises ``FileExistsError`` if ``out_dir`` exists (unless ``overwrite``), ``ValueError`` when
    the model can't be expressed in ``fmt`` (naming the first failing layer), before anything is
    written. Writes atomically: on any error nothing is left behind.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or choose another directory."
        )
    if getattr(model, "config", None) is None or not hasattr(model.config, "to_dict"):
        raise ValueError("save_quantized needs a transformers model (with a .config) that went through pack_model.")
    plan_src = None
    if plan_dir is not None:
        plan_src = Path(plan_dir)
        if not plan_src.is_dir():
            raise FileNotFoundError(f"plan directory {plan_src} does not exist.")
    qmods = packed_modules(model)
    if not qmods:
        raise ValueError("save_quantized: the model has no QuantLinear modules; call pack_model first.")

    scales = input_scales(model)
    if scales and fmt != "awqfx":
        raise ValueError(
            f"cannot export as {fmt}: {len(scales)} layer(s) (e.g. {next(iter(scales))}) read an activation through "
            f"an AWQ scale node (GELU -> fc2 style), which {fmt} loaders cannot apply. Use --format awqfx (fmt='awqfx')."
        )
    if fmt == "awqfx":
        tensors, qcfg = _native_payload(model, qmods)
        for prefix, inv in scales.items():
            tensors[f"{prefix}.{INPUT_SCALE}"] = inv.detach().float().cpu().contiguous()
        if scales:
            qcfg["input_scales"] = sorted(scales)
    elif fmt == "autoawq":
        tensors, qcfg = _autoawq_payload(model, qmods)
    else:
        tensors, qcfg = _compressed_tensors_payload(model, qmods)
    config = _config_dict(model, qcfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # called through the module so the write can be intercepted (tests simulate a full disk)
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_file"):
            gen.to_json_file(str(tmp / "generation_config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if plan_src is not None:
            shutil.copytree(plan_src, tmp / PLAN_SUBDIR)
        if out.exists() or out.is_symlink():  # overwrite: move the old one aside, swap, then delete
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                old = None
                raise
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return out


# =========================================================================== load


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise QuantizedFileError(f"{path}: no such checkpoint directory.")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise QuantizedFileError(f"{cfg_file} is missing: {path} is not a saved quantized model.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QuantizedFileError(f"{cfg_file} is not valid JSON (corrupt or truncated?): {err}") from err
    if not isinstance(cfg, dict):
        raise QuantizedFileError(f"{cfg_file} does not hold a JSON object.")
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise QuantizedFileError(f"{cfg_file} has no quantization_config: not a quantized checkpoint.")
    return cfg


def _weights_file(path: Path) -> Path:
    f = path / WEIGHTS_NAME
    if not f.is_file():
        raise QuantizedFileError(f"{f} is missing: the checkpoint in {path} is incomplete.")
    return f


class _SafeFile:
    """``safe_open`` with every safetensors failure turned into a QuantizedFileError naming the file."""

    def __init__(self, file: Path, device: str = "cpu") -> None:
        self.file = file
        self.device = device
        self._ctx = None
        self._f = None

    def _corrupt(self, err: BaseException) -> QuantizedFileError:
        size = self.file.stat().st_size if self.file.exists() else 0
        return QuantizedFileError(
            f"{self.file} is corrupt or truncated ({size} bytes) and cannot be read: {err}. "
            "Re-export the model."
        )

    def __enter__(self) -> "_SafeFile":
        try:
            self._ctx = safetensors.safe_open(str(self.file), framework="pt", device=self.device)
            self._f = self._ctx.__enter__()
        except Exception as err:  # SafetensorError, OSError on a short mmap, ...
            raise self._corrupt(err) from err
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        try:
            s = self._f.get_slice(key)
            return tuple(int(d) for d in s.get_shape()), str(s.get_dtype())
        except Exception as err:
            raise self._corrupt(err) from err

    def tensor(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key)
        except Exception as err:
            raise self._corrupt(err) from err


_ST_DTYPES = {
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.float32: "F32",
}


def _mismatch(path: Path, problems: list[str]) -> QuantizedFileError:
    shown = problems[:8]
    more = f"; ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return QuantizedFileError(
        f"{path / WEIGHTS_NAME}: the file does not match this model/config ({path / CONFIG_NAME}): "
        + "; ".join(shown)
        + more
    )


def _native_modules(path: Path, qcfg: dict) -> dict[str, dict]:
    version = qcfg.get("format_version")
    if version != NATIVE_FORMAT_VERSION:
        raise QuantizedFileError(
            f"{path / CONFIG_NAME}: unknown awqfx format_version {version!r}; this awqfx reads version "
            f"{NATIVE_FORMAT_VERSION}. Upgrade awqfx or re-export the model."
        )
    modules = qcfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise QuantizedFileError(f"{path / CONFIG_NAME}: quantization_config.modules is missing or empty.")
    for prefix, entry in modules.items():
        if not isinstance(entry, dict) or any(k not in entry for k in _NATIVE_KEYS):
            raise QuantizedFileError(
                f"{path / CONFIG_NAME}: quantization_config.modules[{prefix!r}] must have the keys "
                f"{', '.join(_NATIVE_KEYS)}; got {entry!r}."
            )
        ints = ("bits", "group_size", "in_features", "out_features")
        if any(isinstance(entry[k], bool) or not isinstance(entry[k], int) for k in ints):
            raise QuantizedFileError(f"{path / CONFIG_NAME}: modules[{prefix!r}] has non-integer fields: {entry!r}.")
    return modules


def _hf_config(path: Path, cfg: dict) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise QuantizedFileError(
            f"{path / CONFIG_NAME}: unknown or missing model_type {model_type!r}; cannot rebuild the model."
        )
    d = {k: v for k, v in cfg.items() if k != "quantization_config"}
    return CONFIG_MAPPING[model_type].from_dict(d)


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
    cfg = _read_config(path)
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
    wfile = _weights_file(path)
    dev = torch.device(device)

    with _SafeFile(wfile, device=str(dev) if dev.type != "meta" else "cpu") as f:
        file_meta = {k: f.meta(k) for k in f.keys()}

        model = _build_skeleton(_hf_config(path, cfg))
        parents = _parent_map(model)
        problems: list[str] = []
        for prefix, e in modules.items():
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
            # a ValueError from here is about `backend` (e.g. int4pack on a layer it can't run)
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
        if problems:
            raise _mismatch(path, problems)

        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for prefix in qcfg.get("input_scales", []):
            if prefix not in modules:
                problems.append(f"input scale for {prefix!r}, which is not a quantized module")
            else:
                expected[f"{prefix}.{INPUT_SCALE}"] = (modules[prefix]["in_features"],)
        quantized_keys = {f"{p}.{t}": t for p in modules for t in _QL_TENSORS}
        groups = _alias_groups(model)
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
            raise _mismatch(path, problems)

        state = {k: f.tensor(k) for k in file_meta}

    from awqfx.apply import InputScale

    for prefix in qcfg.get("input_scales", []):
        inv = state.pop(f"{prefix}.{INPUT_SCALE}")
        model.get_submodule(prefix).register_forward_pre_hook(InputScale(inv, prefix + ".weight"))
    model.load_state_dict(state, strict=False, assign=True)
    _retie(model, groups, set(file_meta))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise _mismatch(path, [f"tensors not provided by the file: {leftover[:8]}"])
    model.to(dev)
    gen_file = path / "generation_config.json"
    if gen_file.is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model.eval()


def _retie(model: nn.Module, groups: list[list[str]], loaded: set[str]) -> None:
    """Point every name of a tied group at the one tensor that was loaded."""
    for names in groups:
        src_name = next((n for n in names if n in loaded), None)
        if src_name is None:
            continue
        mod_name, _, leaf = src_name.rpartition(".")
        src_mod = model.get_submodule(mod_name)
        is_param = leaf in src_mod._parameters
        src = src_mod._parameters[leaf] if is_param else src_mod._buffers[leaf]
        for n in names:
            if n == src_name:
                continue
            mn, _, lf = n.rpartition(".")
            m = model.get_submodule(mn)
            if is_param and lf in m._parameters:
                m._parameters[lf] = src
            elif lf in m._buffers:
                m._buffers[lf] = src


# =========================================================================== foreign formats


def _read_all(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = _read_config(path)
    with _SafeFile(_weights_file(path)) as f:
        tensors = {k: f.tensor(k) for k in f.keys()}
    return cfg["quantization_config"], tensors


def load_autoawq_qweights(path: str | os.PathLike) -> dict[str, QuantizedWeight]:
    """``{weight FQN: QuantizedWeight}`` of every layer of an AutoAWQ GEMM export.

    Scales are the stored float16 values widened to float32; the spec is 4-bit asymmetric
    (a symmetric export reads back as zero points of 8, which dequantizes identically).
    """
    path = Path(path)
    qcfg, tensors = _read_all(path)
    if qcfg.get("quant_method") != "awq" or str(qcfg.get("version", "")).lower() != "gemm":
        raise QuantizedFileError(f"{path} is not an AutoAWQ GEMM export (quantization_config={qcfg!r}).")
    g = int(qcfg.get("group_size", 128))
    out: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        try:
            parts = {n: tensors[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales")}
            out[f"{prefix}.weight"] = from_autoawq_gemm(parts, g, int(parts["qweight"].shape[0]))
        except (KeyError, ValueError) as err:
            raise _mismatch(path, [f"layer {prefix}: {err}"]) from err
    return out


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
    qcfg, tensors = _read_all(path)
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
            raise _mismatch(path, [f"layer {prefix}: {err}"]) from err
    return out
