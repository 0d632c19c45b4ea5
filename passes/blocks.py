"""Split a captured graph into its chain of blocks, read from the graph itself (docs/design.md, "Blocks").

A *cut* before node ``i`` is the set of values computed before ``i`` and read at or after it.
The block-by-block mode keeps exactly those values for every calibration batch, so a good cut
is thin: it carries as few parameter-dependent values as any cut can (the residual stream) plus
parameter-free context (rope cos/sin, masks, sizes). The rules, over ops and shapes only:

1. A cut may not fall inside a scale group (from its producer or region inputs to its region
   output and consumers): each group is searched within one block.
2. Among the remaining cuts after the first parameter is read, the thin ones carry the fewest
   parameter-dependent values; of consecutive thin cuts the first is taken (it carries the
   stream before any dtype cast, e.g. a norm's float32 copy of a bf16 residual).
3. A segment that reads no parameter joins the next one; adjacent segments whose parameters
   share the same owner (the longest common module path of their names, e.g. one decoder
   layer's attention and MLP halves) are one block.

``block_module`` cuts a block out as a standalone GraphModule: the values crossing into it
become its placeholders (named as the nodes they replace), the ones leaving it its outputs,
and parameters keep their FQNs, so a plan found on a block is keyed like one found on the
whole graph.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.graph import fetch_attr
from awqfx.groups import ScaleGroup

__all__ = ["Block", "BlockSplitError", "split_blocks", "block_module", "whole_block", "needed_after", "block_args",
           "after_block"]


class BlockSplitError(ValueError):
    """The graph has no cut that keeps every scale group inside one block."""


@dataclass
class Block:
    """A contiguous run of graph nodes: ``inputs`` cross into it, ``outputs`` leave it (node names)."""

    index: int
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    params: list[str]  # parameter FQNs its nodes read
    buffers: list[str]  # buffer / constant attribute targets its nodes read
    owner: str  # longest common module path of ``params`` ("" when none is shared)

    def __repr__(self) -> str:
        return (f"Block({self.index}, owner={self.owner!r}, {len(self.nodes)} nodes, {len(self.params)} params, "
                f"in={self.inputs}, out={self.outputs})")


def _owner(params: Iterable[str]) -> str:
    parts = [p.split(".")[:-1] for p in params]
    if not parts:
        return ""
    common = parts[0]
    for p in parts[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def _group_nodes(g: ScaleGroup) -> list[str]:
    names = [g.producer.node, *g.region_inputs, g.region_output, g.input_node, *(c.node for c in g.consumers)]
    return [n for n in names if n]


def split_blocks(gm: fx.GraphModule, groups: list[ScaleGroup]) -> list[Block]:
    """The chain of blocks of ``gm`` (see the module docstring); ``groups`` are discovery's.

    Raises :class:`BlockSplitError` when no cut keeps the groups whole (one block would be the
    whole model).
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    is_param = {n: n.op == "get_attr" and isinstance(fetch_attr(gm, n.target), nn.Parameter) for n in nodes}
    depends: dict[fx.Node, bool] = {}
    for n in nodes:
        depends[n] = is_param[n] or any(depends[a] for a in n.all_input_nodes)
    first_param_use = min((order[u] for n in nodes if is_param[n] for u in n.users), default=len(nodes))

    inside = [False] * (len(nodes) + 1)  # inside[i]: a cut before node i would split a group
    for g in groups:
        idx = [order[by_name[n]] for n in _group_nodes(g) if n in by_name]
        for i in range(min(idx) + 1, max(idx) + 1):
            inside[i] = True

    last_use = {n: max((order[u] for u in n.users), default=-1) for n in nodes}
    crossing: dict[int, list[fx.Node]] = {}
    live: set[fx.Node] = set()
    for i, n in enumerate(nodes):
        live = {v for v in live if last_use[v] >= i}
        if i > first_param_use and not inside[i] and n.op != "output":
            crossing[i] = sorted(live, key=order.__getitem__)
        if n.op != "get_attr" and n.users:
            live.add(n)
    if not crossing:
        raise BlockSplitError("the graph has no cut outside its scale groups: it cannot be quantized block by block")
    weight = {i: sum(depends[v] for v in vals) for i, vals in crossing.items()}
    thin = min(weight.values())
    cuts = [i for i in sorted(crossing) if weight[i] == thin and weight.get(i - 1) != thin]

    bounds = [0, *cuts, len(nodes) - 1]  # the output node closes the last segment
    segments = [nodes[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    merged: list[list[fx.Node]] = []
    pending: list[fx.Node] = []
    for seg in segments:
        seg = pending + seg
        params = {a.target for n in seg for a in n.all_input_nodes if is_param[a]}
        if not params:
            pending = seg
            continue
        pending = []
        if merged:
            prev = {a.target for n in merged[-1] for a in n.all_input_nodes if is_param[a]}
            if _owner(prev) and _owner(prev) == _owner(params):
                merged[-1] = merged[-1] + seg
                continue
        merged.append(seg)
    if pending:
        if not merged:
            raise BlockSplitError("the graph reads no parameters: there is nothing to quantize block by block")
        merged[-1] = merged[-1] + pending
    if len(merged) < 2:
        raise BlockSplitError("no cut between scale groups carries the residual stream alone: the graph is one block")
    return [_block(gm, i, seg, order, is_param) for i, seg in enumerate(merged)]


def _block(gm: fx.GraphModule, index: int, seg: list[fx.Node], order: dict, is_param: dict) -> Block:
    members = {n for n in seg if n.op != "placeholder"}  # graph inputs are block inputs
    inputs: list[fx.Node] = [n for n in seg if n.op == "placeholder" and n.users]
    attrs: list[fx.Node] = []
    for n in seg:
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                if a not in attrs:
                    attrs.append(a)
            elif a not in members and a not in inputs:
                inputs.append(a)
    inputs.sort(key=order.__getitem__)
    outputs = [n for n in seg if n.op not in ("get_attr", "placeholder") and any(u not in members for u in n.users)]
    params = sorted(a.target for a in attrs if is_param[a])
    return Block(index, [n.name for n in seg if n.op not in ("get_attr", "placeholder")], [a.name for a in inputs],
                 [n.name for n in outputs], params, sorted(a.target for a in attrs if not is_param[a]), _owner(params))


def whole_block(gm: fx.GraphModule) -> Block:
    """All of ``gm`` as one block: its placeholders in, its outputs out (a graph no cut splits)."""
    nodes = list(gm.graph.nodes)
    is_param = {n: n.op == "get_attr" and isinstance(fetch_attr(gm, n.target), nn.Parameter) for n in nodes}
    block = _block(gm, 0, nodes, {n: i for i, n in enumerate(nodes)}, is_param)
    block.outputs = [n.name for n in nodes[-1].all_input_nodes]  # the output node's values, in order
    return block


def needed_after(blocks: list[Block]) -> list[set[str]]:
    """``out[k]``: the boundary values some block after ``k`` reads."""
    out: list[set[str]] = [set() for _ in blocks]
    later: set[str] = set()
    for k in range(len(blocks) - 1, -1, -1):
        out[k] = set(later)
        later |= set(blocks[k].inputs)
    return out


def block_args(block: Block, values: dict[str, Any], device: torch.device | None = None) -> tuple:
    """The arguments of ``block``'s module from one batch's boundary values (tensors moved to ``device``)."""
    return tuple(values[n].to(device) if device is not None and isinstance(values[n], torch.Tensor) else values[n]
                 for n in block.inputs)


def after_block(block: Block, values: dict[str, Any], outputs: tuple, keep: set[str]) -> dict[str, Any]:
    """One batch's boundary values after ``block``: the ones before it in ``keep`` (later blocks read
    them) and its ``outputs``."""
    return {**{k: v for k, v in values.items() if k in keep}, **dict(zip(block.outputs, outputs))}


def _on_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.device) and x.type == "meta":
        return device
    if isinstance(x, (list, tuple)):
        return type(x)(_on_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _on_device(v, device) for k, v in x.items()}
    return x


def _size_source(size: Any, tensors: list[fx.Node]) -> tuple[fx.Node, int] | None:
    """``(tensor input, dim)`` whose traced size is the symbolic size ``size``, or None (a static
    size, or one no tensor input has)."""
    if not isinstance(size, torch.SymInt):
        return None
    for node in tensors:
        for dim, d in enumerate(node.meta["val"].shape):
            if isinstance(d, torch.SymInt) and str(d) == str(size):
                return node, dim
    return None


def _read_sizes_from_tensors(g: fx.Graph, inputs: dict[fx.Node, fx.Node]) -> None:
    """Point ``inputs`` (source node -> block placeholder) that are symbolic sizes crossing into
    the block (the batch size, the sequence length) at the size of a tensor input that has it,
    read in the block. The placeholder stays, unread: the block computes its sizes from its
    tensors, as the whole graph does from its token ids, so it runs on any number of rows of them
    -- the search's loss sample, which may end inside a calibration batch, included."""
    tensors = [ph for ph in inputs.values() if isinstance(ph.meta.get("val"), torch.Tensor)]
    for src, ph in list(inputs.items()):
        found = _size_source(ph.meta.get("val"), tensors)
        if found is not None:
            size = g.call_function(torch.ops.aten.sym_size.int, found)
            size.meta = dict(ph.meta)
            inputs[src] = size


def block_module(gm: fx.GraphModule, block: Block, device: torch.device | str = "cpu") -> fx.GraphModule:
    """``block`` as a standalone GraphModule: ``(*values of block.inputs) -> tuple(values of block.outputs)``.

    Its parameters are ``gm``'s tensors under the same FQNs (shared, not copied). A graph captured
    on the ``meta`` device creates its tensors (positions, masks) there: those ops create them on
    ``device`` instead. A symbolic size among the inputs is read from a tensor input that has it
    (:func:`_read_sizes_from_tensors`).
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name in block.inputs:
        src = by_name[name]
        ph = g.placeholder(name)
        ph.meta = dict(src.meta)
        env[src] = ph
    _read_sizes_from_tensors(g, env)
    for target in [*block.params, *block.buffers]:
        src = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)
        env[src] = g.get_attr(target)
        env[src].meta = dict(src.meta)
    for name in block.nodes:
        src = by_name[name]
        if src.op == "output":
            continue
        env[src] = g.node_copy(src, env.__getitem__)
        env[src].args = _on_device(env[src].args, torch.device(device))
        env[src].kwargs = _on_device(env[src].kwargs, torch.device(device))
    g.output(tuple(env[by_name[n]] for n in block.outputs))
    out = fx.GraphModule(gm, g)
    out.meta.update(getattr(gm, "meta", {}))
    return out
