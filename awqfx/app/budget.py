"""Estimate a quantization run's peak memory before any work, and refuse what cannot fit.

The estimate is read from the captured graph: every node's traced shape is evaluated at the
run's batch and sequence length (the capture keeps them symbolic), so the largest
intermediate of one calibration batch -- attention scores at long sequences -- is known without
running anything. Parts, in bytes:

- ``runtime``: the interpreter, torch and transformers (a measured constant);
- ``weights``: whole-graph mode holds the model, the search's working copy and the packed copy
  (3x the weights); block-by-block mode one block at a time: 4x the largest quantized block
  (its weights, candidate weights, the packed block and the output copy), or twice the largest
  other block (embeddings: computed and written copies), whichever is larger;
- ``boundary``: block-by-block mode keeps every calibration batch's values at the largest block
  boundary (one batch with ``--offload-dir``);
- ``activations``: three times the largest node output of one calibration batch, plus one
  ``[batch, heads, L, L]`` float32 score tensor per attention op (its unfused worst case) -- or
  the same measure over the search's replay of ``loss_samples`` sequences (the loss sample and the guard's), if larger (the two
  are not held together). Block-by-block mode counts only the blocks it runs (not the head
  after the last quantized block);
- ``refine`` (``--refine block``): its float stream, quantized stream and float block outputs of
  ``refine_samples`` sequences at the largest block boundary.

Measured against it (``docs/results.md``): block by block, the TinyLlama-1.1B shape peaks at 65 %
of this estimate and the Llama-2-7B shape at 48 %.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import psutil
import torch
import torch.fx as fx

from awqfx.config import ConfigError
from awqfx.passes.blocks import Block

__all__ = ["MemoryEstimate", "estimate_memory", "available_memory", "check_fits", "RUNTIME_BYTES"]

RUNTIME_BYTES = 700 * 2**20
_ATTENTION = ("scaled_dot_product_attention",)


@dataclass
class MemoryEstimate:
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.parts.items() if v) + " GiB"


def _sizes(gm: fx.GraphModule) -> tuple[object, object] | None:
    """The batch and sequence-length symbols (or ints) of the graph's token input."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point():
            return v.shape[0], v.shape[1]
    return None


def _numel(shape, subs: dict) -> int:
    total = 1
    for d in shape:
        if isinstance(d, torch.SymInt):
            total *= int(d.node.expr.xreplace(subs))
        else:
            total *= int(d)
    return total


def _bytes(v, subs: dict) -> int:
    if isinstance(v, torch.Tensor):
        return _numel(v.shape, subs) * v.dtype.itemsize
    if isinstance(v, (list, tuple)):
        return sum(_bytes(x, subs) for x in v)
    return 0


def _subs(gm: fx.GraphModule, batch: int, seq_len: int) -> dict:
    sizes = _sizes(gm)
    subs = {}
    if sizes is not None:
        for sym, value in zip(sizes, (batch, seq_len)):
            if isinstance(sym, torch.SymInt):
                subs[sym.node.expr] = value
    return subs


def _activations(gm: fx.GraphModule, nodes: set[str] | None, batch: int, seq_len: int) -> int:
    """3x the largest node output plus the unfused attention scores, for one batch of ``batch`` rows."""
    subs = _subs(gm, batch, seq_len)
    largest = 0
    scores = 0
    for n in gm.graph.nodes:
        if nodes is not None and n.name not in nodes or n.op in ("get_attr", "placeholder", "output"):
            continue
        v = n.meta.get("val")
        largest = max(largest, _bytes(v, subs))
        if n.op == "call_function" and any(a in str(n.target) for a in _ATTENTION) and isinstance(v, torch.Tensor):
            q = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
            if isinstance(q, torch.Tensor) and q.dim() == 4:
                b, h, lq = (_numel([d], subs) for d in q.shape[:3])
                scores = max(scores, b * h * lq * lq * 4)
    return 3 * largest + scores


def _boundary(gm: fx.GraphModule, blocks: list[Block], batches: int, batch: int, seq_len: int) -> int:
    subs = _subs(gm, batch, seq_len)
    by_name = {n.name: n for n in gm.graph.nodes}
    per_batch = max((sum(_bytes(by_name[i].meta.get("val"), subs) for i in b.inputs) for b in blocks), default=0)
    return per_batch * batches


def estimate_memory(gm: fx.GraphModule, *, samples: int, seq_len: int, batch_size: int, loss_samples: int,
                    weight_bytes: int, blocks: list[Block] | None = None, block_bytes: list[int] | None = None,
                    outside_bytes: int = 0, offload: bool = False, refine_samples: int = 0,
                    refine_blocks: list[Block] | None = None) -> MemoryEstimate:
    """Peak memory of a run (see the module docstring). ``blocks``: the blocks the block-by-block
    mode runs; ``block_bytes``: the weight bytes of each quantized block; ``outside_bytes``: those
    of the largest block without a quantized weight (embeddings, head); ``refine_samples``: the
    sequences ``--refine block`` learns on, ``refine_blocks`` the blocks it cuts a whole graph into
    (block-by-block mode: ``blocks``)."""
    batches = -(-samples // batch_size)
    est = MemoryEstimate()
    est.parts["runtime"] = RUNTIME_BYTES
    if blocks is None:
        est.parts["weights"] = 3 * weight_bytes
        nodes = None
    else:
        est.parts["weights"] = max(4 * max(block_bytes or [0]), 2 * outside_bytes)
        est.parts["boundary"] = _boundary(gm, blocks, 1 if offload else batches, min(batch_size, samples), seq_len)
        nodes = {n for b in blocks for n in b.nodes}
    est.parts["activations"] = _activations(gm, nodes, min(batch_size, samples), seq_len)
    if loss_samples:
        est.parts["activations"] = max(est.parts["activations"],
                                       _activations(gm, nodes, min(loss_samples, samples), seq_len))
    refine_blocks = blocks if blocks is not None else refine_blocks
    if refine_samples and refine_blocks:
        est.parts["refine"] = 3 * _boundary(gm, refine_blocks, 1, min(refine_samples, samples), seq_len)
    return est


def available_memory(device: str | torch.device | None) -> tuple[int, str]:
    """Bytes this run may still use on ``device`` (CPU: available RAM plus what this process holds)."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {dev}"
    held = psutil.Process().memory_info().rss
    return int(psutil.virtual_memory().available + held), "available RAM"


def check_fits(est: MemoryEstimate, device: str | torch.device | None, hint: str) -> None:
    """Raise :class:`ConfigError` (the estimate, what is available, ``hint``) when ``est`` does not fit."""
    avail, where = available_memory(device)
    if est.total > avail:
        raise ConfigError(f"this run needs about {est.total / 2**30:.1f} GiB ({est.describe()}) but only "
                          f"{avail / 2**30:.1f} GiB is {where}; {hint}")
