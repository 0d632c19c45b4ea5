"""Block-output rounding: the ``--refine block`` step after the scale and clip searches.

Round to nearest, and GPTQ too, minimise each linear's own error. This step minimises the error
of a whole block's output (a decoder layer, as :func:`awqfx.passes.blocks.split_blocks` reads
it from the graph), as auto-round and OmniQuant do: for every quantized weight of the block it
learns

* a rounding offset per weight ``v`` in ``[-0.5, 0.5]``: ``q = clamp(round(w / s + v) + z)``;
* per (row, group) how far the max and the min sit from the clip centre, as shrink ratios of
  the group's own range in ``[min(0.5, start), 1]`` (:func:`awqfx.search.clip.clip_range`'s
  ``minmax`` form), starting at the ratios the clip search chose -- so a range may also widen
  back to the group's own,

by signed gradient descent (step ``lr`` = 1 / iters by default, decaying linearly to 0; round
and the zero point's round pass gradients straight through) on the mean squared error between
the block's output with those weights, run on the *quantized* stream (the outputs of the blocks
before it, already rounded), and the float block's output on the float stream. The refine
sample (``Refine.samples`` calibration sequences, the search's loss sample first) is cut into
mini-batches of ``Refine.batch`` sequences taken in turn. The kept state is the one with the
lowest loss relative to its mini-batch's starting loss; if on the whole refine sample it is not
better than where it started (the searched grid rounded to nearest), the block keeps its start:
a block is never made worse on the data.

The result is plain plan data: the ranges as absolute ``max_val`` / ``min_val`` and the integer
codes, exactly what :func:`awqfx.quant.quantize_weight` (``codes=``) dequantizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.func import functional_call
from tqdm.auto import tqdm

from awqfx.config import Refine
from awqfx.groups import ScaleGroup
from awqfx.params import fake_quantize_param, from_rows, get_param, rows_view
from awqfx.passes.blocks import (
    Block,
    BlockSplitError,
    after_block,
    block_args,
    block_module,
    needed_after,
    split_blocks,
    whole_block,
)
from awqfx.plan import WeightPlan
from awqfx.quant import SCALE_EPS, QuantSpec, compute_qparams, group_bounds
from awqfx.search.clip import clip_centre, group_minmax, shrink_toward

__all__ = ["blocks_to_refine", "refine_blocks"]

MIN_RATIO = 0.5  # the narrowest range a group may learn, as a share of its own (the clip search's default limit)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


@dataclass
class _Rounding:
    """One weight's learnable rounding: offsets ``v`` [R, in] and range ratios ``a`` (max), ``b``
    (min) [R, G] around the fixed float weight ``w`` [R, in] (rows view)."""

    name: str
    in_dim: int
    spec: QuantSpec
    dtype: torch.dtype  # the parameter's
    w: torch.Tensor
    mx: torch.Tensor
    mn: torch.Tensor
    centre: torch.Tensor
    col: torch.Tensor  # [in] -> group index
    v: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    a_min: torch.Tensor
    b_min: torch.Tensor
    a_start: torch.Tensor
    b_start: torch.Tensor

    @classmethod
    def of(cls, name: str, param: torch.Tensor, wp: WeightPlan) -> "_Rounding":
        spec = wp.spec
        w = rows_view(param.detach(), wp.in_dim).float()
        gs = spec.effective_group_size(w.shape[-1])
        mx, mn = group_minmax(w, gs)
        c = clip_centre(mx, mn)
        a = _ratio(wp.max_val, mx, c)
        b = _ratio(wp.min_val, mn, c)
        col = torch.empty(w.shape[-1], dtype=torch.long, device=w.device)
        for gi, (lo, hi) in enumerate(group_bounds(w.shape[-1], spec.group_size)):
            col[lo:hi] = gi
        return cls(name, wp.in_dim, spec, param.dtype, w, mx, mn, c, col, torch.zeros_like(w).requires_grad_(),
                   a.clone().requires_grad_(), b.clone().requires_grad_(), a.clamp(max=MIN_RATIO),
                   b.clamp(max=MIN_RATIO), a, b)

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.a, self.b]

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        return shrink_toward(self.mx, self.centre, self.a), shrink_toward(self.mn, self.centre, self.b)

    def fake(self) -> torch.Tensor:
        """The dequantized weight, differentiable in ``v``, ``a``, ``b`` (the parameter's shape)."""
        spec = self.spec
        hi, lo = self.ranges()
        qmax = float(spec.qmax)
        if spec.symmetric:  # as compute_qparams: the zero is fixed
            s = torch.maximum(hi.abs(), lo.abs()).clamp(min=SCALE_EPS) / float((1 << (spec.bits - 1)) - 1)
            z = torch.full_like(s, float(1 << (spec.bits - 1)))
        else:
            s = (hi - lo).clamp(min=SCALE_EPS) / qmax
            z = torch.clamp(-_round_ste(lo / s), 0.0, qmax)
        s, z = s[:, self.col], z[:, self.col]
        q = torch.clamp(_round_ste(self.w / s + self.v) + z, 0.0, qmax)
        return from_rows((q - z) * s, self.in_dim).to(self.dtype)

    def step(self, lr: float) -> None:
        with torch.no_grad():
            for p, lo, hi in ((self.v, -0.5, 0.5), (self.a, self.a_min, 1.0), (self.b, self.b_min, 1.0)):
                if p.grad is not None:
                    p -= lr * p.grad.sign()
                    p.copy_(p.clamp(min=lo).clamp(max=hi))
                    p.grad = None

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params()]

    def reset(self) -> None:
        """Back to the start: the searched grid, rounded to nearest."""
        self.load([torch.zeros_like(self.v), self.a_start, self.b_start])

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params(), state):
                p.copy_(s)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes uint8 [R, in], max_val, min_val [R, G])``: the learnt state as plan data, the codes
        on exactly the grid ``compute_qparams`` derives from those ranges."""
        with torch.no_grad():
            hi, lo = (t.detach().float() for t in self.ranges())
            s, z = compute_qparams(self.w, self.spec, hi, lo)
            s, z = s[:, self.col], z.float()[:, self.col]
            q = torch.clamp(torch.round(self.w / s + self.v) + z, 0.0, float(self.spec.qmax))
        return q.to(torch.uint8).cpu(), hi.cpu(), lo.cpu()


def _ratio(bound: torch.Tensor | None, own: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The shrink ratio that puts a group's ``own`` bound at ``bound`` (None: 1); 1 where the bound
    is the centre itself (a one-signed group's zero side)."""
    if bound is None:
        return torch.ones_like(own)
    span = own - centre
    safe = torch.where(span == 0, torch.ones_like(span), span)
    return torch.where(span == 0, torch.ones_like(own), (bound.to(own) - centre) / safe).clamp(0.0, 1.0)


def blocks_to_refine(gm: fx.GraphModule, groups: list[ScaleGroup]) -> list[Block]:
    """The blocks the refine trains one at a time: the graph's decoder layers, or the whole graph
    as one block when it does not split (block-by-block mode hands the search one block)."""
    try:
        return split_blocks(gm, groups)
    except BlockSplitError:
        return [whole_block(gm)]


def _reached(bgm: fx.GraphModule, names: set[str]) -> list[bool]:
    """Which of the block's outputs depend on the parameters ``names``."""
    hit = {n for n in bgm.graph.nodes if n.op == "get_attr" and n.target in names}
    for n in bgm.graph.nodes:
        if n not in hit and any(a in hit for a in n.all_input_nodes):
            hit.add(n)
    out = next(n for n in bgm.graph.nodes if n.op == "output")
    return [isinstance(o, fx.Node) and o in hit for o in out.args[0]]


def _mse(outs: tuple, refs: tuple, reached: list[bool]) -> torch.Tensor:
    """Sum over the outputs the rounding reaches of their mean squared error."""
    errs = [torch.nn.functional.mse_loss(o.float(), r.float()) for o, r, hit in zip(outs, refs, reached) if hit]
    if not errs:
        raise RuntimeError("no block output depends on the weights being rounded")
    return torch.stack(errs).sum()


def _train(bgm: fx.GraphModule, block: Block, rounds: list[_Rounding], q_in: list[dict], refs: list[tuple],
           refine: Refine) -> dict[str, Any]:
    """Learn ``rounds`` on the block; returns the block's losses (the module doc)."""
    reached = _reached(bgm, {r.name for r in rounds})

    def loss_on(c: int, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            subs = {r.name: r.fake() for r in rounds}
            return _mse(functional_call(bgm, subs, block_args(block, q_in[c])), refs[c], reached)

    def total() -> float:
        return sum(float(loss_on(c, False)) for c in range(len(q_in))) / len(q_in)

    start = [loss_on(c, False).item() for c in range(len(q_in))]
    start_total = sum(start) / len(start)
    best, best_state = math.inf, None
    lr0 = refine.lr if refine.lr is not None else 1.0 / refine.iters
    for it in range(refine.iters):
        c = it % len(q_in)
        loss = loss_on(c, True)
        rel = loss.item() / max(start[c], 1e-30)
        if rel < best:
            best, best_state = rel, [r.state() for r in rounds]
        loss.backward()
        lr = lr0 * (1.0 - it / refine.iters)
        for r in rounds:
            r.step(lr)
    if best_state is not None:
        for r, state in zip(rounds, best_state):
            r.load(state)
    final = total()
    kept = final < start_total
    if not kept:
        for r in rounds:
            r.reset()
    return {"block": block.owner or str(block.index), "weights": len(rounds), "loss_start": start_total,
            "loss_final": final, "kept": kept}


def refine_blocks(gm: fx.GraphModule, groups: list[ScaleGroup], weights: dict[str, WeightPlan], names: set[str],
                  chunks: list[dict[str, Any]], refine: Refine, progress: bool = True,
                  quant_chunks: list[dict[str, Any]] | None = None, tokens: int = 0) -> list[dict[str, Any]]:
    """Learn the rounding of the weights ``names`` block by block (module doc) and write it into
    their plans (``max_val``, ``min_val``, ``codes``; a block left at its start keeps its plans);
    returns one loss record per block trained.

    ``gm``: the folded float graph (the search's result, no observers); ``chunks``: the refine
    sample as graph inputs, one dict per mini-batch, on the graph's device; ``quant_chunks``: the
    same rows as the quantized model feeds ``gm`` (a block of block-by-block mode, after the
    blocks before it were quantized), None: the same as ``chunks``; ``tokens``: how many tokens
    the refine sample holds (recorded in each weight's info)."""
    blocks = blocks_to_refine(gm, groups)
    active = [b.index for b in blocks if any(w in names for w in b.params)]
    if not active:
        return []
    keep_after = needed_after(blocks)
    device = next((v.device for v in chunks[0].values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    fp_vals = [dict(c) for c in chunks]
    q_vals = None if quant_chunks is None else [dict(c) for c in quant_chunks]  # None: the float stream
    records = []
    bar = tqdm(blocks[: active[-1] + 1], desc="block rounding", unit="block", disable=not progress)
    for block in bar:
        bgm = block_module(gm, block, device)
        for p in bgm.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            refs = [tuple(bgm(*block_args(block, v))) for v in fp_vals]
        todo = [w for w in block.params if w in names]
        q_out = refs
        if todo:
            rounds = [_Rounding.of(w, get_param(gm, w), weights[w]) for w in todo]
            rec = _train(bgm, block, rounds, q_vals or fp_vals, refs, refine)
            records.append(rec)
            bar.set_postfix(loss=f"{rec['loss_final'] / max(rec['loss_start'], 1e-30):.3f}")
            for r in rounds:
                wp = weights[r.name]
                if rec["kept"]:
                    wp.codes, wp.max_val, wp.min_val = r.result()
                wp.info.update(refine="block", refine_tokens=tokens, block_loss=[rec["loss_start"], rec["loss_final"]],
                               block_kept=rec["kept"])
            final = {w: fake_quantize_param(get_param(gm, w), weights[w].in_dim, weights[w].spec, weights[w].max_val,
                                            weights[w].min_val, weights[w].codes) for w in todo}
            with torch.no_grad():
                q_out = [tuple(functional_call(bgm, final, block_args(block, v))) for v in q_vals or fp_vals]
        elif q_vals is not None:
            with torch.no_grad():
                q_out = [tuple(bgm(*block_args(block, v))) for v in q_vals]
        keep = keep_after[block.index]
        if q_vals is not None or todo:
            q_vals = [after_block(block, v, o, keep) for v, o in zip(q_vals or fp_vals, q_out)]
        fp_vals = [after_block(block, v, o, keep) for v, o in zip(fp_vals, refs)]
        del bgm, refs, q_out
    bar.close()
    return records
