"""The scale search of one group: statistics, candidate scales and their region losses.

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
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from awqfx import distributed
from awqfx.config import AWQConfig
from awqfx.graph import linear_op
from awqfx.groups import ScaleGroup
from awqfx.observed import ObservedGraph
from awqfx.params import column_scale, from_rows, get_param, rows_view
from awqfx.passes.act_quantizers import ActQuantizer, quantizing
from awqfx.passes.region import Region
from awqfx.quant import QuantSpec, fake_quantize, group_bounds

__all__ = ["search_group", "region_losses", "candidates", "channel_x_mean", "channel_w_mean", "candidate_weight"]


def channel_x_mean(observed: ObservedGraph, g: ScaleGroup) -> torch.Tensor:
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


def channel_w_mean(work: fx.GraphModule, g: ScaleGroup, spec: QuantSpec) -> torch.Tensor:
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


def candidates(cfg: AWQConfig, g: ScaleGroup, x_mean: torch.Tensor, w_mean: torch.Tensor | None):
    """``[(label, form, alpha, full scale float32)]``; the identity first."""
    C = g.producer.num_channels
    ch = g.channels
    x = x_mean[ch]
    forms = ["x", "duo"] if cfg.scales.form == "both" else [cfg.scales.form]
    out = [("identity", "identity", None, torch.ones(C))]
    for form in forms:
        for i in range(cfg.scales.n_grid):
            a = i / cfg.scales.n_grid
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


def grid_position(cand, n_grid: int) -> tuple[str, int]:
    """``(form, index)`` of a candidate on its form's grid; the identity is form ``x``'s point 0."""
    _label, form, alpha, _s = cand
    return ("x", 0) if form == "identity" else (form, round(alpha * n_grid))


def stride_schedule(cands, n_grid: int, stride: int):
    """What the search evaluates, in two steps: ``coarse``, every ``stride``-th grid point of each
    form (the identity among them); then ``near(best)``, the points of the best one's form closer
    to it than ``stride``. With ``stride`` 1 the first step is the whole grid and the second adds
    nothing. At n_grid 20, stride 4: at most 11 of the 20 (docs/design.md, "The search")."""
    pos = [grid_position(c, n_grid) for c in cands]
    coarse = [i for i, (_f, k) in enumerate(pos) if k % stride == 0]

    def near(best: int) -> list[int]:
        form, k = pos[best]
        return [i for i, (f, j) in enumerate(pos) if f == form and abs(j - k) < stride]

    return coarse, near


CANDIDATE_CHUNK = 1 << 22  # weight elements quantized at a time by candidate_weight


def candidate_weight(w: torch.Tensor, c, s_full: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1`` in ``w``'s dtype. ``W diag(s)`` is the weight the fold stores: the
    float64 product rounded once to ``w``'s dtype (for a float32 ``w`` that is the float32 product);
    the quantizer works in float32. Computed a slab of rows at a time (quantization groups lie
    within a row, so the result is the same): the quantizer's temporaries are a few slabs, not a
    few copies of the weight."""
    rows = rows_view(w.detach(), c.in_dim)
    flat = rows.reshape(-1, rows.shape[-1])
    cs = column_scale(c.columns, s_full).to(device=w.device, dtype=torch.float32)
    out = torch.empty(flat.shape, dtype=w.dtype, device=w.device)
    step = max(1, CANDIDATE_CHUNK // max(1, flat.shape[1]))
    for a in range(0, flat.shape[0], step):
        blk = flat[a : a + step]
        scaled = blk * cs if w.dtype == torch.float32 else (blk.double() * cs.double()).to(w.dtype)
        out[a : a + step] = fake_quantize(scaled, spec).float() / cs
    return from_rows(out.view(rows.shape), c.in_dim).contiguous()


def single_linear(work: fx.GraphModule, reg: Region, g: ScaleGroup):
    """``(consumer, input node)`` when the loss region is exactly one 2-D linear of a quantized
    consumer applied to the region's only input (v->o, up->down): its loss then has a closed form
    in the input Gram matrix, ~3-7x cheaper per candidate than running the linear when the loss
    sample has several times more tokens than the linear has inputs (SmolLM2: 4096 vs 576-1536)."""
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


def region_outputs(x) -> list[torch.Tensor]:
    """The float tensors of a region output (a tensor, or a list/tuple of them, e.g. a ``chunk``)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in region_outputs(v)]
    return []


def _shared(losses: torch.Tensor) -> list[float]:
    """Every rank's share of the candidate losses (zeros elsewhere), exchanged: all of them, exactly."""
    return distributed.all_reduce_sum(losses, what="the scale search").tolist()


def _losses(reg: Region, g: ScaleGroup, params: dict, envs: list[dict], spec: QuantSpec, device,
            quantizers: dict[str, ActQuantizer]) -> Callable[[list], list[float]]:
    """A function of candidates giving each one's MSE of the region output against the current
    float weights' (each rank computes its round-robin share of the candidates); the float output
    is computed once, here. ``quantizers``: the working graph's activation quantizers by linear
    node (empty: weight-only)."""
    feeds = [[env[n] for n in reg.env_nodes] for env in envs]
    with quantizing(quantizers.values(), False):
        ref = [region_outputs(reg.gm(*f, *[params[t] for t in reg.attrs])) for f in feeds]
    numel = sum(t.numel() for r in ref for t in r)
    smoothed = [(quantizers[c.node], c) for c in g.consumers if c.quantize and c.node in quantizers]

    def score(cands) -> list[float]:
        losses = torch.zeros(len(cands), dtype=torch.float64)
        try:
            for i, (_label, _form, _alpha, s_full) in enumerate(cands):
                if not distributed.owns(i):
                    continue
                p = dict(params)
                for c in g.consumers:
                    if c.quantize and c.weight in p:
                        p[c.weight] = candidate_weight(params[c.weight], c, s_full.to(device), spec)
                for q, c in smoothed:
                    q.smooth = column_scale(c.columns, s_full).to(device)
                err = 0.0
                with quantizing(quantizers.values(), True):
                    for f, r in zip(feeds, ref):
                        for o, rr in zip(region_outputs(reg.gm(*f, *[p[t] for t in reg.attrs])), r):
                            d = o.float() - rr.float()
                            err += float(d.square_().sum(dtype=torch.float64))  # in place: one output-sized temporary
                losses[i] = err / max(1, numel)
        finally:
            for q, _c in smoothed:
                q.smooth = None
        return _shared(losses)

    return score


def _gram_losses(c, data: fx.Node, params: dict, envs: list[dict], spec: QuantSpec,
                 device) -> Callable[[list], list[float]]:
    """The same for a region that is one linear: ``trace(D G D^T) / (T out)``, in float32, with
    the input Gram computed once, here."""
    with torch.autocast(device.type, enabled=False):
        xs = [env[data].reshape(-1, env[data].shape[-1]).float() for env in envs]
        gram = sum(x.t() @ x for x in xs)
        n_tok = sum(x.shape[0] for x in xs)
        w0 = rows_view(params[c.weight], c.in_dim).float()

    def score(cands) -> list[float]:
        losses = torch.zeros(len(cands), dtype=torch.float64)
        with torch.autocast(device.type, enabled=False):
            for i, (_label, _form, _alpha, s_full) in enumerate(cands):
                if distributed.owns(i):
                    d = rows_view(candidate_weight(params[c.weight], c, s_full.to(device), spec), c.in_dim).float() - w0
                    losses[i] = float(((d @ gram) * d).sum(dtype=torch.float64)) / (n_tok * w0.shape[0])
        return _shared(losses)

    return score


def _gram_is_cheaper(c, data: fx.Node, params: dict, envs: list[dict]) -> bool:
    """The Gram form costs ``out * in^2`` per candidate, running the linear ``tokens * out * in``:
    it wins when the loss sample has more tokens than the linear has inputs."""
    tokens = sum(env[data].numel() // max(1, env[data].shape[-1]) for env in envs)
    return tokens > params[c.weight].shape[c.in_dim]


def region_losses(work: fx.GraphModule, reg: Region, g: ScaleGroup, params: dict, envs: list[dict],
                  spec: QuantSpec, device, quantizers: dict[str, ActQuantizer]) -> Callable[[list], list[float]]:
    """A function giving candidates' region losses on ``envs`` (what does not depend on the
    candidate is computed once): in closed form from the input Gram when the region is one linear
    and that is cheaper, else by running the region."""
    lone = single_linear(work, reg, g)
    if lone is not None and _gram_is_cheaper(lone[0], lone[1], params, envs):
        return _gram_losses(lone[0], lone[1], params, envs, spec, device)
    return _losses(reg, g, params, envs, spec, device, quantizers)


def search_group(observed: ObservedGraph, work: fx.GraphModule, reg: Region, g: ScaleGroup, params: dict,
                 envs: list[dict], cfg: AWQConfig, device,
                 quantizers: dict[str, ActQuantizer] | None = None,
                 held_envs: list[dict] | None = None) -> tuple[torch.Tensor, dict]:
    """The best full scale of group ``g`` on the loss sample (``envs``: the replay's values of the
    region inputs) and what was tried: ``(scale, info)``. ``quantizers``: the working graph's
    activation quantizers by linear node name (weight-activation mode). ``held_envs``: the same
    values on the guard's held-back sequences; the chosen scale is kept only if it lowers the
    region loss there against s = 1 (else s = 1, and ``info["guard_rejected"]`` names it);
    ``info["held_loss"]`` / ``["held_loss_identity"]``: the searched scale's and s = 1's loss there."""
    spec = cfg.spec
    quantizers = quantizers or {}
    x_mean = channel_x_mean(observed, g)
    w_mean = channel_w_mean(work, g, spec) if cfg.scales.form in ("duo", "both") else None
    cands = candidates(cfg, g, x_mean, w_mean)
    # s = 1 is always evaluated (the RTN loss); it competes when asked to, and in form "x",
    # whose grid point alpha = 0 it is.
    id_ok = cfg.scales.include_identity or cfg.scales.form in ("x", "both")
    allowed = {i for i, (lab, *_rest) in enumerate(cands) if id_ok or lab != "identity"}
    found: dict[int, float] = {}
    score = region_losses(work, reg, g, params, envs, spec, device, quantizers)

    def evaluate(idx: list[int]) -> int:
        """Evaluate the candidates ``idx`` (those not evaluated yet); the best allowed one so far."""
        new = [i for i in idx if i not in found]
        if new:
            found.update(zip(new, score([cands[i] for i in new])))
        return min((i for i in found if i in allowed), key=lambda i: (found[i], i))

    coarse, near = stride_schedule(cands, cfg.scales.n_grid, cfg.scales.grid_stride)
    best = evaluate(near(evaluate(coarse)))
    tried = sorted(found)
    losses = [found[i] for i in tried]
    info = {"loss_identity": found[0], "losses": losses, "candidates": [cands[i][0] for i in tried],
            "region_nodes": reg.size}
    if held_envs and best != 0:
        held = region_losses(work, reg, g, params, held_envs, spec, device, quantizers)([cands[0], cands[best]])
        info.update(held_loss=held[1], held_loss_identity=held[0], guard_rejected=None)
        if not held[1] < held[0]:  # the scale does not help on data the search did not see
            info["guard_rejected"] = cands[best][0]
            best = 0
    label, form, alpha, s_best = cands[best]
    info.update(choice=label, form=form, alpha=alpha, loss=found[best])
    return s_best, info
