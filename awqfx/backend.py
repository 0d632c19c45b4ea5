"""awqfx as a ``torch.compile`` backend: discovery inside compile pipelines.

(To quantize inside a pipeline, run the pass on the exported graph and compile its output:
``torch.compile(apply_awq_pass(awqfx.capture(model), calib))``; dynamo's graphs take the
parameters as inputs, so folding scales into them belongs before compilation.)

Dynamo hands a backend a GraphModule whose parameters are placeholders and whose linears are
``torch._C._nn.linear``; each placeholder's FQN is read from the source dynamo records for it
(``awqfx.graph.dynamo_param``), and discovery reads the graph with the same rules as an exported
graph and finds the same groups.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from awqfx.graph import linear_op
from awqfx.groups import Discovery
from awqfx.passes.discover import discover

__all__ = ["AWQBackend", "backend"]


class AWQBackend:
    """A torch.compile backend that records the scale groups of every graph it is given.

    ``torch.compile(model, backend=awqfx.backend)`` runs the model unchanged and leaves the
    discovered groups in ``awqfx.backend.discoveries`` (one per compiled graph). With
    ``compiler`` set, the graph is then handed on to that backend (e.g. ``"inductor"``).
    """

    def __init__(self, compiler: str | Callable | None = None):
        self.compiler = compiler
        self.discoveries: list[Discovery] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        if any(linear_op(gm, n) is not None for n in gm.graph.nodes):  # graph breaks may leave linear-free pieces
            self.discoveries.append(discover(gm))
        if self.compiler is None:
            return gm.forward
        if isinstance(self.compiler, str):
            from torch._dynamo import lookup_backend  # loaded by the time dynamo calls a backend

            return lookup_backend(self.compiler)(gm, example_inputs)
        return self.compiler(gm, example_inputs)

    @property
    def last(self) -> Discovery:
        if not self.discoveries:
            raise RuntimeError("awqfx backend has not compiled any graph yet: call the compiled model first")
        return self.discoveries[-1]


backend = AWQBackend()
