"""GGUF (llama.cpp): an AWQ-searched model as one ``.gguf`` file of Q4_0, Q4_1 or Q8_0 blocks.

The directory written holds ``model.gguf`` (:data:`GGUF_NAME`) and the plan in ``awq_plan/``;
llama.cpp takes the file, transformers the directory and the file name::

    AutoModelForCausalLM.from_pretrained(out_dir, gguf_file="model.gguf")

What is in the file (docs/design.md, "GGUF")

* The quantized linears: the plan's scales folded into the float weights
  (``apply_plan(model, plan, weights="float")``), each weight clamped per (row, block) to its
  clip range (:func:`awqfx.gguf_blocks.clamp_blocks`) and quantized by the ``gguf`` package
  (``gguf.quants.quantize``) to the plan's type -- the numbers the search's fake quantization
  computed with, bit for bit. ``attn_q`` / ``attn_k`` rows are permuted as llama.cpp's converter
  does (``LlamaModel.permute``; transformers' GGUF loader reverses it); rows are independent in
  a block quantizer, so the permutation commutes with quantization.
* Everything else as llama.cpp writes it: 1-D tensors (norms) as F32; the token embedding and an
  unquantized head as Q8_0, the type llama.cpp's quantizer falls back to for them when a k-quant
  does not fit (the bundled SmolLM2 Q4_1 file's ``token_embd`` is Q8_0), or F16 when a row is not a
  multiple of 32. A tied head is the token embedding (no ``output``). A linear left out of the plan
  (``--ignore``) stays float: F32.
* Tensor names from ``gguf.get_tensor_name_map`` (the map transformers' loader inverts).
* Metadata: from a GGUF source (the bundled SmolLM2, or any ``.gguf`` MODEL), every key is
  copied -- architecture parameters, tokenizer, chat template -- but ``general.file_type`` and
  ``general.quantization_version``, which are set for the new type. From a Hugging Face source
  the ``llama.*`` keys are converted from ``config.json`` and the tokenizer with ``gguf.vocab``
  (a GPT-2 byte-level BPE, a Llama byte-fallback BPE or a SentencePiece model, plus
  ``gguf.SpecialVocab``: merges, special token ids, chat template).

What it can hold (:func:`check`, :func:`check_model`): the ``llama`` architecture only (GGUF
arch ``llama``; other models are refused naming it), without rope scaling or linear biases;
2-D ``nn.Linear`` weights whose input is a multiple of 32, quantized with a GGUF spec
(``QuantSpec.gguf``); no activation scale nodes, no 3-D experts, no quantized tied head.
Whole-graph mode only (:data:`MODES`): the file is written from the whole folded model and the
plan (:func:`save_from_plan`), and ``--eval`` reads it back as transformers does (:func:`load`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from awqfx.formats.common import (
    PLAN_SUBDIR,
    Layer,
    ModelSource,
    activation_problems,
    checkpoint_dir,
    dedupe_state,
    format_error,
    linear_only_problems,
    packing_problems,
)
from awqfx.gguf_blocks import BLOCK_SIZE, GGUF_TYPES, block_type, clamp_blocks
from awqfx.params import get_param, rows_view
from awqfx.plan import AWQPlan

__all__ = [
    "ARCHITECTURES",
    "GGUF_NAME",
    "NAME",
    "check",
    "check_model",
    "file_type",
    "ggml_type",
    "llama_permute",
    "load",
    "load_gguf",
    "save_from_plan",
    "save_gguf",
]

log = logging.getLogger(__name__)

NAME = "gguf"
WEIGHTS = "float"  # the apply_plan weights mode of the model save_gguf takes: folded, not quantized
MODES = ("whole",)  # one file, written from the whole folded model: never block by block
GGUF_NAME = "model.gguf"
EVAL_NOTE = f"{GGUF_NAME} as transformers loads it"  # what --eval's "perplexity after" measures
#: transformers ``model_type`` -> GGUF architecture this writer knows the conventions of.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}
#: Metadata a GGUF source's copy does not keep (the writer sets them, or they describe the old file).
_NOT_COPIED = ("GGUF.", gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
               gguf.Keys.General.QUANTIZATION_VERSION)
#: The token embedding and the head: Q8_0 when outside the plan (F16 for rows not a multiple of 32).
_EMBEDDINGS = {f"{gguf.TENSOR_NAMES[t]}.weight" for t in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT)}
_EMBEDDING_TYPE = gguf.GGMLQuantizationType.Q8_0
_EMBEDDING_FALLBACK = gguf.GGMLQuantizationType.F16


def ggml_type(type_name: str) -> gguf.GGMLQuantizationType:
    """The ``gguf.GGMLQuantizationType`` of an awqfx GGUF type name (``"q4_0"`` -> ``Q4_0``)."""
    return gguf.GGMLQuantizationType[block_type(type_name).ggml_name]


def file_type(type_name: str) -> gguf.LlamaFileType:
    """``general.file_type`` of a file mostly of ``type_name`` blocks (``MOSTLY_Q4_0``, ...)."""
    return gguf.LlamaFileType[f"MOSTLY_{block_type(type_name).ggml_name}"]


# =========================================================================== checks


def check(layers: list[Layer]) -> list[str]:
    """Every reason a GGUF file cannot hold ``layers`` (shapes and spec only, before calibration)."""
    problems = packing_problems(layers) + linear_only_problems(NAME, layers) + activation_problems(NAME, layers)
    specs = sorted({(layer.spec.bits, layer.spec.group_size, layer.spec.symmetric) for layer in layers
                    if not layer.spec.is_gguf})
    if specs:
        b, g, s = specs[0]
        problems.append(f"the weights are quantized on awqfx's integer grid ({b}-bit, group {g}, "
                        f"{'symmetric' if s else 'asymmetric'}), which GGUF has no block type for; quantize with a "
                        f"GGUF type (--gguf-type {', '.join(GGUF_TYPES)}; QuantSpec.gguf(...))")
    types = sorted({layer.spec.scheme for layer in layers if layer.spec.is_gguf})
    if len(types) > 1:
        problems.append(f"the weights use several GGUF types ({', '.join(types)}); one file is written for one type")
    for layer in layers:
        if len(layer.shape) == 2 and layer.in_features % BLOCK_SIZE:
            problems.append(f"{layer.where}: GGUF blocks hold {BLOCK_SIZE} inputs and {layer.in_features} is not a "
                            f"multiple of {BLOCK_SIZE}; leave this layer in float or use --format awqfx")
    return problems


def _model_type(config: Any) -> str:
    return str(getattr(config, "model_type", None))


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise format_error(NAME, ["the config names no rope_theta"])
    return float(theta)


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_model(model: nn.Module, source: ModelSource) -> list[str]:
    """Every reason :func:`save_gguf` cannot write ``model`` (its architecture, parameter names and
    metadata source), before calibration. ``source.gguf_file``: the ``.gguf`` it was loaded from,
    whose metadata and tokenizer are copied; else ``source.model_dir``: its Hugging Face directory
    (config, tokenizer)."""
    config = model.config
    mt = _model_type(config)
    if mt not in ARCHITECTURES:
        archs = ", ".join(repr(a) for a in ARCHITECTURES)
        return [(f"the model is a {mt!r} ({type(model).__name__}); awqfx writes GGUF for the {archs} architecture "
                 "only, use another --format")]
    problems = []
    if _rope_type(config) != "default":
        problems.append(f"the model uses {_rope_type(config)!r} rope scaling, which this GGUF writer does not "
                        "convert; use another --format")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("the model's linears have biases, which transformers' GGUF loader for llama drops; "
                        "use another --format")
    names = _tensor_names(model)
    unmapped = [n for n, g in names.items() if g is None]
    if unmapped:
        problems.append(f"no GGUF tensor name for {', '.join(unmapped[:5])}" + (" ..." if len(unmapped) > 5 else ""))
    if source.gguf_file is not None:
        problems += _source_problems(source.gguf_file, config, {g for g in names.values() if g})
    elif source.model_dir is not None:
        try:
            _hf_vocab(Path(source.model_dir))
        except ValueError as e:
            problems.append(str(e))
    return problems


def _source_problems(path: Path, config: Any, written: set[str]) -> list[str]:
    """A GGUF source must be llama and hold exactly the tensors the model maps to."""
    reader = gguf.GGUFReader(path)
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != "llama":
        return [f"{path.name} is a GGUF of architecture {arch!r}; awqfx writes GGUF for 'llama' only"]
    source = {t.name for t in reader.tensors}
    problems = []
    if source - written:
        problems.append(f"{path.name} has tensors the loaded model has no counterpart for "
                        f"({', '.join(sorted(source - written)[:5])}); they would be lost")
    n = _field(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    if n is not None and int(n) != int(config.num_hidden_layers):
        problems.append(f"{path.name} has {n} blocks but the loaded model {config.num_hidden_layers}")
    return problems


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


# =========================================================================== tensors


def _tensor_names(model: nn.Module) -> dict[str, str | None]:
    """``{state dict name (tied weights once): GGUF tensor name or None}`` via ``gguf``'s name map."""
    config = model.config
    name_map = gguf.get_tensor_name_map(ARCHITECTURES[_model_type(config)], int(config.num_hidden_layers))
    out = {}
    for name in _unique_state_names(model):
        base, _, suffix = name.rpartition(".")
        mapped = name_map.get_name(base)
        out[name] = None if mapped is None else f"{mapped}.{suffix}"
    return out


def _unique_state_names(model: nn.Module) -> list[str]:
    """State dict names with tied weights once (the first name, as ``dedupe_state`` keeps)."""
    seen: set[int] = set()
    names = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` of ``attn_q`` / ``attn_k`` rows (rotary halves interleaved
    per head); transformers' ``LlamaTensorProcessor._reverse_permute_weights`` undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _permuted(gguf_name: str, w: torch.Tensor, config: Any) -> torch.Tensor:
    if ".attn_q." in gguf_name:
        return llama_permute(w, config.num_attention_heads, config.num_attention_heads)
    if ".attn_k." in gguf_name:
        return llama_permute(w, config.num_attention_heads, config.num_key_value_heads)
    return w


def _encode(w: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, Any]:
    """``(array, raw_dtype)`` for ``GGUFWriter.add_tensor``: float32 for F32, else the type's bytes."""
    data = w.detach().to(torch.float32).cpu().contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data, None
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def _tensors(model: nn.Module, plan: AWQPlan, names: dict[str, str | None]) -> Iterable[tuple[str, np.ndarray, Any]]:
    state = dedupe_state({n: t for n, t in model.state_dict().items() if n in names})
    config = model.config
    for name, t in state.items():
        gname = names[name]
        wp = plan.weights.get(name)
        if wp is not None:
            rows = clamp_blocks(rows_view(t, wp.in_dim), wp.max_val, wp.min_val)
            yield gname, *_encode(_permuted(gname, rows, config), ggml_type(wp.spec.scheme))
        elif gname in _EMBEDDINGS and t.dim() == 2:
            qtype = _EMBEDDING_TYPE if t.shape[-1] % BLOCK_SIZE == 0 else _EMBEDDING_FALLBACK
            yield gname, *_encode(t, qtype)
        elif t.dim() <= 2:  # norms, and linears left in float
            yield gname, *_encode(_permuted(gname, t, config), gguf.GGMLQuantizationType.F32)
        else:
            raise format_error(NAME, [f"{name} has {t.dim()} dims; GGUF llama tensors have 1 or 2"])


# =========================================================================== metadata


def _copy_metadata(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every key of ``source`` but the ones this file sets itself (:data:`_NOT_COPIED`)."""
    reader = gguf.GGUFReader(source)
    for field in reader.fields.values():
        if field.name.startswith(_NOT_COPIED):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _hf_vocab(model_dir: Path):
    """The ``gguf.vocab`` reader of ``model_dir``'s tokenizer, tried as llama.cpp's converter tries
    them for llama; a ValueError naming what was found when none reads it."""
    reasons = []
    for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab, gguf.vocab.SentencePieceVocab):
        try:
            return cls(model_dir)
        except (FileNotFoundError, TypeError, KeyError, ValueError, ImportError, RuntimeError) as e:
            reasons.append(f"{cls.__name__}: {type(e).__name__} {e}")
    raise ValueError(f"no tokenizer in {model_dir} that gguf.vocab converts (a GPT-2 byte-level BPE or Llama "
                     f"byte-fallback BPE tokenizer.json, or a SentencePiece tokenizer.model): {'; '.join(reasons)}")


def _hf_metadata(writer: gguf.GGUFWriter, config: Any, model_dir: Path) -> None:
    """The ``llama.*`` keys from ``config.json`` and the tokenizer, as llama.cpp's converter writes them."""
    writer.add_name(model_dir.name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _hf_tokenizer(writer, model_dir, int(config.vocab_size))


def _hf_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> None:
    vocab = _hf_vocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > n_vocab:
        raise format_error(NAME, [f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}"])
    for i in range(len(tokens), n_vocab):  # embedding rows no token uses, as llama.cpp's converter pads them
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        # llama.cpp's converter names the pre-tokenizer by hashing a test tokenization against its own list;
        # "default" is the GPT-2 split llama.cpp uses for a BPE it does not know
        log.warning("GGUF: tokenizer.ggml.pre is written as 'default' (GPT-2 pre-tokenizer); llama.cpp's "
                    "converter may name a model-specific one")
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab).add_to_gguf(
        writer, quiet=True)


# =========================================================================== write / read


def save_gguf(model: nn.Module, plan: AWQPlan, out_dir: str | Path, source_gguf: str | Path | None = None,
              model_dir: str | Path | None = None, plan_dir: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Write ``out_dir/model.gguf`` (and ``plan_dir`` copied to ``out_dir/awq_plan/``).

    ``model``: the plan's model with the scales folded and the weights *not* quantized
    (``apply_plan(model, plan, weights="float")``); the type is the plan's (every planned weight
    must have the same GGUF spec). ``source_gguf``: the ``.gguf`` the model was loaded from
    (metadata and tokenizer copied); else ``model_dir``: the Hugging Face directory (config and
    tokenizer converted). Atomic like the other formats: on any error nothing is left behind.
    Raises :class:`~awqfx.formats.common.FormatError` listing every problem before writing.
    """
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
                              "another directory.")
    if source_gguf is None and model_dir is None:
        raise ValueError("save_gguf needs the source's metadata: source_gguf (a .gguf) or model_dir (a HF directory)")
    source = None if source_gguf is None else Path(source_gguf)
    layers = [Layer(n, tuple(get_param(model, n).shape), wp.in_dim, wp.spec) for n, wp in plan.weights.items()]
    problems = check(layers) + check_model(model, ModelSource(None if model_dir is None else Path(model_dir), source))
    if not plan.weights:
        problems.append("the plan quantizes no weight")
    if plan.input_scales:
        problems.append(f"the plan scales the inputs of {', '.join(sorted(plan.input_scales)[:3])} with an inserted "
                        "node (a scale group after an activation), which a GGUF file has no place for")
    if problems:
        raise format_error(NAME, problems)
    type_name = next(iter(plan.weights.values())).spec.scheme
    names = _tensor_names(model)
    with checkpoint_dir(out) as tmp:
        writer = gguf.GGUFWriter(tmp / GGUF_NAME, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[_model_type(model.config)]])
        if source is not None:
            _copy_metadata(writer, source)
        else:
            _hf_metadata(writer, model.config, Path(model_dir))
        writer.add_file_type(int(file_type(type_name)))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, data, raw in _tensors(model, plan, names):
            writer.add_tensor(gname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if plan_dir is not None:
            shutil.copytree(plan_dir, tmp / PLAN_SUBDIR)
    return out


def save_from_plan(model: nn.Module, plan: AWQPlan, out_dir: str | Path, source: ModelSource,
                   plan_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """The format's writer (:func:`awqfx.formats.save_model`): :func:`save_gguf` with the metadata
    of ``source``."""
    return save_gguf(model, plan, out_dir, source_gguf=source.gguf_file, model_dir=source.model_dir,
                     plan_dir=plan_dir, overwrite=overwrite)


def load_gguf(out_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``out_dir/model.gguf`` as transformers loads it (dequantized to ``dtype``)."""
    return AutoModelForCausalLM.from_pretrained(str(out_dir), gguf_file=GGUF_NAME, dtype=dtype,
                                                local_files_only=True).eval()


load = load_gguf  # the format's reader (awqfx.formats.load_written)
