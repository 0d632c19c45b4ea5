"""The replay of the loss sample: node values of the working graph, computed on demand.

``prepare`` records ``loss_samples`` calibration sequences as *graph inputs* (token ids).
:class:`Replay` runs them through the search's private working copy of the graph node by node,
on demand: when a task needs a value, exactly the nodes it depends on are computed (with the
weights as they are *now*: earlier groups folded, and in ``propagate="quant"`` mode earlier
weights already fake-quantized); values are freed as soon as no later task can need them
(:mod:`awqfx.search.schedule`), and recomputed when a fold or a quantization changes a parameter
they depend on. Memory stays at about one block's activations.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from awqfx.graph import fetch_attr
from awqfx.observed import ObservedGraph

log = logging.getLogger(__name__)

__all__ = ["Replay", "loss_sample", "held_sample", "chunk_sample"]


def _rows(observed: ObservedGraph, start: int, stop: int) -> dict[str, Any]:
    """The recorded graph inputs, rows ``start:stop`` of the batched ones (the others whole)."""
    fixed = observed.unbatched_inputs()
    return {k: (v[start:stop] if isinstance(v, torch.Tensor) and v.dim() and k not in fixed else v)
            for k, v in observed.loss_inputs().items()}


def _n_rows(sample: dict[str, Any], fixed: set[str]) -> int | None:
    first = next((v for k, v in sample.items() if isinstance(v, torch.Tensor) and k not in fixed), None)
    return None if first is None else int(first.shape[0])


def loss_sample(observed: ObservedGraph, loss_samples: int, what: str = "loss_samples") -> dict[str, Any]:
    """The recorded graph inputs, first ``loss_samples`` rows; warns (naming the setting ``what``)
    when fewer were recorded."""
    sample = _rows(observed, 0, loss_samples)
    n_rows = _n_rows(sample, observed.unbatched_inputs())
    if n_rows is None:
        raise RuntimeError("no loss sample was recorded (the graph has no tensor inputs?)")
    if n_rows < loss_samples:
        recorded = observed.config.recorded_samples
        why = (f"prepare recorded only {recorded} (its config's loss_samples + guard_samples, or refine_samples); "
               f"pass the larger value to prepare" if recorded < loss_samples
               else f"calibration had only {n_rows} sequences")
        log.warning("search: %s=%d asked for, %d available: %s", what, loss_samples, n_rows, why)
    return sample


def held_sample(observed: ObservedGraph, loss_samples: int, held: int) -> dict[str, Any] | None:
    """The ``held`` recorded rows after the loss sample (the guard's, held back from the search),
    or None when ``held`` is 0; warns when fewer were recorded, None when none were."""
    if held <= 0:
        return None
    sample = _rows(observed, loss_samples, loss_samples + held)
    n_rows = _n_rows(sample, observed.unbatched_inputs()) or 0
    if n_rows < held:
        log.warning("search: guard_samples=%d asked for, %d recorded after the %d loss sequences (prepare records "
                    "loss_samples + guard_samples of its config; calibration may have had fewer)%s", held, n_rows,
                    loss_samples, ": no guard" if n_rows == 0 else "")
    return sample if n_rows > 0 else None


def chunk_sample(sample: dict[str, Any], batch_size: int, device: torch.device,
                 unbatched: set[str] = frozenset()) -> list[dict[str, Any]]:
    """The sample cut into batches of ``batch_size`` rows on ``device`` (one replay env each);
    the ``unbatched`` inputs go whole into every batch."""
    def cut(k: str, v: Any, r0: int) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        return (v if k in unbatched or not v.dim() else v[r0 : r0 + batch_size]).to(device)

    n_rows = next(v for k, v in sample.items() if isinstance(v, torch.Tensor) and k not in unbatched).shape[0]
    return [{k: cut(k, v, r0) for k, v in sample.items()} for r0 in range(0, n_rows, batch_size)]


class Replay:
    """Node values of the working graph on the loss sample (one env per chunk of sequences)."""

    def __init__(self, gm: fx.GraphModule, chunks: list[dict], needed_until: dict[fx.Node, int], lc: dict[fx.Node, int],
                 last_use: dict[fx.Node, int]):
        self.gm = gm
        self.chunks = chunks
        self.envs: list[dict[fx.Node, object]] = [{} for _ in chunks]
        self.computed: set[fx.Node] = set()
        # Computed, consumed by every user, freed, and final (nothing it depends on changes later):
        # never computed again, so it keeps none of its inputs alive.
        self.retired: set[fx.Node] = set()
        self.needed_until = needed_until  # node -> last task that may compute it
        self.lc = lc  # node -> last task that changes a parameter it depends on
        self.last_use = last_use  # node -> last task that reads it directly
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.done = -1
        self.pinned: set[fx.Node] = set()
        self.nodes_run = 0
        self.seconds = 0.0

    def _run(self, n: fx.Node, env: dict, inputs: dict):
        if n.op == "placeholder":
            if n.name not in inputs:
                raise RuntimeError(f"no recorded loss sample for graph input {n.name!r}")
            return inputs[n.name]
        if n.op == "get_attr":
            return fetch_attr(self.gm, n.target)
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        raise RuntimeError(f"cannot evaluate node {n.name} ({n.op})")

    def ensure(self, nodes: Iterable[fx.Node]) -> None:
        missing: set[fx.Node] = set()
        stack = [n for n in nodes if n not in self.computed]
        while stack:
            n = stack.pop()
            if n in missing or n in self.computed:
                continue
            missing.add(n)
            stack.extend(a for a in n.all_input_nodes if a not in self.computed and a not in missing)
        if not missing:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            for n in sorted(missing, key=self.order.__getitem__):
                for env, inputs in zip(self.envs, self.chunks):
                    env[n] = self._run(n, env, inputs)
                self.computed.add(n)
                self.nodes_run += 1
                for a in n.all_input_nodes:
                    self._maybe_free(a)
        self.seconds += time.perf_counter() - t0

    def values(self, n: fx.Node) -> list:
        self.ensure([n])
        return [env[n] for env in self.envs]

    def _maybe_free(self, a: fx.Node) -> None:
        if a in self.pinned or a not in self.computed or self.last_use.get(a, -1) > self.done:
            return
        for u in a.users:
            if self.needed_until.get(u, -1) > self.done and (
                    (u not in self.computed and u not in self.retired) or self.lc.get(u, -1) > self.done):
                return
        self._drop(a)
        if self.lc.get(a, -1) <= self.done:
            self.retired.add(a)

    def _drop(self, a: fx.Node) -> None:
        self.computed.discard(a)
        self.retired.discard(a)
        for env in self.envs:
            env.pop(a, None)

    def sweep(self) -> None:
        for a in list(self.computed):
            self._maybe_free(a)

    def invalidate(self, targets: set[str]) -> None:
        """Forget every value that depends on the parameters ``targets`` (they were replaced)."""
        if not targets:
            return
        start = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target in targets]
        seen = set(start)
        stack = list(start)
        while stack:
            n = stack.pop()
            self._drop(n)
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    stack.append(u)
