"""What ``prepare`` returns: the observed private copy of the graph and what discovery found."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from awqfx.groups import Discovery, ScaleGroup
from awqfx.passes.observers import MeanAbsObserver, SampleObserver

__all__ = ["ObservedGraph", "searched_groups"]


@dataclass
class ObservedGraph:
    """What ``prepare`` returns: a private copy of the graph with observers, and what discovery found.

    ``gm`` stays runnable (``input_ids -> logits``); calling it also feeds the observers, so a
    user may calibrate with their own loop instead of :func:`awqfx.calibrate`.
    ``groups``: the groups the search will scale (:func:`searched_groups`); ``dropped``: the
    unfoldable groups left unscaled because the config drops them (``drop_unfoldable``).
    ``linears``: every linear-like weight -> (its first linear node, that node's activation
    input node, in_dim); ``data_of``: every linear-like node -> its activation input node.
    """

    gm: fx.GraphModule
    discovery: Discovery
    config: Any
    groups: list[ScaleGroup]
    linears: dict[str, tuple[str, str, int]]
    data_of: dict[str, str]
    mean_observers: dict[str, MeanAbsObserver] = field(default_factory=dict)
    sample_observers: dict[str, SampleObserver] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=lambda: {"batches": 0, "sequences": 0, "tokens": 0})
    _calib_gm: fx.GraphModule | None = None
    dropped: list[ScaleGroup] = field(default_factory=list)

    def x_mean(self, node: str) -> torch.Tensor:
        """Per-channel ``mean |x|`` of activation node ``node`` over all calibration tokens."""
        return self.mean_observers[node].mean()

    def x_max(self, node: str) -> torch.Tensor:
        """Per-channel ``max |x|`` of activation node ``node`` over all calibration tokens."""
        return self.mean_observers[node].max()

    def loss_inputs(self) -> dict[str, Any]:
        """The recorded loss sample: graph input name -> first ``loss_samples`` rows."""
        return {name: obs.sample() for name, obs in self.sample_observers.items()}

    def unbatched_inputs(self) -> set[str]:
        """Graph inputs without a batch dim (the same value for every batch; see ``SampleObserver``)."""
        return {name for name, obs in self.sample_observers.items() if not obs.batched}


def searched_groups(discovery: Discovery, config: Any) -> tuple[list[ScaleGroup], list[ScaleGroup]]:
    """``(groups, dropped)``: the discovered groups the search scales (at least one consumer is
    quantized; the others keep s = 1) and those ``config.scales.drop_unfoldable`` leaves out (the
    ones that are not :attr:`~awqfx.groups.ScaleGroup.foldable`)."""
    groups = [g for g in discovery.groups if any(c.quantize for c in g.consumers)]
    scales = getattr(config, "scales", None)
    if scales is None or not scales.drop_unfoldable:
        return groups, []
    return [g for g in groups if g.foldable], [g for g in groups if not g.foldable]
