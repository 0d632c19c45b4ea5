"""Rewrite linear nodes of a folded graph into packed quantized ops (``awqfx::int4_linear`` /
``awqfx::dequant_linear`` through ``QuantLinear`` submodules).

The input is a GraphModule whose scales are already folded (``apply_plan(gm, plan,
quantize=False)``); each planned 2-D weight is quantized with the plan's clip range, packed, and
its linear-like node (``linear``, GPT-2 ``addmm``, ``x @ W.T``) becomes a ``call_module`` of a
``QuantLinear``. The float weight is dropped from the module. The result re-exports with
``torch.export`` (the kernels are ``torch.library`` custom ops with fake implementations).
A weight whose plan quantizes its input activations too (``WeightPlan.act``) becomes an
:class:`~awqfx.int8_linear.Int8Linear` instead (``awqfx::int8_linear``: the input is quantized at
run time and multiplied in int8), which replaces the linear node and its activation quantizer
node, if the graph has one. 3-D MoE expert weights have no packed kernel and stay as
(fake-quantized) floats.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from awqfx.graph import linear_op
from awqfx.int8_linear import Int8Linear
from awqfx.modules import QuantLinear
from awqfx.params import get_param
from awqfx.passes.act_quantizers import float_input, quantizer_of

__all__ = ["pack_linears"]


def _drop_param(gm: fx.GraphModule, name: str) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    delattr(owner, attr)


def pack_linears(gm: fx.GraphModule, plan, backend: str = "auto") -> fx.GraphModule:
    """Replace every planned 2-D linear weight of ``gm`` (in place) by a packed ``QuantLinear`` (an
    ``Int8Linear`` when its plan quantizes activations); returns ``gm``."""
    packed: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        lin = linear_op(gm, node)
        if lin is None or lin.weight.name not in plan.weights:
            continue
        w = get_param(gm, lin.weight.name)
        if w.dim() != 2:
            continue
        if len(lin.data.meta.get("val", torch.empty(0, 0)).shape) < 1:
            continue
        wp = plan.weights[lin.weight.name]
        qw = plan.quantized_weight(gm, lin.weight.name)
        bias = get_param(gm, lin.bias.name).detach() if lin.bias is not None else None
        if wp.act is not None:
            ql = Int8Linear.from_quantized(qw, wp.act, bias).to(w.device)
        else:
            ql = QuantLinear.from_quantized(qw, bias, backend=backend).to(w.device)
        mod_name = "awqfx_packed_" + lin.weight.name.replace(".", "_")
        gm.add_submodule(mod_name, ql)
        quantizer, data = quantizer_of(gm, node), float_input(gm, node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(mod_name, (data if wp.act is not None else lin.data,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if quantizer is not None and wp.act is not None and not quantizer.users:  # the module quantizes its input
            gm.graph.erase_node(quantizer)
            delattr(gm, quantizer.target)
        packed[lin.weight.name] = mod_name
        if lin.bias is not None:
            packed[lin.bias.name] = mod_name
    for n in list(gm.graph.nodes):  # the float weights' reads are dead now
        if n.op == "get_attr" and not n.users and n.target in packed:
            gm.graph.erase_node(n)
    for name in packed:
        if not any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
            _drop_param(gm, name)
    gm.recompile()
    return gm
