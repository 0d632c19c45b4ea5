"""awqfx: activation-aware weight quantization as a torch.fx graph-rewriting pass.

The package face: ``capture`` a model, ``discover`` its scale groups, then ``prepare`` ->
``calibrate`` -> ``search`` -> ``convert`` (or ``apply_awq_pass`` for all four); ``apply_plan``
applies a plan to a graph or a module tree; ``save_quantized`` / ``load_quantized`` write and read
the packed model. Layout: docs/design.md.
"""
__version__ = "0.1.0"

from awqfx.api import AWQPlan, apply_awq_pass, calibrate, convert, prepare, search  # noqa: E402
from awqfx.apply import apply_plan  # noqa: E402
from awqfx.backend import AWQBackend, backend  # noqa: E402
from awqfx.capture import CaptureError, capture  # noqa: E402
from awqfx.config import AWQConfig  # noqa: E402
from awqfx.export import load_quantized, save_quantized  # noqa: E402
from awqfx.groups import Consumer, Discovery, Producer, Rejection, ScaleGroup  # noqa: E402
from awqfx.passes.discover import discover  # noqa: E402

__all__ = [
    "capture", "discover", "AWQConfig", "prepare", "calibrate", "search", "convert", "apply_awq_pass", "apply_plan",
    "save_quantized", "load_quantized", "AWQPlan", "backend", "AWQBackend", "CaptureError", "ScaleGroup", "Producer",
    "Consumer", "Rejection", "Discovery",
]
