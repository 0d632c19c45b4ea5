"""The AWQ plan: plain data keyed by parameter FQN.

A plan holds, per scale group, the scale vector and everything needed to fold it (the producer
and the consumers' column maps, so applying never needs discovery again); per quantizable
weight, its :class:`~awqfx.quant.QuantSpec`, its activation quantizer (:class:`~awqfx.config.ActSpec`,
weight-activation mode only), the dim its groups run along, the clip range found by the search
(absolute ``max_val``/``min_val`` per (row, group) of the *folded* weight, or none) and, when a
refinement rounded it (``--refine gptq``), its integer codes; the config it was made with; and metadata (version, time per stage, losses).

``plan.save(dir)`` writes ``plan.json`` + ``plan.safetensors`` (no pickle); ``AWQPlan.load(dir)``
reads them back. :func:`awqfx.apply.apply_plan` applies a plan to a GraphModule or to the model's
``nn.Module`` tree; every exporter reads the same plan (docs/design.md, "The plan").
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from awqfx.config import ActSpec
from awqfx.groups import Consumer, Producer, ScaleGroup
from awqfx.params import get_param, input_scales_of, rows_view
from awqfx.quant import QuantSpec, quantize_weight

__all__ = ["AWQPlan", "GroupPlan", "WeightPlan", "PLAN_FORMAT"]

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
    the weight's rows view (input dim last), or None for the weight's own group min/max. ``act``:
    the input activations of the linears reading it are quantized too (weight-activation mode),
    or None (weight-only). ``codes``: uint8 ``[..., out, in]`` in the rows view, the integers a
    refinement chose on the grid of the folded weight's range (scales and zero points from the
    weight and ``max_val``/``min_val`` as without it), or None (round to nearest on that grid)."""

    spec: QuantSpec
    in_dim: int
    max_val: torch.Tensor | None = None
    min_val: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    act: ActSpec | None = None
    codes: torch.Tensor | None = None


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

    @property
    def activations(self) -> dict[str, ActSpec]:
        """``{weight: ActSpec}`` of the weights whose linears quantize their input activations."""
        return {name: wp.act for name, wp in self.weights.items() if wp.act is not None}

    @property
    def input_scales(self) -> dict[str, torch.Tensor]:
        """``{consumer weight: factor per input column}``: the ``1/s`` of every activation group, the
        one representation of activation scales that every applier and exporter reads."""
        out: dict[str, torch.Tensor] = {}
        for gp in self.groups:
            if gp.group.producer.kind == "activation":
                out.update(input_scales_of(gp.group, gp.scale))
        return out

    def quantized_weight(self, model: nn.Module, name: str):
        """The integers + qparams (:class:`~awqfx.quant.QuantizedWeight`) of weight ``name``.

        ``model`` must hold the *folded, not yet quantized* weights:
        ``apply_plan(model, plan, weights="float")``."""
        wp = self.weights[name]
        w = rows_view(get_param(model, name).detach(), wp.in_dim)
        return quantize_weight(w, wp.spec, wp.max_val, wp.min_val, codes=wp.codes)

    def group_gains(self) -> list[dict[str, Any]]:
        """Per searched group: ``name``, ``choice``, ``gain`` (share of the region's round-to-nearest
        error the searched scale removes on the loss sample), ``held_gain`` (the searched scale's on the
        guard's held-back sample; None where the guard did not run or no scale was searched) and
        ``rejected`` (the scale the guard turned down, or None)."""
        def gain(loss, ref):
            return None if loss is None or ref in (None, 0) else 1.0 - float(loss) / float(ref)

        def searched_loss(info):  # the searched scale's, also where the guard turned it down
            rejected = info.get("guard_rejected")
            return info["losses"][info["candidates"].index(rejected)] if rejected else info.get("loss")

        return [{"name": g.name, "choice": g.info.get("choice"),
                 "gain": gain(searched_loss(g.info), g.info.get("loss_identity")),
                 "held_gain": gain(g.info.get("held_loss"), g.info.get("held_loss_identity")),
                 "rejected": g.info.get("guard_rejected")} for g in self.groups if "loss" in g.info]

    def summary(self) -> str:
        lines = [f"AWQPlan: {len(self.groups)} scale groups, {len(self.weights)} quantized weights"]
        for r in self.group_gains():
            gain = "" if r["gain"] is None else f" gain {r['gain']:+.1%}"
            held = "" if r["held_gain"] is None else f", held-out {r['held_gain']:+.1%}"
            guard = f" (guard kept s = 1, not {r['rejected']})" if r["rejected"] else ""
            lines.append(f"  {r['name']}: {r['choice']}{gain}{held}{guard}")
        return "\n".join(lines)

    # -- save / load ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``plan.json`` and ``plan.safetensors`` into directory ``path`` (created)."""
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
                     "scheme": wp.spec.scheme, "in_dim": wp.in_dim, "clip": wp.max_val is not None,
                     "codes": wp.codes is not None, "info": _jsonable(wp.info)}
            if wp.act is not None:
                entry["act"] = asdict(wp.act)
            if wp.max_val is not None:
                tensors[f"weight.{name}.max_val"] = wp.max_val.detach().float().cpu().contiguous()
                tensors[f"weight.{name}.min_val"] = wp.min_val.detach().float().cpu().contiguous()
            if wp.codes is not None:
                tensors[f"weight.{name}.codes"] = wp.codes.detach().to(torch.uint8).cpu().contiguous()
            weights[name] = entry
        doc = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "config": _jsonable(self.config),
               "metadata": _jsonable(self.metadata), "groups": groups, "weights": weights}
        (out / "plan.json").write_text(json.dumps(doc, indent=1))
        save_file(tensors, str(out / "plan.safetensors"), metadata={"format": PLAN_FORMAT})
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AWQPlan":
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
            spec = QuantSpec(int(wd["bits"]), int(wd["group_size"]), bool(wd["symmetric"]), wd.get("scheme", "int"))
            mx = tensors.get(f"weight.{name}.max_val") if wd.get("clip") else None
            mn = tensors.get(f"weight.{name}.min_val") if wd.get("clip") else None
            act = ActSpec(**wd["act"]) if wd.get("act") else None
            codes = tensors[f"weight.{name}.codes"] if wd.get("codes") else None
            weights[name] = WeightPlan(spec, int(wd["in_dim"]), mx, mn, wd.get("info", {}), act, codes)
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
