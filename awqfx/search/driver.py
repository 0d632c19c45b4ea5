"""The AWQ search driver: per-group scales on region losses, then per-(row, group) clip ranges.

One loop over the scheduled tasks (:mod:`awqfx.search.schedule`) on a private working copy of
the graph: a scale task searches one group's scale (:mod:`awqfx.search.scales`), checks it on
the guard's held-back sequences when ``guard_samples`` asks for them (replayed beside the loss
sample, never searched on) and folds the best into the working copy; a weight task searches a weight's clip ranges
(:mod:`awqfx.search.clip`), rounds it by GPTQ on that grid when the config refines
(:mod:`awqfx.search.gptq`, against the Gram of every loss-sample token the linear reads) and,
with ``propagate="quant"``, quantizes it there. The loss sample
is replayed through the working copy on demand (:mod:`awqfx.search.replay`). With ``--refine
block`` the rounding of every weight is then learnt block by block on the folded graph
(:mod:`awqfx.search.block_rounding`). The result is an :class:`~awqfx.plan.AWQPlan`; neither the
observed graph nor the caller's model is modified.

Weight-activation mode (``AWQConfig.activations``): the working copy has an activation quantizer
before every quantized linear (:mod:`awqfx.passes.act_quantizers`). The replay runs them off
with ``propagate="fp"`` (each group sees float outputs of earlier groups) and on with
``"quant"``; a region's float reference runs them off, its candidates on (a candidate's scale
divides the consumers' activations before they are quantized); the clip search scores ``Q(x)
Q(w)`` against ``x w``. A config with SmoothQuant's scales (``AWQConfig.smoothquant``) computes
them without a search (:mod:`awqfx.search.smoothquant`).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

import awqfx
from awqfx import distributed
from awqfx.act_quant import fake_quantize_activation
from awqfx.config import AWQConfig
from awqfx.graph import fetch_attr, float_dtype, shallow_copy
from awqfx.groups import ScaleGroup
from awqfx.memory import release_memory
from awqfx.observed import ObservedGraph
from awqfx.params import fake_quantize_param, get_param, move_to, release_parameters, rows_view, set_param
from awqfx.passes.act_quantizers import act_quantizers, float_input, insert_act_quantizers
from awqfx.passes.dtype_asserts import drop_dtype_asserts
from awqfx.passes.fold import fold_scales
from awqfx.passes.input_scales import insert_input_scales
from awqfx.passes.observers import remove_observers
from awqfx.passes.region import extract_region
from awqfx.plan import AWQPlan, GroupPlan, WeightPlan
from awqfx.search.block_rounding import refine_blocks
from awqfx.search.clip import absolute_clip, input_gram, search_clip
from awqfx.search.gptq import gptq_codes
from awqfx.search.replay import Replay, chunk_sample, held_sample, loss_sample
from awqfx.search.scales import search_group
from awqfx.search.schedule import schedule_tasks
from awqfx.search.smoothquant import smoothquant_plan

__all__ = ["search", "rtn_plan", "group_losses", "gap_recovered"]


def weight_plans(observed: ObservedGraph, cfg: AWQConfig) -> dict[str, WeightPlan]:
    """A :class:`WeightPlan` (spec, input dim, activation spec) for every quantizable weight, validated
    against its shape."""
    spec = cfg.spec
    out = {}
    for w in observed.discovery.quantizable:
        if w not in observed.linears:
            continue
        in_dim = observed.linears[w][2]
        spec.validate(get_param(observed.gm, w).shape[in_dim])
        out[w] = WeightPlan(spec, in_dim, act=cfg.activations)
    return out


def rtn_plan(observed: ObservedGraph, cfg: AWQConfig | None = None) -> AWQPlan:
    """Round-to-nearest: every quantizable weight with the spec, no scales, no clip."""
    cfg = cfg or observed.config
    return AWQPlan([], weight_plans(observed, cfg), cfg.to_dict(),
                   {"awqfx_version": awqfx.__version__, "method": "rtn", "timings": dict(observed.timings)})


def _working_copy(observed: ObservedGraph, groups: list[ScaleGroup], device,
                  weights: dict[str, WeightPlan]) -> tuple[fx.GraphModule, dict[str, str]]:
    """The search's private graph: no observers, no dtype asserts (they fail under autocast), on
    ``device``, with a unit input scale before every consumer of an activation group (folding
    then only replaces buffers: the replayed graph never changes shape) and an activation
    quantizer before every linear of a weight whose plan quantizes activations."""
    work = shallow_copy(observed.gm)
    remove_observers(work)
    drop_dtype_asserts(work)
    move_to(work, device)
    ones = {c.weight: torch.ones(c.columns.numel()) for g in groups if g.producer.kind == "activation"
            for c in g.consumers}
    input_attrs = insert_input_scales(work, ones) if ones else {}
    acts = {w: wp.act for w, wp in weights.items() if wp.act is not None}
    if acts:
        insert_act_quantizers(work, acts)
    return work, input_attrs


def _give_weights(observed: ObservedGraph) -> None:
    """Leave the observed graph's parameters to the working copy: meta tensors of the same shape there."""
    for gm in (observed.gm, observed._calib_gm):
        if gm is not None:
            release_parameters(gm)
    observed._calib_gm = None


def _changed_by_fold(g: ScaleGroup, input_attrs: dict[str, str]) -> set[str]:
    names = {c.weight for c in g.consumers} | {p for p in (g.producer.weight, g.producer.bias) if p}
    if g.producer.kind == "activation":
        names |= {input_attrs[c.weight] for c in g.consumers}
    return names


def _check_calibrated(observed: ObservedGraph) -> None:
    empty = [n for n, o in observed.mean_observers.items() if o.count == 0]
    if empty or (observed.sample_observers and all(o.rows == 0 and o.value is None for o in observed.sample_observers.values())):
        raise RuntimeError("the observed graph has no calibration statistics: run awqfx.api.calibrate(observed, calib) "
                           "before search" + (f" (no data at {empty[:3]})" if empty else ""))


def _share_clips(ratio_of: dict[str, torch.Tensor], clip_tokens: dict[str, int],
                 codes_of: dict[str, torch.Tensor]) -> None:
    """Every rank's clip ratios and refined codes (each searched a share of the weights) on every
    rank, in place."""
    for ratios, tokens, codes in distributed.all_gather((ratio_of, clip_tokens, codes_of), what="the clip search"):
        ratio_of.update(ratios)
        clip_tokens.update(tokens)
        codes_of.update(codes)


def search(observed: ObservedGraph, config: AWQConfig | None = None, progress: bool = True,
           take_weights: bool = False, quant_inputs: dict[str, Any] | None = None) -> AWQPlan:
    """Find the AWQ scales and clip ranges for a calibrated :class:`ObservedGraph`; returns the plan.

    ``config`` defaults to the one given to ``prepare``; a different one may be passed to try
    another search on the same calibration (quantizer, grid, forms, clip, propagation).
    Neither the observed graph nor the caller's model is modified, except with ``take_weights``:
    the search's working copy then takes the observed graph's parameters (there they become meta
    tensors), so each folded weight replaces its float original instead of adding a copy -- for a
    caller that holds no other reference to them and needs neither again (block-by-block mode).
    With ``propagate="quant"`` the observed graph keeps them: its final fold starts from them.
    ``quant_inputs`` (``--refine block``): the refine sample's graph inputs (the first
    ``refine_samples`` recorded rows) as the quantized model computes them (block-by-block mode:
    the quantized stream at the block's boundary; same keys and rows); None: the recorded ones.
    """
    cfg = config or observed.config
    if not cfg.needs_calibration:
        return rtn_plan(observed, cfg)
    _check_calibrated(observed)
    t_start = time.perf_counter()
    spec = cfg.spec
    weights = weight_plans(observed, cfg)
    if cfg.smoothquant is not None:
        return smoothquant_plan(observed, cfg, weights)
    groups = [g for g in observed.groups if cfg.scales is not None
              and any(c.quantize and c.weight in weights for c in g.consumers)]
    device = torch.device(cfg.runtime.device or next(iter(observed.gm.parameters())).device)
    work, input_attrs = _working_copy(observed, groups, device, weights)
    quant_mode = cfg.scales is not None and cfg.scales.propagate == "quant"
    quantizers = act_quantizers(work)
    for q in quantizers.values():  # the replay: float activations upstream, or quantized ones with "quant"
        q.enabled = quant_mode
    if take_weights and not quant_mode:
        _give_weights(observed)
    by_name = {n.name: n for n in work.graph.nodes}
    lin_node = {w: by_name[observed.linears[w][0]] for w in weights}
    data_node = {w: float_input(work, n) for w, n in lin_node.items()}  # after the input scales

    clip = cfg.clip
    qk = set(observed.discovery.attention_qk) if clip is not None and clip.skip_qk else set()
    clip_set = set() if clip is None else {w for w in weights if w not in qk and get_param(work, w).dim() == 2}
    refined = set() if cfg.refine is None else {w for w in weights if get_param(work, w).dim() == 2}
    refine_set = refined if cfg.refine is not None and cfg.refine.method == "gptq" else set()  # rounded per linear
    searched = clip_set | refine_set  # weight tasks that read the linear's input
    task_weights = {w: lin_node[w] for w in weights if w in searched or quant_mode}
    regions = {gi: extract_region(work, g) for gi, g in enumerate(groups)}
    requires = {("scale", gi): list(r.env_nodes) for gi, r in regions.items()}
    requires.update({("weight", w): [data_node[w]] for w in task_weights if w in searched})
    changes = {("scale", gi): _changed_by_fold(g, input_attrs) for gi, g in enumerate(groups)}
    if quant_mode:
        changes.update({("weight", w): {w} for w in task_weights})
    sched = schedule_tasks(work, groups, task_weights, requires, changes)
    # distributed: the clip searches go round-robin to the ranks (docs/design.md "Distributed calibration")
    clip_turn = {w: i for i, w in enumerate(w for kind, w in sched.tasks if kind == "weight" and w in searched)}

    sample = loss_sample(observed, cfg.runtime.loss_samples)
    if quant_inputs is not None and set(quant_inputs) != set(sample):
        raise ValueError(f"quant_inputs must hold the graph inputs {sorted(sample)}, got {sorted(quant_inputs)}")
    chunks = chunk_sample(sample, cfg.runtime.batch_size, device, observed.unbatched_inputs())
    held = held_sample(observed, cfg.runtime.loss_samples, cfg.guard_samples)  # the guard's, after the loss sample
    held_chunks = [] if held is None else chunk_sample(held, cfg.runtime.batch_size, device, observed.unbatched_inputs())
    n_loss = len(chunks)  # the replay's envs: the loss sample's chunks, then the held-back ones
    stream = Replay(work, chunks + held_chunks, sched.needed_until, sched.last_change,
                    sched.last_use)
    scale_of: dict[int, torch.Tensor] = {}
    infos: dict[int, dict] = {}
    ratio_of: dict[str, torch.Tensor] = {}
    clip_tokens: dict[str, int] = {}
    codes_of: dict[str, torch.Tensor] = {}
    refine_tokens: dict[str, int] = {}
    t_scale = t_clip = 0.0
    bar = tqdm(sched.tasks, desc="awq search", unit="task", disable=not progress or not distributed.is_main())
    with torch.no_grad(), cfg.autocast("search", device, float_dtype(work)):
        for ti, (kind, what) in enumerate(bar):
            t0 = time.perf_counter()
            if kind == "scale":
                g, reg = groups[what], regions[what]
                stream.pinned = set(reg.env_nodes)
                stream.ensure(reg.env_nodes)
                params = {t: fetch_attr(work, t) for t in reg.attrs}
                scale_of[what], infos[what] = search_group(observed, work, reg, g, params, stream.envs[:n_loss], cfg,
                                                           device, quantizers, held_envs=stream.envs[n_loss:])
                if infos[what]["choice"] != "identity":
                    fold_scales(work, [g], [scale_of[what]])
                    stream.invalidate(_changed_by_fold(g, input_attrs))
                t_scale += time.perf_counter() - t0
            else:
                w, in_dim = what, weights[what].in_dim
                if w in searched and distributed.owns(clip_turn[w]):
                    stream.pinned = {data_node[w]}
                    values = stream.values(data_node[w])[:n_loss]
                    wr = rows_view(get_param(work, w).detach(), in_dim).float()
                    if w in clip_set:
                        x, xq = _clip_tokens(values, weights[w].act, clip.tokens)
                        ratio_of[w] = search_clip(wr, x, spec, clip.mode, clip.shrink_ratios(), clip.rounds,
                                                  xq=xq).cpu()
                        clip_tokens[w] = x.shape[0]
                        del x, xq
                    if w in refine_set:
                        hi, lo = (absolute_clip(wr, -1, spec, ratio_of[w], clip.mode) if w in ratio_of
                                  else (None, None))
                        gram, refine_tokens[w] = _input_gram(values, weights[w].act)
                        codes_of[w] = gptq_codes(wr, gram, spec, hi, lo, cfg.refine.damp, cfg.refine.act_order).cpu()
                        del gram
                    del values, wr
                if w in searched and quant_mode:  # the quantized weight feeds later tasks: every rank needs it now
                    ratio_of[w], clip_tokens[w], codes_of[w] = distributed.broadcast(
                        (ratio_of.get(w), clip_tokens.get(w), codes_of.get(w)), distributed.owner(clip_turn[w]),
                        what="the clip search")
                    for found in (ratio_of, clip_tokens, codes_of):
                        if found[w] is None:
                            del found[w]
                if quant_mode:
                    cur = get_param(work, w)
                    hi, lo = absolute_clip(cur, in_dim, spec, ratio_of[w], clip.mode) if w in ratio_of else (None, None)
                    set_param(work, w, fake_quantize_param(cur, in_dim, spec, hi, lo, codes_of.get(w)))
                    stream.invalidate({w})
                t_clip += time.perf_counter() - t0
            stream.done = ti
            stream.pinned = set()
            stream.sweep()
    bar.close()
    _share_clips(ratio_of, clip_tokens, codes_of)

    # Final folded float weights: the absolute clip ranges are taken on them.
    if quant_mode:  # the working copy holds quantized weights: fold a fresh copy
        final = shallow_copy(observed.gm)
        remove_observers(final)
        fold_scales(final, [groups[gi] for gi in sorted(scale_of)], [scale_of[gi] for gi in sorted(scale_of)])
    else:  # the working copy holds exactly the folded float weights (same fold math, same order)
        final = work
    for w, r in ratio_of.items():
        wp = weights[w]
        wp.max_val, wp.min_val = absolute_clip(get_param(final, w), wp.in_dim, spec, r, clip.mode)
        wp.info = {"clip": clip.mode, "mean_ratio": float(r.mean()), "clip_tokens": clip_tokens[w],
                   "clip_rounds": clip.rounds}
    for w, codes in codes_of.items():
        weights[w].codes = codes
        weights[w].info.update(refine=cfg.refine.method, refine_tokens=refine_tokens.get(w))
    block_records = []
    t_refine = time.perf_counter()
    if refined and not refine_set:  # --refine block: on the folded float graph, after every range is known
        with cfg.autocast("search", device, float_dtype(final)):
            unbatched = observed.unbatched_inputs()
            taught = loss_sample(observed, cfg.refine_samples, "refine_samples")
            block_records = refine_blocks(
                final, groups, weights, refined, chunk_sample(taught, cfg.refine.batch, device, unbatched), cfg.refine,
                progress=progress and distributed.is_main(),
                quant_chunks=None if quant_inputs is None else chunk_sample(quant_inputs, cfg.refine.batch, device,
                                                                            unbatched),
                tokens=max((v.shape[0] * v.shape[1] for k, v in taught.items()  # rows x sequence
                            if isinstance(v, torch.Tensor) and v.dim() >= 2 and k not in unbatched), default=0))
    t_refine = time.perf_counter() - t_refine
    replay_s, replayed = stream.seconds, stream.nodes_run
    del stream, regions, work, final
    release_memory()
    timings = dict(observed.timings)
    timings.update({"search_s": time.perf_counter() - t_start, "search_scale_s": t_scale, "search_clip_s": t_clip,
                    "search_replay_s": replay_s, "search_refine_blocks_s": t_refine})
    meta = {
        "awqfx_version": awqfx.__version__,
        "torch_version": torch.__version__,
        "method": "awq",
        "timings": timings,
        "calibration": dict(observed.calibration),
        "loss_sample": {k: list(v.shape) for k, v in sample.items() if isinstance(v, torch.Tensor)},
        "guard_sample": {} if held is None else {k: list(v.shape) for k, v in held.items() if isinstance(v, torch.Tensor)},
        "region_evaluations": sum(len(i["losses"]) for i in infos.values()),
        "replayed_nodes": replayed,
        "device": str(device),
        "groups_skipped": [g.name for g in observed.groups if g not in groups],
        "groups_dropped": [g.site for g in observed.dropped],
    }
    if block_records:
        meta["refine_blocks"] = block_records
    plan_groups = [GroupPlan(groups[gi], scale_of[gi].float().cpu(), infos[gi]) for gi in sorted(scale_of)]
    return AWQPlan(plan_groups, weights, cfg.to_dict(), meta)


def _clip_tokens(values: list[torch.Tensor], act, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n_tokens`` evenly spaced input tokens of a linear ``[T, in]`` from the replay's values, and
    the same tokens quantized as the linear reads them (``act``; None: weight-only), each chunk
    quantized on its own as the graph does (a per-tensor scale is one chunk's)."""
    def rows(vs: list[torch.Tensor]) -> torch.Tensor:
        flat = [v.reshape(-1, v.shape[-1]) for v in vs]
        x = torch.cat(flat, 0) if len(flat) > 1 else flat[0]
        return x[:: max(1, x.shape[0] // n_tokens)][:n_tokens]

    return rows(values), None if act is None else rows([fake_quantize_activation(v, act) for v in values])


def _input_gram(values: list[torch.Tensor], act) -> tuple[torch.Tensor, int]:
    """``(X^T X / T, T)`` over every token of the replayed inputs of a linear (float32), as the linear
    reads them (``act``: quantized; None: weight-only), chunk by chunk."""
    gram, tokens = None, 0
    with torch.autocast(values[0].device.type, enabled=False):
        for v in values:
            x = v.reshape(-1, v.shape[-1])
            if act is not None:
                x = fake_quantize_activation(x, act)
            part = input_gram(x) * x.shape[0]
            gram = part if gram is None else gram + part
            tokens += x.shape[0]
    return gram / tokens, tokens


def group_losses(plan: AWQPlan) -> list[tuple[str, float, float]]:
    """``[(group, awq loss, rtn loss)]`` as recorded by the search."""
    return [(g.name, float(g.info["loss"]), float(g.info["loss_identity"])) for g in plan.groups]


def gap_recovered(fp: float, rtn: float, awq: float) -> float:
    """Share of RTN's perplexity gap to fp that AWQ recovers: ``(rtn - awq) / (rtn - fp)``."""
    return (rtn - awq) / (rtn - fp) if rtn != fp else math.nan
