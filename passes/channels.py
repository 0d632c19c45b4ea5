"""Channel propagation: follow one producer's output channels through the graph.

Every producer output gets a tensor of *channel ids* with its example shape (``arange(C)`` along
the last dim). Data-movement ops (views, transposes, slices, chunks, GQA ``expand``+``reshape``,
token gathers...) are applied to that id tensor verbatim, so the id tensor reaching a consumer
*is* the channel map: no per-op bookkeeping and no per-model table. Ops that scale values (casts,
dropout, ReLU, a gating ``mul`` by something that does not carry the producer's channels, the V
operand of attention) keep the ids; everything else blocks the channels it sees
(docs/design.md, "The rule").
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from awqfx.graph import (
    DATA_MOVEMENT, HOMOGENEOUS, IDENTITY, MATMULS, METADATA, LinearOp, concrete, example_value, fetch_attr, op_name,
    shape_of,
)

__all__ = ["ChannelPropagator", "Flow"]


@dataclass
class Flow:
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


class ChannelPropagator:
    """Follows channel-id tensors from one producer, in topological order."""

    def __init__(self, gm: fx.GraphModule, order: dict[fx.Node, int], linear_ops: dict[fx.Node, LinearOp]):
        self.gm = gm
        self.order = order
        self.linear_ops = linear_ops

    def run(self, start: fx.Node, init: torch.Tensor, num_channels: int) -> Flow:
        flow = Flow(num_channels, blocked=torch.zeros(num_channels, dtype=torch.bool))
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
    def _step(self, node: fx.Node, values: dict, flow: Flow):
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

    def _tensor_getitem(self, node: fx.Node, src, flow: Flow):
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

    def _transfer(self, node: fx.Node, name: str, values: dict, inputs: list[fx.Node], flow: Flow):
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


def _gather(src: torch.Tensor, dims: list[int], flow: "Flow", node: fx.Node) -> bool:
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
