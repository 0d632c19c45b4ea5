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

from awqfx.params import fake_quantize_param, get_param, set_param
from awqfx.quant import QuantSpec

__all__ = ["quantize_linears"]


class _WeightLike(Protocol):
    spec: QuantSpec
    in_dim: int
    max_val: torch.Tensor | None
    min_val: torch.Tensor | None
    codes: torch.Tensor | None


def quantize_linears(module: nn.Module, weights: Mapping[str, _WeightLike]) -> nn.Module:
    """Fake-quantize every weight named in ``weights`` (FQN -> spec, in_dim, optional clip range and
    refined codes), in place.

    Works on a GraphModule and on a plain module tree alike (only attributes change). Returns ``module``.
    """
    for name, wp in weights.items():
        w = get_param(module, name)
        set_param(module, name, fake_quantize_param(w, wp.in_dim, wp.spec, wp.max_val, wp.min_val,
                                                    wp.codes))
    return module
