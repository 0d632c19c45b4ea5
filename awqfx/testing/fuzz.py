"""Discovery fuzzer: random small models from a grammar of ops, checked two ways.

1. **No false positives** — every group ``discover`` returns is folded with random positive
   scales; the model output must not change.
2. **False negatives, by brute force** — for each candidate producer (linear rows, norm weights)
   and each of its channels, double that channel in the producer, measure which linear inputs
   change (exactly by 2x, column by column), halve those weight columns, and see whether the output
   is restored. A channel for which that works is scalable; if discovery did not put it in a group,
   it is a miss. The miss rate is reported (``python -m awqfx.fuzz --cases 2000``).

The grammar covers norms with and without bias or a ``1 + w`` offset, linears with and without
bias, activations (ReLU, GELU, SiLU, tanh), residual adds, head reshapes and transposes, gating
muls, slices / chunks of fused linears, attention with GQA expand, scalar muls and concatenation.
"""
from __future__ import annotations

import argparse
import copy
import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import awqfx
from awqfx.graph import fetch_attr, linear_op
from awqfx.params import set_param
from awqfx.passes.discover import discover
from awqfx.passes.fold import fold_scales

HIDDEN = 16


class OffsetNorm(nn.Module):
    """RMS norm with a ``1 + w`` weight (Gemma style)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.2)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (1.0 + self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(1 + torch.randn(dim) * 0.2)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        m = nn.LayerNorm(dim)
    elif kind == "layernorm_nobias":
        m = nn.LayerNorm(dim, bias=False)
    elif kind == "offset":
        return OffsetNorm(dim)
    else:
        return RMSNorm(dim)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.2)
        if m.bias is not None:
            m.bias.normal_(0.0, 0.2)
    return m


_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class Block:
    kind: str
    params: dict = field(default_factory=dict)


class FuzzModel(nn.Module):
    """A residual stack of randomly chosen blocks; forward interprets the recipe."""

    def __init__(self, blocks: list[Block], rng: random.Random):
        super().__init__()
        self.blocks = blocks
        self.mods = nn.ModuleList()
        H = HIDDEN
        for b in blocks:
            m = nn.ModuleDict()
            p = b.params
            if p.get("norm"):
                m["norm"] = _norm(p["norm"], H)
            if b.kind == "mlp":
                m["up"] = nn.Linear(H, p["inner"], bias=p["bias"])
                m["down"] = nn.Linear(p["inner"], H, bias=p["bias"])
                if p["gated"]:
                    m["gate"] = nn.Linear(H, p["inner"], bias=p["bias"])
            elif b.kind == "fused_mlp":
                m["gate_up"] = nn.Linear(H, 2 * p["inner"], bias=p["bias"])
                m["down"] = nn.Linear(p["inner"], H, bias=p["bias"])
            elif b.kind == "attn":
                hd, nh, nkv = p["head_dim"], p["heads"], p["kv_heads"]
                if p["fused"]:
                    m["qkv"] = nn.Linear(H, (nh + 2 * nkv) * hd, bias=p["bias"])
                else:
                    m["q"] = nn.Linear(H, nh * hd, bias=p["bias"])
                    m["k"] = nn.Linear(H, nkv * hd, bias=p["bias"])
                    m["v"] = nn.Linear(H, nkv * hd, bias=p["bias"])
                m["o"] = nn.Linear(nh * hd, H, bias=p["bias"])
            elif b.kind == "chain":
                m["a"] = nn.Linear(H, p["inner"], bias=p["bias"])
                m["b"] = nn.Linear(p["inner"], H, bias=p["bias"])
            elif b.kind == "cat":
                m["a"] = nn.Linear(H, p["inner"], bias=p["bias"])
                m["b"] = nn.Linear(H, p["inner"], bias=p["bias"])
                m["c"] = nn.Linear(2 * p["inner"], H, bias=p["bias"])
            self.mods.append(m)
        self.head = nn.Linear(H, 8)

    def forward(self, x):
        for b, m in zip(self.blocks, self.mods):
            p = b.params
            h = m["norm"](x) if "norm" in m else x
            if p.get("scalar"):
                h = h * 0.5
            if b.kind == "mlp":
                up = m["up"](h)
                if p["gated"]:
                    inner = _ACTS[p["act"]](m["gate"](h)) * up
                else:
                    inner = _ACTS[p["act"]](up)
                y = m["down"](inner)
            elif b.kind == "fused_mlp":
                gate, up = m["gate_up"](h).chunk(2, dim=-1)
                y = m["down"](_ACTS[p["act"]](gate) * up)
            elif b.kind == "attn":
                y = self._attn(m, h, p)
            elif b.kind == "chain":
                a = m["a"](h)
                if p["act"] != "none":
                    a = _ACTS[p["act"]](a)
                y = m["b"](a)
            elif b.kind == "cat":
                y = m["c"](torch.cat([m["a"](h), _ACTS[p["act"]](m["b"](h))], dim=-1))
            else:
                raise AssertionError(b.kind)
            x = x + y if p["residual"] else y
        return self.head(x)

    @staticmethod
    def _attn(m, h, p):
        B, T, _ = h.shape
        hd, nh, nkv = p["head_dim"], p["heads"], p["kv_heads"]
        if p["fused"]:
            q, k, v = m["qkv"](h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = m["q"](h), m["k"](h), m["v"](h)
        q = q.view(B, T, nh, hd).transpose(1, 2)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if nkv != nh:
            rep = nh // nkv
            k = k[:, :, None].expand(B, nkv, rep, T, hd).reshape(B, nh, T, hd)
            v = v[:, :, None].expand(B, nkv, rep, T, hd).reshape(B, nh, T, hd)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return m["o"](o.transpose(1, 2).reshape(B, T, nh * hd))


def random_model(seed: int) -> FuzzModel:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    blocks = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["mlp", "fused_mlp", "attn", "chain", "cat"])
        p = {
            "norm": rng.choice([None, "layernorm", "layernorm_nobias", "rms", "offset"]),
            "bias": rng.random() < 0.4,
            "residual": rng.random() < 0.7,
            "scalar": rng.random() < 0.2,
            "act": rng.choice(list(_ACTS)),
            "inner": rng.choice([8, 12, 24]),
        }
        if kind == "mlp":
            p["gated"] = rng.random() < 0.5
        if kind == "chain":
            p["act"] = rng.choice(["none", "relu", "gelu"])
        if kind == "attn":
            p["head_dim"] = rng.choice([4, 8])
            p["kv_heads"] = rng.choice([1, 2])
            p["heads"] = p["kv_heads"] * rng.choice([1, 2])
            p["fused"] = rng.random() < 0.4
        blocks.append(Block(kind, p))
    return FuzzModel(blocks, rng).eval()


# -- checks -----------------------------------------------------------------------------------

@dataclass
class CaseResult:
    seed: int
    groups: int
    false_positive: str | None  # description when folding changed the output
    scalable: int  # brute-force scalable (producer, channel) pairs
    missed: int  # of those, not in any discovered group


def _linear_inputs(gm, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``gm`` and record the activation operand of every linear-like op."""
    seen: dict[str, torch.Tensor] = {}
    lins = {n.name: linear_op(gm, n) for n in gm.graph.nodes}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            lin = lins.get(n.name)
            if lin is not None:
                seen[n.name] = self.env[lin.data].detach().clone()
            return out

    with torch.no_grad():
        out = Rec(gm).run(x)
    return out, seen


def brute_force_scalable(gm, x, tol: float = 1e-4) -> set[tuple[str, int]]:
    """(producer weight, channel) pairs whose doubling can be undone by halving linear columns."""
    base_out, base_in = _linear_inputs(gm, x)
    lins = {n.name: linear_op(gm, n) for n in gm.graph.nodes if linear_op(gm, n) is not None}
    producers: list[tuple[str, str, int, float, str | None]] = []  # (weight, kind, out_dim, offset, bias)
    for lin in lins.values():
        producers.append((lin.weight.name, "linear", lin.out_dim, 0.0, lin.bias.name if lin.bias else None))
    for name, p in gm.named_parameters():
        if p.dim() == 1 and not any(name == (lin.bias.name if lin.bias else None) for lin in lins.values()):
            if name.endswith("weight"):
                offset = 1.0 if isinstance(fetch_attr(gm, name.rsplit(".", 1)[0]), OffsetNorm) else 0.0
                bias = name[: -len("weight")] + "bias"
                producers.append((name, "norm", 0, offset, bias if bias in dict(gm.named_parameters()) else None))
    ok: set[tuple[str, int]] = set()
    for weight, kind, out_dim, offset, bias in producers:
        C = fetch_attr(gm, weight).shape[out_dim if kind == "linear" else 0]
        for c in range(C):
            g = copy.deepcopy(gm)
            w = fetch_attr(g, weight).detach().clone()
            idx = [slice(None)] * w.dim()
            idx[out_dim if kind == "linear" else 0] = c
            w[tuple(idx)] = (w[tuple(idx)] + offset) * 2 - offset
            set_param(g, weight, w)
            if bias is not None:
                b = fetch_attr(g, bias).detach().clone()
                b[c] *= 2
                set_param(g, bias, b)
            if _compensate(g, x, lins, base_out, base_in, tol):
                ok.add((weight, c))
    return ok


def _compensate(g, x, lins, base_out, base_in, tol) -> bool:
    """Undo a doubled producer channel by halving consumer columns, earliest linear first.

    After each compensation the graph is re-run, so effects downstream of a restored consumer
    disappear. True when the output is restored and at least one linear absorbed the change.
    """
    order = [n.name for n in g.graph.nodes if n.name in lins]
    done: set[str] = set()  # consumers already compensated: their inputs stay doubled by design
    for _ in range(len(order) + 1):
        out, new_in = _linear_inputs(g, x)
        changed = [n for n in order if n not in done and not torch.allclose(base_in[n], new_in[n], atol=tol, rtol=tol)]
        if not changed:
            return bool(done) and torch.allclose(out, base_out, atol=tol, rtol=tol)
        lin = lins[changed[0]]
        old, new = base_in[changed[0]], new_in[changed[0]]
        fo, fn = old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1])
        cols = [j for j in range(fo.shape[1]) if not torch.allclose(fo[:, j], fn[:, j], atol=tol, rtol=tol)]
        if not all(torch.allclose(fn[:, j], 2 * fo[:, j], atol=tol, rtol=tol) for j in cols):
            return False
        cw = fetch_attr(g, lin.weight.name).detach().clone()
        sel = [slice(None)] * cw.dim()
        sel[lin.in_dim] = cols
        cw[tuple(sel)] = cw[tuple(sel)] / 2
        set_param(g, lin.weight.name, cw)
        done.add(changed[0])
    return False


def run_case(seed: int, brute_force: bool = True) -> CaseResult:
    model = random_model(seed)
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(seed))
    gm = awqfx.capture(model, example_inputs=(x,))
    d = discover(gm)
    ref = model(x)
    g2 = copy.deepcopy(gm)
    gen = torch.Generator().manual_seed(seed + 1)
    fold_scales(g2, d.groups, [torch.rand(g.channels.numel(), generator=gen) * 1.5 + 0.5 for g in d.groups])
    with torch.no_grad():
        out = g2(x)
    err = ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
    fp = None if err <= 1e-4 else f"seed {seed}: output changed by {err:.2e} ({[g.name for g in d.groups]})"
    scalable, missed = 0, 0
    if brute_force:
        truth = brute_force_scalable(gm, x)
        found = {(g.producer.weight, int(c)) for g in d.groups if g.producer.weight for c in g.channels}
        scalable = len(truth)
        missed = len(truth - found)
    return CaseResult(seed, len(d.groups), fp, scalable, missed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m awqfx.fuzz", description="Fuzz awqfx discovery on random models.")
    ap.add_argument("--cases", type=int, default=200, help="number of random models (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--no-brute-force", action="store_true", help="skip the false-negative measurement")
    args = ap.parse_args(argv)
    fps, scalable, missed, groups = [], 0, 0, 0
    for s in range(args.seed, args.seed + args.cases):
        r = run_case(s, brute_force=not args.no_brute_force)
        groups += r.groups
        scalable += r.scalable
        missed += r.missed
        if r.false_positive:
            fps.append(r.false_positive)
    print(f"cases: {args.cases}  groups found: {groups}  false positives: {len(fps)}")
    if not args.no_brute_force:
        rate = missed / scalable if scalable else 0.0
        print(f"brute-force scalable (producer, channel) pairs: {scalable}  missed by discovery: {missed}  "
              f"false-negative rate: {rate:.2%}")
    for f in fps[:10]:
        print("  FP", f)
    return 1 if fps else 0


if __name__ == "__main__":
    raise SystemExit(main())
