"""Activation quantizers: a fake-quantize node before every quantized linear (weight-activation mode).

``insert_act_quantizers(gm, {weight FQN: ActSpec})`` puts a ``call_module`` node of an
:class:`ActQuantizer` between each linear op that reads one of the weights and its activation
input, and nowhere else: ``x -> [input scale mul] -> ActQuantizer -> linear``. The module
fake-quantizes its input with :func:`awqfx.act_quant.fake_quantize_activation` (dynamic,
symmetric, per token or per tensor), so the rewritten graph computes what the packed int8
linears (:class:`awqfx.int8_linear.Int8Linear`) compute.

The search inserts them into its working copy, so the region losses and the clip losses see
quantized activations; there it switches them off to compute the float reference
(:func:`quantizing`) and gives each candidate's scale to the quantizers of the group's consumers
(``ActQuantizer.smooth``: quantize ``x / s``, as the folded graph will).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.act_quant import fake_quantize_activation
from awqfx.config import ActSpec
from awqfx.graph import linear_op

__all__ = ["ActQuantizer", "insert_act_quantizers", "is_act_quantizer", "quantizer_of", "float_input",
           "act_quantizers", "quantizing"]


class ActQuantizer(nn.Module):
    """Fake-quantizes the activation input of the linear reading ``weight`` (see the module doc).

    ``enabled``: off, the module passes its input through. ``smooth``: per input column, quantize
    ``x / smooth`` and multiply back (the search's candidate scales); None in a converted graph.
    """

    def __init__(self, spec: ActSpec, weight: str):
        super().__init__()
        self.spec = spec
        self.weight = weight
        self.enabled = True
        self.smooth: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not x.is_floating_point():
            return x
        return fake_quantize_activation(x, self.spec, self.smooth)

    def extra_repr(self) -> str:
        return f"weight={self.weight!r}, bits={self.spec.bits}, granularity={self.spec.granularity!r}"


def is_act_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    try:
        return isinstance(gm.get_submodule(node.target), ActQuantizer)
    except AttributeError:
        return False


def quantizer_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The activation quantizer node linear op ``node`` reads, if any."""
    lin = linear_op(gm, node)
    if lin is None or not isinstance(lin.data, fx.Node) or not is_act_quantizer(gm, lin.data):
        return None
    return lin.data


def float_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The float activation linear op ``node`` multiplies: its input, or its quantizer's input."""
    q = quantizer_of(gm, node)
    return q.args[0] if q is not None else linear_op(gm, node).data


def act_quantizers(gm: fx.GraphModule) -> dict[str, ActQuantizer]:
    """``{linear node name: its ActQuantizer}`` of every quantized linear op of ``gm``."""
    out = {}
    for n in gm.graph.nodes:
        q = quantizer_of(gm, n)
        if q is not None:
            out[n.name] = gm.get_submodule(q.target)
    return out


def insert_act_quantizers(gm: fx.GraphModule, acts: Mapping[str, ActSpec]) -> dict[str, str]:
    """Put an :class:`ActQuantizer` before every linear op of ``gm`` that reads a weight in ``acts``
    (FQN -> spec), in place (a linear already reading one keeps it); returns ``{linear node name:
    quantizer module name}``."""
    added: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        lin = linear_op(gm, node)
        if lin is None or lin.weight.name not in acts or quantizer_of(gm, node) is not None:
            continue
        base = "awqfx_act_quant_" + lin.weight.name.replace(".", "_")
        name, k = base, 0
        while hasattr(gm, name):
            k += 1
            name = f"{base}_{k}"
        gm.add_submodule(name, ActQuantizer(acts[lin.weight.name], lin.weight.name))
        with gm.graph.inserting_before(node):
            q = gm.graph.call_module(name, (lin.data,))
        q.meta = dict(lin.data.meta)
        node.replace_input_with(lin.data, q)
        added[node.name] = name
    gm.recompile()
    return added


@contextlib.contextmanager
def quantizing(quantizers: Iterable[ActQuantizer], enabled: bool) -> Iterator[None]:
    """Switch ``quantizers`` on or off for the duration of the block (restored after)."""
    quantizers = list(quantizers)
    before = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = enabled
    try:
        yield
    finally:
        for q, e in zip(quantizers, before):
            q.enabled = e
