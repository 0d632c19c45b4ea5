"""awqfx: activation-aware weight quantization as a torch.fx graph-rewriting pass."""
from awqfx.backend import AWQBackend, backend
from awqfx.capture import CaptureError, capture
from awqfx.groups import Consumer, Discovery, Producer, Rejection, ScaleGroup

__all__ = ["backend", "AWQBackend", "capture", "CaptureError", "ScaleGroup", "Producer", "Consumer", "Rejection", "Discovery"]
__version__ = "0.1.0"
