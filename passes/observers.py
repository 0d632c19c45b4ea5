"""Observer modules and the pass that inserts them (``call_module`` nodes, like torch.ao's pt2e).

Two observers:

- :class:`MeanAbsObserver` after every consumer *input* node (the activation a group's
  linears multiply): per-channel ``mean |x|`` over **all** calibration tokens, accumulated in
  float64 (fp32 inputs), with a NaN/Inf check that names the node and the groups it serves, and
  per-channel ``max |x|`` (SmoothQuant's statistic).
- :class:`SampleObserver` after every (non-parameter) graph input: the first ``loss_samples``
  sequences, kept as the model's own inputs (token ids). The search replays them through the
  graph group by group (``awqfx.search.replay``), so every loss-region input, every extra tensor a region
  reads (rope cos/sin, masks, positions) and every clip-search input is recomputed exactly when it
  is needed and freed after: memory stays at one block's activations instead of all of them, and
  ``propagate="quant"`` sees quantized upstream weights without extra full passes.

Observer nodes have no users: the observed graph computes exactly what the captured one did.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.graph import linear_op, param_name
from awqfx.groups import ScaleGroup

__all__ = ["MeanAbsObserver", "SampleObserver", "NonFiniteActivationError", "is_observer", "insert_observers",
           "remove_observers"]


class NonFiniteActivationError(FloatingPointError, ValueError):
    """A calibration activation is NaN or infinite."""


class MeanAbsObserver(nn.Module):
    """Accumulates ``sum |x|`` and ``max |x|`` per last-dim channel, and the token count."""

    _is_impure = True  # keep through dead-code elimination (it has no users)

    def __init__(self, node: str, serves: list[str]):
        super().__init__()
        self.node = node
        self.serves = list(serves)
        self.sum: torch.Tensor | None = None
        self.amax: torch.Tensor | None = None  # float32 max |x| per channel
        self.count = 0
        self.batches = 0
        # per-batch sums, kept instead of added while one rank of a distributed run calibrates its
        # share of the batches (awqfx.calibrate adds every rank's in batch order afterwards)
        self.partials: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        xf = x.detach().reshape(-1, x.shape[-1]) if x.dim() else x.detach().reshape(1, 1)
        s = xf.abs().sum(0, dtype=torch.float64)
        if not bool(torch.isfinite(s).all()):
            bad = "NaN" if bool(torch.isnan(xf).any()) else "Inf"
            raise NonFiniteActivationError(
                f"{bad} activation at node {self.node!r} in calibration batch {self.batches} "
                f"(the input of the linears of {', '.join(self.serves)}). Check the model's weights and the "
                "calibration inputs; a float16 model may overflow (calibrate in float32)."
            )
        if self.partials is not None:
            self.partials.append(s)
        else:
            self.sum = s if self.sum is None else self.sum + s
        m = xf.abs().amax(0).float() if xf.shape[0] else None
        if m is not None:
            self.amax = m if self.amax is None else torch.maximum(self.amax, m)
        self.count += xf.shape[0]
        self.batches += 1
        return None

    def mean(self) -> torch.Tensor:
        if self.sum is None or self.count == 0:
            raise RuntimeError(f"observer at {self.node!r} has seen no data; run awqfx.api.calibrate first")
        return (self.sum / self.count).float().cpu()

    def max(self) -> torch.Tensor:
        if self.amax is None:
            raise RuntimeError(f"observer at {self.node!r} has seen no data; run awqfx.api.calibrate first")
        return self.amax.float().cpu()

    def extra_repr(self) -> str:
        return f"node={self.node!r}, tokens={self.count}"


class SampleObserver(nn.Module):
    """Keeps the first ``max_rows`` rows (dim 0, the batch) of a graph input, on the CPU.

    An input without a batch dim (``batched=False``: e.g. a block's rope cos/sin of shape
    ``[1, L, d]``, the same for every batch) keeps its first value, like a non-tensor input.
    """

    _is_impure = True

    def __init__(self, node: str, max_rows: int, batched: bool = True):
        super().__init__()
        self.node = node
        self.batched = batched
        self.max_rows = int(max_rows)
        self.chunks: list[torch.Tensor] = []
        self.rows = 0
        self.skipped = 0
        self.value = None  # non-tensor / 0-d inputs: the first value seen

    def forward(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or not self.batched:
            if self.value is None:
                self.value = x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x
            return None
        if self.rows >= self.max_rows:
            return None
        if self.chunks and tuple(x.shape[1:]) != tuple(self.chunks[0].shape[1:]):
            self.skipped += 1  # a different sequence length: keep the sample rectangular
            return None
        take = x.detach()[: self.max_rows - self.rows].to("cpu", copy=True)
        self.chunks.append(take)
        self.rows += take.shape[0]
        return None

    def sample(self):
        if self.chunks:
            return torch.cat(self.chunks, 0)
        return self.value

    def extra_repr(self) -> str:
        return f"node={self.node!r}, rows={self.rows}/{self.max_rows}"


def _same_size(a, b) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return int(a) == int(b)


def batched_inputs(gm: fx.GraphModule) -> set[str]:
    """Names of the graph inputs whose dim 0 is the batch: the traced dim 0 of the first input whose
    dim 0 is dynamic (else of the first tensor input); an input whose dim 0 differs (``[1, L, d]``
    rope tables crossing into a block) is the same for every batch. Without traced values, all."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and param_name(gm, n) is None]
    vals = {n.name: n.meta.get("val") for n in inputs}
    tensors = {k: v for k, v in vals.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not tensors or any(v is None for v in vals.values()):
        return {n.name for n in inputs}
    dynamic = [v.shape[0] for v in tensors.values() if isinstance(v.shape[0], torch.SymInt)]
    batch = dynamic[0] if dynamic else next(iter(tensors.values())).shape[0]
    return {k for k, v in tensors.items() if _same_size(v.shape[0], batch)}


def is_observer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    try:
        mod = gm.get_submodule(node.target)
    except AttributeError:
        return False
    return isinstance(mod, (MeanAbsObserver, SampleObserver))


def insert_observer(gm: fx.GraphModule, after: fx.Node, module: nn.Module, prefix: str) -> fx.Node:
    name = prefix
    k = 0
    while hasattr(gm, name):
        k += 1
        name = f"{prefix}_{k}"
    gm.add_module(name, module)
    anchor = after
    if after.op == "placeholder":  # keep placeholders contiguous at the top
        last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        anchor = last_ph
    with gm.graph.inserting_after(anchor):
        node = gm.graph.call_module(name, (after,))
    node.meta["awqfx_observer"] = True
    return node


def remove_observers(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop observer nodes and their modules, in place."""
    changed = False
    for n in list(gm.graph.nodes):
        if is_observer(gm, n):
            if n.users:
                n.replace_all_uses_with(n.args[0])
            target = n.target
            gm.graph.erase_node(n)
            if hasattr(gm, target):
                delattr(gm, target)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def insert_observers(gm: fx.GraphModule, groups: list[ScaleGroup],
                     loss_samples: int = 0) -> tuple[dict[str, MeanAbsObserver], dict[str, SampleObserver]]:
    """Insert a :class:`MeanAbsObserver` after each consumer input of ``groups`` and, when
    ``loss_samples`` > 0, a :class:`SampleObserver` after each non-parameter graph input, in place.
    Returns ``(mean observers by data node, sample observers by graph input)``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    serves: dict[str, list[str]] = {}
    for g in groups:
        for c in g.consumers:
            names = serves.setdefault(linear_op(gm, by_name[c.node]).data.name, [])
            if g.name not in names:
                names.append(g.name)
    means: dict[str, MeanAbsObserver] = {}
    samples: dict[str, SampleObserver] = {}
    for data, names in serves.items():
        means[data] = MeanAbsObserver(data, names)
        insert_observer(gm, by_name[data], means[data], "awqfx_obs_mean")
    if loss_samples > 0:
        batched = batched_inputs(gm)
        for n in [n for n in gm.graph.nodes if n.op == "placeholder"]:
            if param_name(gm, n) is None:
                samples[n.name] = SampleObserver(n.name, loss_samples, batched=n.name in batched)
                insert_observer(gm, n, samples[n.name], "awqfx_obs_sample")
    gm.recompile()
    return means, samples
