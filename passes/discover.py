"""Discovery: find every AWQ scale group by reading the graph.

The rule (docs/design.md, "The rule"): a *producer* whose output channels can be rescaled -- a norm's weight
vector, a linear's output rows, or an activation after which a ``mul`` can be inserted -- reaches,
through channel-preserving ops only, consumers that are all linear-like ops. Any other use of a
channel (a residual add, rope, softmax, the graph output) blocks that channel.

How channels are followed: every producer output gets a tensor of *channel ids* with its example
shape (``arange(C)`` along the last dim). Data-movement ops (views, transposes, slices, chunks,
GQA ``expand``+``reshape``, token gathers...) are applied to that id tensor verbatim, so the id
tensor reaching a consumer *is* the channel map: no per-op bookkeeping and no per-model table.
Ops that scale values (casts, dropout, ReLU, a gating ``mul`` by something that does not carry the
producer's channels, the V operand of attention) keep the ids; everything else blocks the channels
it sees. A value derived from blocked channels is unchanged by the transform (blocked channels are
never scaled), so it may still gate other channels.
"""
from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from awqfx.graph import (
    ACTIVATIONS, DATA_MOVEMENT, ELEMENTWISE, IDENTITY, METADATA, ROUTING, LinearOp, example_value, fetch_attr,
    has_shapes, linear_op, node_path, op_name, param_name, param_of, shape_of,
)
from awqfx.groups import Consumer, Discovery, Producer, Rejection, ScaleGroup
from awqfx.passes.channels import ChannelPropagator

__all__ = ["discover", "DiscoveryError", "normalize_modules"]


class DiscoveryError(ValueError):
    """The graph cannot be analysed (no shapes recorded, no linear layers...)."""


# -- producers -------------------------------------------------------------------------------

@dataclass
class _Candidate:
    producer: Producer
    output: fx.Node  # node whose output carries the channels on its last dim
    params: list[str] = field(default_factory=list)


def _norm_candidate(gm: fx.GraphModule, node: fx.Node) -> _Candidate | None:
    name = op_name(gm, node)
    out_shape = shape_of(node)
    if not out_shape:
        return None
    C = out_shape[-1]
    if name in ("layer_norm", "rms_norm"):
        if node.op == "call_module":
            return None  # normalised to functional form before discovery
        w = param_of(gm, node.args[2] if len(node.args) > 2 else node.kwargs.get("weight"))
        if w is None or shape_of(w.node) != (C,):
            return None
        b = None
        if name == "layer_norm":
            bn = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
            b = param_of(gm, bn) if isinstance(bn, fx.Node) else None
        prod = Producer("norm", node.name, C, weight=w.name, bias=b.name if b else None, path=node_path(gm, node))
        return _Candidate(prod, node, [w.name] + ([b.name] if b else []))
    if name != "mul" or len(node.args) != 2:
        return None
    a, b = node.args
    for vec, other in ((a, b), (b, a)):
        ref = param_of(gm, vec, allow_offset=True)
        if ref is None or shape_of(ref.node) != (C,) or not isinstance(other, fx.Node):
            continue
        if param_of(gm, other) is not None:
            continue
        prod = Producer("norm", node.name, C, weight=ref.name, offset=ref.offset, path=node_path(gm, node))
        out = node
        users = [u for u in node.users if op_name(gm, u) not in METADATA]
        if len(users) == 1 and op_name(gm, users[0]) == "add" and len(users[0].args) == 2:
            add = users[0]
            bias_arg = add.args[1] if add.args[0] is node else add.args[0]
            bref = param_of(gm, bias_arg)
            if bref is not None and shape_of(bref.node) == (C,) and bref.offset == 0:
                prod.bias = bref.name
                prod.node = add.name
                out = add
        return _Candidate(prod, out, [ref.name] + ([prod.bias] if prod.bias else []))
    return None


def _linear_candidate(gm: fx.GraphModule, lin: LinearOp) -> _Candidate:
    C = shape_of(lin.node)[-1]
    prod = Producer("linear", lin.node.name, C, weight=lin.weight.name,
                    bias=lin.bias.name if lin.bias else None, out_dim=lin.out_dim, path=node_path(gm, lin.node))
    return _Candidate(prod, lin.node, [lin.weight.name] + ([lin.bias.name] if lin.bias else []))


# -- helpers over the whole graph -------------------------------------------------------------

def _param_uses(gm: fx.GraphModule) -> dict[str, int]:
    """How many ops read each parameter, counting aliases (tied weights) together."""
    by_tensor: dict[int, list[str]] = defaultdict(list)
    uses: dict[str, int] = defaultdict(int)
    for n in gm.graph.nodes:
        name = param_name(gm, n)
        if name is None:
            continue
        key = id(fetch_attr(gm, n.target)) if n.op == "get_attr" else hash(name)
        if name not in by_tensor[key]:
            by_tensor[key].append(name)
        uses[name] += sum(1 for u in n.users if op_name(gm, u) not in METADATA)
    total: dict[str, int] = {}
    for names in by_tensor.values():
        count = sum(uses[n] for n in names)
        for n in names:
            total[n] = count
    return total


def _is_routing(gm: fx.GraphModule, node: fx.Node, depth: int = 6) -> bool:
    """The linear's output decides a discrete route (MoE router): keep it unquantized."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if op_name(gm, u) in ROUTING:
                    return True
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    return False


def _feeds_attention_scores(gm: fx.GraphModule, node: fx.Node, linear_ops, depth: int = 24) -> bool:
    """The linear's output reaches attention queries/keys (sdpa operand 0/1, or a softmax) before
    any other linear: a q/k projection, whose clipping the reference search skips."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                name = op_name(gm, u)
                if name == "scaled_dot_product_attention" and n in u.args[:2]:
                    return True
                if name in ("softmax", "_softmax", "_safe_softmax"):
                    return True
                if u in linear_ops or u in seen:
                    continue
                seen.add(u)
                nxt.append(u)
        frontier = nxt
    return False


def _is_head(gm: fx.GraphModule, node: fx.Node, depth: int = 16) -> bool:
    """The linear's output is a graph output (an LM head): not quantized by default.

    It may reach the output through a chain of single-user ops that post-process each logit on its
    own: data movement, casts, and elementwise ops whose other operands are constants
    (softcapping ``tanh(x / c) * c``, logit scaling ``x * s`` or ``x / s``).
    """
    cur = node
    for _ in range(depth):
        users = [u for u in cur.users if op_name(gm, u) not in METADATA]
        if any(u.op == "output" for u in users):
            return True
        if len(users) != 1 or not _keeps_logits(gm, users[0], cur):
            return False
        cur = users[0]
    return False


def _keeps_logits(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """``node`` moves, casts or elementwise-transforms ``src`` alone (its other operands are constants)."""
    name = op_name(gm, node)
    if name in DATA_MOVEMENT | IDENTITY:
        return True
    if name.removesuffix("_") not in ELEMENTWISE or shape_of(node) != shape_of(src):
        return False
    return all(_is_constant(gm, a) for a in node.all_input_nodes if a is not src)


def _is_constant(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A parameter, a graph constant, or a single-element value (broadcast alike over every logit)."""
    if node.op == "get_attr" or param_name(gm, node) is not None:
        return True
    return hasattr(example_value(node), "shape") and math.prod(shape_of(node)) == 1


def _first_common_descendant(nodes: list[fx.Node], order: dict[fx.Node, int]) -> fx.Node | None:
    """The earliest node (graph order) that every one of ``nodes`` reaches, the graph output
    excluded; None when they never meet before it. Walks users in graph order, so a node's set
    of reaching starts is complete when it is visited."""
    full = (1 << len(nodes)) - 1
    reached: dict[fx.Node, int] = defaultdict(int)
    heap: list[tuple[int, str]] = []
    by_name: dict[str, fx.Node] = {}

    def push_users(n: fx.Node, mask: int) -> None:
        for u in n.users:
            if u not in reached:
                by_name[u.name] = u
                heapq.heappush(heap, (order[u], u.name))
            reached[u] |= mask

    for i, n in enumerate(nodes):
        push_users(n, 1 << i)
    while heap:
        _, name = heapq.heappop(heap)
        node = by_name[name]
        if node.op == "output":
            return None
        if reached[node] == full:
            return node
        push_users(node, reached[node])
    return None


def _split_parts(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The pieces ``node``'s output is cut into when every use is data movement (the q/k/v slices
    of a fused projection; a split/chunk counts by its items); None otherwise."""
    users = [u for u in node.users if op_name(gm, u) not in METADATA]
    if not users or any(op_name(gm, u) not in DATA_MOVEMENT for u in users):
        return None
    parts: list[fx.Node] = []
    for u in users:
        if isinstance(example_value(u), torch.Tensor):
            parts.append(u)
        else:  # a tuple (split, chunk): its items are the parts
            parts += [i for i in u.users if op_name(gm, i) not in METADATA]
    return parts


def _extend_region_end(gm: fx.GraphModule, end: fx.Node, order: dict[fx.Node, int]) -> fx.Node:
    """Follow ``end`` through data movement and further linear ops; where its output is split into
    parts (a fused q/k/v or gate/up projection), continue from the first node all parts reach."""
    while True:
        users = [u for u in end.users if op_name(gm, u) not in METADATA]
        if len(users) == 1 and isinstance(example_value(users[0]), torch.Tensor):
            u = users[0]
            lin = linear_op(gm, u)
            if op_name(gm, u) in DATA_MOVEMENT | IDENTITY or (lin is not None and lin.data is end):
                end = u
                continue
        parts = _split_parts(gm, end)
        if not parts:
            return end
        joined = parts[0] if len(parts) == 1 else _first_common_descendant(parts, order)
        if joined is None or not isinstance(example_value(joined), torch.Tensor):
            return end
        end = joined


def _region(gm: fx.GraphModule, group_input: fx.Node, consumers: list[LinearOp], order) -> tuple[list[str], str]:
    """The subgraph whose output the AWQ loss compares (docs/design.md, "The rule", 8).

    Its output is the first node all consumers reach, extended through data movement and
    further linear ops until anything else (a residual add, a norm) begins: the attention block
    for norm->qkv, the MLP for norm->gate/up, the consumer itself for v->o and up->down. A fused
    projection's output split into parts continues from the first node all parts reach, so
    norm->qkv_proj and norm->gate_up_proj get the same block as their unfused forms.
    """
    nodes = [c.node for c in consumers]
    end = nodes[0] if len(nodes) == 1 else _first_common_descendant(nodes, order)
    if end is None:
        end = max(nodes, key=lambda n: order[n])
    end = _extend_region_end(gm, end, order)
    data_inputs = list(dict.fromkeys(c.data for c in consumers))
    inputs = data_inputs if len(data_inputs) == 1 else [group_input]
    return [n.name for n in inputs], end.name


def normalize_modules(gm: fx.GraphModule) -> bool:
    """Rewrite ``call_module`` Linear/LayerNorm leaves into functional ops on ``get_attr`` weights.

    Semantics and parameter names are unchanged (``fc1`` -> ``linear(x, get_attr fc1.weight)``);
    afterwards every graph kind looks the same to discovery. Returns whether anything changed.
    """
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) not in (nn.Linear, nn.LayerNorm):
            continue
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{node.target}.weight")
            b = gm.graph.get_attr(f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
            for g in (w, b):
                if g is not None:
                    g.meta["val"] = fetch_attr(gm, g.target)
            if isinstance(mod, nn.Linear):
                new = gm.graph.call_function(F.linear, (node.args[0], w, b))
            else:
                new = gm.graph.call_function(F.layer_norm, (node.args[0], tuple(mod.normalized_shape), w, b, mod.eps))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


# -- the pass --------------------------------------------------------------------------------

def discover(gm: fx.GraphModule, quantize_head: bool = False) -> Discovery:
    """Find every scale group of ``gm`` (and every rejected candidate with its blocking op).

    Works on torch.export graphs, torch.compile (dynamo) graphs and call_module graphs (after
    ``normalize_modules``); needs example values on the nodes (``meta['val']``), which
    ``awqfx.capture`` and dynamo record, and ``awqfx.graph.propagate_shapes`` adds to others.
    """
    if any(n.op == "call_module" for n in gm.graph.nodes):
        normalize_modules(gm)
    if not has_shapes(gm):
        raise DiscoveryError(
            "The graph has no shape information on its nodes. Capture it with awqfx.capture(model), "
            "or call awqfx.graph.propagate_shapes(gm, example_inputs) first."
        )
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    linear_ops = {}
    for n in gm.graph.nodes:
        lin = linear_op(gm, n)
        if lin is not None:
            linear_ops[n] = lin
    if not linear_ops:
        raise DiscoveryError(
            "The graph has no linear layers with parameter weights (nn.Linear, F.linear, addmm, x @ W.T "
            "or grouped expert matmuls), so there is nothing for AWQ to quantize."
        )
    uses = _param_uses(gm)
    prop = ChannelPropagator(gm, order, linear_ops)
    groups: list[ScaleGroup] = []
    rejected: list[Rejection] = []
    candidates: list[_Candidate] = []
    for n in gm.graph.nodes:
        if n in linear_ops:
            candidates.append(_linear_candidate(gm, linear_ops[n]))
        else:
            c = _norm_candidate(gm, n)
            if c is not None:
                candidates.append(c)
    candidate_nodes = {c.output for c in candidates} | set(linear_ops)
    by_name = {n.name: n for n in gm.graph.nodes}

    def evaluate(cand: _Candidate) -> ScaleGroup | None:
        C = cand.producer.num_channels
        shape = shape_of(cand.output)
        init = torch.broadcast_to(torch.arange(C), shape).clone()
        flow = prop.run(cand.output, init, C)
        label = cand.producer.label
        shared = [p for p in cand.params if uses.get(p, 1) > 1]
        consumers = []
        for _, (lin, cols) in flow.consumers.items():
            if uses.get(lin.weight.name, 1) > 1:
                shared.append(lin.weight.name)
            consumers.append((lin, cols))
        if shared:
            rejected.append(Rejection(label, cand.producer.kind, f"shared (tied) weight: {', '.join(sorted(set(shared)))}",
                                      cand.output.name, "shared weight", torch.arange(C)))
            return None
        if flow.blocks:
            first = min(flow.blocks, key=lambda b: order[b[0]])
            reasons = list(dict.fromkeys(b[1] for b in flow.blocks))
            rejected.append(Rejection(label, cand.producer.kind, "; ".join(reasons[:4]), first[0].name, first[1],
                                      torch.nonzero(flow.blocked).flatten()))
        good = ~flow.blocked
        out_consumers = []
        for lin, cols in consumers:
            cols = cols.clone()
            ok = cols >= 0
            cols[ok & ~good[cols.clamp(min=0)]] = -1
            if (cols >= 0).any():
                quant = not _is_routing(gm, lin.node) and (quantize_head or not _is_head(gm, lin.node))
                out_consumers.append(Consumer(lin.node.name, lin.weight.name, lin.in_dim, cols, quant, node_path(gm, lin.node)))
        if not out_consumers:
            return None
        used = torch.zeros(C, dtype=torch.bool)
        for c in out_consumers:
            used[c.columns[c.columns >= 0]] = True
        channels = torch.nonzero(used).flatten()
        inputs, output = _region(gm, cand.output, [linear_ops[by_name[c.node]] for c in out_consumers], order)
        return ScaleGroup(cand.producer, out_consumers, channels, flow.through, inputs, output, cand.output.name)

    for cand in candidates:
        g = evaluate(cand)
        if g is not None:
            groups.append(g)

    # Consumers no foldable producer reaches: insert a scale node after the activation feeding them.
    covered = {c.node for g in groups for c in g.consumers}
    for n, lin in linear_ops.items():
        if n.name in covered:
            continue
        src = lin.data
        while (src.op in ("call_function", "call_method") and op_name(gm, src) in DATA_MOVEMENT | IDENTITY
               and len(src.users) == 1 and isinstance(src.args[0], fx.Node)):
            src = src.args[0]
        if src in candidate_nodes or op_name(gm, src) not in ACTIVATIONS or not shape_of(src):
            continue
        C = shape_of(src)[-1]
        prod = Producer("activation", src.name, C, path=node_path(gm, src))
        g = evaluate(_Candidate(prod, src, []))
        if (g is not None and any(c.quantize for c in g.consumers)
                and not any(r.producer == prod.label for r in rejected)):
            groups.append(g)
            covered |= {c.node for c in g.consumers}
    groups.sort(key=lambda g: order[by_name[g.input_node]])
    qk = sorted({lin.weight.name for n, lin in linear_ops.items() if _feeds_attention_scores(gm, n, linear_ops)})
    quantizable = sorted({lin.weight.name for n, lin in linear_ops.items()
                          if not _is_routing(gm, n) and (quantize_head or not _is_head(gm, n))})
    return Discovery(groups, rejected, attention_qk=qk, quantizable=quantizable)

