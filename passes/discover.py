"""Discovery: find every AWQ scale group by reading the graph.

The rule (DESIGN.md §3): a *producer* whose output channels can be rescaled -- a norm's weight
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

from awqfx.graph import (
    ACTIVATIONS, DATA_MOVEMENT, ELEMENTWISE, HOMOGENEOUS, IDENTITY, MATMULS, METADATA, ROUTING, ParamRef,
    concrete, example_value, fetch_attr, has_shapes, is_grouped_mm, node_path, op_name, param_name, param_of,
    shape_of,
)
from awqfx.groups import Consumer, Discovery, Producer, Rejection, ScaleGroup

__all__ = ["discover", "LinearOp", "linear_op", "DiscoveryError"]


class DiscoveryError(ValueError):
    """The graph cannot be analysed (no shapes recorded, no linear layers...)."""


# -- linear-like ops ------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearOp:
    """A linear-like op with a parameter weight: ``linear``, GPT-2 ``addmm``, ``x @ W.T``, MoE grouped mm."""

    node: fx.Node
    data: fx.Node  # the activation operand
    weight: ParamRef
    in_dim: int  # parameter dim contracted with the activation's last dim
    out_dim: int  # parameter dim that becomes the output's last dim
    bias: ParamRef | None


def linear_op(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    if node.op not in ("call_function", "call_method"):
        return None
    name = op_name(gm, node)
    args = list(node.args)
    if name == "linear" and len(args) >= 2:
        w = param_of(gm, args[1])
        b = args[2] if len(args) > 2 else node.kwargs.get("bias")
        if w is None or len(w.perm) != 2:
            return None
        bias = param_of(gm, b) if isinstance(b, fx.Node) else None
        if isinstance(b, fx.Node) and bias is None:
            return None
        return LinearOp(node, args[0], w, w.perm[1], w.perm[0], bias)
    if name == "addmm" and len(args) >= 3:
        w = param_of(gm, args[2])
        bias = param_of(gm, args[0])
        if w is None or bias is None or len(w.perm) != 2:
            return None
        return LinearOp(node, args[1], w, w.perm[0], w.perm[1], bias)
    if (name in MATMULS or is_grouped_mm(name)) and len(args) >= 2:
        w = param_of(gm, args[1])
        if w is None or len(w.perm) < 2 or not isinstance(args[0], fx.Node):
            return None
        if param_name(gm, args[0]) is not None:
            return None
        nd = len(w.perm)
        return LinearOp(node, args[0], w, w.perm[nd - 2], w.perm[nd - 1], None)
    return None


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


# -- channel propagation ---------------------------------------------------------------------

@dataclass
class _Flow:
    """Result of following one producer's channels through the graph."""

    num_channels: int
    consumers: dict[str, tuple[LinearOp, torch.Tensor]] = field(default_factory=dict)
    blocked: torch.Tensor | None = None  # bool [C]
    blocks: list[tuple[fx.Node, str, torch.Tensor]] = field(default_factory=list)  # (node, reason, channel mask)
    through: list[str] = field(default_factory=list)

    def block(self, node: fx.Node, reason: str, ids: torch.Tensor) -> None:
        ids = ids[ids >= 0]
        if ids.numel() == 0:
            return
        hit = torch.zeros_like(self.blocked)
        hit[ids] = True  # a scatter, not torch.unique: ids tensors can hold 100k+ entries
        self.blocked |= hit
        self.blocks.append((node, reason, hit))


def _ids_in(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)
    parts = [_ids_in(v) for v in value if v is not None]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _const_along(idx: torch.Tensor, dim: int) -> bool:
    if idx.shape[dim] <= 1:
        return True
    return bool((idx == idx.narrow(dim, 0, 1)).all())


class _Propagator:
    """Follows channel-id tensors from one producer, in topological order."""

    def __init__(self, gm: fx.GraphModule, order: dict[fx.Node, int], linear_ops: dict[fx.Node, LinearOp]):
        self.gm = gm
        self.order = order
        self.linear_ops = linear_ops

    def run(self, start: fx.Node, init: torch.Tensor, num_channels: int) -> _Flow:
        flow = _Flow(num_channels, blocked=torch.zeros(num_channels, dtype=torch.bool))
        values: dict[fx.Node, object] = {start: init}
        heap: list[tuple[int, str]] = []
        queued: set[fx.Node] = set()
        by_name: dict[str, fx.Node] = {}

        def push_users(n: fx.Node) -> None:
            for u in n.users:
                if u not in queued:
                    queued.add(u)
                    by_name[u.name] = u
                    heapq.heappush(heap, (self.order[u], u.name))

        push_users(start)
        while heap:
            _, name = heapq.heappop(heap)
            node = by_name[name]
            out = self._step(node, values, flow)
            if out is not None:
                values[node] = out
                if node.op != "output":
                    push_users(node)
        return flow

    # One node: returns the output channel-id value (or None) and records consumers / blocks.
    def _step(self, node: fx.Node, values: dict, flow: _Flow):
        gm = self.gm
        inputs = [a for a in node.all_input_nodes if a in values]
        if not inputs:
            return None
        name = op_name(gm, node)
        if node.op == "output":
            for a in inputs:
                flow.block(node, "graph output", _ids_in(values[a]))
            return None
        if name in METADATA:
            return None
        lin = self.linear_ops.get(node)
        if lin is not None:
            if inputs == [lin.data]:
                idx = values[lin.data]
                cols = self._columns(idx)
                if cols is None:
                    flow.block(node, f"{name} (channels vary across rows)", _ids_in(idx))
                    return None
                flow.consumers[node.name] = (lin, cols)
                return None
            for a in inputs:
                flow.block(node, f"{name} weight/bias operand", _ids_in(values[a]))
            return None
        try:
            out = self._transfer(node, name, values, inputs, flow)
        except Exception as e:  # an op we could not replay on ids: conservative
            for a in inputs:
                flow.block(node, f"{name} ({type(e).__name__})", _ids_in(values[a]))
            return None
        if out is not None and name not in flow.through:
            flow.through.append(name)
        return out

    def _tensor_getitem(self, node: fx.Node, src, flow: _Flow):
        """``x[idx]`` / ``x[:, idx]`` with integer tensors (dynamo's spelling of a token gather)."""
        key = node.args[1]
        items = list(key) if isinstance(key, tuple) else [key]
        if any(k is Ellipsis or k is None for k in items):
            flow.block(node, "tensor indexing", _ids_in(src))
            return None
        dims, concrete_items = [], []
        for d, k in enumerate(items):
            if isinstance(k, fx.Node):
                v = example_value(k)
                if v is None or v.dtype == torch.bool:
                    flow.block(node, "mask indexing", _ids_in(src))
                    return None
                dims.append(d)
                const = _constant(self.gm, k)
                concrete_items.append(const if const is not None else torch.zeros(shape_of(k), dtype=torch.long))
            else:
                concrete_items.append(concrete(k))
        if not _gather(src, [d for d in dims if _constant(self.gm, items[d]) is None], flow, node):
            return None
        return src[tuple(concrete_items) if isinstance(key, tuple) else concrete_items[0]]

    def _columns(self, idx) -> torch.Tensor | None:
        if not isinstance(idx, torch.Tensor) or idx.dim() == 0:
            return None
        rows = idx.reshape(-1, idx.shape[-1])
        if not bool((rows == rows[:1]).all()):
            return None
        return rows[0].clone()

    def _transfer(self, node: fx.Node, name: str, values: dict, inputs: list[fx.Node], flow: _Flow):
        out_shape = shape_of(node)
        block_all = lambda why: [flow.block(node, why, _ids_in(values[a])) for a in inputs]  # noqa: E731
        if name in IDENTITY or name in HOMOGENEOUS:
            src = node.args[0] if node.args else None
            if src in values:
                return values[src]
            return None  # a flow used only as dtype/shape reference (type_as)
        if name in ("mul", "div"):
            a, b = (list(node.args) + [None, None])[:2]
            fa, fb = a in values, b in values
            if fa and fb:
                ia, ib = torch.broadcast_to(values[a], out_shape), torch.broadcast_to(values[b], out_shape)
                if name == "div" or bool(((ia >= 0) & (ib >= 0) & (ia == ib)).any()):
                    block_all(f"{name} of two scaled operands")
                    return None
                # Disjoint channels on both sides (relu(gate) * up of one fused linear): scaling both
                # would multiply two scales into one column, so keep one operand's channels and block
                # the other's -- the one behind a homogeneous activation, else the first.
                keep_b = op_name(self.gm, a) in HOMOGENEOUS if isinstance(a, fx.Node) else True
                keep_b = keep_b or not (isinstance(b, fx.Node) and op_name(self.gm, b) in HOMOGENEOUS)
                drop, keep = (a, ib) if keep_b else (b, ia)
                flow.block(node, f"{name} of two scaled operands", _ids_in(values[drop]))
                return keep.clone()
            if name == "div" and fb:
                block_all("div by scaled channels")
                return None
            idx = values[a] if fa else values[b]
            return torch.broadcast_to(idx, out_shape).clone()
        if name in ("add", "sub"):
            a, b = (list(node.args) + [None, None])[:2]
            if a in values and b in values and torch.equal(torch.as_tensor(values[a]), torch.as_tensor(values[b])):
                return values[a]
            block_all("add (residual or bias)" if name == "add" else name)
            return None
        if name == "scaled_dot_product_attention":
            v = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
            for a in inputs:
                if a is not v:
                    flow.block(node, "attention query/key/mask", _ids_in(values[a]))
            if v not in values:
                return None
            idx = values[v]
            if not _const_along(idx, -2):
                block_all("attention over channel dim")
                return None
            idx = idx.narrow(-2, 0, 1)
            if idx.dim() >= 3 and idx.shape[-3] != out_shape[-3] and out_shape[-3] % idx.shape[-3] == 0:
                idx = idx.repeat_interleave(out_shape[-3] // idx.shape[-3], dim=-3)
            return torch.broadcast_to(idx, out_shape).clone()
        if name in MATMULS:
            a, b = node.args[:2]
            if a in values and b in values:
                block_all("matmul of two scaled operands")
                return None
            if b in values:  # attention probs @ V
                idx = values[b]
                if not _const_along(idx, -2):
                    block_all("matmul contracts channels")
                    return None
                return torch.broadcast_to(idx.narrow(-2, 0, 1), out_shape).clone()
            idx = values[a]
            if not _const_along(idx, -1):
                block_all("matmul contracts channels")
                return None
            return torch.broadcast_to(idx.narrow(-1, 0, 1), out_shape).clone()
        if name == "cat" or name == "stack":
            tensors = node.args[0]
            filled = [values[t] if t in values else torch.full(shape_of(t), -1, dtype=torch.long) for t in tensors]
            dim = concrete(node.args[1]) if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return torch.cat(filled, dim) if name == "cat" else torch.stack(filled, dim)
        if name in DATA_MOVEMENT:
            return self._replay(node, name, values, inputs, flow, out_shape)
        block_all(name)
        return None

    def _replay(self, node, name, values, inputs, flow, out_shape):
        """Apply a data-movement op to the channel-id tensor itself."""
        data = node.args[0] if node.args else None
        if inputs != [data]:
            for a in inputs:
                flow.block(node, f"{name} index operand", _ids_in(values[a]))
            return None
        src = values[data]
        if name == "getitem" and isinstance(src, (list, tuple)):
            return src[node.args[1]]
        if name in ("index", "index_select"):
            # Token gathers (MoE routing): legal only when the channel ids do not vary along the
            # gathered dims, then position 0 is representative of every index.
            if name == "index":
                ix = node.args[1]
                dims = [d for d, t in enumerate(ix) if t is not None and _constant(self.gm, t) is None]
                if not _gather(src, dims, flow, node):
                    return None
                consts = [None if t is None else _constant(self.gm, t) for t in ix]
                if all(c is not None for c, t in zip(consts, ix) if t is not None):
                    return torch.ops.aten.index.Tensor(src, consts)  # fixed slices (falcon q/k/v split)
                zeros = [None if t is None else torch.zeros(shape_of(t), dtype=torch.long) for t in ix]
                return torch.ops.aten.index.Tensor(src, zeros)
            dim = int(concrete(node.args[1]))
            if not _gather(src, [dim], flow, node):
                return None
            return torch.index_select(src, dim, torch.zeros(shape_of(node.args[2]), dtype=torch.long))
        if name == "getitem" and any(isinstance(a, fx.Node) for a in _flatten(node.args[1])):
            return self._tensor_getitem(node, src, flow)
        args = [src] + [concrete(a) for a in node.args[1:]]
        kwargs = {k: concrete(v) for k, v in node.kwargs.items()}
        if node.op == "call_method":
            out = getattr(src, node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out_shape and tuple(out.shape) != out_shape:
            flow.block(node, f"{name} (shape mismatch)", _ids_in(src))
            return None
        if isinstance(out, torch.Tensor) and out.dtype != torch.long:
            flow.block(node, name, _ids_in(src))
            return None
        return out


def _gather(src: torch.Tensor, dims: list[int], flow: "_Flow", node: fx.Node) -> bool:
    """A token gather is legal when channel ids do not vary along the gathered dims."""
    for d in dims:
        if not _const_along(src, d):
            flow.block(node, "index over channel dim", _ids_in(src))
            return False
    return True


def _constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The value of an index operand that is a graph constant (not data-dependent), else None."""
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            v = fetch_attr(gm, node.target)
            return v.detach().clone().long() if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) else None
        if node.op == "call_function" and op_name(gm, node) in {"lift_fresh_copy", "clone", "detach", "alias"}:
            node = node.args[0]
            continue
        return None
    return None


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


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


def _region(gm: fx.GraphModule, group_input: fx.Node, consumers: list[LinearOp], order) -> tuple[list[str], str]:
    """The subgraph whose output the AWQ loss compares (DESIGN §4).

    Its output is the first node all consumers reach, extended through data movement and
    further linear ops until anything else (a residual add, a norm) begins: the attention block
    for norm->qkv, the MLP for norm->gate/up, the consumer itself for v->o and up->down.
    """
    nodes = [c.node for c in consumers]
    if len(nodes) == 1:
        end = nodes[0]
    else:
        reach: list[set[fx.Node]] = []
        for n in nodes:
            seen, stack = set(), [n]
            while stack and len(seen) < 4000:
                x = stack.pop()
                for u in x.users:
                    if u not in seen:
                        seen.add(u)
                        stack.append(u)
            reach.append(seen)
        common = set.intersection(*reach)
        common.discard(next(n for n in gm.graph.nodes if n.op == "output"))
        end = min(common, key=lambda n: order[n]) if common else max(nodes, key=lambda n: order[n])
    while True:
        users = [u for u in end.users if op_name(gm, u) not in METADATA]
        if len(users) != 1:
            break
        u = users[0]
        if not isinstance(example_value(u), torch.Tensor):
            break  # never end a region on a tuple/list (split, chunk)
        lin = linear_op(gm, u)
        if op_name(gm, u) in DATA_MOVEMENT | IDENTITY or (lin is not None and lin.data is end):
            end = u
        else:
            break
    data_inputs = list(dict.fromkeys(c.data for c in consumers))
    inputs = data_inputs if len(data_inputs) == 1 else [group_input]
    return [n.name for n in inputs], end.name


def normalize_modules(gm: fx.GraphModule) -> bool:
    """Rewrite ``call_module`` Linear/LayerNorm leaves into functional ops on ``get_attr`` weights.

    Semantics and parameter names are unchanged (``fc1`` -> ``linear(x, get_attr fc1.weight)``);
    afterwards every graph kind looks the same to discovery. Returns whether anything changed.
    """
    import torch.nn as nn
    import torch.nn.functional as F

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
    prop = _Propagator(gm, order, linear_ops)
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

