"""Replace linear-like weights by their fake-quantized values (quantize -> dequantize).

The weights are named by parameter FQN, so the same pass rewrites a captured GraphModule
(``get_attr`` parameters) and the model's own ``nn.Module`` tree. Groups run along the weight's
*input* dim (``in_dim``): a weight whose input dim is not the last one (GPT-2 ``Conv1D`` stores
``[in, out]``) is viewed with ``in`` last for quantization and put back afterwards. Parameters are
replaced by new tensors, never written into (the caller's model may share them).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn as nn

from awqfx.quant import QuantSpec, fake_quantize
from passes.fold import get_param, set_param

__all__ = ["rows_view", "from_rows", "fake_quantize_param", "quantize_linears"]


class _WeightLike(Protocol):
    spec: QuantSpec
    in_dim: int
    max_val: torch.Tensor | None
    min_val: torch.Tensor | None


def rows_view(w: torch.Tensor, in_dim: int) -> torch.Tensor:
    """``w`` with its input dim moved last: ``[out, in]`` / ``[E, out, in]`` (a view)."""
    return w.movedim(in_dim % w.dim(), -1)


def from_rows(w_rows: torch.Tensor, in_dim: int) -> torch.Tensor:
    """Inverse of :func:`rows_view`."""
    return w_rows.movedim(-1, in_dim % w_rows.dim())


def fake_quantize_param(
    w: torch.Tensor,
    in_dim: int,
    spec: QuantSpec,
    max_val: torch.Tensor | None = None,
    min_val: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(w))`` with groups along ``in_dim``; same shape/dtype/layout order as ``w``.

    ``max_val``/``min_val`` (``[..., out, n_groups]`` in the rows view) override the group range
    (the clip search result).
    """
    rows = rows_view(w.detach(), in_dim)
    dev = rows.device
    mx = None if max_val is None else max_val.to(dev)
    mn = None if min_val is None else min_val.to(dev)
    q = fake_quantize(rows, spec, max_val=mx, min_val=mn)
    return from_rows(q, in_dim).contiguous()


def quantize_linears(module: nn.Module, weights: Mapping[str, _WeightLike]) -> nn.Module:
    """Fake-quantize every weight named in ``weights`` (FQN -> spec, in_dim, optional clip range), in place.

    Works on a GraphModule and on a plain module tree alike (only attributes change). Returns ``module``.
    """
    for name, wp in weights.items():
        w = get_param(module, name)
        set_param(module, name, fake_quantize_param(w, wp.in_dim, wp.spec, wp.max_val, wp.min_val))
    return module
