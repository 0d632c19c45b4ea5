"""Activation input scales: ``x -> x * f`` on the input of a consumer linear.

An ``activation`` scale group (GELU/SiLU between two linears) has no parameter that can absorb
``1/s``: the consumers' inputs are multiplied by it instead (AutoAWQ's ScaledActivation). awqfx
has one representation of these factors: ``{consumer weight FQN: per-input-column factor}``
(``AWQPlan.input_scales``). This pass puts them into a graph as a ``mul`` by a buffer right
before each linear op that reads the weight; the module-tree applier puts the same factors into
forward pre-hooks, and the native format stores them next to the packed weight. Where the linear
reads its input through an activation quantizer (:mod:`awqfx.passes.act_quantizers`), the ``mul``
goes before the quantizer: the scaled activation is what is quantized.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx

from awqfx.graph import example_value, linear_op, shape_of
from awqfx.passes.act_quantizers import float_input, quantizer_of

__all__ = ["insert_input_scales", "input_scale_attr", "InputScaleError"]


class InputScaleError(ValueError):
    """An input scale names a weight the graph does not read, or has the wrong size."""


def input_scale_attr(weight: str) -> str:
    """The buffer that holds the input scale of consumer ``weight`` in a rewritten graph."""
    return "awqfx_input_scale_" + weight.replace(".", "_")


def insert_input_scales(gm: fx.GraphModule, scales: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Multiply the activation input of every linear op reading weight ``w`` by ``scales[w]``
    (one factor per input column), in place; returns ``{weight: buffer name}``.

    Refuses (:class:`InputScaleError`) a weight no linear op of ``gm`` reads, or whose input's
    last dim differs from the factor's length: a plan from another graph must not attach to the
    wrong node. A weight that already has its input scale gets the new factor in its buffer.
    """
    sites: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        lin = linear_op(gm, n)
        if lin is not None and lin.weight.name in scales:
            sites.setdefault(lin.weight.name, []).append(n)
    missing = sorted(set(scales) - set(sites))
    if missing:
        raise InputScaleError(f"input scales for weights no linear op of this graph reads: {missing[:5]} "
                              "(was the plan made for another model?)")
    attrs: dict[str, str] = {}
    for w, nodes in sites.items():
        attr = attrs[w] = input_scale_attr(w)
        unscaled = [n for n in nodes if not _reads_scaled_input(gm, n, attr)]
        for node in unscaled:
            width = (shape_of(float_input(gm, node)) or (None,))[-1]
            if width != scales[w].numel():
                raise InputScaleError(f"input scale of {w} has {scales[w].numel()} entries but its linear op "
                                      f"{node.name} reads {width} input channels")
        like = getattr(gm, attr, None)
        if like is None:
            like = example_value(float_input(gm, nodes[0]))
        gm.register_buffer(attr, scales[w].detach().to(device=getattr(like, "device", "cpu"),
                                                       dtype=getattr(like, "dtype", torch.float32)))
        for node in unscaled:
            data = float_input(gm, node)
            reader = quantizer_of(gm, node) or node
            with gm.graph.inserting_before(reader):
                buf = gm.graph.get_attr(attr)
                scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (data, buf))
            buf.meta["val"] = getattr(gm, attr)
            scaled.meta = dict(data.meta)
            reader.replace_input_with(data, scaled)
    gm.recompile()
    return attrs


def _reads_scaled_input(gm: fx.GraphModule, node: fx.Node, attr: str) -> bool:
    """The linear op already reads ``mul(x, <attr>)`` (through its activation quantizer, if any):
    only the buffer needs to change."""
    data = float_input(gm, node)
    return data.op == "call_function" and len(data.args) == 2 and getattr(data.args[1], "target", None) == attr
