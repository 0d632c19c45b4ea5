"""The clip search: per-(row, group) ranges of each quantized weight.

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
    ignores. Every shrink moves a bound toward zero -- or, in a group whose weights all share one
    sign, toward its zero-side bound, which stays put -- so a clipped range never reaches past the
    group's own values on either side (clamping the weight to it gives the same quantizer: the
    smoothed format). Ratios are invariant to the per-row scaling a later group may fold into the weight
    (v_proj rows, up_proj rows), so the plan stores absolute ranges computed on the final folds.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from awqfx.params import rows_view
from awqfx.quant import QuantSpec, fake_quantize, group_bounds

__all__ = ["clip_range", "block_grams", "input_gram", "clip_ratios", "refine_clip_jointly", "absolute_clip",
           "search_clip", "input_cross"]


def group_minmax(w_rows: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    mx, mn = [], []
    for a, b in group_bounds(w_rows.shape[-1], gs):
        blk = w_rows[:, a:b]
        mx.append(blk.amax(-1))
        mn.append(blk.amin(-1))
    return torch.stack(mx, -1), torch.stack(mn, -1)


def clip_centre(mx: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """The point of each group's range ``[mn, mx]`` nearest zero, which the clip shrinks toward:
    0 when the range holds it, else the zero-side bound of a group whose weights all share one
    sign (so that bound stays put instead of moving outward, past the group's own values)."""
    return mn.clamp(min=0).minimum(mx)


def shrink_toward(bound: torch.Tensor, centre: torch.Tensor, ratio) -> torch.Tensor:
    """``bound`` moved toward ``centre`` to ``ratio`` of its distance (1: unmoved)."""
    return centre + (bound - centre) * ratio


def clip_range(mx: torch.Tensor, mn: torch.Tensor, ratio, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped ``(max_val, min_val)`` of groups with range ``[mn, mx]`` at shrink ``ratio``
    (``"minmax"``: ``ratio[..., 0]`` shrinks the max, ``ratio[..., 1]`` the min), never wider than
    ``[mn, mx]`` on either side: ``minmax`` / ``asym`` shrink both bounds toward
    :func:`clip_centre` (0 for a group holding both signs: ``mx * ratio``, ``mn * ratio``)."""
    if mode in ("minmax", "asym"):
        centre = clip_centre(mx, mn)
        r_max, r_min = (ratio[..., 0], ratio[..., 1]) if mode == "minmax" else (ratio, ratio)
        return shrink_toward(mx, centre, r_max), shrink_toward(mn, centre, r_min)
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


def input_cross(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """``Q(x)^T (Q(x) - x) / T`` in float32 for tokens ``x`` [T, in] and their quantized ``xq``: the
    cross term of the clip losses with quantized activations."""
    xq = xq.float()
    return xq.t() @ (xq - x.float()) / x.shape[0]


def _group_sums(v: torch.Tensor, gs: int) -> torch.Tensor:
    """Row sums of ``v`` [R, in] per quantization group: [R, G]."""
    return torch.stack([v[:, a:b].sum(-1) for a, b in group_bounds(v.shape[-1], gs)], -1)


def _cross_terms(w: torch.Tensor, cross: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per group, whole row)``: ``w C^T`` [R, in] with ``C`` cut to its diagonal group blocks,
    and with all of ``C`` (the linear term of the per-group and of the joint clip loss)."""
    cross = cross.float().to(w.device)
    blocks = torch.cat([w[:, a:b] @ cross[a:b, a:b].t() for a, b in group_bounds(w.shape[-1], gs)], 1)
    return blocks, w @ cross.t()


def clip_ratios(w_rows: torch.Tensor, grams: list[tuple[int, torch.Tensor]], spec: QuantSpec, mode: str,
                ratios: list[float], sweeps: int = 2, lin: torch.Tensor | None = None) -> torch.Tensor:
    """Best shrink ratio per (row, group) of ``w_rows`` [R, in] for inputs with the per-group
    Grams ``grams`` (:func:`block_grams`): the reference's loss, each group on its own.

    ``"sym"`` / ``"asym"`` try one shrink for the whole range (``[R, G]``). ``"minmax"`` starts
    from the best ``"asym"`` shrink, then refines the max and the min shrinks separately, one
    coordinate at a time, ``sweeps`` times each (each step can only lower the error), and returns
    ``[R, G, 2]`` (max ratio, min ratio): 1 + 4 grid sweeps instead of the full grid squared.
    ``lin`` [R, in]: the per-group linear term of quantized activations (:func:`_cross_terms`)."""
    gs = spec.effective_group_size(w_rows.shape[1])
    w = w_rows.float()
    grams = [(a, g.to(w.device, torch.float32)) for a, g in grams]
    mx, mn = group_minmax(w, gs)
    centre = clip_centre(mx, mn)

    def err_of(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        d = fake_quantize(w, spec, max_val=hi, min_val=lo) - w
        err = _partial_sq_err(grams, d)
        return err if lin is None else err + 2 * _group_sums(d * lin, gs)

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
                hi = shrink_toward(mx, centre, r if side == 0 else ra)
                lo = shrink_toward(mn, centre, rb if side == 0 else r)
                err = err_of(hi, lo)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                if side == 0:
                    ra = torch.where(better, torch.full_like(err, r), ra)
                else:
                    rb = torch.where(better, torch.full_like(err, r), rb)
    return torch.stack([ra, rb], -1)


def refine_clip_jointly(w_rows: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, mode: str, ratio: torch.Tensor,
                        ratios: list[float], rounds: int, lin: torch.Tensor | None = None) -> torch.Tensor:
    """Refine the per-group clip choice ``ratio`` (from :func:`clip_ratios`, same ``mode``) against
    the whole linear's output error ``d G d^T`` (``gram`` [in, in], mean over tokens).

    The per-group loss of the reference treats each group's rounding error as if it were alone; on
    one output row the groups' errors add up or cancel through the off-diagonal blocks of G. Here
    each group in turn picks, per row, the candidate that minimises the row's total error given
    the other groups' current choice, ``rounds`` times over all groups: each step can only lower it.
    Candidates: the mode's shrink ratios (``"minmax"``: every max shrink with the current min
    shrink, and every min shrink with the current max). ``lin`` [R, in]: the whole-row linear term
    of quantized activations (:func:`_cross_terms`).
    """
    R, n = w_rows.shape
    gs = spec.effective_group_size(n)
    w = w_rows.float()
    gram = gram.float().to(w.device)
    mx, mn = group_minmax(w, gs)
    centre = clip_centre(mx, mn)
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
                c = centre[:, gi, None]
                hi = torch.cat([shrink_toward(mx[:, gi, None], c, cand),
                                shrink_toward(mx[:, gi, None], c, ra[:, gi, None]).expand(R, k)], 1)
                lo = torch.cat([shrink_toward(mn[:, gi, None], c, rb[:, gi, None]).expand(R, k),
                                shrink_toward(mn[:, gi, None], c, cand)], 1)
            else:
                hi, lo = clip_range(mx[:, gi, None], mn[:, gi, None], cand, mode)
            m = hi.shape[1]
            wr = wg.repeat_interleave(m, 0)
            sub = replace(spec, group_size=b - a)
            D = (fake_quantize(wr, sub, max_val=hi.reshape(-1, 1), min_val=lo.reshape(-1, 1)) - wr).reshape(R, m, b - a)
            if lin is not None:
                cross = cross + lin[:, a:b]
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


def absolute_clip(w: torch.Tensor, in_dim: int, spec: QuantSpec, ratio: torch.Tensor, mode: str):
    rows = rows_view(w.detach(), in_dim).float()
    lead = rows.shape[:-1]
    r2 = rows.reshape(-1, rows.shape[-1])
    mx, mn = group_minmax(r2, spec.effective_group_size(r2.shape[-1]))
    hi, lo = clip_range(mx, mn, ratio.to(mx.device), mode)
    G = mx.shape[-1]
    return hi.reshape(*lead, G).cpu(), lo.reshape(*lead, G).cpu()


def search_clip(w_rows: torch.Tensor, x: torch.Tensor, spec: QuantSpec, mode: str, ratios: list[float],
                rounds: int, xq: torch.Tensor | None = None) -> torch.Tensor:
    """Best shrink ratios of ``w_rows`` [R, in] for input tokens ``x`` [T, in]: the per-group
    search, then ``rounds`` joint refinements (float32, outside any autocast). ``xq``: the same
    tokens as the linear reads them quantized (weight-activation mode; see the module doc)."""
    gs = spec.effective_group_size(w_rows.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        gram = input_gram(x if xq is None else xq)
        per_group = whole = None
        if xq is not None:
            per_group, whole = _cross_terms(w_rows.float(), input_cross(x, xq), gs)
        r = clip_ratios(w_rows, block_grams(gram, gs), spec, mode, ratios, lin=per_group)
        if rounds:
            r = refine_clip_jointly(w_rows, gram, spec, mode, r, ratios, rounds, lin=whole)
    return r
