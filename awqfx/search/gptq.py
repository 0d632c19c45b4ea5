"""GPTQ rounding with fixed quantization ranges: the ``--refine gptq`` step after the clip search.

Round to nearest treats each weight on its own. GPTQ (Frantar et al., 2022) rounds the columns
of a linear one at a time and moves each column's rounding error onto the columns not yet
rounded, in proportion to how the inputs correlate: the update minimises the output error
``(W - Q) H (W - Q)^T`` with ``H = X^T X`` the input Gram. Here the quantization grid of every
(row, group) is fixed before rounding starts -- the AWQ-scaled weight's clipped ranges, so the
scales and zero points stay those of the plan and only the integer codes change ("static
groups"); that also lets columns go in any order, so by default they go by decreasing ``H_jj``
(the most active inputs first, "act order"). A ragged last group is just a shorter set of
columns sharing one grid.

Steps (``H`` averaged over tokens; float64 for the factorisations):

1. ``H += damp * mean(diag H) * I``; a column whose input is never non-zero (``H_jj == 0``) is
   rounded alone (``H_jj = 1``) and passes no error on.
2. ``U = chol(H^-1)^T`` (upper): row ``j`` of ``U`` after column ``j`` says how column ``j``'s
   error ``e_j = (w_j - q_j) / U_jj`` moves the later columns: ``w_k -= e_j U_jk``.
3. Columns go in blocks of ``block``; inside a block the update is applied column by column,
   then to every later column at once (``W[:, end:] -= E U[block, end:]``).
"""
from __future__ import annotations

import torch

from awqfx.quant import QuantSpec, compute_qparams, group_bounds

__all__ = ["gptq_codes"]


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``h^-1`` for a symmetric positive definite ``h`` (float64)."""
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_codes(w_rows: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None,
               min_val: torch.Tensor | None = None, damp: float = 0.01, act_order: bool = True,
               block: int = 128) -> torch.Tensor:
    """Integer codes (uint8 ``[R, in]``) of ``w_rows`` ``[R, in]`` on the grid that ``max_val`` /
    ``min_val`` (``[R, n_groups]``; None: the weight's own group range) define, rounded by GPTQ
    against the input Gram ``gram`` ``[in, in]`` (module doc). Dequantized with the same
    ``compute_qparams(w_rows, spec, max_val, min_val)`` they give the refined weight."""
    spec.require_int("GPTQ rounding")
    R, n = w_rows.shape
    if gram.shape != (n, n):
        raise ValueError(f"GPTQ needs the [{n}, {n}] input Gram of this weight, got {tuple(gram.shape)}")
    w = w_rows.detach().to(torch.float64)
    dev = w_rows.device
    scale, zero = compute_qparams(w_rows.detach().float(), spec, None if max_val is None else max_val.to(dev),
                                  None if min_val is None else min_val.to(dev))
    col_group = torch.empty(n, dtype=torch.long, device=dev)
    for gi, (a, b) in enumerate(group_bounds(n, spec.group_size)):
        col_group[a:b] = gi
    col_scale = scale.to(torch.float64)[:, col_group]  # [R, in]: each column's group grid
    col_zero = zero.to(torch.float64)[:, col_group]
    qmax = float(spec.qmax)

    h = gram.detach().to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n, device=w.device)
    w, h = w[:, order], h[order][:, order]
    s, z = col_scale[:, order], col_zero[:, order]
    u = _inverse_cholesky_upper(h)

    q = torch.empty_like(w)
    for a in range(0, n, block):
        b = min(a + block, n)
        wb = w[:, a:b].clone()
        err = torch.empty_like(wb)
        for j in range(b - a):
            col = wb[:, j]
            qj = torch.clamp(torch.round(col / s[:, a + j]) + z[:, a + j], 0.0, qmax)
            q[:, a + j] = qj
            e = (col - (qj - z[:, a + j]) * s[:, a + j]) / u[a + j, a + j]
            wb[:, j:] -= e[:, None] * u[a + j, a + j : b][None, :]
            err[:, j] = e
        w[:, b:] -= err @ u[a:b, b:]
    codes = torch.empty_like(q)
    codes[:, order] = q
    return codes.to(torch.uint8)
