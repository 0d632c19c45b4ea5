"""The activation quantizer of weight-activation mode (W8A8): dynamic, symmetric, per token or per
tensor (:class:`~awqfx.config.ActSpec`).

One function computes the integer codes and the scale (:func:`quantize_activation`); the fake
quantizer of the graphs and the search (:func:`fake_quantize_activation`) and the int8 kernel
(:mod:`awqfx.kernels_int8`) both call it, so a packed layer multiplies exactly the integers the
fake-quantized graph was scored with::

    scale = max(max |x|, 1e-5) / (2^(bits-1) - 1)      per row of the last dim, or over the tensor
    q     = clamp(round(x / scale), -(2^(bits-1) - 1), 2^(bits-1) - 1)
    x_hat = q * scale

Math in float32 whatever ``x``'s dtype; the codes fit int8 for every ``bits`` in 4..8.
"""
from __future__ import annotations

import torch
from torch import Tensor

from awqfx.config import ActSpec
from awqfx.quant import SCALE_EPS

__all__ = ["quantize_activation", "fake_quantize_activation"]


def _codes(xf: Tensor, spec: ActSpec) -> tuple[Tensor, Tensor]:
    """Float32 codes (integer-valued) and scale of a float32 ``xf``."""
    qmax = float(spec.qmax)
    a = xf.abs()
    if spec.per_token:
        amax = a.amax(dim=-1, keepdim=True)
    else:
        amax = (a.amax() if a.numel() else a.new_zeros(())).reshape([1] * xf.dim())
    scale = amax.clamp(min=SCALE_EPS) / qmax
    return torch.clamp(torch.round(xf / scale), -qmax, qmax), scale


def quantize_activation(x: Tensor, spec: ActSpec) -> tuple[Tensor, Tensor]:
    """``(q, scale)``: int8 codes of ``x``'s shape and the float32 scale (``[..., 1]`` per token,
    all-ones shape per tensor), with ``x ~= q * scale``."""
    q, scale = _codes(x.float(), spec)
    return q.to(torch.int8), scale


def fake_quantize_activation(x: Tensor, spec: ActSpec, smooth: Tensor | None = None) -> Tensor:
    """``q * scale`` in ``x``'s dtype. ``smooth`` (per last-dim channel): quantize ``x / smooth``
    and multiply the result back by ``smooth`` -- what a linear whose columns are scaled by
    ``smooth`` sees when the ``1/smooth`` is folded upstream (the scale search's candidates)."""
    xf = x.float()
    if smooth is not None:
        s = smooth.to(device=x.device, dtype=torch.float32)
        q, scale = _codes(xf / s, spec)
        return (q * scale * s).to(x.dtype)
    q, scale = _codes(xf, spec)
    return (q * scale).to(x.dtype)
