"""Cut a scale group's loss region out of the graph as a standalone GraphModule.

The region is the subgraph between the group's ``region_inputs`` and its ``region_output``
(discovery chooses them: the attention block for norm->qkv, the MLP for norm->gate/up, the
consumer itself for v->o and up->down). Every other value the region reads (rope cos/sin, masks,
sizes) becomes a leading placeholder, every parameter a trailing one, so the search can run it
with candidate weights: ``region.gm(*values_of(region.env_nodes), *params(region.attrs))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from awqfx.groups import ScaleGroup

__all__ = ["Region", "extract_region"]


@dataclass
class Region:
    """A group's loss region as a standalone module: ``gm(*values_of(env_nodes), *params(attrs))``."""

    gm: fx.GraphModule
    env_nodes: list[fx.Node]  # nodes of the working graph whose values feed the first placeholders
    attrs: list[str]  # get_attr targets feeding the remaining placeholders
    size: int  # number of compute nodes


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen = {node}
    stack = [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def extract_region(gm: fx.GraphModule, group: ScaleGroup) -> Region:
    """Cut the loss region of ``group`` out of ``gm`` (nodes between its region inputs and output)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    try:
        inputs = [by_name[n] for n in group.region_inputs]
        out = by_name[group.region_output]
    except KeyError as e:
        raise RuntimeError(f"group {group.name}: region node {e} is not in the graph") from e
    anc = _ancestors(out)
    region: set[fx.Node] = set()
    stack = list(inputs)
    while stack:
        for u in stack.pop().users:
            if u in anc and u not in region and u not in inputs:
                region.add(u)
                stack.append(u)
    if out not in region:
        raise RuntimeError(f"group {group.name}: region output {out.name} does not depend on its inputs")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    const: dict[fx.Node, bool] = {}

    def is_const(n: fx.Node) -> bool:  # computed from parameters/constants only: copy into the region
        if n in const:
            return const[n]
        todo = [n]
        while todo:
            x = todo[-1]
            if x in const:
                todo.pop()
                continue
            if x.op == "get_attr":
                const[x] = True
                todo.pop()
                continue
            if x.op not in ("call_function", "call_method"):
                const[x] = False
                todo.pop()
                continue
            pending = [a for a in x.all_input_nodes if a not in const]
            if pending:
                todo.extend(pending)
                continue
            const[x] = all(const[a] for a in x.all_input_nodes)
            todo.pop()
        return const[n]

    copy_set = set(region)
    env_nodes: list[fx.Node] = list(inputs)
    attrs: list[str] = []
    stack = list(region)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in copy_set or a in inputs:
                continue
            if a.op == "get_attr":
                if a.target not in attrs:
                    attrs.append(a.target)
            elif is_const(a):
                copy_set.add(a)
                stack.append(a)
            elif a not in env_nodes:
                env_nodes.append(a)
    extras = sorted(env_nodes[len(inputs):], key=order.__getitem__)
    env_nodes = list(inputs) + extras
    attrs.sort()
    g = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(env_nodes):
        ph = g.placeholder(f"in_{i}_{n.name}")
        ph.meta = dict(n.meta)
        mapping[n] = ph
    attr_ph: dict[str, fx.Node] = {}
    for i, t in enumerate(attrs):
        attr_ph[t] = g.placeholder(f"p_{i}_" + t.replace(".", "_"))
    for n in sorted(copy_set, key=order.__getitem__):
        def lookup(a: fx.Node) -> fx.Node:
            if a.op == "get_attr":
                return attr_ph[a.target]
            return mapping[a]

        mapping[n] = g.node_copy(n, lookup)
    g.output(mapping[out])
    rgm = fx.GraphModule(gm, g)
    return Region(rgm, env_nodes, attrs, len(copy_set))
