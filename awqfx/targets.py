"""What is quantized and which scale groups are scaled, as the user narrows or extends discovery
(docs/design.md, "Targets").

Discovery decides what *can* be scaled and quantized; the target fields of ``AWQConfig`` adjust it:

- ``ignore`` / ``only``: regular expressions (``re.search``) over every linear-like weight's
  parameter name (``model.layers.0.mlp.down_proj.weight``) and module name
  (``model.layers.0.mlp.down_proj``). An ignored weight is left out of the plan, so it stays float
  in every format; with ``only``, weights that match no ``only`` pattern are ignored. A group
  whose consumers are partly ignored is still scaled: folding ``s`` into a float consumer's
  columns is exact, and it stays float (the same rule as the LM head and MoE routers).
- ``exclude_groups``: patterns over a discovered group's producer (parameter, module and node
  name); matching groups are dropped, i.e. keep ``s = 1``.
- ``extra_groups``: groups declared by name (:class:`~awqfx.config.GroupSpec`). The channel map of
  each consumer is the one channel propagation finds from the producer, or, where no channel path
  reaches the consumer, the identity (the consumer's input features must then equal the
  producer's channels). A declared group is accepted only if folding random scales into it leaves
  the model's output unchanged (:func:`check_equivalence`).

:func:`resolve_targets` decides on the whole graph, before any calibration: every pattern must
match, every name must exist, declared groups must not collide with kept ones. It returns
:class:`Targets`, which :func:`apply_targets` applies to the discovery of that graph or of one of
its blocks (block-by-block mode), so both modes quantize the same weights and scale the same groups.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from awqfx.config import AWQConfig, ConfigError, GroupSpec
from awqfx.graph import (
    concrete, example_value, float_dtype, linear_op, linear_table, node_path, op_name, param_of, shallow_copy,
    shape_of,
)
from awqfx.groups import Consumer, Discovery, Rejection, ScaleGroup
from awqfx.params import get_param
from awqfx.passes.channels import ChannelPropagator
from awqfx.passes.discover import _Candidate, _linear_candidate, _norm_candidate, _region  # discovery's own rules
from awqfx.passes.fold import fold_scales

__all__ = ["Targets", "TargetError", "GroupCheckError", "resolve_targets", "apply_targets", "select_targets",
           "check_equivalence", "declared_groups", "example_inputs", "is_selected", "relative_error", "tolerance"]


class TargetError(ConfigError):
    """A target pattern matches nothing, a declared group names what the model lacks or collides with a group."""


class GroupCheckError(TargetError):
    """A declared scale group is not an equivalence: folding scales into it changes the model's output."""


@dataclass(frozen=True)
class Targets:
    """What :func:`resolve_targets` decided on the whole graph.

    quantized: the weights to quantize (discovery's quantizable weights that survive ignore/only);
    excluded: names of discovered groups dropped; declared: the declared groups with parameter
    names; selection: the config fields it was decided from (``AWQConfig.selection()``).
    """

    quantized: frozenset[str]
    excluded: frozenset[str]
    declared: tuple[GroupSpec, ...]
    selection: dict[str, tuple]


def _module(weight: str) -> str:
    return weight.rpartition(".")[0]


def _matches(pattern: str, weight: str) -> bool:
    return re.search(pattern, weight) is not None or re.search(pattern, _module(weight)) is not None


def is_selected(weight: str, cfg: AWQConfig) -> bool:
    """Whether ``cfg``'s ignore/only patterns keep ``weight`` (parameter name) quantized."""
    if any(_matches(p, weight) for p in cfg.ignore):
        return False
    return not cfg.only or any(_matches(p, weight) for p in cfg.only)


def _examples(pattern: str, names: Sequence[str], n: int = 4) -> str:
    """Real names to show next to a pattern or name that matched nothing: the closest ones (by
    whole name, or by last component: ``dwn_proj`` -> ``model.layers.0.mlp.down_proj``), else a spread."""
    by_tail: dict[str, str] = {}
    for name in names:
        by_tail.setdefault(name.rsplit(".", 1)[-1], name)
    close = difflib.get_close_matches(pattern, names, n=n, cutoff=0.6)
    close += [by_tail[t] for t in difflib.get_close_matches(pattern.rsplit(".", 1)[-1], list(by_tail), n=n, cutoff=0.6)]
    if not close:
        step = max(1, len(names) // n)
        close = list(names[::step][:n])
    return ", ".join(dict.fromkeys(close))


def _group_matches(pattern: str, g: ScaleGroup) -> bool:
    """``pattern`` found in the group's producer: its parameter and module name, or for an inserted
    scale (no parameter) the activation's node and module path."""
    p = g.producer
    names = [g.name, p.path] + ([_module(p.weight)] if p.weight else [p.node])
    return any(re.search(pattern, n) for n in names if n)


# -- declared groups, on one graph --------------------------------------------------------------

class _GraphView:
    """The lookups a declared group is built from: producers by weight, linear ops by weight."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.linear_ops = {}
        for n in gm.graph.nodes:
            lin = linear_op(gm, n)
            if lin is not None:
                self.linear_ops[n] = lin
        self.readers: dict[str, list] = {}
        for lin in self.linear_ops.values():
            self.readers.setdefault(lin.weight.name, []).append(lin)
        self.producers: dict[str, list[_Candidate]] = {}
        for n in gm.graph.nodes:
            cand = _linear_candidate(gm, self.linear_ops[n]) if n in self.linear_ops else _norm_candidate(gm, n)
            if cand is not None:
                self.producers.setdefault(cand.producer.weight, []).append(cand)

    def names(self, weights: Iterable[str]) -> dict[str, str]:
        """Module and parameter names -> parameter name."""
        return {alias: w for w in weights for alias in (w, _module(w))}


def _resolve_name(spec: GroupSpec, role: str, name: str, known: dict[str, str]) -> str:
    if name in known:
        return known[name]
    what = "a norm or linear layer" if role == "producer" else "a linear layer"
    modules = sorted({_module(w) for w in known.values()})
    raise TargetError(f"declared scale group {spec}: the {role} {name!r} is not {what} of this model; "
                      f"close names: {_examples(_module(name) if name.endswith('.weight') else name, modules)}")


def _resolve_spec(view: _GraphView, spec: GroupSpec) -> GroupSpec:
    """``spec`` with module names replaced by parameter names; refuses names the graph lacks."""
    producer = _resolve_name(spec, "producer", spec.producer, view.names(view.producers))
    consumers = tuple(_resolve_name(spec, "consumer", c, view.names(view.readers)) for c in spec.consumers)
    if len(set(consumers)) != len(consumers):
        raise TargetError(f"declared scale group {spec}: a consumer is named twice")
    return GroupSpec(producer, consumers)


def _build_group(view: _GraphView, spec: GroupSpec, quantized: Iterable[str]) -> ScaleGroup:
    """The ScaleGroup of a declared group (parameter names) on ``view``'s graph, as discovery builds
    its own: column maps from channel propagation (the identity where no channel path reaches a
    consumer), channels, region, statistics site."""
    gm, quantized = view.gm, set(quantized)
    cands = view.producers[spec.producer]
    if len(cands) != 1:
        raise TargetError(f"declared scale group {spec}: {spec.producer} is read by {len(cands)} ops; a shared "
                          "weight cannot absorb one scale")
    cand = cands[0]
    C = cand.producer.num_channels
    init = torch.broadcast_to(torch.arange(C), shape_of(cand.output)).clone()
    flow = ChannelPropagator(gm, view.order, view.linear_ops).run(cand.output, init, C)
    consumers, ops = [], []
    for w in spec.consumers:
        readers = view.readers.get(w, [])
        if len(readers) != 1:
            where = "is not read by any op of this graph" if not readers else f"is read by {len(readers)} ops"
            raise TargetError(f"declared scale group {spec}: the consumer {w} {where}; declare a linear read once, "
                              "in the same part of the model as its producer")
        lin = readers[0]
        if lin.node.name in flow.consumers:
            cols = flow.consumers[lin.node.name][1]
        else:  # no channel path: the consumer's columns are taken to read the producer's channels in order
            n_in = get_param(gm, w).shape[lin.in_dim]
            if n_in != C:
                raise TargetError(f"declared scale group {spec}: {w} reads {n_in} input features but "
                                  f"{spec.producer} has {C} output channels, and no channel path connects them")
            cols = torch.arange(C)
        consumers.append(Consumer(lin.node.name, w, lin.in_dim, cols, w in quantized, node_path(gm, lin.node)))
        ops.append(lin)
    used = torch.zeros(C, dtype=torch.bool)
    for c in consumers:
        used[c.columns[c.columns >= 0]] = True
    inputs, output = _region(gm, cand.output, ops, view.order)
    return ScaleGroup(cand.producer, consumers, torch.nonzero(used).flatten(), list(flow.through), inputs, output,
                      cand.output.name)


# -- deciding and applying ----------------------------------------------------------------------

def _need_matches(what: str, patterns: Sequence[str], weights: Sequence[str]) -> None:
    for p in patterns:
        if not any(_matches(p, w) for w in weights):
            raise TargetError(f"{what} pattern {p!r} matches no linear layer of this model (patterns are Python "
                              "regular expressions searched in module and parameter names); real names: "
                              f"{_examples(p, sorted({_module(w) for w in weights}))}")


def resolve_targets(gm: fx.GraphModule, disc: Discovery, cfg: AWQConfig) -> Targets:
    """Decide ``cfg``'s targets on the whole graph ``gm`` (discovery ``disc``), before any calibration.

    Raises :class:`TargetError` when an ignore/only/exclude pattern matches nothing, nothing is left
    to quantize, a declared group names a module the graph lacks (with the closest names), a
    declared consumer's inputs do not fit its producer, or a declared group collides with a kept
    group (same producer, or a consumer already in a group). The numeric check of declared groups
    needs weights: :func:`check_equivalence`.
    """
    weights = sorted(linear_table(gm)[0])
    _need_matches("ignore", cfg.ignore, weights)
    _need_matches("only", cfg.only, weights)
    quantized = frozenset(w for w in disc.quantizable if is_selected(w, cfg))
    if disc.quantizable and not quantized:
        raise TargetError(f"the ignore/only patterns leave no weight to quantize; quantizable linears: "
                          f"{_examples('', [_module(w) for w in disc.quantizable])}, ...")
    excluded: set[str] = set()
    for p in cfg.exclude_groups:
        hit = {g.name for g in disc.groups if _group_matches(p, g)}
        if not hit:
            producers = [g.producer.path or g.name for g in disc.groups]
            raise TargetError(f"exclude-group pattern {p!r} matches no discovered scale group's producer; "
                              f"producers: {_examples(p, producers)}")
        excluded |= hit
    kept = [g for g in disc.groups if g.name not in excluded]
    producer_of = {g.producer.weight: g.name for g in kept if g.producer.weight}
    consumer_of = {c.weight: g.name for g in kept for c in g.consumers}
    declared = []
    view = _GraphView(gm) if cfg.extra_groups else None
    for raw in cfg.extra_groups:
        spec = _resolve_spec(view, raw)
        if spec.producer in producer_of:
            raise TargetError(f"declared scale group {raw}: {spec.producer} already heads the scale group "
                              f"{producer_of[spec.producer]}; drop that one first (exclude_groups, --exclude-group)")
        for c in spec.consumers:
            if c in consumer_of:
                raise TargetError(f"declared scale group {raw}: {c} is already a consumer of the scale group "
                                  f"{consumer_of[c]}; drop that one first (exclude_groups, --exclude-group)")
        _build_group(view, spec, quantized)  # refuses consumers whose inputs do not fit the producer
        producer_of[spec.producer] = str(raw)
        consumer_of.update({c: str(raw) for c in spec.consumers})
        declared.append(spec)
    return Targets(quantized, frozenset(excluded), tuple(declared), cfg.selection())


def apply_targets(gm: fx.GraphModule, disc: Discovery, targets: Targets) -> Discovery:
    """A copy of ``disc`` (discovery of ``gm``: the whole graph or one block of it) with ``targets``
    applied: unselected weights left out of ``quantizable`` and marked ``quantize=False`` in their
    groups, excluded groups dropped, declared groups whose producer ``gm`` holds added."""
    quantizable = [w for w in disc.quantizable if w in targets.quantized]
    groups = [replace(g, consumers=[replace(c, quantize=c.quantize and c.weight in targets.quantized)
                                    for c in g.consumers])
              for g in disc.groups if g.name not in targets.excluded]
    if targets.declared:
        view = _GraphView(gm)
        groups += [_build_group(view, spec, quantizable) for spec in targets.declared if spec.producer in view.producers]
        by_name = {n.name: n for n in gm.graph.nodes}
        groups.sort(key=lambda g: view.order[by_name[g.input_node]])
    return Discovery(groups, list(disc.rejected), list(disc.attention_qk), quantizable)


def declared_groups(disc: Discovery, targets: Targets) -> list[ScaleGroup]:
    """The groups of ``disc`` that ``targets`` declared (after :func:`apply_targets`)."""
    names = {spec.producer for spec in targets.declared}
    return [g for g in disc.groups if g.producer.weight in names]


def select_targets(gm: fx.GraphModule, disc: Discovery, cfg: AWQConfig,
                   inputs: tuple | None = None) -> tuple[Discovery, Targets]:
    """Resolve, apply and check ``cfg``'s targets on the whole graph ``gm`` (weights loaded):
    :func:`resolve_targets`, :func:`apply_targets`, then :func:`check_equivalence` of every declared
    group on ``inputs`` (default :func:`example_inputs`)."""
    targets = resolve_targets(gm, disc, cfg)
    out = apply_targets(gm, disc, targets)
    declared = declared_groups(out, targets)
    if declared:
        check_equivalence(gm, declared, example_inputs(gm) if inputs is None else inputs, disc.rejected)
    return out, targets


# -- the numeric check --------------------------------------------------------------------------

def _vocab_size(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Rows of the embedding table an integer graph input indexes (None: it indexes none)."""
    for u in node.users:
        if op_name(gm, u) != "embedding":
            continue
        for a in u.args:
            ref = param_of(gm, a) if a is not node else None
            if ref is not None:
                return int(shape_of(ref.node)[0])
    return None


def example_inputs(gm: fx.GraphModule, seed: int = 0) -> tuple:
    """Random inputs of the shapes the graph was traced with: normal floats, token ids below the
    embedding's rows (other integers 0), ``True`` masks, sizes as traced."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = example_value(n)
        if not isinstance(v, torch.Tensor):
            out.append(concrete(n))
            continue
        shape = shape_of(n)
        if v.dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(v.dtype)
        elif v.dtype == torch.bool:
            t = torch.ones(shape, dtype=torch.bool)
        else:
            high = _vocab_size(gm, n)
            t = torch.randint(0, high, shape, generator=gen) if high else torch.zeros(shape, dtype=torch.long)
            t = t.to(v.dtype)
        out.append(t.to(device))
    return tuple(out)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def relative_error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """``max |out - ref| / max |ref|`` over the float outputs (float64)."""
    num = max((float((o.double() - r.double()).abs().max()) for r, o in zip(ref, out) if r.numel()), default=0.0)
    den = max((float(r.double().abs().max()) for r in ref if r.numel()), default=0.0)
    return num / max(den, 1e-30)


def tolerance(dtype: torch.dtype | None) -> float:
    """The largest relative output change an exact fold may show in ``dtype``: 1e-3, or four ulps of a
    half type (a ``1 + w`` norm weight divided by ``s`` is rounded once into it)."""
    if dtype is None or not dtype.is_floating_point:
        return 1e-3
    return max(1e-3, 4 * torch.finfo(dtype).eps)


def check_equivalence(gm: fx.GraphModule, groups: Sequence[ScaleGroup], inputs: tuple,
                      rejected: Sequence[Rejection] = (), seed: int = 0) -> dict[str, float]:
    """Fold random positive scales into each group (one at a time, on a copy of ``gm``) and compare
    the output on ``inputs`` with ``gm``'s; returns ``{group: max relative error}``.

    The scales are powers of two (1/4, 1/2, 2, 4 at random per channel): dividing and multiplying
    by them is exact in every float format, so a true equivalence moves the output by rounding
    noise at most (none, except for ``1 + w`` norms), while a wrong group moves it by the scales
    themselves. Raises :class:`GroupCheckError` with the measured error when it exceeds
    :func:`tolerance`; ``rejected`` (discovery's) adds why discovery did not find the group.
    """
    if any(get_param(gm, w).device.type == "meta" for g in groups
           for w in [g.producer.weight, *(c.weight for c in g.consumers)] if w):
        raise TargetError("declared scale groups are checked on the model's weights, and this graph has none "
                          "(meta device)")
    gen = torch.Generator().manual_seed(seed)
    tol = tolerance(float_dtype(gm))
    errors: dict[str, float] = {}
    with torch.no_grad():
        ref = _tensors(gm(*inputs))
        if not all(bool(torch.isfinite(r).all()) for r in ref):
            raise TargetError("the model's output on the random check input is not finite: the declared scale "
                              "groups cannot be checked")
        for g in groups:
            n = g.channels.numel()
            exponent = torch.randint(1, 3, (n,), generator=gen) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
            folded = shallow_copy(gm)
            fold_scales(folded, [g], [2.0 ** exponent.double()])
            err = relative_error(ref, _tensors(folded(*inputs)))
            del folded
            errors[g.name] = err
            if not err <= tol:
                cons = ",".join(c.weight for c in g.consumers)
                why = next((f" Discovery did not group it: {r.reason} (at node {r.blocking_node})."
                            for r in rejected if r.producer == g.name), "")
                raise GroupCheckError(
                    f"declared scale group {g.producer.weight}:{cons} is not an equivalence of this model: folding "
                    f"random scales into it (producer divided, consumer columns multiplied) changes the output by a "
                    f"max relative error of {err:.3g} (tolerance {tol:.0e}).{why} Declare every linear that reads "
                    "the producer's channels and nothing else, or drop the declaration.")
    return errors
