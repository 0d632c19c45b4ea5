"""What the three checkpoint formats share: layer descriptions for the format checks, the
checkpoint directory (atomic write, config.json), safe file reading and the skeleton a loader
fills (for AutoAWQ and compressed-tensors, :func:`load_packed`: the packed model rebuilt around
the weights their readers give).

Every format is a directory holding ``config.json`` (the HF model config plus a
``quantization_config``; none in the float ``smoothed`` format) and ``model.safetensors``
(metadata ``{"format": "pt"}``), or above ``max_shard_bytes`` (2 GiB) shards
``model-0000i-of-0000N.safetensors`` with the ``model.safetensors.index.json`` Hugging Face
loaders read (:mod:`awqfx.formats.shards`); never pickle. Optional extras: the tokenizer files (``tokenizer.save_pretrained``),
``generation_config.json``, and the AWQ plan copied into the ``awq_plan/`` sub-directory (a
sub-directory, not the top level, because vLLM loads every top-level ``*.safetensors`` file as
model weights and ``plan.safetensors`` would break it).

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
import functools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig

from awqfx.apply import InputScale
from awqfx.config import ActSpec
from awqfx.formats.shards import DEFAULT_SHARD_BYTES, INDEX_NAME, WEIGHTS_NAME, ShardWriter
from awqfx.graph import float_dtype
from awqfx.int8_linear import Int8Linear, int8_modules
from awqfx.modules import QuantLinear
from awqfx.packed_experts import packed_experts
from awqfx.packed_model import parent_map
from awqfx.quant import QuantizedWeight, QuantSpec

CONFIG_NAME = "config.json"
PLAN_SUBDIR = "awq_plan"
INPUT_SCALE = "awqfx_input_scale"
QL_TENSORS = ("qweight", "scales", "qzeros", "bias")
INT8_TENSORS = ("int_weight", "weight_scale", "weight_zero", "bias")  # Int8Linear's state


class QuantizedFileError(ValueError):
    """A quantized checkpoint directory is missing files, corrupt, or does not match its config."""


class FormatError(ValueError):
    """The layers about to be quantized cannot be written in the chosen checkpoint format."""


# =========================================================================== format checks


@dataclass(frozen=True)
class Layer:
    """One weight about to be quantized, as the format checks see it: shapes and spec only.

    ``shape``: the weight as the model stores it; ``in_dim``: its dim contracted with the input
    (the last one for ``nn.Linear``'s ``[out, in]``, 0 for GPT-2's ``Conv1D`` ``[in, out]``);
    ``tied``: the tensor is shared with another parameter (a tied LM head); ``input_scale``: the
    layer reads its input through an inserted AWQ scale node (an activation group's ``1/s``);
    ``act``: the layer quantizes its input activations too (weight-activation mode), or None.
    """

    name: str
    shape: tuple[int, ...]
    in_dim: int
    spec: QuantSpec
    tied: bool = False
    input_scale: bool = False
    act: ActSpec | None = None

    @property
    def in_features(self) -> int:
        return self.shape[self.in_dim]

    @property
    def out_features(self) -> int:
        return [d for i, d in enumerate(self.shape) if i != self.in_dim % len(self.shape)][-1]

    @property
    def where(self) -> str:
        if len(self.shape) != 2:
            return f"layer {self.name} (shape {list(self.shape)})"
        return f"layer {self.name} (in_features={self.in_features}, out_features={self.out_features})"

    def stores_in_last(self) -> bool:
        """The input dim is the weight's last one (``nn.Linear``'s ``[out, in]``)."""
        return self.in_dim % len(self.shape) == len(self.shape) - 1

    def ragged(self) -> bool:
        g = self.spec.effective_group_size(self.in_features)
        return g <= 0 or self.in_features % g != 0


def divisor_hint(in_features: int) -> str:
    ok = [g for g in (64, 32) if in_features % g == 0]
    if ok:
        return "re-quantize with " + " or ".join(f"--group-size {g}" for g in ok) + ", or "
    return ""


def packing_problems(layers: list[Layer]) -> list[str]:
    """What no format can store: a tied weight cannot become a packed layer without untying it, and
    no packed expert module quantizes its input activations."""
    return [
        f"{layer.where} is tied (shared) with another module's weight: packing it would untie the model; "
        "leave it in float (quantize_head=False)"
        for layer in layers
        if layer.tied
    ] + [
        f"{layer.where} is a 3-D fused MoE expert weight, and no packed expert module quantizes its input "
        "activations; quantize weights only (no --act-bits), or --ignore the experts"
        for layer in layers
        if layer.act is not None and len(layer.shape) != 2
    ]


def integer_grid_problems(layers: list[Layer]) -> list[str]:
    """What a packed layer cannot store: weights quantized with GGUF blocks, which have no integer
    zero-point form (packed layers hold codes on awqfx's integer grid)."""
    gguf_types = sorted({layer.spec.scheme for layer in layers if layer.spec.is_gguf})
    if not gguf_types:
        return []
    return [f"the weights are quantized with GGUF {', '.join(gguf_types)} blocks, which have no integer "
            "zero-point form: only --format gguf stores them"]


def activation_problems(fmt: str, layers: list[Layer]) -> list[str]:
    """What a weight-only format cannot store: quantized input activations (weight-activation mode)."""
    acts = [layer.name for layer in layers if layer.act is not None]
    if not acts:
        return []
    return [f"{len(acts)} layers quantize their input activations (--act-bits), which {fmt} does not describe "
            f"(weights only); use --format awqfx or compressed-tensors"]


def linear_only_problems(fmt: str, layers: list[Layer]) -> list[str]:
    """What a foreign loader cannot rebuild: it swaps plain ``nn.Linear`` layers ([out, in] weights)
    for its packed ones and knows nothing of awqfx's scale nodes."""
    problems = []
    for layer in layers:
        if len(layer.shape) != 2:
            problems.append(
                f"{layer.where} is a 3-D fused MoE expert weight; awqfx writes {fmt} for 2-D nn.Linear weights "
                "only, use --format awqfx"
            )
        elif not layer.stores_in_last():
            problems.append(
                f"{layer.where} stores its weight as [in, out] (x @ W, like GPT-2's Conv1D), not as an nn.Linear, "
                f"and {fmt} loaders only convert nn.Linear layers; use --format awqfx"
            )
        if layer.input_scale:
            problems.append(
                f"{layer.where} reads its input through an AWQ scale node after an activation (GELU -> fc2 style), "
                f"which {fmt} loaders cannot apply; use --format awqfx, or --drop-unfoldable to leave such groups "
                "unscaled"
            )
    return problems


@dataclass(frozen=True)
class ModelSource:
    """What the model was loaded from, for a format that copies its metadata (GGUF): its Hugging
    Face directory (config, tokenizer) and, when MODEL was a ``.gguf`` file, that file."""

    model_dir: Path | None = None
    gguf_file: Path | None = None


def format_error(fmt: str, problems: list[str]) -> FormatError:
    return FormatError(f"cannot export as {fmt}: " + "; ".join(problems) + ".")


def refuse(fmt: str, problems: list[str]) -> None:
    """Raise :class:`FormatError` listing ``problems``, if there are any."""
    if problems:
        raise format_error(fmt, problems)


def packed_layers(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> list[Layer]:
    """The packed modules of ``model`` as :class:`Layer` descriptions, for a writer's check.

    The orientation comes from the architecture rebuilt from ``model.config``: a module that is not
    an ``nn.Linear`` there is described as ``[in, out]`` (the other kind ``pack_model`` packs).
    """
    try:
        skeleton = _reference_skeleton(model.config.to_json_string())
    except Exception:  # noqa: BLE001 - not constructible from its config: nothing to compare with
        skeleton = None
    scaled = input_scales(model)
    layers = []
    for prefix, m in [*qmods.items(), *int8_modules(model).items()]:
        in_dim = 1
        if skeleton is not None:
            with contextlib.suppress(AttributeError):
                in_dim = 1 if isinstance(skeleton.get_submodule(prefix), nn.Linear) else 0
        shape = (m.out_features, m.in_features) if in_dim == 1 else (m.in_features, m.out_features)
        spec = QuantSpec(bits=m.bits, group_size=m.group_size, symmetric=bool(m.symmetric))
        layers.append(Layer(f"{prefix}.weight", shape, in_dim, spec, input_scale=prefix in scaled,
                            act=getattr(m, "act", None)))
    for name, e in packed_experts(model).items():
        layers.append(Layer(name, tuple(e.weight_shape), e.in_dim, e.spec))
    return layers


def input_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module prefix: 1/s per input column}`` of modules whose input is scaled by a pre-hook
    (the module-tree form of an activation group's inserted scale node)."""
    out = {}
    for name, m in model.named_modules():
        for h in m._forward_pre_hooks.values():
            if isinstance(h, InputScale):
                out[name] = h.factor
    return out


# =========================================================================== model skeleton, state


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


def build_skeleton(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` with every parameter on the meta device (in ``dtype``,
    default the config's own)."""
    with _params_on_meta():
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


@functools.lru_cache(maxsize=2)
def _reference_skeleton(config_json: str) -> nn.Module:
    """A shared, never modified meta skeleton of a config (the block-by-block writer asks once per block)."""
    d = json.loads(config_json)
    return build_skeleton(CONFIG_MAPPING[d["model_type"]].from_dict(d))


def alias_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to the same parameter/buffer object (tied weights), groups of 2+."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def dedupe_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def split_state(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """The model's state dict without the tensors of the packed modules (``QuantLinear`` and
    ``Int8Linear``), deduplicated."""
    state = model.state_dict()
    quantized_keys = {f"{p}.{t}" for p in qmods for t in QL_TENSORS}
    quantized_keys |= {f"{p}.{t}" for p in int8_modules(model) for t in INT8_TENSORS}
    return dedupe_state({k: v for k, v in state.items() if k not in quantized_keys})


def unquantized_linears(model: nn.Module) -> list[str]:
    """Names of ``nn.Linear`` modules still in float (``lm_head``, MoE routers, ...)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


# =========================================================================== write


def config_dict(model: nn.Module, qcfg: dict | None) -> dict:
    """``model``'s config as ``config.json`` holds it, with ``qcfg`` as its ``quantization_config``
    (None: none, a plain float checkpoint)."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)  # where the source was read from: a path on the quantizing machine
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    dtype = float_dtype(model) or torch.float32
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def write_checkpoint(
    out: Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    tokenizer: Any = None,
    plan_src: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write the checkpoint directory atomically (see the module docstring); replaces ``out`` if it exists."""
    with checkpoint_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        writer.add(tensors)
        writer.finish()
        write_extras(tmp, config, getattr(model, "generation_config", None), tokenizer, plan_src)


def write_extras(directory: Path, config: dict, generation_config: Any = None, tokenizer: Any = None,
                 plan_src: Path | None = None) -> None:
    """Everything of a checkpoint directory but the weights: config.json, generation config, tokenizer, plan."""
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if generation_config is not None and hasattr(generation_config, "to_json_file"):
        generation_config.to_json_file(str(directory / "generation_config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if plan_src is not None:
        shutil.copytree(plan_src, directory / PLAN_SUBDIR)


@contextlib.contextmanager
def checkpoint_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write into; renamed to ``out`` when the block exits
    without error (an existing ``out`` is replaced only then), removed on any error or Ctrl-C."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        yield tmp
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


# =========================================================================== read


def read_config(path: Path) -> dict:
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


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards its index lists, else ``model.safetensors``."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise QuantizedFileError(f"{index} is not a valid shard index (corrupt or truncated?): {err}") from err
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise QuantizedFileError(f"{path}: the shards {', '.join(missing)} listed in {INDEX_NAME} are missing; "
                                     "the checkpoint is incomplete.")
        return files
    f = path / WEIGHTS_NAME
    if not f.is_file():
        raise QuantizedFileError(f"{f} is missing: the checkpoint in {path} is incomplete.")
    return [f]


class SafeFile:
    """``safe_open`` over one file or a checkpoint's shards, every safetensors failure turned into a
    QuantizedFileError naming the file."""

    def __init__(self, files: Path | list[Path], device: str = "cpu") -> None:
        self.files = [files] if isinstance(files, Path) else list(files)
        self.device = device
        self._stack = contextlib.ExitStack()
        self._where: dict[str, tuple[Path, Any]] = {}

    @staticmethod
    def _corrupt(file: Path, err: BaseException) -> QuantizedFileError:
        size = file.stat().st_size if file.exists() else 0
        return QuantizedFileError(
            f"{file} is corrupt or truncated ({size} bytes) and cannot be read: {err}. "
            "Re-export the model."
        )

    def __enter__(self) -> "SafeFile":
        for file in self.files:
            try:
                f = self._stack.enter_context(safetensors.safe_open(str(file), framework="pt", device=self.device))
                keys = list(f.keys())
            except Exception as err:  # SafetensorError, OSError on a short mmap, ...
                self._stack.close()
                raise self._corrupt(file, err) from err
            self._where.update({k: (file, f) for k in keys})
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        file, f = self._where[key]
        try:
            s = f.get_slice(key)
            return tuple(int(d) for d in s.get_shape()), str(s.get_dtype())
        except Exception as err:
            raise self._corrupt(file, err) from err

    def tensor(self, key: str) -> torch.Tensor:
        file, f = self._where[key]
        try:
            return f.get_tensor(key)
        except Exception as err:
            raise self._corrupt(file, err) from err


def mismatch(path: Path, problems: list[str]) -> QuantizedFileError:
    shown = problems[:8]
    more = f"; ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return QuantizedFileError(
        f"{path}: the weights file does not match this model/config ({path / CONFIG_NAME}): "
        + "; ".join(shown)
        + more
    )


def read_all(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = read_config(path)
    with SafeFile(weight_files(path)) as f:
        tensors = {k: f.tensor(k) for k in f.keys()}
    return cfg["quantization_config"], tensors


# =========================================================================== rebuild the model


def hf_config(path: Path, cfg: dict) -> Any:
    """The transformers config of the checkpoint ``path`` from its ``config.json`` (``cfg``),
    without the ``quantization_config``."""
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise QuantizedFileError(
            f"{path / CONFIG_NAME}: unknown or missing model_type {model_type!r}; cannot rebuild the model."
        )
    d = {k: v for k, v in cfg.items() if k != "quantization_config"}
    return CONFIG_MAPPING[model_type].from_dict(d)


def fill_skeleton(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor], groups: list[list[str]]) -> None:
    """Load ``state`` into the meta skeleton ``model`` without copies (``assign``) and point every
    name of a tied group (``groups``: :func:`alias_groups` of the skeleton) at the one tensor loaded;
    a tensor the skeleton has no place for, or of another shape, is a mismatch of ``path``."""
    try:
        unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    except RuntimeError as err:  # a shape that does not match the architecture
        raise mismatch(path, [str(err)]) from err
    if unexpected:
        raise mismatch(path, [f"unexpected tensor {k} {list(state[k].shape)}" for k in unexpected])
    retie(model, groups, set(state))


def retie(model: nn.Module, groups: list[list[str]], loaded: set[str]) -> None:
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


def refuse_unloaded(path: Path, model: nn.Module) -> None:
    """A mismatch of ``path`` naming the parameters and buffers its files left on the meta device."""
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise mismatch(path, [f"tensors not provided by the file: {leftover[:8]}"])


def read_generation_config(path: Path, model: nn.Module) -> None:
    """Give ``model`` the checkpoint's ``generation_config.json``, when it has one that reads."""
    if (path / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(str(path))


def swap_in_packed(path: Path, model: nn.Module, qweights: Mapping[str, QuantizedWeight],
                   act: ActSpec | None = None) -> None:
    """Replace the ``nn.Linear`` owning each weight of ``qweights`` (``prefix.weight``, ``[out, in]``)
    with its packed module, which takes over the linear's (loaded) bias: a ``QuantLinear``, or given
    ``act`` an ``Int8Linear`` quantizing its input with ``act``."""
    modules, parents = dict(model.named_modules()), parent_map(model)
    problems = []
    for fqn, qw in qweights.items():
        prefix = fqn.rpartition(".")[0]
        linear = modules.get(prefix) if prefix else None
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != tuple(qw.shape):
            problems.append(f"quantized layer {prefix} ([out, in] = {list(qw.shape)}) is not an nn.Linear of that "
                            "shape in this architecture")
        elif linear.bias is not None and linear.bias.device.type == "meta":
            problems.append(f"missing tensor {prefix}.bias")
        else:
            packed = QuantLinear.from_quantized(qw, linear.bias) if act is None else \
                Int8Linear.from_quantized(qw, act, linear.bias)
            for parent, child_name in parents.get(id(linear), []):
                setattr(parent, child_name, packed)
    if problems:
        raise mismatch(path, problems)


def load_packed(path: Path, tensors: Mapping[str, torch.Tensor], qweights: Mapping[str, QuantizedWeight],
                layer_tensors: tuple[str, ...], dtype: torch.dtype | None = None,
                act: ActSpec | None = None) -> nn.Module:
    """The model of the checkpoint ``path`` (a format read into ``qweights``, ``{weight name:
    QuantizedWeight}``, and ``tensors``, every tensor its files hold), in eval mode: the
    architecture of its ``config.json``, each quantized weight's linear packed
    (:func:`swap_in_packed`, with ``act``), every other tensor loaded (floats in ``dtype``; None: as
    stored) and tied weights re-tied. ``layer_tensors``: the names a quantized layer ``prefix`` stores
    its weight under (``prefix.<name>``), which the packed module replaces; its bias is the linear's."""
    model = build_skeleton(hf_config(path, read_config(path)), dtype)
    groups = alias_groups(model)
    layer_keys = {f"{fqn.rpartition('.')[0]}.{name}" for fqn in qweights for name in layer_tensors}
    state = {k: t.to(dtype) if dtype is not None and t.is_floating_point() else t
             for k, t in tensors.items() if k not in layer_keys}
    fill_skeleton(path, model, state, groups)
    swap_in_packed(path, model, qweights, act)
    refuse_unloaded(path, model)
    read_generation_config(path, model)
    return model.eval()
