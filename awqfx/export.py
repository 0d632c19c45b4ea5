"""Kept for ``from awqfx.export import save_quantized, load_quantized``: the formats live in
:mod:`awqfx.formats` (one module per format)."""

from awqfx.formats import (
    FORMATS, NATIVE_FORMAT_VERSION, PLAN_SUBDIR, WEIGHTS_NAME, FormatError, QuantizedFileError, check_format,
    load_autoawq_qweights, load_compressed_tensors_qweights, load_quantized, save_quantized,
)

__all__ = [
    "FORMATS", "NATIVE_FORMAT_VERSION", "WEIGHTS_NAME", "PLAN_SUBDIR", "FormatError", "QuantizedFileError",
    "check_format", "save_quantized", "load_quantized", "load_autoawq_qweights", "load_compressed_tensors_qweights",
]
