"""Save a packed model in three on-disk formats (and the float smoothed model in a fourth), and
load them back.

One module per format, each with its writer (``payload``: tensors + ``quantization_config``),
its reader (the smoothed format's is plain ``transformers``), its tensor layout and a ``check(layers)`` that lists every reason the format cannot
hold a set of layers, from shapes and the quantizer spec alone (so it runs right after
discovery, before calibration; the writers call it too):

* :mod:`awqfx.formats.native` (``"awqfx"``): any bits, any group size, ragged groups, ``Conv1D``
  layers, activation scale nodes; read by :func:`load_quantized`.
* :mod:`awqfx.formats.autoawq` (``"autoawq"``): AutoAWQ GEMM, 4-bit ``nn.Linear`` layers,
  ``in % g == 0``, ``out % 8 == 0``; read by :func:`load_autoawq_qweights`.
* :mod:`awqfx.formats.compressed_tensors` (``"compressed-tensors"``): ``pack-quantized``,
  ``nn.Linear`` layers, ``in % g == 0``; read by :func:`load_compressed_tensors_qweights`.
* :mod:`awqfx.formats.smoothed` (``"smoothed"``): not quantized: the float model with the plan's
  scales folded and weights clamped to their clip ranges, a plain checkpoint (no
  ``quantization_config``) for other quantizers; no activation scale nodes. Its ``WEIGHTS`` is
  ``"smoothed"``: it writes ``apply_plan(..., weights="smoothed")``, the others a packed model
  (:func:`weights_mode`).
* :mod:`awqfx.formats.gguf` (``"gguf"``): one llama.cpp ``.gguf`` file of Q4_0 / Q4_1 / Q8_0
  blocks (the plan's GGUF spec), llama architecture, ``in % 32 == 0``; written from the folded
  float model and the plan by :func:`awqfx.formats.gguf.save_gguf` (its ``WEIGHTS`` is
  ``"float"``), read by transformers (``from_pretrained(dir, gguf_file="model.gguf")``).

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
    PLAN_SUBDIR, WEIGHTS_NAME, FormatError, Layer, QuantizedFileError, config_dict, write_checkpoint,
)
from awqfx.formats.compressed_tensors import load_compressed_tensors_qweights
from awqfx.formats.native import NATIVE_FORMAT_VERSION, load_quantized
from awqfx.packed_model import packed_modules

__all__ = [
    "FORMATS", "NATIVE_FORMAT_VERSION", "WEIGHTS_NAME", "PLAN_SUBDIR", "FormatError", "Layer", "QuantizedFileError",
    "check_format", "format_module", "weights_mode", "save_quantized", "load_quantized", "load_autoawq_qweights", "load_compressed_tensors_qweights",
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


def check_format(fmt: str, layers: list[Layer]) -> list[str]:
    """Every reason format ``fmt`` cannot hold ``layers`` (empty when it can), each naming its layer."""
    problems = format_module(fmt).check(layers)
    gguf_types = sorted({layer.spec.scheme for layer in layers if layer.spec.is_gguf})
    if gguf_types and weights_mode(fmt) == "packed":  # packed layers store the integer grid's codes
        problems.append(f"the weights are quantized with GGUF {', '.join(gguf_types)} blocks, which have no integer "
                        f"zero-point form: only --format gguf stores them")
    return problems


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
    if not hasattr(writer, "payload"):
        raise ValueError(f"format {fmt!r} is not written by save_quantized: it needs the plan too "
                         "(awqfx.formats.gguf.save_gguf(apply_plan(model, plan, weights='float'), plan, out_dir, ...)).")
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
    if not qmods and weights_mode(fmt) == "packed":
        raise ValueError("save_quantized: the model has no QuantLinear modules; call pack_model first.")
    tensors, qcfg = writer.payload(model, qmods)
    write_checkpoint(out, config_dict(model, qcfg), tensors, model, tokenizer, plan_src)
    return out
