"""Save a packed model in three on-disk formats (and the float smoothed model in a fourth), and
load them back.

One module per format, each with its writer (``payload``: tensors + ``quantization_config``),
its reader (the smoothed format's is plain ``transformers``), its tensor layout and a ``check(layers)`` that lists every reason the format cannot
hold a set of layers, from shapes and the quantizer spec alone (so it runs right after
discovery, before calibration; the writers call it too):

* :mod:`awqfx.formats.native` (``"awqfx"``): any bits, any group size, ragged groups, ``Conv1D``
  layers, activation scale nodes; read by :func:`load_quantized`.
* :mod:`awqfx.formats.autoawq` (``"autoawq"``): AutoAWQ GEMM, 4-bit ``nn.Linear`` layers,
  ``in % g == 0``, ``out % 8 == 0``; read by :func:`load_autoawq_qweights` (its weights) and its
  ``load`` (the packed model).
* :mod:`awqfx.formats.compressed_tensors` (``"compressed-tensors"``): ``pack-quantized``, or
  ``int-quantized`` for weight-activation layers (``Int8Linear``: int8 weights, dynamic
  ``input_activations``), ``nn.Linear`` layers, ``in % g == 0``; read by
  :func:`load_compressed_tensors_qweights` (its weights) and its ``load`` (the packed model).
* :mod:`awqfx.formats.smoothed` (``"smoothed"``): not quantized: the float model with the plan's
  scales folded and weights clamped to their clip ranges, a plain checkpoint (no
  ``quantization_config``) for other quantizers; no activation scale nodes. Its ``WEIGHTS`` is
  ``"smoothed"``: it writes ``apply_plan(..., weights="smoothed")``, the others a packed model
  (:func:`weights_mode`).
* :mod:`awqfx.formats.gguf` (``"gguf"``): one llama.cpp ``.gguf`` file of Q4_0 / Q4_1 / Q8_0
  blocks (the plan's GGUF spec), llama architecture, ``in % 32 == 0``; written from the folded
  float model and the plan by :func:`awqfx.formats.gguf.save_gguf` (its ``WEIGHTS`` is
  ``"float"``), read by transformers (``from_pretrained(dir, gguf_file="model.gguf")``).

What a job asks a format, each answered by the format module or a default (:func:`weights_mode`,
:func:`format_modes`, :func:`model_problems`, :func:`writes_from_plan`, :func:`save_model`,
:func:`reads_back`, :func:`load_written`, :func:`eval_note`): ``WEIGHTS``, the ``apply_plan``
weights mode of the model it writes (default ``"packed"``); ``MODES``, the quantize modes it can be written in
(default whole graph and block by block); ``check_model(model, source)``, the reasons it cannot
write the whole model beyond its layers (architecture, metadata source; default none);
``save_from_plan(model, plan, out_dir, source, ...)`` when it is written from the model and the
plan, not from ``payload`` (:func:`save_quantized`); ``load(out_dir, dtype)``, its reader, which
``--eval`` of a block-by-block run (and of a format written from the plan) evaluates: a format
without one cannot be read back, and such a run is refused before any work; ``EVAL_NOTE``, what
that evaluation measures when not the quantized model itself.

:mod:`awqfx.formats.common` holds the directory layout, atomic writing and safe reading they share.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from awqfx.formats import autoawq, compressed_tensors, gguf, native, smoothed
from awqfx.formats.autoawq import load_autoawq_qweights
from awqfx.formats.common import (
    PLAN_SUBDIR, WEIGHTS_NAME, FormatError, Layer, ModelSource, QuantizedFileError, config_dict, write_checkpoint,
)
from awqfx.formats.compressed_tensors import load_compressed_tensors_qweights
from awqfx.formats.native import NATIVE_FORMAT_VERSION, load_quantized
from awqfx.int8_linear import int8_modules
from awqfx.packed_model import packed_modules

__all__ = [
    "FORMATS", "NATIVE_FORMAT_VERSION", "WEIGHTS_NAME", "PLAN_SUBDIR", "FormatError", "Layer", "ModelSource",
    "QuantizedFileError", "check_format", "format_module", "weights_mode", "format_modes", "model_problems",
    "writes_from_plan", "save_model", "reads_back", "load_written", "eval_note", "save_quantized", "load_quantized",
    "load_autoawq_qweights", "load_compressed_tensors_qweights",
]

_MODULES = {native.NAME: native, autoawq.NAME: autoawq, compressed_tensors.NAME: compressed_tensors,
            smoothed.NAME: smoothed, gguf.NAME: gguf}
FORMATS = tuple(_MODULES)


def format_module(fmt: str):
    """The module of format ``fmt`` (its ``payload``, ``check``, layout and reader)."""
    if fmt not in _MODULES:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return _MODULES[fmt]


def weights_mode(fmt: str) -> str:
    """The :func:`~awqfx.apply.apply_plan` ``weights`` mode that makes the model format ``fmt``
    writes: ``"packed"`` (``QuantLinear`` modules), or the format's own ``WEIGHTS``."""
    return getattr(format_module(fmt), "WEIGHTS", "packed")


def format_modes(fmt: str) -> tuple[str, ...]:
    """The quantize modes format ``fmt`` can be written in: ``"whole"`` (the whole model in
    memory) and ``"sequential"`` (block by block, :mod:`awqfx.sequential`), or the format's ``MODES``."""
    return getattr(format_module(fmt), "MODES", ("whole", "sequential"))


def check_format(fmt: str, layers: list[Layer]) -> list[str]:
    """Every reason format ``fmt`` cannot hold ``layers`` (empty when it can), each naming its layer."""
    return format_module(fmt).check(layers)


def model_problems(fmt: str, model: nn.Module, source: ModelSource) -> list[str]:
    """Every reason format ``fmt`` cannot write ``model`` beyond its layers (its architecture, the
    metadata of ``source``): the format's ``check_model``, nothing when it has none."""
    check_model = getattr(format_module(fmt), "check_model", None)
    return [] if check_model is None else check_model(model, source)


def writes_from_plan(fmt: str) -> bool:
    """Whether format ``fmt`` is written from the model and the plan (its ``save_from_plan``: it
    quantizes the float weights itself) rather than from the packed model (``payload``)."""
    return hasattr(format_module(fmt), "save_from_plan")


def save_model(fmt: str, model: nn.Module, plan: Any, out_dir: str | os.PathLike, source: ModelSource,
               tokenizer: Any = None, plan_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (``apply_plan(..., weights=weights_mode(fmt))`` of ``plan``) in format ``fmt``:
    the format's ``save_from_plan`` (with the metadata of ``source``), else :func:`save_quantized`."""
    if writes_from_plan(fmt):
        return format_module(fmt).save_from_plan(model, plan, out_dir, source, plan_dir=plan_dir, overwrite=overwrite)
    return save_quantized(model, out_dir, fmt=fmt, tokenizer=tokenizer, plan_dir=plan_dir, overwrite=overwrite)


def reads_back(fmt: str) -> bool:
    """Whether awqfx can load what format ``fmt`` writes (the format's ``load``)."""
    return hasattr(format_module(fmt), "load")


def load_written(fmt: str, out_dir: str | os.PathLike, dtype: Any) -> nn.Module:
    """The model format ``fmt`` wrote to ``out_dir``, as the format's ``load`` reads it (``dtype``:
    of the float parts, for a reader that takes one); ``ValueError`` for a format without one."""
    if not reads_back(fmt):
        raise ValueError(f"awqfx has no reader for --format {fmt}: it cannot load what it wrote to {out_dir}.")
    return format_module(fmt).load(out_dir, dtype)


def eval_note(fmt: str) -> str:
    """What ``--eval`` measures of format ``fmt``'s output when not the quantized model itself
    (the format's ``EVAL_NOTE``), else ``""``."""
    return getattr(format_module(fmt), "EVAL_NOTE", "")


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    fmt: str = "awqfx",
    tokenizer: Any = None,
    plan_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a packed HF model (``QuantLinear`` modules inside) to ``out_dir`` in format ``fmt``.

    ``fmt``: ``"awqfx"`` (native), ``"autoawq"`` or ``"compressed-tensors"`` (see the format
    modules for the exact layouts), or ``"smoothed"``, which takes the *float* model the plan
    made instead (``apply_plan(model, plan, weights="smoothed")``, no ``QuantLinear``) and writes
    a plain checkpoint without ``quantization_config``. ``tokenizer``: saved with ``save_pretrained`` when given.
    ``plan_dir``: its files are copied into ``out_dir/awq_plan/``. Returns ``Path(out_dir)``.

    Raises ``FileExistsError`` if ``out_dir`` exists (unless ``overwrite``), :class:`FormatError`
    (a ``ValueError``) listing every layer ``fmt`` cannot hold, before anything is written.
    Writes atomically: on any error nothing is left behind.
    """
    writer = format_module(fmt)
    if writes_from_plan(fmt):
        raise ValueError(f"format {fmt!r} is not written by save_quantized: it needs the plan too (awqfx.formats."
                         f"save_model({fmt!r}, apply_plan(model, plan, weights={weights_mode(fmt)!r}), plan, out_dir, "
                         "ModelSource(model_dir)).")
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
    if not qmods and not int8_modules(model) and weights_mode(fmt) == "packed":
        raise ValueError("save_quantized: the model has no QuantLinear or Int8Linear modules; call pack_model first.")
    tensors, qcfg = writer.payload(model, qmods)
    write_checkpoint(out, config_dict(model, qcfg), tensors, model, tokenizer, plan_src)
    return out
