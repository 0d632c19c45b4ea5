"""Block-by-block quantization of a checkpoint that need not fit in memory (docs/design.md, "Blocks").

The model is built and captured on the ``meta`` device (no weights), discovery runs on the whole
graph, and :func:`awqfx.passes.blocks.split_blocks` cuts it into its chain of blocks. Then, with
the calibration batches' values at the current block boundary kept in memory (or on disk):

1. read the block's tensors from the checkpoint's safetensors files, on the compute device;
2. ``prepare`` -> ``calibrate`` -> ``search`` on the block's own GraphModule (the same passes and
   search code as the whole-graph mode; the groups must be the ones whole-graph discovery found);
3. run the block on the boundary values to get the next boundary (float weights, or the
   fake-quantized block with ``propagate="quant"``);
4. fold and pack the block in the model's module tree, write its tensors to the output shards,
   and put its parameters back on ``meta``.

Peak memory is one block's weights and working copies, the boundary values, and the output
shard being filled; blocks after the last quantized one are read and written, never run.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import AutoConfig

import awqfx
from awqfx import distributed
from awqfx.api import calibrate, convert, prepare, search
from awqfx.apply import apply_plan
from awqfx.calibrate import sample_order
from awqfx.capture import capture
from awqfx.checkpoint import Checkpoint
from awqfx.config import AWQConfig, fast_half_matmul
from awqfx.formats import FormatError, format_modes, format_module, weights_mode
from awqfx.formats.common import (
    alias_groups, build_skeleton, checkpoint_dir, config_dict, dedupe_state, unquantized_linears, write_extras,
)
from awqfx.formats.shards import ShardWriter
from awqfx.graph import linear_table
from awqfx.groups import Discovery
from awqfx.memory import map_large_allocations, peak_rss_mb, release_memory
from awqfx.modules import QuantLinear
from awqfx.observed import ObservedGraph, searched_groups
from awqfx.packed_model import packed_modules, parent_map
from awqfx.params import get_param, release_parameters, set_param
from awqfx.passes.blocks import Block, BlockSplitError, after_block, block_args, block_module, needed_after, split_blocks
from awqfx.passes.discover import discover
from awqfx.plan import AWQPlan
from awqfx.targets import Targets, TargetError, apply_targets, check_equivalence, declared_groups, resolve_targets

log = logging.getLogger(__name__)

__all__ = ["SequentialModel", "BlockRecord", "open_sequential", "quantize_sequential", "compute_dtype_for",
           "held_batches"]

OUTPUT_SHARD_BYTES = 16 * 2**20  # a shard is written after the block that fills this much (blocks are never split
# across shards below the usual 2 GiB); kept small: what is buffered is held through the next block's search
#: Checkpoints from this size on serve large allocations from their own mappings
#: (:func:`~awqfx.memory.map_large_allocations`): on the TinyLlama shape (2.2 GB) that lowers the peak
#: by ~70 MB; on the 270 MB SmolLM2 it cost 20x the page faults of the whole-graph run and about twice
#: its CPU time (docs/results.md, "Real-size models"), where the peak is small anyway.
MAP_ALLOCATIONS_FROM_BYTES = 2**30


@dataclass
class BlockRecord:
    """What one block cost: its owner, parameter count and time per stage."""

    index: int
    owner: str
    params: int
    groups: int
    weights: int
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0  # the process's peak resident memory when the block was done


@dataclass
class SequentialModel:
    """A checkpoint opened for block-by-block work: the meta skeleton it is written from (in the
    output ``dtype``), the graph it is computed with (in ``compute_dtype``), discovery, blocks.
    ``targets``: what is quantized and scaled (:mod:`awqfx.targets`), decided on the whole graph;
    ``discovery`` has them applied and every block follows them."""

    path: Path
    checkpoint: Checkpoint
    skeleton: nn.Module
    gm: fx.GraphModule
    discovery: Discovery
    blocks: list[Block]
    dtype: torch.dtype
    compute_dtype: torch.dtype
    aliases: dict[str, list[str]]
    targets: Targets | None = None

    def observed_view(self, cfg: AWQConfig) -> ObservedGraph:
        """The whole graph as ``prepare`` would see it, without observers (for the format checks)."""
        linears, data_of = linear_table(self.gm)
        groups, dropped = searched_groups(self.discovery, cfg)
        return ObservedGraph(self.gm, self.discovery, cfg, groups, linears, data_of, dropped=dropped)

    def quantizes(self, block: Block) -> bool:
        """Whether ``block`` holds a weight to quantize."""
        return not set(self.discovery.quantizable).isdisjoint(block.params)

    def block_bytes(self, block: Block) -> int:
        """Bytes of the block's weights as computed (``compute_dtype``)."""
        return sum(get_param(self.gm, p).numel() * self.compute_dtype.itemsize for p in block.params)


def compute_dtype_for(dtype: torch.dtype, device: str | torch.device | None) -> torch.dtype:
    """``dtype`` where ``device`` multiplies it fast, else float32 (e.g. bf16 on an AVX2-only CPU,
    where torch's bf16 matmul is two orders of magnitude slower than float32)."""
    if dtype in (torch.bfloat16, torch.float16) and not fast_half_matmul(device or "cpu", dtype):
        return torch.float32
    return dtype


def open_sequential(path: str | os.PathLike, dtype: torch.dtype | None = None, quantize_head: bool = False,
                    device: str | torch.device | None = None, config: AWQConfig | None = None) -> SequentialModel:
    """Index ``path``'s safetensors, build and capture the model on ``meta``, discover and split it.

    ``dtype``: the output dtype of everything unquantized (default: the checkpoint's). Blocks are
    computed in that dtype where ``device`` has fast matmuls for it, else in float32, one block
    at a time (:func:`compute_dtype_for`). Raises :class:`~awqfx.checkpoint.CheckpointError` when
    tensors are missing or mis-shaped and :class:`~awqfx.passes.blocks.BlockSplitError` when the
    graph cannot be cut, before any work. ``config``: the config whose targets (ignore, only,
    extra_groups, exclude_groups) the blocks follow, resolved here (:class:`~awqfx.targets.TargetError`
    before any work); its declared groups are checked numerically when their block is quantized.
    """
    path = Path(path)
    ckpt = Checkpoint(path)
    if ckpt.nbytes() >= MAP_ALLOCATIONS_FROM_BYTES:
        map_large_allocations()  # from here on, freed block tensors leave the process instead of the heap
    dtype = dtype or ckpt.dtype() or torch.float32
    compute = compute_dtype_for(dtype, device)
    model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    skeleton = build_skeleton(model_config, dtype).eval()
    aliases = {n: names for names in alias_groups(skeleton) for n in names}
    expected = {}
    for name, p in skeleton.named_parameters():  # one name per tied group: any of its names will do
        names = aliases.get(name, [name])
        expected[next((n for n in names if n in ckpt.entries), name)] = tuple(p.shape)
    ckpt.check(expected)
    gm = capture(skeleton if compute == dtype else build_skeleton(model_config, compute).eval())
    disc = discover(gm, quantize_head=quantize_head)
    targets = resolve_targets(gm, disc, config or AWQConfig())
    disc = apply_targets(gm, disc, targets)
    blocks = split_blocks(gm, disc.groups)
    return SequentialModel(path, ckpt, skeleton, gm, disc, blocks, dtype, compute, aliases, targets)


# --------------------------------------------------------------------------------- boundary


class Boundary:
    """The values crossing the current block boundary, one dict per calibration batch, in memory
    or (with ``offload_dir``) one file per batch on disk. A batch given as None is not held here
    (another rank's, in a distributed run): it stays None at every boundary."""

    def __init__(self, batches: list[dict[str, Any] | None], offload_dir: Path | None = None):
        self.dir = offload_dir
        self.n = len(batches)
        self._mem: list[dict[str, Any] | None] = [None] * self.n
        self._absent = {i for i, values in enumerate(batches) if values is None}
        for i, values in enumerate(batches):
            if values is not None:
                self.put(i, values)

    def get(self, i: int) -> dict[str, Any] | None:
        if self.dir is None or i in self._absent:
            return self._mem[i]
        return torch.load(self.dir / f"batch-{i:06d}.pt", weights_only=True)

    def put(self, i: int, values: dict[str, Any]) -> None:
        if self.dir is None:
            self._mem[i] = values
            return
        torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in values.items()},
                   self.dir / f"batch-{i:06d}.pt")

    def args(self, names: list[str]) -> "BoundaryArgs":
        return BoundaryArgs(self, names)


@dataclass
class BoundaryArgs:
    """The calibration batches as a block's positional arguments (what ``calibrate`` iterates); a
    batch not held here is all None, which ``calibrate`` skips."""

    boundary: Boundary
    names: list[str]

    def __len__(self) -> int:
        return self.boundary.n

    def __iter__(self) -> Iterator[tuple]:
        for i in range(self.boundary.n):
            values = self.boundary.get(i)
            yield tuple(None if values is None else values[n] for n in self.names)


def held_batches(n: int, cfg: AWQConfig) -> set[int]:
    """The calibration batches this rank keeps at every boundary: its share of the calibration
    (:func:`awqfx.distributed.shard`, as ``calibrate`` splits them) and the first ones, which hold
    the loss sample (and the guard's held-back sequences) every rank records. All of them in one process."""
    if distributed.world_size() == 1:
        return set(range(n))
    sample = -(-cfg.recorded_samples // cfg.runtime.batch_size)
    return set(distributed.shard(n)) | set(range(min(n, sample)))


# --------------------------------------------------------------------------------- one block


def _sources(sm: SequentialModel, block: Block) -> dict[str, str]:
    """Each parameter of ``block`` -> the checkpoint name holding it (tied ones: any of their names)."""
    return {p: next(n for n in sm.aliases.get(p, [p]) if n in sm.checkpoint.entries) for p in block.params}


def _load_compute(sm: SequentialModel, block: Block, bgm: fx.GraphModule, device: torch.device) -> None:
    """Read ``block``'s parameters from the checkpoint into its graph, in the compute dtype."""
    names = _sources(sm, block)
    tensors = sm.checkpoint.load(set(names.values()), device=device, dtype=sm.compute_dtype)
    for p, src in names.items():
        owner, _, attr = p.rpartition(".")
        setattr(bgm.get_submodule(owner), attr, nn.Parameter(tensors[src], requires_grad=False))
    for b in block.buffers:
        value = get_param(bgm, b)
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise BlockSplitError(f"block {block.index} reads {b}, a buffer that is neither in the checkpoint nor "
                                  "computed by the model's constructor")
        if isinstance(value, torch.Tensor) and value.device != device:
            set_param(bgm, b, value.to(device))


def _load_output(sm: SequentialModel, block: Block, device: torch.device) -> None:
    """Read ``block``'s parameters into the skeleton it is written from, in the output dtype."""
    names = _sources(sm, block)
    tensors = sm.checkpoint.load(set(names.values()), device=device, dtype=sm.dtype)
    for p, src in names.items():
        for alias in sm.aliases.get(p, [p]):
            set_param(sm.skeleton, alias, tensors[src])


def _check_groups(sm: SequentialModel, block: Block, observed: ObservedGraph) -> None:
    """The block's discovery must find exactly the whole graph's groups that live in it."""
    params = set(block.params)
    expected = sorted(g.name for g in sm.discovery.groups if all(c.weight in params for c in g.consumers))
    found = sorted(g.name for g in observed.discovery.groups)
    if expected != found:
        raise BlockSplitError(f"block {block.index} ({block.owner or 'unnamed'}): discovery on the block finds the "
                              f"groups {found}, on the whole graph {expected}; quantize without --sequential")


def _check_declared(sm: SequentialModel, block: Block, bgm: fx.GraphModule, observed: ObservedGraph,
                    boundary: Boundary, device: torch.device) -> None:
    """The declared scale groups in ``block`` must be equivalences (:func:`awqfx.targets.check_equivalence`),
    checked on the block's float weights and its first calibration batch at the boundary (the
    whole model is never in memory to run on random inputs)."""
    groups = declared_groups(observed.discovery, sm.targets)
    if not groups:
        return
    values = next((v for i in range(boundary.n) if (v := boundary.get(i)) is not None), None)
    if values is None:  # distributed: the other ranks hold batches and check it
        log.warning("block %d: this rank holds no calibration batch to check its declared scale groups on",
                    block.index)
        return
    args = tuple(values[n].to(device) if isinstance(values[n], torch.Tensor) else values[n] for n in block.inputs)
    check_equivalence(bgm, groups, args, observed.discovery.rejected)


def _run(bgm: fx.GraphModule, boundary: Boundary, block: Block, keep: set[str], device: torch.device) -> None:
    """Replace each held batch's boundary values by the block's outputs (and the inputs still needed later)."""
    with torch.no_grad():
        for i in range(boundary.n):
            values = boundary.get(i)
            if values is not None:
                boundary.put(i, after_block(block, values, bgm(*block_args(block, values, device)), keep))


def _part(model: nn.Module, prefixes: set[str]) -> nn.Module:
    """A module tree holding only ``model``'s modules at ``prefixes``, under the same paths."""
    part = nn.Module()
    for prefix in sorted(prefixes, key=len):
        if any(prefix.startswith(p + ".") for p in prefixes if p != prefix):
            continue  # inside a module already taken
        *path, leaf = prefix.split(".")
        node = part
        for name in path:
            if name not in node._modules:
                node.add_module(name, nn.Module())
            node = node._modules[name]
        node.add_module(leaf, model.get_submodule(prefix))
    object.__setattr__(part, "config", model.config)
    return part


def _to_meta(model: nn.Module, block: Block, aliases: dict[str, list[str]]) -> None:
    """Put the block's tensors in ``model`` back on meta; packed modules become meta shells."""
    parents = parent_map(model)
    for prefix, m in packed_modules(model).items():
        if m.scales.device.type == "meta":
            continue
        shell = QuantLinear(m.in_features, m.out_features, bits=m.bits, group_size=m.group_size,
                            bias=m.bias is not None, symmetric=bool(m.symmetric), device="meta",
                            bias_dtype=m.bias.dtype if m.bias is not None else torch.float32)
        shell._forward_pre_hooks.update(m._forward_pre_hooks)
        for parent, child in parents.get(id(m), []):
            setattr(parent, child, shell)
    for p in block.params:
        for alias in aliases.get(p, [p]):
            try:
                t = get_param(model, alias)
            except AttributeError:
                continue  # packed: the weight is gone with its module
            if t.device.type != "meta":
                set_param(model, alias, torch.empty_like(t, device="meta"))


# --------------------------------------------------------------------------------- writing


def _merge_config(a: dict | None, b: dict) -> dict:
    """Two parts' ``quantization_config``: dicts merged, lists joined, everything else equal."""
    if a is None:
        return dict(b)
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _merge_config(out[k], v)
        elif isinstance(v, list) and isinstance(out[k], list):
            out[k] = out[k] + [x for x in v if x not in out[k]]
        elif out[k] != v:
            raise FormatError(f"blocks disagree on quantization_config[{k!r}]: {out[k]!r} vs {v!r}")
    return out


class BlockWriter:
    """Writes the packed (or, for the smoothed format, the float) model block by block: tensors to
    shards, config once at the end. ``weights``: the ``apply_plan`` mode each block is applied with."""

    def __init__(self, directory: Path, fmt: str, model: nn.Module, aliases: dict[str, list[str]]):
        self.fmt = format_module(fmt)
        self.weights = weights_mode(fmt)
        self.model = model
        self.aliases = aliases
        self.shards = ShardWriter(directory)
        self.written: set[str] = set()
        self.qcfg: dict | None = None

    def add(self, block: Block) -> None:
        prefixes = {p.rpartition(".")[0] for p in block.params}
        part = _part(self.model, prefixes)
        qmods = packed_modules(part)
        if qmods or self.weights != "packed":
            tensors, qcfg = self.fmt.payload(part, qmods)
            if qcfg is not None:
                self.qcfg = _merge_config(self.qcfg, qcfg)
        else:
            tensors = dedupe_state(part.state_dict())
        fresh = {}
        for k, t in tensors.items():
            names = self.aliases.get(k, [k])
            if any(a in self.written for a in names):
                continue  # a tied tensor, written once
            fresh[names[0]] = t  # under its first name in the model's order, as save_pretrained does
            self.written.add(names[0])
        self.shards.add(fresh)
        if self.shards.buffered >= OUTPUT_SHARD_BYTES:
            self.shards.flush()

    def finish(self) -> dict:
        self.shards.finish()
        if self.qcfg is None and self.weights == "packed":
            raise FormatError("no block had a quantized layer: nothing to write")
        key = getattr(self.fmt, "UNQUANTIZED_KEY", None)
        if key is not None and self.qcfg is not None:
            self.qcfg[key] = unquantized_linears(self.model)
        return config_dict(self.model, self.qcfg)


# --------------------------------------------------------------------------------- driver


def quantize_sequential(
    sm: SequentialModel,
    calib: torch.Tensor,
    cfg: AWQConfig,
    out: str | os.PathLike,
    fmt: str = "awqfx",
    tokenizer: Any = None,
    offload_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[AWQPlan, list[BlockRecord]]:
    """Quantize ``sm`` block by block on ``calib`` (``[N, L]`` token ids) and write it to ``out``.

    Returns the plan of the whole model (the union of the blocks' plans) and one record per
    block. The output directory appears only when everything is written (atomic, like
    ``save_quantized``); ``sm.skeleton`` ends with its quantized modules as meta shells.
    ``fmt="smoothed"`` writes each block folded and clamped, not quantized (a plain checkpoint).
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if "sequential" not in format_modes(fmt):
        raise FormatError(f"format {fmt!r} is written from the whole model, not block by block: quantize it whole "
                          "(awqfx quantize --mode whole)")
    device = torch.device(cfg.runtime.device or "cpu")
    if sm.targets is None or sm.targets.selection != cfg.selection():
        raise TargetError("the model was opened for other targets (ignore / only / extra_groups / exclude_groups) "
                          "than this config's: open it with open_sequential(..., config=cfg)")
    last_active = max((b.index for b in sm.blocks if sm.quantizes(b)), default=-1)
    if last_active < 0:
        raise BlockSplitError("no block has a weight to quantize")
    if cfg.needs_calibration and calib.shape[0] < cfg.runtime.loss_samples:  # said once, not by every block's search
        log.warning("search: loss_samples=%d asked for, %d available: calibration had only %d sequences",
                    cfg.runtime.loss_samples, calib.shape[0], calib.shape[0])
        cfg = cfg.with_(loss_samples=int(calib.shape[0]), guard_samples=0)
    elif calib.shape[0] < cfg.replayed_samples:
        log.warning("search: guard_samples=%d asked for, %d sequences left after the %d loss sequences",
                    cfg.guard_samples, calib.shape[0] - cfg.runtime.loss_samples, cfg.runtime.loss_samples)
        cfg = cfg.with_(guard_samples=int(calib.shape[0]) - cfg.runtime.loss_samples)
    if calib.shape[0] < cfg.refine_samples:
        log.warning("search: refine_samples=%d asked for, calibration had only %d sequences", cfg.refine_samples,
                    calib.shape[0])
        cfg = cfg.with_(refine_samples=int(calib.shape[0]))
    needed = needed_after(sm.blocks)
    (inp,) = [n.name for n in sm.gm.graph.nodes if n.op == "placeholder"]
    rows = torch.arange(calib.shape[0])
    if cfg.needs_calibration:  # the loss sample (first rows) spread over the whole set, as calibrate does
        rows = sample_order(calib.shape[0], cfg)
    batches = [{inp: calib[rows[i : i + cfg.runtime.batch_size]]} for i in range(0, calib.shape[0], cfg.runtime.batch_size)]
    tmp_offload = None
    if offload_dir is not None:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        tmp_offload = Path(tempfile.mkdtemp(prefix="awqfx-boundary-", dir=offload_dir))
    plan = AWQPlan([], {}, cfg.to_dict(), {"awqfx_version": awqfx.__version__, "method": cfg.method,
                                           "mode": "sequential", "blocks": len(sm.blocks),
                                           "groups_dropped": [g.site for g in searched_groups(sm.discovery, cfg)[1]]})
    records: list[BlockRecord] = []
    gc.freeze()  # the skeleton and its graph live to the end: keep them out of every collection
    try:
        held = held_batches(len(batches), cfg)  # distributed: each rank runs the blocks on its share only
        boundary = Boundary([b if i in held else None for i, b in enumerate(batches)], tmp_offload)
        # --refine block trains each block on the quantized stream: the loss sample's batches, carried through
        # the fake-quantized blocks beside the float boundary (every rank holds them)
        quant = (Boundary(batches[: -(-cfg.refine_samples // cfg.runtime.batch_size)])
                 if _refines_blocks(cfg) else None)
        main = distributed.is_main()  # every rank calibrates its share and finds the same plan; rank 0 writes
        with checkpoint_dir(out) if main else contextlib.nullcontext() as tmp:
            writer = BlockWriter(tmp, fmt, sm.skeleton, sm.aliases) if main else None
            bar = tqdm(sm.blocks, desc="awq blocks", unit="block", disable=not progress or not main)
            for block in bar:
                records.append(_quantize_block(sm, block, boundary, cfg, plan, writer, device,
                                               run_next=block.index < last_active, keep=needed[block.index],
                                               quant=quant))
                bar.set_postfix(block=block.owner or block.index, s=f"{records[-1].seconds:.1f}")
            bar.close()
            if writer is not None:
                write_extras(tmp, writer.finish(), getattr(sm.skeleton, "generation_config", None), tokenizer)
                plan.save(tmp / "awq_plan")
    finally:
        gc.unfreeze()
        if tmp_offload is not None:
            shutil.rmtree(tmp_offload, ignore_errors=True)
    plan.metadata["timings"] = {"blocks_s": sum(r.seconds for r in records)}
    return plan, records


def _refines_blocks(cfg: AWQConfig) -> bool:
    return cfg.refine is not None and cfg.refine.method == "block"


def _quant_sample(quant: Boundary, observed: ObservedGraph) -> dict[str, Any]:
    """The block's recorded refine sample as the quantized stream ``quant`` has it: as many rows of
    each batched input (the refine's first ``refine_samples``), the recorded value of the others
    (the same in both streams)."""
    batches = [quant.get(i) for i in range(quant.n)]
    unbatched = observed.unbatched_inputs()
    rows = observed.config.refine_samples
    return {n: v if n in unbatched or not isinstance(v, torch.Tensor)
            else torch.cat([b[n].cpu() for b in batches], 0)[: min(rows, v.shape[0])]
            for n, v in observed.loss_inputs().items()}


def _quantize_block(sm: SequentialModel, block: Block, boundary: Boundary, cfg: AWQConfig, plan: AWQPlan,
                    writer: BlockWriter | None, device: torch.device, run_next: bool, keep: set[str],
                    quant: Boundary | None = None) -> BlockRecord:
    rec = BlockRecord(block.index, block.owner, sum(get_param(sm.gm, p).numel() for p in block.params), 0, 0)
    t_start = time.perf_counter()

    def stage(name: str, t0: float) -> float:
        now = time.perf_counter()
        rec.stages[name] = rec.stages.get(name, 0.0) + now - t0
        return now

    t = time.perf_counter()
    quantized = sm.quantizes(block)
    block_plan = None
    if quantized or run_next:
        bgm = block_module(sm.gm, block, device)
        _load_compute(sm, block, bgm, device)
        t = stage("load", t)
        quant_boundary = cfg.scales is not None and cfg.scales.propagate == "quant"
        observed = None
        if quantized:
            observed = prepare(bgm, cfg, targets=sm.targets)
            _check_groups(sm, block, observed)
            _check_declared(sm, block, bgm, observed, boundary, device)
            if cfg.needs_calibration:
                calibrate(observed, boundary.args(block.inputs), progress=False)
            t = stage("calibrate", t)
        if run_next and not quant_boundary:  # float weights: before the search folds them away
            _run(bgm, boundary, block, keep, device)
            t = stage("next boundary", t)
        keep_float = quant_boundary or quant is not None  # the float block runs again after the search
        if quantized:
            if not keep_float:  # the search's working copy takes the block's weights: one copy, folded in place
                release_parameters(bgm)  # now: a GraphModule and its Graph form a cycle, freed by a full collection
                del bgm
            q_inputs = None if quant is None else _quant_sample(quant, observed)
            block_plan = search(observed, cfg, progress=False, take_weights=not keep_float, quant_inputs=q_inputs)
            del observed
            rec.groups, rec.weights = len(block_plan.groups), len(block_plan.weights)
            plan.groups.extend(block_plan.groups)
            plan.weights.update(block_plan.weights)
            if "refine_blocks" in block_plan.metadata:
                plan.metadata.setdefault("refine_blocks", []).extend(block_plan.metadata["refine_blocks"])
            t = stage("search", t)
        if run_next and keep_float:
            runner = convert(bgm, block_plan, weights="fake") if block_plan is not None else bgm
            for stream in ([boundary] if quant_boundary else []) + ([quant] if quant is not None else []):
                _run(runner, stream, block, keep, device)
            del runner
            t = stage("next boundary", t)
        bgm = observed = None
        release_memory()
    if writer is not None:
        _load_output(sm, block, device)
        if block_plan is not None:  # packed (or smoothed) for writing only: no kernel layout
            apply_plan(sm.skeleton, block_plan, weights=writer.weights, inplace=True, backend="dequant")
        writer.add(block)
        _to_meta(sm.skeleton, block, sm.aliases)
        release_memory()
    stage("pack + write", t)
    rec.seconds = time.perf_counter() - t_start
    rec.peak_rss_mb = peak_rss_mb() or 0.0
    return rec
