"""The search's task order and the liveness of the replayed values.

Tasks: ``("scale", gi)`` in group order; ``("weight", name)`` (clip search, and in
``propagate="quant"`` mode the weight's quantization) right after the last group that scales the
weight's columns, or -- for weights no group scales -- before the first later group. For every
node of the working graph the schedule knows the last task that reads it (``last_use``), the
last task that may need it computed (``needed_until``) and the last task that changes a
parameter it depends on (``last_change``): :class:`awqfx.search.replay.Replay` frees a value
once none of these lie ahead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from awqfx.groups import ScaleGroup

__all__ = ["Schedule", "schedule_tasks"]


@dataclass
class Schedule:
    tasks: list[tuple[str, object]]
    last_change: dict[fx.Node, int] = field(default_factory=dict)
    last_use: dict[fx.Node, int] = field(default_factory=dict)
    needed_until: dict[fx.Node, int] = field(default_factory=dict)


def _order(work: fx.GraphModule, groups: list[ScaleGroup], weight_nodes: dict[str, fx.Node]) -> list[tuple[str, object]]:
    order = {n: i for i, n in enumerate(work.graph.nodes)}
    by_name = {n.name: n for n in work.graph.nodes}
    last_group: dict[str, int] = {}
    first_consumer = []
    for gi, g in enumerate(groups):
        for c in g.consumers:
            last_group[c.weight] = gi
        first_consumer.append(min(order[by_name[c.node]] for c in g.consumers))
    keyed: list[tuple[tuple, str, object]] = [((gi, 0, 0), "scale", gi) for gi in range(len(groups))]
    for w, node in weight_nodes.items():
        pos = order[node]
        if w in last_group:
            key = (last_group[w], 1, pos)
        else:
            k = next((gi for gi, fc in enumerate(first_consumer) if fc > pos), len(groups))
            key = (k, -1, pos)
        keyed.append((key, "weight", w))
    keyed.sort(key=lambda t: t[0])
    return [(kind, what) for _, kind, what in keyed]


def schedule_tasks(work: fx.GraphModule, groups: list[ScaleGroup], weight_nodes: dict[str, fx.Node],
                   requires: dict[tuple[str, object], list[fx.Node]],
                   changes: dict[tuple[str, object], set[str]]) -> Schedule:
    """Order the tasks and compute the liveness of every node.

    ``weight_nodes``: the weights that get a task -> their first linear node. ``requires[task]``:
    the nodes whose values the task reads; ``changes[task]``: the parameters/buffers it replaces.
    """
    sched = Schedule(_order(work, groups, weight_nodes))
    changed_at: dict[str, int] = {}
    for ti, task in enumerate(sched.tasks):
        for name in changes.get(task, ()):
            changed_at[name] = ti
    for n in work.graph.nodes:
        own = changed_at.get(n.target, -1) if n.op == "get_attr" else -1
        sched.last_change[n] = max([own] + [sched.last_change[a] for a in n.all_input_nodes])
    for ti in range(len(sched.tasks) - 1, -1, -1):  # backwards: the first visit is the last task
        reqs = requires.get(sched.tasks[ti], [])
        for r in reqs:
            sched.last_use.setdefault(r, ti)
        stack = [r for r in reqs if r not in sched.needed_until]
        while stack:
            n = stack.pop()
            if n in sched.needed_until:
                continue
            sched.needed_until[n] = ti
            stack.extend(a for a in n.all_input_nodes if a not in sched.needed_until)
    return sched
