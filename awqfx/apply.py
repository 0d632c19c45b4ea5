"""The one plan applier: ``apply_plan(target, plan, weights=...)`` for a GraphModule or a module tree.

A plan (plain data keyed by parameter FQN, :mod:`awqfx.plan`) applies the same way to both:

- **GraphModule** (a capture of the model): the scales are folded by the ``fold_scales`` pass
  (activation scales become ``mul`` nodes before their consumers, ``insert_input_scales``), then
  the weights are fake-quantized (``quantize_linears``) or packed (``pack_linears``: each
  planned 2-D linear becomes a ``QuantLinear`` call).
- **nn.Module tree** with the same parameter names: the scales are folded into the parameters,
  activation scales become :class:`InputScale` forward pre-hooks on the consumers, then the
  weights are fake-quantized or the linears swapped for packed ``QuantLinear`` modules.

Weight-activation plans (``WeightPlan.act`` set, W8A8): under ``"fake"`` an activation quantizer
goes before every planned linear (graph: ``insert_act_quantizers`` nodes; module tree: a
:class:`QuantizedInput` forward pre-hook); under ``"packed"`` the planned 2-D linears become
:class:`~awqfx.int8_linear.Int8Linear` (int8 matmuls, the input quantized at run time), and a
graph's 3-D expert weights stay fake-quantized behind activation quantizer nodes (a module tree's
are refused: no packed expert module quantizes its input).

``weights``: ``"fake"`` (quantize -> dequantize, float weights), ``"packed"`` (integer codes and
the int4 / int8 kernels), ``"float"`` (fold only: e.g. to read integers with
:meth:`AWQPlan.quantized_weight`) or ``"smoothed"`` (fold, then clamp each planned weight per
(row, group) to its clip range without quantizing it: the float model that round-to-nearest
at the plan's bits and group size turns into the plan's integers; written by
:mod:`awqfx.formats.smoothed`). Under ``"packed"``, 3-D MoE expert weights of a module tree
become :class:`~awqfx.packed_experts.PackedExperts`; a graph reads them as parameters, so there
they stay fake-quantized floats.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.act_quant import fake_quantize_activation
from awqfx.config import ActSpec
from awqfx.groups import ScaleGroup
from awqfx.int8_linear import pack_int8_model
from awqfx.packed_experts import pack_experts
from awqfx.packed_model import pack_model
from awqfx.params import clamp_param, fold_parameters, full_scale, get_param, has_param, set_param
from awqfx.passes.act_quantizers import insert_act_quantizers
from awqfx.passes.fold import fold_scales
from awqfx.passes.observers import remove_observers
from awqfx.passes.pack_linears import pack_linears
from awqfx.passes.quantize_linears import quantize_linears
from awqfx.plan import AWQPlan

__all__ = ["apply_plan", "check_module_tree", "InputScale", "QuantizedInput", "deepcopy_module", "WEIGHT_MODES"]

WEIGHT_MODES = ("fake", "packed", "float", "smoothed")


class InputScale:
    """Forward pre-hook: multiply the module's first input by a per-channel factor on its last dim
    (an activation group's ``1/s``, from :attr:`AWQPlan.input_scales`)."""

    def __init__(self, factor: torch.Tensor, weight: str):
        self.factor = factor
        self.weight = weight

    def __call__(self, module, args):
        x = args[0]
        if x.shape[-1] != self.factor.numel():
            raise RuntimeError(f"awqfx input scale of {self.weight}: input has {x.shape[-1]} channels, "
                               f"expected {self.factor.numel()}")
        return (x * self.factor.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])


class QuantizedInput:
    """Forward pre-hook: fake-quantize the module's first input (the module-tree form of an
    activation quantizer node, :mod:`awqfx.passes.act_quantizers`)."""

    def __init__(self, spec: ActSpec, weight: str):
        self.spec = spec
        self.weight = weight

    def __call__(self, module, args):
        return (fake_quantize_activation(args[0], self.spec),) + tuple(args[1:])


def _add_input_scales(model: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    for weight, factor in scales.items():
        owner = weight.rpartition(".")[0]
        try:
            mod = model.get_submodule(owner)
        except AttributeError as e:
            raise ValueError(f"the plan's input scale of {weight} has no module {owner!r} in this model") from e
        mod.register_forward_pre_hook(InputScale(factor, weight))


def deepcopy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` without torch's pytree-spec FutureWarning (export graphs carry a LeafSpec)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(module)


def _check_names(target: nn.Module, plan: AWQPlan) -> None:
    names = list(plan.weights) + [w for gp in plan.groups
                                  for w in [gp.group.producer.weight, *[c.weight for c in gp.group.consumers]]]
    missing = sorted({w for w in names if w is not None and not has_param(target, w)})
    if missing:
        raise ValueError(f"the plan names parameters this module does not have: {missing[:5]}")


def check_module_tree(groups: Iterable[ScaleGroup], weights: Iterable[str]) -> None:
    """Refuse ``groups`` the module-tree applier cannot hold. There an activation group's ``1/s`` is a
    pre-hook on the input of the module that owns the consumer weight; that is the weight's input only
    when none of the other ``weights`` (the linear-like weights of the model) that module owns is
    outside the group, not when its input feeds a weight of another group first (fused experts whose
    gate/up output reaches down_proj inside the module). Checked before calibration by the CLI, and by
    :func:`apply_plan` on a module tree."""
    weights = list(weights)
    for group in groups:
        if group.producer.kind != "activation":
            continue
        mine = {c.weight for c in group.consumers}
        for weight in sorted(mine):
            owner = weight.rpartition(".")[0]
            others = sorted(w for w in weights if w.rpartition(".")[0] == owner and w not in mine)
            if others:
                raise ValueError(
                    f"the plan scales the input of {weight} after an activation inside module {owner!r}, whose "
                    f"input feeds {others[0]} instead: the module tree cannot hold that scale. Apply the plan to "
                    f"the captured graph (awqfx.convert / apply_plan on the GraphModule), or search with "
                    f"drop_unfoldable=True (--drop-unfoldable) to leave such groups unscaled")


def _fold_module_tree(model: nn.Module, plan: AWQPlan) -> None:
    for gp in plan.groups:
        fold_parameters(model, gp.group, full_scale(gp.group, gp.scale).to(torch.float64))
    _add_input_scales(model, plan.input_scales)


def apply_plan(target: nn.Module, plan: AWQPlan, weights: str = "fake", inplace: bool = False,
               backend: str = "auto") -> nn.Module:
    """Apply ``plan`` to a GraphModule (a fresh capture) or to the model's ``nn.Module`` tree.

    Works on a deep copy unless ``inplace=True``; returns the rewritten module. Refuses a plan
    that names parameters the target does not have, or input scales it cannot attach.
    ``backend`` picks the packed kernels (``"auto"``, ``"int4pack"``, ``"dequant"``: see
    :class:`awqfx.modules.QuantLinear`).
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHT_MODES))}, got {weights!r}")
    _check_names(target, plan)
    graph = isinstance(target, fx.GraphModule)
    if not graph:
        check_module_tree([gp.group for gp in plan.groups], plan.weights)
    out = target if inplace else deepcopy_module(target)
    if graph:
        remove_observers(out)
        fold_scales(out, [gp.group for gp in plan.groups], [gp.scale for gp in plan.groups])
    else:
        _fold_module_tree(out, plan)
    acts = plan.activations
    if weights == "fake":
        quantize_linears(out, plan.weights)
        _quantize_inputs(out, acts)
    elif weights == "smoothed":
        refined = sorted(n for n, wp in plan.weights.items() if wp.codes is not None)
        if refined:
            raise ValueError(f"smoothed weights are clamped for round-to-nearest; the plan's refined codes cannot be "
                             f"written so ({refined[:3]}): apply it with weights='fake' or 'packed'")
        for name, wp in plan.weights.items():
            set_param(out, name, clamp_param(get_param(out, name), wp.in_dim, wp.spec, wp.max_val, wp.min_val))
    elif weights == "packed":
        flat = {n: wp for n, wp in plan.weights.items() if get_param(out, n).dim() == 2}
        experts = {n: wp for n, wp in plan.weights.items() if n not in flat}
        if graph:
            quantize_linears(out, experts)  # the graph reads expert weights as parameters: fake-quantized
            insert_act_quantizers(out, {n: a for n, a in acts.items() if n in experts})
            pack_linears(out, plan, backend=backend)
        else:
            refused = sorted(n for n in experts if n in acts)
            if refused:
                raise ValueError(f"no packed module quantizes the input activations of 3-D expert weights: {refused[:3]}; "
                                 "apply the plan to the captured graph, or quantize weights only (no --act-bits)")
            in_dims = {n: wp.in_dim for n, wp in plan.weights.items()}
            pack_experts(out, {n: plan.quantized_weight(out, n) for n in experts}, in_dims)
            pack_model(out, {n: plan.quantized_weight(out, n) for n in flat if n not in acts}, in_dims=in_dims,
                       backend=backend)
            pack_int8_model(out, {n: plan.quantized_weight(out, n) for n in flat if n in acts}, acts, in_dims)
    if graph:
        out.recompile()
    return out


def _quantize_inputs(target: nn.Module, acts: dict[str, ActSpec]) -> None:
    """An activation quantizer before every linear reading a weight in ``acts``: graph nodes, or
    forward pre-hooks on a module tree's owners (after any input-scale hook)."""
    if isinstance(target, fx.GraphModule):
        insert_act_quantizers(target, acts)
        return
    for weight, spec in acts.items():
        target.get_submodule(weight.rpartition(".")[0]).register_forward_pre_hook(QuantizedInput(spec, weight))
