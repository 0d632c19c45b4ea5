"""Fold AWQ scales into the graph: producers divide by ``s``, consumers multiply their columns.

``Y = W X = (W diag(s)) (diag(s)^-1 X)``: dividing the producer's output channels and scaling
the consumer's matching weight columns leaves the graph's function unchanged (exactly, up to
float rounding), which is what makes the quantization of ``W diag(s)`` activation-aware.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx

from awqfx.groups import ScaleGroup
from awqfx.params import fold_parameters, full_scale, input_scales_of
from awqfx.passes.input_scales import insert_input_scales

__all__ = ["fold_scales"]


def fold_scales(
    gm: fx.GraphModule,
    groups: Sequence[ScaleGroup],
    scales: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
) -> fx.GraphModule:
    """Apply the equivalence transform of each group with its scale, rewriting ``gm`` in place.

    ``scales`` is a list aligned with ``groups`` or a mapping from ``group.name``; each entry has
    one value per group channel (or per producer channel). Parameters are replaced, not written
    into, so a model that shares tensors with ``gm`` is untouched. Activation producers' ``1/s``
    becomes an input scale of their consumers (:func:`insert_input_scales`).
    """
    if not isinstance(scales, Mapping):
        if len(scales) != len(groups):
            raise ValueError(f"got {len(scales)} scales for {len(groups)} groups")
        scales = {g.name: s for g, s in zip(groups, scales)}
    inputs: dict[str, torch.Tensor] = {}
    for g in groups:
        if g.name not in scales:
            continue
        s = full_scale(g, scales[g.name]).to(torch.float64)
        if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError(f"scales for {g.name} must be finite and positive")
        if g.producer.kind == "activation":
            inputs.update(input_scales_of(g, s))
        fold_parameters(gm, g, s)
    if inputs:
        insert_input_scales(gm, inputs)
    return gm
