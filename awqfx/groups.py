"""The pivot objects of discovery: what may be scaled, by whom it is compensated, and why not.

A ``ScaleGroup`` is one AWQ equivalence transform ``Y = (X / s) (s W)``: the *producer* divides
its output channels by ``s`` (a norm weight, a linear's output rows, or an inserted ``mul`` node
after an activation) and every *consumer* multiplies the weight columns that read those channels.
Channel maps are explicit so that fused weights (phi3 ``qkv_proj``), GQA repeats and reshaped
heads need no special cases downstream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def _ranges(ids: list[int]) -> list[list[int]]:
    """Compress sorted ids into ``[start, end)`` ranges for display and JSON."""
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


@dataclass
class Producer:
    """Where the division by ``s`` happens.

    kind: ``norm`` (a per-channel weight vector multiplying a normalised input; ``offset`` is the
    constant added to it, 1.0 for Gemma's ``x * (1 + w)``), ``linear`` (output rows of a weight,
    ``out_dim`` says which dim of the parameter holds them), or ``activation`` (no parameter can
    absorb the scale, so a ``mul`` node is inserted after ``node``).
    """

    kind: str
    node: str
    num_channels: int
    weight: str | None = None
    bias: str | None = None
    out_dim: int = 0
    offset: float = 0.0
    path: str = ""

    @property
    def label(self) -> str:
        return self.weight or f"{self.node} (inserted scale)"


@dataclass
class Consumer:
    """A linear-like op that reads producer channels: ``weight`` columns along ``in_dim``.

    ``columns[j]`` is the producer channel read by column ``j`` of the weight (``-1``: a column
    fed by something else, left unscaled). GQA makes columns repeat channels; fused/sliced
    producers make some channels reach no column.
    """

    node: str
    weight: str
    in_dim: int
    columns: torch.Tensor
    quantize: bool = True
    path: str = ""


@dataclass
class ScaleGroup:
    producer: Producer
    consumers: list[Consumer]
    channels: torch.Tensor  # producer channel ids that are scaled (sorted)
    through: list[str] = field(default_factory=list)  # ops the channels passed through
    region_inputs: list[str] = field(default_factory=list)  # node names feeding the loss region
    region_output: str = ""  # node whose output the AWQ loss compares
    input_node: str = ""  # node whose output carries the producer channels (statistics site)

    @property
    def kind(self) -> str:
        return f"{self.producer.kind}->linear"

    @property
    def name(self) -> str:
        return self.producer.label

    @property
    def foldable(self) -> bool:
        """Whether parameters absorb the whole transform: every producer but an activation, whose
        ``1/s`` needs an inserted scale node (a ``mul`` in the graph, a pre-hook on the consumers)."""
        return self.producer.kind != "activation"

    @property
    def site(self) -> str:
        """The group as a user reads it: ``producer module -> consumer weights``."""
        return f"{self.producer.path or self.name} -> {', '.join(c.weight for c in self.consumers)}"

    def to_json(self) -> dict[str, Any]:
        ch = self.channels.tolist()
        return {
            "kind": self.kind,
            "producer": self.producer.label,
            "producer_kind": self.producer.kind,
            "producer_node": self.producer.node,
            "channels": _ranges(ch),
            "num_channels": len(ch),
            "producer_channels": self.producer.num_channels,
            "consumers": [c.weight for c in self.consumers],
            "consumer_maps": [
                {
                    "weight": c.weight,
                    "in_dim": c.in_dim,
                    "columns": int(c.columns.numel()),
                    "repeat": _repeat_factor(c.columns),
                    "quantize": c.quantize,
                }
                for c in self.consumers
            ],
            "through": self.through,
            "region": {"inputs": self.region_inputs, "output": self.region_output},
        }


def _repeat_factor(columns: torch.Tensor) -> int:
    used = columns[columns >= 0]
    if used.numel() == 0:
        return 0
    return int(used.numel() // torch.unique(used).numel())


@dataclass
class Rejection:
    """A candidate producer that cannot be scaled (or only partly), and the op that blocks it."""

    producer: str
    kind: str
    reason: str
    blocking_node: str
    blocking_op: str
    channels: torch.Tensor  # the blocked producer channels

    def to_json(self) -> dict[str, Any]:
        return {
            "producer": self.producer,
            "kind": self.kind,
            "reason": self.reason,
            "blocking_node": self.blocking_node,
            "blocking_op": self.blocking_op,
            "channels": _ranges(self.channels.tolist()),
        }


@dataclass
class Discovery:
    """What ``passes.discover`` found: the groups, the rejected candidates, and two weight lists.

    ``quantizable``: every linear-like weight the quantizer should touch (grouped or not; MoE
    routers and the LM head are left out by default). ``attention_qk``: weights whose outputs
    feed attention queries/keys (the clip search skips them, as the reference does).
    """

    groups: list[ScaleGroup]
    rejected: list[Rejection]
    attention_qk: list[str] = field(default_factory=list)
    quantizable: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"groups": [g.to_json() for g in self.groups], "rejected": [r.to_json() for r in self.rejected]}
