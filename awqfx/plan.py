"""The AWQ plan: plain data keyed by parameter FQN, and its two appliers (DESIGN §1).

A plan holds, per scale group, the scale vector and everything needed to fold it (the producer
and the consumers' column maps, so applying never needs discovery again); per quantizable
weight, its :class:`~awqfx.quant.QuantSpec`, the dim its groups run along and the clip range
found by the search (absolute ``max_val``/``min_val`` per (row, group) of the *folded* weight, or
none); the config it was made with; and metadata (version, time per stage, losses).

``plan.save(dir)`` writes ``plan.json`` + ``plan.safetensors`` (no pickle); ``AWQPlan.load(dir)``
reads them back. :func:`apply_plan` rewrites a GraphModule (fold the scales in the graph, insert
``mul`` nodes after activations, fake-quantize the weights) or an ``nn.Module`` tree with the same
parameter names (fold into the parameters; activation scales become forward pre-hooks on the
consuming modules): one plan, two appliers, the same numbers.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.groups import Consumer, Producer, ScaleGroup
from awqfx.quant import QuantSpec, quantize_weight
from passes.fold import column_scale, fold_parameters, fold_scales, full_scale, get_param
from passes.quantize_linears import quantize_linears, rows_view

__all__ = ["AWQPlan", "GroupPlan", "WeightPlan", "apply_plan", "PLAN_FORMAT"]

PLAN_FORMAT = "awqfx-plan"
PLAN_VERSION = 1


@dataclass
class GroupPlan:
    """One scale group: ``group`` says where ``scale`` goes, ``info`` how it was chosen."""

    group: ScaleGroup
    scale: torch.Tensor  # float32 [producer.num_channels], 1 outside group.channels
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.group.name


@dataclass
class WeightPlan:
    """How one weight is quantized. ``max_val``/``min_val``: ``[..., out, n_groups]`` clip range in
    the weight's rows view (input dim last), or None for the weight's own group min/max."""

    spec: QuantSpec
    in_dim: int
    max_val: torch.Tensor | None = None
    min_val: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class AWQPlan:
    groups: list[GroupPlan] = field(default_factory=list)
    weights: dict[str, WeightPlan] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- views ---------------------------------------------------------------------------
    @property
    def scales(self) -> dict[str, torch.Tensor]:
        """``{producer label: full scale vector}``."""
        return {g.name: g.scale for g in self.groups}

    def quantized_weight(self, model: nn.Module, name: str):
        """The integers + qparams (:class:`~awqfx.quant.QuantizedWeight`) of weight ``name``.

        ``model`` must hold the *folded, not yet quantized* weights:
        ``apply_plan(model, plan, quantize=False)``."""
        wp = self.weights[name]
        w = rows_view(get_param(model, name).detach(), wp.in_dim)
        return quantize_weight(w, wp.spec, wp.max_val, wp.min_val)

    def summary(self) -> str:
        lines = [f"AWQPlan: {len(self.groups)} scale groups, {len(self.weights)} quantized weights"]
        for g in self.groups:
            i = g.info
            lines.append(
                f"  {g.name}: {i.get('choice', '?')} loss {i.get('loss', float('nan')):.4g} "
                f"(rtn {i.get('loss_identity', float('nan')):.4g})"
            )
        return "\n".join(lines)

    # -- save / load ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``plan.json`` and ``plan.safetensors`` into directory ``path`` (created)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        groups = []
        for i, gp in enumerate(self.groups):
            g = gp.group
            tensors[f"group.{i}.scale"] = gp.scale.detach().float().cpu().contiguous()
            tensors[f"group.{i}.channels"] = g.channels.long().cpu().contiguous()
            cons = []
            for j, c in enumerate(g.consumers):
                tensors[f"group.{i}.consumer.{j}.columns"] = c.columns.long().cpu().contiguous()
                cons.append({"node": c.node, "weight": c.weight, "in_dim": c.in_dim, "quantize": c.quantize, "path": c.path})
            groups.append({
                "producer": asdict(g.producer),
                "consumers": cons,
                "through": list(g.through),
                "region_inputs": list(g.region_inputs),
                "region_output": g.region_output,
                "input_node": g.input_node,
                "info": _jsonable(gp.info),
            })
        weights = {}
        for name, wp in self.weights.items():
            entry = {"bits": wp.spec.bits, "group_size": wp.spec.group_size, "symmetric": wp.spec.symmetric,
                     "in_dim": wp.in_dim, "clip": wp.max_val is not None, "info": _jsonable(wp.info)}
            if wp.max_val is not None:
                tensors[f"weight.{name}.max_val"] = wp.max_val.detach().float().cpu().contiguous()
                tensors[f"weight.{name}.min_val"] = wp.min_val.detach().float().cpu().contiguous()
            weights[name] = entry
        doc = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "config": _jsonable(self.config),
               "metadata": _jsonable(self.metadata), "groups": groups, "weights": weights}
        (out / "plan.json").write_text(json.dumps(doc, indent=1))
        save_file(tensors, str(out / "plan.safetensors"), metadata={"format": PLAN_FORMAT})
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AWQPlan":
        from safetensors.torch import load_file

        src = Path(path)
        doc = json.loads((src / "plan.json").read_text())
        if doc.get("format") != PLAN_FORMAT:
            raise ValueError(f"{src / 'plan.json'} is not an awqfx plan (format={doc.get('format')!r})")
        if int(doc.get("version", 0)) > PLAN_VERSION:
            raise ValueError(f"plan version {doc['version']} is newer than this awqfx understands ({PLAN_VERSION})")
        tensors = load_file(str(src / "plan.safetensors"))
        groups = []
        for i, gd in enumerate(doc["groups"]):
            cons = [Consumer(c["node"], c["weight"], int(c["in_dim"]), tensors[f"group.{i}.consumer.{j}.columns"],
                             bool(c["quantize"]), c.get("path", "")) for j, c in enumerate(gd["consumers"])]
            g = ScaleGroup(Producer(**gd["producer"]), cons, tensors[f"group.{i}.channels"], list(gd["through"]),
                           list(gd["region_inputs"]), gd["region_output"], gd["input_node"])
            groups.append(GroupPlan(g, tensors[f"group.{i}.scale"], gd.get("info", {})))
        weights = {}
        for name, wd in doc["weights"].items():
            spec = QuantSpec(int(wd["bits"]), int(wd["group_size"]), bool(wd["symmetric"]))
            mx = tensors.get(f"weight.{name}.max_val") if wd.get("clip") else None
            mn = tensors.get(f"weight.{name}.min_val") if wd.get("clip") else None
            weights[name] = WeightPlan(spec, int(wd["in_dim"]), mx, mn, wd.get("info", {}))
        return cls(groups, weights, doc.get("config", {}), doc.get("metadata", {}))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


# -- appliers ------------------------------------------------------------------------------

def _fold_module(model: nn.Module, gp: GroupPlan) -> None:
    """Fold one group into an nn.Module tree's parameters (the same math as ``fold_scales``);
    an activation producer's ``1/s`` becomes a forward pre-hook on its consumers."""
    s = full_scale(gp.group, gp.scale).to(torch.float64)
    if gp.group.producer.kind == "activation":
        _add_input_scale_hooks(model, gp.group, s)
    fold_parameters(model, gp.group, s)


class _InputScale:
    """Forward pre-hook: multiply the module's first input by ``1/s`` on its last dim (an activation
    producer's scale, which no parameter can absorb; the graph applier inserts a ``mul`` node)."""

    def __init__(self, inv_cols: torch.Tensor, group: str):
        self.inv_cols = inv_cols
        self.group = group

    def __call__(self, module, args):
        x = args[0]
        if x.shape[-1] != self.inv_cols.numel():
            raise RuntimeError(f"awqfx scale hook of {self.group}: input has {x.shape[-1]} channels, "
                               f"expected {self.inv_cols.numel()}")
        return (x * self.inv_cols.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])


def _add_input_scale_hooks(model: nn.Module, g: ScaleGroup, s: torch.Tensor) -> None:
    inv = (1.0 / s).to(torch.float32)
    for c in g.consumers:
        owner = c.weight.rpartition(".")[0]
        try:
            mod = model.get_submodule(owner)
        except AttributeError as e:
            raise ValueError(f"plan group {g.name}: no module {owner!r} in the model for consumer {c.weight}") from e
        inv_cols = column_scale(c.columns, inv.to(torch.float64)).to(torch.float32)
        handle = mod.register_forward_pre_hook(_InputScale(inv_cols, g.name))
        mod.__dict__.setdefault("_awqfx_hooks", []).append(handle)


def _rebind_activation_nodes(gm: fx.GraphModule, groups: list[ScaleGroup]) -> list[ScaleGroup]:
    """Activation producers are named by node; if a node is missing (another capture), find the
    group with the same consumers by running discovery on ``gm``."""
    names = {n.name for n in gm.graph.nodes}
    missing = [g for g in groups if g.producer.kind == "activation" and g.producer.node not in names]
    if not missing:
        return groups
    from passes.discover import discover

    found = {frozenset(c.weight for c in g.consumers): g for g in discover(gm).groups if g.producer.kind == "activation"}
    out = []
    for g in groups:
        if g in missing:
            twin = found.get(frozenset(c.weight for c in g.consumers))
            if twin is None:
                raise ValueError(f"plan group {g.name}: no activation feeding {[c.weight for c in g.consumers]} in this graph")
            g = copy.copy(g)
            g.producer = copy.copy(g.producer)
            g.producer.node = twin.producer.node
        out.append(g)
    return out


def apply_plan(target: nn.Module, plan: AWQPlan, inplace: bool = False, quantize: bool = True) -> nn.Module:
    """Apply ``plan`` to a GraphModule (a fresh capture) or to the model's ``nn.Module`` tree.

    Scales are folded (activation scales: a ``mul`` node in a graph, a forward pre-hook on the
    consuming module in a module tree), then every planned weight is replaced by its fake-quantized
    value (``quantize=False``: fold only, e.g. to get integers with :meth:`AWQPlan.quantized_weight`).
    Works on a deep copy unless ``inplace=True``; returns the rewritten module.
    """
    from awqfx.observe import remove_observers

    missing = [n for n in plan.weights if not _has_param(target, n)]
    missing += [w for gp in plan.groups for w in [gp.group.producer.weight, *[c.weight for c in gp.group.consumers]]
                if w is not None and not _has_param(target, w)]
    if missing:
        raise ValueError(f"the plan names parameters this module does not have: {sorted(set(missing))[:5]}")
    out = target if inplace else deepcopy_module(target)
    if isinstance(out, fx.GraphModule):
        remove_observers(out)
        groups = _rebind_activation_nodes(out, [gp.group for gp in plan.groups])
        fold_scales(out, groups, [gp.scale for gp in plan.groups])
    else:
        for gp in plan.groups:
            _fold_module(out, gp)
    if quantize:
        quantize_linears(out, plan.weights)
    if isinstance(out, fx.GraphModule):
        out.recompile()
    return out


def deepcopy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` without torch's pytree-spec FutureWarning (export graphs carry a LeafSpec)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(module)


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        get_param(module, name)
        return True
    except AttributeError:
        return False
