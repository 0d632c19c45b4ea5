"""The AWQ search: per-group scales on region losses, then per-(row, group) clip ranges (DESIGN §4).

How activations reach the search
    ``prepare`` records ``loss_samples`` calibration sequences as *graph inputs* (token ids; the
    first ones fed, which ``calibrate`` picks evenly spaced over an ``[N, L]`` calibration set).
    A :class:`_Stream` replays them through a private working copy of the graph,
    node by node and on demand: when group ``k`` is searched, exactly the nodes its loss region
    reads are computed (with the weights as they are *now*: earlier groups folded, and in
    ``propagate="quant"`` mode earlier weights already fake-quantized); values are freed as soon
    as nothing that may still change needs them, and recomputed when a fold or a quantization
    changes a parameter they depend on. One replay of the loss sample serves every group, the
    clip search and both propagation modes: memory is one block's activations, and
    ``propagate="quant"`` costs no extra forward passes.

Per group (graph order)
    ``x_mean`` per producer channel comes from the consumers' input observers (all calibration
    tokens); ``w_mean`` (form ``duo``) is ``|W|`` normalised by its quant group's max, averaged
    over the rows of every quantized consumer. For ``alpha`` in ``{0, 1/n, ..., (n-1)/n}``:
    ``s = x_mean^alpha`` (or ``/ w_mean^(1-alpha)``), clamped at 1e-4 and normalised by
    ``sqrt(max * min)``; ``s = 1`` (plain RTN) is always evaluated and, with
    ``include_identity``, is a candidate. Each candidate sets every quantized consumer weight to
    ``Q(W diag(s)) diag(s)^-1`` and runs the group's *loss region* -- a standalone GraphModule cut
    from the captured graph between ``region_inputs`` and ``region_output`` whose other inputs
    (rope cos/sin, masks, sizes) and parameters are placeholders -- on the loss sample; the loss
    is the MSE to the region's output with the current float weights (computed once). The best
    scales are folded into the working copy (``fold_scales``) before the next group.

Clip (after the weight's last scaling group)
    For each 2-D quantized weight (q/k skipped by default; 3-D expert weights are not clipped),
    try shrink ratios 1.0, 0.95, ... (> max_shrink) of the group range -- ``minmax``: the max and
    the min shrinks separately (coordinate sweeps from the best joint shrink), ``asym``: max and
    min together (llmc), ``sym``: max |w| (the reference, clamping both ends) -- and keep, per
    (row, group), the choice with the smallest mean squared error of the partial products
    ``x_g . (Q(w_g) - w_g)`` over ``clip_tokens`` input tokens (the reference's loss, computed as
    ``d_g G_g d_g^T`` from the input Gram ``G``). Then ``clip_rounds`` passes refine each group's
    choice against the whole row's output error ``d G d^T``: the other groups' errors add to or
    cancel this group's through the off-diagonal blocks of ``G``, which the per-group loss
    ignores. Ratios are invariant to the per-row scaling a later group may fold into the weight
    (v_proj rows, up_proj rows), so the plan stores absolute ranges computed on the final folds.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

from awqfx.config import AWQConfig
from awqfx.graph import drop_dtype_asserts, fetch_attr, float_dtype
from awqfx.groups import ScaleGroup
from awqfx.observe import ObservedGraph, release_memory, remove_observers
from awqfx.plan import AWQPlan, GroupPlan, WeightPlan
from awqfx.quant import QuantSpec, fake_quantize, group_bounds
from passes.fold import column_scale, fold_parameters, fold_scales, full_scale, get_param, set_param
from passes.quantize_linears import fake_quantize_param, from_rows, rows_view

log = logging.getLogger(__name__)

__all__ = ["search", "rtn_plan", "build_region", "Region", "clip_ratios", "clip_range", "refine_clip_jointly"]



# -- copies --------------------------------------------------------------------------------

def shallow_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph and module containers whose tensors are *shared* with
    ``gm`` (read-only use, or replaced via ``set_param``: never written into)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, env)
    g.output(out)
    return fx.GraphModule(gm, g)


def move_to(gm: torch.nn.Module, device) -> None:
    """Move every tensor the graph reads to ``device`` by *replacing* it (``nn.Module.to`` would
    rewrite shared Parameter objects in place, i.e. the caller's model)."""
    device = torch.device(device)
    if isinstance(gm, fx.GraphModule):
        targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    else:
        targets = {k for k, _ in gm.named_parameters()} | {k for k, _ in gm.named_buffers()}
    for t in targets:
        v = fetch_attr(gm, t)
        if isinstance(v, torch.Tensor) and v.device != device:
            set_param(gm, t, v.to(device))


# -- loss regions ----------------------------------------------------------------------------

@dataclass
class Region:
    """A group's loss region as a standalone module: ``gm(*values_of(env_nodes), *params(attrs))``."""

    gm: fx.GraphModule
    env_nodes: list[fx.Node]  # nodes of the working graph whose values feed the first placeholders
    attrs: list[str]  # get_attr targets feeding the remaining placeholders
    size: int  # number of compute nodes


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen = {node}
    stack = [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def build_region(gm: fx.GraphModule, group: ScaleGroup) -> Region:
    """Cut the loss region of ``group`` out of ``gm`` (nodes between its region inputs and output)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    try:
        inputs = [by_name[n] for n in group.region_inputs]
        out = by_name[group.region_output]
    except KeyError as e:
        raise RuntimeError(f"group {group.name}: region node {e} is not in the graph") from e
    anc = _ancestors(out)
    region: set[fx.Node] = set()
    stack = list(inputs)
    while stack:
        for u in stack.pop().users:
            if u in anc and u not in region and u not in inputs:
                region.add(u)
                stack.append(u)
    if out not in region:
        raise RuntimeError(f"group {group.name}: region output {out.name} does not depend on its inputs")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    const: dict[fx.Node, bool] = {}

    def is_const(n: fx.Node) -> bool:  # computed from parameters/constants only: copy into the region
        if n in const:
            return const[n]
        todo = [n]
        while todo:
            x = todo[-1]
            if x in const:
                todo.pop()
                continue
            if x.op == "get_attr":
                const[x] = True
                todo.pop()
                continue
            if x.op not in ("call_function", "call_method"):
                const[x] = False
                todo.pop()
                continue
            pending = [a for a in x.all_input_nodes if a not in const]
            if pending:
                todo.extend(pending)
                continue
            const[x] = all(const[a] for a in x.all_input_nodes)
            todo.pop()
        return const[n]

    copy_set = set(region)
    env_nodes: list[fx.Node] = list(inputs)
    attrs: list[str] = []
    stack = list(region)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in copy_set or a in inputs:
                continue
            if a.op == "get_attr":
                if a.target not in attrs:
                    attrs.append(a.target)
            elif is_const(a):
                copy_set.add(a)
                stack.append(a)
            elif a not in env_nodes:
                env_nodes.append(a)
    extras = sorted(env_nodes[len(inputs):], key=order.__getitem__)
    env_nodes = list(inputs) + extras
    attrs.sort()
    g = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(env_nodes):
        ph = g.placeholder(f"in_{i}_{n.name}")
        ph.meta = dict(n.meta)
        mapping[n] = ph
    attr_ph: dict[str, fx.Node] = {}
    for i, t in enumerate(attrs):
        attr_ph[t] = g.placeholder(f"p_{i}_" + t.replace(".", "_"))
    for n in sorted(copy_set, key=order.__getitem__):
        def lookup(a: fx.Node) -> fx.Node:
            if a.op == "get_attr":
                return attr_ph[a.target]
            return mapping[a]

        mapping[n] = g.node_copy(n, lookup)
    g.output(mapping[out])
    rgm = fx.GraphModule(gm, g)
    return Region(rgm, env_nodes, attrs, len(copy_set))


# -- the replay of the loss sample -----------------------------------------------------------

class _Stream:
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


# -- scale candidates ----------------------------------------------------------------------

def _channel_x_mean(observed: ObservedGraph, g: ScaleGroup) -> torch.Tensor:
    C = g.producer.num_channels
    num = torch.zeros(C, dtype=torch.float64)
    den = torch.zeros(C, dtype=torch.float64)
    for c in g.consumers:
        m = observed.x_mean(observed.data_of[c.node]).double()
        cols = c.columns
        if m.numel() != cols.numel():
            raise RuntimeError(f"group {g.name}: consumer {c.weight} reads {cols.numel()} columns but its input "
                               f"{observed.data_of[c.node]} has {m.numel()} channels")
        ok = cols >= 0
        num.index_add_(0, cols[ok], m[ok])
        den.index_add_(0, cols[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    return (num / den.clamp(min=1)).float()


def _channel_w_mean(work: fx.GraphModule, g: ScaleGroup, spec: QuantSpec) -> torch.Tensor:
    C = g.producer.num_channels
    num = torch.zeros(C, dtype=torch.float64)
    den = torch.zeros(C, dtype=torch.float64)
    cons = [c for c in g.consumers if c.quantize] or g.consumers
    for c in cons:
        w = rows_view(get_param(work, c.weight).detach(), c.in_dim).float().cpu()
        w = w.reshape(-1, w.shape[-1]).abs()
        gs = spec.effective_group_size(w.shape[-1])
        parts = [blk / (blk.amax(dim=-1, keepdim=True) + 1e-6) for blk in (w[:, a:b] for a, b in group_bounds(w.shape[-1], gs))]
        col = torch.cat(parts, dim=1).sum(0, dtype=torch.float64)  # [in]
        rows = w.shape[0]
        ok = c.columns >= 0
        num.index_add_(0, c.columns[ok], col[ok])
        den.index_add_(0, c.columns[ok], torch.full((int(ok.sum()),), float(rows), dtype=torch.float64))
    return (num / den.clamp(min=1)).float()


def _candidates(cfg: AWQConfig, g: ScaleGroup, x_mean: torch.Tensor, w_mean: torch.Tensor | None):
    """``[(label, form, alpha, full scale float32)]``; the identity first."""
    C = g.producer.num_channels
    ch = g.channels
    x = x_mean[ch]
    forms = ["x", "duo"] if cfg.scale_form == "both" else [cfg.scale_form]
    out = [("identity", "identity", None, torch.ones(C))]
    for form in forms:
        for i in range(cfg.n_grid):
            a = i / cfg.n_grid
            if form == "x":
                if i == 0:
                    continue  # x_mean^0 = 1: the identity
                s = x.pow(a).clamp(min=1e-4)
            else:
                s = (x.pow(a) / (w_mean[ch].pow(1 - a) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            full = torch.ones(C)
            full[ch] = s
            out.append((f"{form} a={a:.2f}", form, a, full))
    return out


def _along(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


def _candidate_weight(w: torch.Tensor, c, s_full: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    cs = _along(column_scale(c.columns, s_full).to(device=w.device, dtype=torch.float32), c.in_dim, w.dim())
    wf = w.float()
    return (fake_quantize_param(wf * cs, c.in_dim, spec) / cs).to(w.dtype)


def _single_linear(work: fx.GraphModule, reg: Region, g: ScaleGroup):
    """``(consumer, input node)`` when the loss region is exactly one 2-D linear of a quantized
    consumer applied to the region's only input (v->o, up->down): its loss then has a closed form
    in the input Gram matrix, ~3-7x cheaper per candidate than running the linear."""
    from passes.discover import linear_op

    if reg.size != 1 or len(reg.env_nodes) != 1:
        return None
    out = next(n for n in reg.gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node) or out.op == "placeholder":
        return None
    by_name = {n.name: n for n in work.graph.nodes}
    node = by_name.get(out.name)
    lin = linear_op(work, node) if node is not None else None
    if lin is None or lin.data is not reg.env_nodes[0] or lin.weight.node.op != "get_attr":
        return None
    cons = [c for c in g.consumers if c.node == node.name and c.quantize]
    if len(cons) != 1 or len(lin.weight.perm) != 2 or get_param(work, cons[0].weight).dim() != 2:
        return None
    return cons[0], lin.data


# -- clip ------------------------------------------------------------------------------------

def _group_minmax(w_rows: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    mx, mn = [], []
    for a, b in group_bounds(w_rows.shape[-1], gs):
        blk = w_rows[:, a:b]
        mx.append(blk.amax(-1))
        mn.append(blk.amin(-1))
    return torch.stack(mx, -1), torch.stack(mn, -1)


def clip_range(mx: torch.Tensor, mn: torch.Tensor, ratio, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped ``(max_val, min_val)`` of groups with range ``[mn, mx]`` at shrink ``ratio``
    (``"minmax"``: ``ratio[..., 0]`` shrinks the max, ``ratio[..., 1]`` the min)."""
    if mode == "minmax":
        return mx * ratio[..., 0], mn * ratio[..., 1]
    if mode == "asym":
        return mx * ratio, mn * ratio
    m = torch.maximum(mx.abs(), mn.abs()) * ratio
    return torch.minimum(mx, m), torch.maximum(mn, -m)


def _partial_sq_err(grams: list[tuple[int, torch.Tensor]], d: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``(x_g . d_g)^2`` per (row, group) from :func:`block_grams`: d [R, in] -> [R, G]."""
    R, n = d.shape
    out = []
    for start, g in grams:
        G, gs = g.shape[0], g.shape[-1]
        db = d[:, start : start + G * gs].reshape(R, G, gs).permute(1, 0, 2)  # [G', R, gs]
        out.append((torch.bmm(db, g) * db).sum(-1).t())
    return torch.cat(out, 1)


def block_grams(gram: torch.Tensor, group_size: int) -> list[tuple[int, torch.Tensor]]:
    """The diagonal blocks of an input Gram ``[in, in]`` per quantization group, as
    ``[(first column, [G', g, g])]`` (full groups, then a ragged last group): the per-group clip loss."""
    n = gram.shape[0]
    g = min(group_size, n)
    n_full = n // g
    out = []
    if n_full:
        idx = torch.arange(n_full, device=gram.device)
        blocks = gram[: n_full * g, : n_full * g].reshape(n_full, g, n_full, g)[idx, :, idx, :]
        out.append((0, blocks))
    if n_full * g < n:
        out.append((n_full * g, gram[n_full * g:, n_full * g:].unsqueeze(0)))
    return out


def input_gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x / T`` in float32 for tokens ``x`` [T, in]: the clip losses' view of the inputs."""
    x = x.float()
    return x.t() @ x / x.shape[0]


def clip_ratios(w_rows: torch.Tensor, grams: list[tuple[int, torch.Tensor]], spec: QuantSpec, mode: str,
                ratios: list[float], sweeps: int = 2) -> torch.Tensor:
    """Best shrink ratio per (row, group) of ``w_rows`` [R, in] for inputs with the per-group
    Grams ``grams`` (:func:`block_grams`): the reference's loss, each group on its own.

    ``"sym"`` / ``"asym"`` try one shrink for the whole range (``[R, G]``). ``"minmax"`` starts
    from the best ``"asym"`` shrink, then refines the max and the min shrinks separately, one
    coordinate at a time, ``sweeps`` times each (each step can only lower the error), and returns
    ``[R, G, 2]`` (max ratio, min ratio): 1 + 4 grid sweeps instead of the full grid squared."""
    gs = spec.effective_group_size(w_rows.shape[1])
    w = w_rows.float()
    grams = [(a, g.to(w.device, torch.float32)) for a, g in grams]
    mx, mn = _group_minmax(w, gs)

    def err_of(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return _partial_sq_err(grams, fake_quantize(w, spec, max_val=hi, min_val=lo) - w)

    best_err = torch.full(mx.shape, float("inf"), device=w.device)
    best = torch.ones(mx.shape, device=w.device)
    for r in ratios:
        err = err_of(*clip_range(mx, mn, r, "sym" if mode == "sym" else "asym"))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(err, r), best)
    if mode != "minmax":
        return best
    ra, rb = best.clone(), best.clone()  # max shrink, min shrink
    for _ in range(sweeps):
        for side in (0, 1):
            for r in ratios:
                hi, lo = (mx * r, mn * rb) if side == 0 else (mx * ra, mn * r)
                err = err_of(hi, lo)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                if side == 0:
                    ra = torch.where(better, torch.full_like(err, r), ra)
                else:
                    rb = torch.where(better, torch.full_like(err, r), rb)
    return torch.stack([ra, rb], -1)


def refine_clip_jointly(w_rows: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, mode: str, ratio: torch.Tensor,
                        ratios: list[float], rounds: int) -> torch.Tensor:
    """Refine the per-group clip choice ``ratio`` (from :func:`clip_ratios`, same ``mode``) against
    the whole linear's output error ``d G d^T`` (``gram`` [in, in], mean over tokens).

    The per-group loss of the reference treats each group's rounding error as if it were alone; on
    one output row the groups' errors add up or cancel through the off-diagonal blocks of G. Here
    each group in turn picks, per row, the candidate that minimises the row's total error given
    the other groups' current choice, ``rounds`` times over all groups: each step can only lower it.
    Candidates: the mode's shrink ratios (``"minmax"``: every max shrink with the current min
    shrink, and every min shrink with the current max).
    """
    R, n = w_rows.shape
    gs = spec.effective_group_size(n)
    w = w_rows.float()
    gram = gram.float().to(w.device)
    mx, mn = _group_minmax(w, gs)
    pair = mode == "minmax"
    ratio = ratio.to(w.device)
    d = fake_quantize(w, spec, *clip_range(mx, mn, ratio, mode)) - w
    ra = (ratio[..., 0] if pair else ratio).clone()
    rb = ratio[..., 1].clone() if pair else ra
    cand = torch.tensor(ratios, device=w.device)
    k = len(ratios)
    rows = torch.arange(R, device=w.device)
    for _ in range(rounds):
        for gi, (a, b) in enumerate(group_bounds(n, gs)):
            wg, gg = w[:, a:b], gram[a:b, a:b]
            cross = d @ gram[:, a:b] - d[:, a:b] @ gg  # [R, g]: what the other groups' errors add
            if pair:  # [R, 2k]: vary the max shrink, then the min shrink
                hi = torch.cat([mx[:, gi, None] * cand, (mx[:, gi] * ra[:, gi])[:, None].expand(R, k)], 1)
                lo = torch.cat([(mn[:, gi] * rb[:, gi])[:, None].expand(R, k), mn[:, gi, None] * cand], 1)
            else:
                hi, lo = clip_range(mx[:, gi, None], mn[:, gi, None], cand, mode)
            m = hi.shape[1]
            wr = wg.repeat_interleave(m, 0)
            sub = QuantSpec(spec.bits, b - a, spec.symmetric)
            D = (fake_quantize(wr, sub, max_val=hi.reshape(-1, 1), min_val=lo.reshape(-1, 1)) - wr).reshape(R, m, b - a)
            err = ((D @ gg) * D).sum(-1) + 2 * (D * cross[:, None, :]).sum(-1)
            cur = ((d[:, a:b] @ gg) * d[:, a:b]).sum(-1) + 2 * (d[:, a:b] * cross).sum(-1)
            j = err.argmin(1)
            take = err[rows, j] < cur
            d[:, a:b] = torch.where(take[:, None], D[rows, j], d[:, a:b])
            if pair:
                ra[:, gi] = torch.where(take & (j < k), cand[j.clamp(max=k - 1)], ra[:, gi])
                rb[:, gi] = torch.where(take & (j >= k), cand[(j - k).clamp(min=0)], rb[:, gi])
            else:
                ra[:, gi] = torch.where(take, cand[j], ra[:, gi])
    return torch.stack([ra, rb], -1) if pair else ra


def _abs_clip(w: torch.Tensor, in_dim: int, spec: QuantSpec, ratio: torch.Tensor, mode: str):
    rows = rows_view(w.detach(), in_dim).float()
    lead = rows.shape[:-1]
    r2 = rows.reshape(-1, rows.shape[-1])
    mx, mn = _group_minmax(r2, spec.effective_group_size(r2.shape[-1]))
    hi, lo = clip_range(mx, mn, ratio.to(mx.device), mode)
    G = mx.shape[-1]
    return hi.reshape(*lead, G).cpu(), lo.reshape(*lead, G).cpu()


def _tensors(x) -> list[torch.Tensor]:
    """The float tensors of a region output (a tensor, or a list/tuple of them, e.g. a ``chunk``)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


# -- the search ------------------------------------------------------------------------------

def _version() -> str:
    try:
        import awqfx

        return getattr(awqfx, "__version__", "unknown")
    except Exception:  # pragma: no cover
        return "unknown"


def _weight_plans(observed: ObservedGraph, cfg: AWQConfig) -> dict[str, WeightPlan]:
    spec = cfg.spec
    out = {}
    for w in observed.discovery.quantizable:
        if w not in observed.linears:
            continue
        in_dim = observed.linears[w][2]
        shape = get_param(observed.gm, w).shape
        spec.validate(shape[in_dim])
        out[w] = WeightPlan(spec, in_dim)
    return out


def rtn_plan(observed: ObservedGraph, cfg: AWQConfig | None = None) -> AWQPlan:
    """Round-to-nearest: every quantizable weight with the spec, no scales, no clip."""
    cfg = cfg or observed.config
    return AWQPlan([], _weight_plans(observed, cfg), cfg.to_dict(),
                   {"awqfx_version": _version(), "method": "rtn", "timings": dict(observed.timings)})


def _insert_prescales(work: fx.GraphModule, groups: list[ScaleGroup]) -> dict[int, str]:
    """A unit ``mul`` after each activation producer, so that folding its scale later only replaces a
    buffer (the replay's graph never changes shape)."""
    from awqfx.graph import example_value

    by_name = {n.name: n for n in work.graph.nodes}
    attrs = {}
    for gi, g in enumerate(groups):
        if g.producer.kind != "activation":
            continue
        node = by_name[g.producer.node]
        val = example_value(node)
        dtype = getattr(val, "dtype", torch.float32)
        device = getattr(val, "device", torch.device("cpu"))
        attr = f"awqfx_prescale_{gi}"
        work.register_buffer(attr, torch.ones(g.producer.num_channels, dtype=dtype, device=device))
        with work.graph.inserting_after(node):
            inv = work.graph.get_attr(attr)
        with work.graph.inserting_after(inv):
            mul = work.graph.call_function(torch.ops.aten.mul.Tensor, (node, inv))
        node.replace_all_uses_with(mul, delete_user_cb=lambda u, m=mul: u is not m)
        mul.meta = dict(node.meta)
        attrs[gi] = attr
    work.recompile()
    return attrs


def _fold_working(work: fx.GraphModule, g: ScaleGroup, s_full: torch.Tensor, prescale: str | None) -> set[str]:
    """Fold ``s_full`` into the working copy (same math as ``fold_scales``); returns the changed names."""
    changed = {c.weight for c in g.consumers}
    if g.producer.bias is not None:
        changed.add(g.producer.bias)
    if g.producer.kind != "activation":
        fold_scales(work, [g], [s_full])
        changed.add(g.producer.weight)
        return changed
    s = full_scale(g, s_full).to(torch.float64)
    buf = getattr(work, prescale)
    setattr(work, prescale, (1.0 / s).to(dtype=buf.dtype, device=buf.device))  # = fold_scales' mul node
    fold_parameters(work, g, s)
    changed.add(prescale)
    return changed


def _check_calibrated(observed: ObservedGraph) -> None:
    empty = [n for n, o in observed.mean_observers.items() if o.count == 0]
    if empty or (observed.sample_observers and all(o.rows == 0 and o.value is None for o in observed.sample_observers.values())):
        raise RuntimeError("the observed graph has no calibration statistics: run awqfx.api.calibrate(observed, calib) "
                           "before search" + (f" (no data at {empty[:3]})" if empty else ""))


def search(observed: ObservedGraph, config: AWQConfig | None = None, progress: bool = True) -> AWQPlan:
    """Find the AWQ scales and clip ranges for a calibrated :class:`ObservedGraph`; returns the plan.

    ``config`` defaults to the one given to ``prepare``; a different one may be passed to try
    another search on the same calibration (quantizer, grid, forms, clip, propagation).
    Neither the observed graph nor the caller's model is modified.
    """
    from tqdm.auto import tqdm

    cfg = config or observed.config
    if cfg.method == "rtn":
        return rtn_plan(observed, cfg)
    _check_calibrated(observed)
    t_start = time.perf_counter()
    spec = cfg.spec
    weights = _weight_plans(observed, cfg)
    groups = [g for g in observed.groups if any(c.quantize and c.weight in weights for c in g.consumers)]

    work = shallow_copy(observed.gm)
    remove_observers(work)
    drop_dtype_asserts(work)  # they would fail under the bf16 autocast of search_dtype
    device = torch.device(cfg.device) if cfg.device else next(iter(observed.gm.parameters())).device
    move_to(work, device)
    prescales = _insert_prescales(work, groups)
    by_name = {n.name: n for n in work.graph.nodes}

    qk = set(observed.discovery.attention_qk) if cfg.clip_skip_qk else set()
    clip_set = set()
    if cfg.clip != "none":
        for w, wp in weights.items():
            if w not in qk and get_param(work, w).dim() == 2:
                clip_set.add(w)
    quant_mode = cfg.propagate == "quant"

    # Tasks: ("scale", gi) in group order; ("weight", name) right after the last group that scales
    # the weight's columns, or -- for weights no group scales -- before the first later group.
    last_group: dict[str, int] = {}
    first_consumer = []
    order = {n: i for i, n in enumerate(work.graph.nodes)}
    for gi, g in enumerate(groups):
        for c in g.consumers:
            last_group[c.weight] = gi
        first_consumer.append(min(order[by_name[c.node]] for c in g.consumers))
    tasks: list[tuple[tuple, str, object]] = []
    for gi in range(len(groups)):
        tasks.append(((gi, 0, 0), "scale", gi))
    for w in weights:
        if w not in clip_set and not quant_mode:
            continue
        pos = order[by_name[observed.linears[w][0]]]
        if w in last_group:
            key = (last_group[w], 1, pos)
        else:
            k = next((gi for gi, fc in enumerate(first_consumer) if fc > pos), len(groups))
            key = (k, -1, pos)
        tasks.append((key, "weight", w))
    tasks.sort(key=lambda t: t[0])

    regions: dict[int, Region] = {gi: build_region(work, groups[gi]) for gi in range(len(groups))}
    changes: dict[str, int] = {}
    requires: list[list[fx.Node]] = []
    for ti, (_, kind, what) in enumerate(tasks):
        if kind == "scale":
            g = groups[what]
            for name in [g.producer.weight, g.producer.bias, prescales.get(what), *[c.weight for c in g.consumers]]:
                if name is not None:
                    changes[name] = ti
            requires.append(list(regions[what].env_nodes))
        else:
            if quant_mode:
                changes[what] = ti
            requires.append([by_name[observed.linears[what][1]]] if what in clip_set else [])
    lc: dict[fx.Node, int] = {}
    for n in work.graph.nodes:
        own = changes.get(n.target, -1) if n.op == "get_attr" else -1
        lc[n] = max([own] + [lc[a] for a in n.all_input_nodes])
    last_use: dict[fx.Node, int] = {}
    needed_until: dict[fx.Node, int] = {}  # node -> last task whose inputs depend on it
    for ti in range(len(requires) - 1, -1, -1):  # backwards: the first visit is the last task
        stack = [r for r in requires[ti] if r not in needed_until]
        for r in requires[ti]:
            last_use.setdefault(r, ti)
        while stack:
            n = stack.pop()
            if n in needed_until:
                continue
            needed_until[n] = ti
            stack.extend(a for a in n.all_input_nodes if a not in needed_until)

    sample = {k: (v[: cfg.loss_samples] if isinstance(v, torch.Tensor) and v.dim() else v)
              for k, v in observed.loss_inputs().items()}
    first = next((v for v in sample.values() if isinstance(v, torch.Tensor)), None)
    if first is None:
        raise RuntimeError("no loss sample was recorded (the graph has no tensor inputs?)")
    n_rows = first.shape[0]
    if n_rows < cfg.loss_samples:
        recorded = observed.config.loss_samples
        why = (f"prepare recorded only {recorded} (its config's loss_samples); pass the larger value to prepare"
               if recorded < cfg.loss_samples else f"calibration had only {n_rows} sequences")
        log.warning("search: loss_samples=%d asked for, %d available: %s", cfg.loss_samples, n_rows, why)
    chunks = []
    for r0 in range(0, n_rows, cfg.batch_size):
        chunks.append({k: (v[r0 : r0 + cfg.batch_size].to(device) if isinstance(v, torch.Tensor) and v.dim() else v)
                       for k, v in sample.items()})
    stream = _Stream(work, chunks, needed_until, lc, last_use)

    scale_of: dict[int, torch.Tensor] = {}
    infos: dict[int, dict] = {}
    ratio_of: dict[str, torch.Tensor] = {}
    clip_tokens: dict[str, int] = {}
    t_scale = t_clip = 0.0
    n_evals = 0
    bar = tqdm(tasks, desc="awq search", unit="task", disable=not progress)
    with torch.no_grad(), cfg.autocast("search", device, float_dtype(work)):
        for ti, (_, kind, what) in enumerate(bar):
            if kind == "scale":
                gi = what
                g = groups[gi]
                t0 = time.perf_counter()
                reg = regions[gi]
                stream.pinned = set(reg.env_nodes)
                stream.ensure(reg.env_nodes)
                feeds = [[env[n] for n in reg.env_nodes] for env in stream.envs]
                params = {t: fetch_attr(work, t) for t in reg.attrs}
                ref = [_tensors(reg.gm(*f, *[params[t] for t in reg.attrs])) for f in feeds]
                numel = sum(t.numel() for r in ref for t in r)
                x_mean = _channel_x_mean(observed, g)
                w_mean = _channel_w_mean(work, g, spec) if cfg.scale_form in ("duo", "both") else None
                cands = _candidates(cfg, g, x_mean, w_mean)
                losses = []
                lone = _single_linear(work, reg, g)
                if lone is not None:  # the region is one linear: MSE = trace(D G D^T) / (T out)
                    c, data = lone
                    with torch.autocast(device.type, enabled=False):
                        xs = [env[data].reshape(-1, env[data].shape[-1]).float() for env in stream.envs]
                        gram = sum(x.t() @ x for x in xs)
                        n_tok = sum(x.shape[0] for x in xs)
                        w0 = rows_view(params[c.weight], c.in_dim).float()
                        for label, form, alpha, s_full in cands:
                            d = rows_view(_candidate_weight(params[c.weight], c, s_full.to(device), spec), c.in_dim).float() - w0
                            losses.append(float(((d @ gram) * d).sum(dtype=torch.float64)) / (n_tok * w0.shape[0]))
                            n_evals += 1
                    del xs, gram
                for label, form, alpha, s_full in ([] if lone is not None else cands):
                    p = dict(params)
                    for c in g.consumers:
                        if c.quantize and c.weight in p:
                            p[c.weight] = _candidate_weight(params[c.weight], c, s_full.to(device), spec)
                    err = 0.0
                    for f, r in zip(feeds, ref):
                        out = _tensors(reg.gm(*f, *[p[t] for t in reg.attrs]))
                        for o, rr in zip(out, r):
                            err += float((o.float() - rr.float()).pow(2).sum(dtype=torch.float64))
                    losses.append(err / max(1, numel))
                    n_evals += 1
                # s = 1 is always evaluated (the RTN loss); it competes when asked to, and in form "x",
                # whose grid point alpha = 0 it is.
                id_ok = cfg.include_identity or cfg.scale_form in ("x", "both")
                allowed = [i for i, (lab, *_rest) in enumerate(cands) if id_ok or lab != "identity"]
                best = min(allowed, key=lambda i: (losses[i], i))
                label, form, alpha, s_best = cands[best]
                infos[gi] = {"choice": label, "form": form, "alpha": alpha, "loss": losses[best],
                             "loss_identity": losses[0], "losses": losses,
                             "candidates": [c[0] for c in cands], "region_nodes": reg.size}
                scale_of[gi] = s_best
                del ref, feeds
                if label != "identity":
                    changed = _fold_working(work, g, s_best, prescales.get(gi))
                    stream.invalidate(changed)
                t_scale += time.perf_counter() - t0
            else:
                w = what
                t0 = time.perf_counter()
                in_dim = observed.linears[w][2]
                if w in clip_set:
                    data = by_name[observed.linears[w][1]]
                    stream.pinned = {data}
                    xs = [v.reshape(-1, v.shape[-1]) for v in stream.values(data)]
                    x = torch.cat(xs, 0) if len(xs) > 1 else xs[0]
                    x = x[:: max(1, x.shape[0] // cfg.clip_tokens)][: cfg.clip_tokens]
                    wr = rows_view(get_param(work, w).detach(), in_dim).float()
                    ratios = cfg.shrink_ratios()
                    with torch.autocast(device.type, enabled=False):
                        gram = input_gram(x)
                        r = clip_ratios(wr, block_grams(gram, spec.effective_group_size(wr.shape[-1])), spec,
                                        cfg.clip, ratios)
                        if cfg.clip_rounds:
                            r = refine_clip_jointly(wr, gram, spec, cfg.clip, r, ratios, cfg.clip_rounds)
                    ratio_of[w] = r.cpu()
                    clip_tokens[w] = x.shape[0]
                    del x, xs, gram
                if quant_mode:
                    cur = get_param(work, w)
                    hi = lo = None
                    if w in ratio_of:
                        hi, lo = _abs_clip(cur, in_dim, spec, ratio_of[w], cfg.clip)
                    set_param(work, w, fake_quantize_param(cur, in_dim, spec, hi, lo))
                    stream.invalidate({w})
                t_clip += time.perf_counter() - t0
            stream.done = ti
            stream.pinned = set()
            stream.sweep()
    bar.close()

    # Final folded float weights: the absolute clip ranges are taken on them.
    if quant_mode:  # the working copy holds quantized weights: fold a fresh copy
        final = shallow_copy(observed.gm)
        remove_observers(final)
        fold_scales(final, [groups[gi] for gi in sorted(scale_of)], [scale_of[gi] for gi in sorted(scale_of)])
    else:  # the working copy holds exactly the folded float weights (same fold math, same order)
        final = work
    for w, r in ratio_of.items():
        wp = weights[w]
        wp.max_val, wp.min_val = _abs_clip(get_param(final, w), wp.in_dim, spec, r, cfg.clip)
        wp.info = {"clip": cfg.clip, "mean_ratio": float(r.mean()),
                   "clip_tokens": clip_tokens[w], "clip_rounds": cfg.clip_rounds}
    replay_s, replayed = stream.seconds, stream.nodes_run
    del stream, regions, chunks, work, final
    release_memory()
    plan_groups = [GroupPlan(groups[gi], scale_of[gi].float().cpu(), infos[gi]) for gi in sorted(scale_of)]
    t_search = time.perf_counter() - t_start
    timings = dict(observed.timings)
    timings.update({"search_s": t_search, "search_scale_s": t_scale, "search_clip_s": t_clip,
                    "search_replay_s": replay_s})
    meta = {
        "awqfx_version": _version(),
        "torch_version": torch.__version__,
        "method": "awq",
        "timings": timings,
        "calibration": dict(observed.calibration),
        "loss_sample": {k: list(v.shape) for k, v in sample.items() if isinstance(v, torch.Tensor)},
        "region_evaluations": n_evals,
        "replayed_nodes": replayed,
        "device": str(device),
        "groups_skipped": [g.name for g in observed.groups if g not in groups],
    }
    return AWQPlan(plan_groups, weights, cfg.to_dict(), meta)


def group_losses(plan: AWQPlan) -> list[tuple[str, float, float]]:
    """``[(group, awq loss, rtn loss)]`` as recorded by the search."""
    return [(g.name, float(g.info["loss"]), float(g.info["loss_identity"])) for g in plan.groups]


def gap_recovered(fp: float, rtn: float, awq: float) -> float:
    """Share of RTN's perplexity gap to fp that AWQ recovers: ``(rtn - awq) / (rtn - fp)``."""
    return (rtn - awq) / (rtn - fp) if rtn != fp else math.nan
