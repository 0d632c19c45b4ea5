"""Discovered scale groups as llm-compressor ``AWQMapping`` entries (``awqfx inspect --mappings``).

An ``AWQMapping(smooth_layer, balance_layers)`` names, by module name or ``re:`` regex, the
layer whose output is divided by ``s`` and the layers whose input columns are multiplied by it.
llm-compressor applies a resolved mapping in exactly three ways (its AWQ modifier's smoothing
step), so a group is expressible only when its transform is one of them:

- a smooth layer with a 1-D ``.weight`` (a norm): the whole weight (and bias) is divided by ``s``,
  so every producer channel must be scaled;
- a smooth layer with a 2-D ``.weight``: the *last* ``len(s)`` output rows are divided (a fused
  ``qkv_proj`` smoothing ``o_proj``), so the scaled channels must be the trailing rows of an
  ``[out, in]`` weight, and a bias must be scaled whole;
- every balance layer: ``W * s.view(1, -1)``, column ``j`` by ``s[j]``, so each consumer must be
  a 2-D ``[out, in]`` ``.weight`` whose columns read the scaled channels one-to-one, in order.

Everything else (a scale after an activation, GQA repeats, stacked 3-D expert weights, Conv1D
``[in, out]`` layouts, interleaved fused heads, groups awqfx leaves unscaled) is listed apart
with the reason, taken from the group's own data.

Groups that differ only in numeric path components (the layer index) collapse into one mapping.
Each pattern is ``re:.*<suffix>$`` with the shortest module-path suffix that matches exactly the
intended modules among ``model.named_modules()`` (the same ``re.match`` llm-compressor's
compressed-tensors matcher uses); when no suffix does, numeric components become alternations of
the indices used, and as a last resort the full names are listed. A pattern is never emitted
unverified.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awqfx.groups import Consumer, Discovery, ScaleGroup, _ranges

FORMATS = ("llm-compressor",)
_IMPORT = "from llmcompressor.modifiers.awq import AWQMapping"


@dataclass
class AWQMappingEntry:
    """One llm-compressor ``AWQMapping``; ``groups`` are the awqfx groups it stands for."""

    smooth_layer: str
    balance_layers: list[str]
    groups: list[str] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"smooth_layer": self.smooth_layer, "balance_layers": list(self.balance_layers)}
        if self.note:
            out["note"] = self.note
        return out

    def to_python(self) -> str:
        balance = ", ".join(f'"{b}"' for b in self.balance_layers)
        line = f'AWQMapping("{self.smooth_layer}", [{balance}]),'
        return f"{line}  # {self.note}" if self.note else line


@dataclass
class NotExpressible:
    group: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"group": self.group, "reason": self.reason}


@dataclass
class MappingReport:
    mappings: list[AWQMappingEntry]
    not_expressible: list[NotExpressible]

    def to_json(self) -> dict[str, Any]:
        return {"mappings": [m.to_json() for m in self.mappings],
                "not_expressible": [n.to_json() for n in self.not_expressible]}

    def to_python(self) -> str:
        """Pasteable Python: the import, ``mappings = [...]``, and the rest as comments."""
        lines = [_IMPORT, ""]
        if self.mappings:
            lines += ["mappings = [", *(f"    {m.to_python()}" for m in self.mappings), "]"]
        else:
            lines.append("mappings = []")
        if self.not_expressible:
            n = len(self.not_expressible)
            lines += ["", f"# not expressible as AWQMapping ({n} group{'s' if n != 1 else ''}):"]
            lines += [f"#   {n.group}: {n.reason}" for n in self.not_expressible]
        return "\n".join(lines)


# -- which groups an AWQMapping can express -------------------------------------------------

def _param(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in params:
        raise ValueError(f"scale group names parameter {name!r}, which the model does not have; pass the "
                         "module that was captured (discovery on it names its parameters).")
    return params[name]


def _producer_reason(g: ScaleGroup, params: dict[str, torch.Tensor]) -> str | None:
    p = g.producer
    if p.kind == "activation":
        return (f"the scale follows an activation ({p.path or p.node}), where awqfx inserts a multiply; an "
                "AWQMapping divides the smooth layer's weight, and an activation has none")
    w = _param(params, p.weight)
    if p.weight != f"{p.path}.weight":
        return (f"the scale is absorbed by {p.weight} ({w.dim()}-D), which is not the .weight of module "
                f"{p.path!r}; an AWQMapping divides the smooth module's .weight")
    ch = g.channels.tolist()
    n, total = len(ch), p.num_channels
    if w.dim() == 1:
        if n != total:
            return (f"only {n} of the {total} channels of {p.weight} are scaled; llm-compressor divides "
                    "a 1-D smooth weight as a whole")
        return None
    if w.dim() != 2:
        return f"{p.weight} is a {w.dim()}-D parameter; llm-compressor smooths 1-D or [out, in] weights"
    if p.out_dim != 0:
        return (f"{p.weight} keeps its output channels along dim {p.out_dim} (an [in, out] weight); "
                "llm-compressor divides rows of an [out, in] weight")
    if ch != list(range(total - n, total)):
        return (f"the scaled output rows of {p.weight} are {','.join(f'{a}:{b}' for a, b in _ranges(ch))} of {total}, not its last {n}; "
                "llm-compressor divides only the last rows of a smooth layer wider than its balance layers")
    if p.bias is not None and n != total:
        return (f"only the last {n} of {total} rows of {p.weight} are scaled but it has a bias, which "
                "llm-compressor divides as a whole")
    return None


def _consumer_reason(c: Consumer, g: ScaleGroup, params: dict[str, torch.Tensor]) -> str | None:
    if c.weight != f"{c.path}.weight":
        w = _param(params, c.weight)
        return (f"balance weight {c.weight} ({w.dim()}-D) is not the .weight of module {c.path!r}; "
                "llm-compressor multiplies the .weight of each balance module")
    w = _param(params, c.weight)
    if w.dim() != 2:
        return f"balance weight {c.weight} is {w.dim()}-D; llm-compressor multiplies [out, in] weights"
    if c.in_dim != 1:
        return (f"{c.weight} reads its input along dim {c.in_dim} (an [in, out] weight); llm-compressor "
                "multiplies columns (dim 1) of balance weights")
    cols, ch = c.columns, g.channels
    if cols.tolist() == ch.tolist():
        return None
    unfed = int((cols < 0).sum())
    if unfed:
        return (f"{unfed} of the {cols.numel()} input columns of {c.weight} are fed by something other "
                f"than {g.name}; llm-compressor multiplies every input column of a balance layer")
    counts = torch.bincount(cols)
    if int(counts.max()) > 1:
        return (f"{c.weight} reads each of the {len(ch)} scaled channels {int(counts.max())} times "
                "(kv heads repeated for grouped-query attention); llm-compressor multiplies balance columns "
                "one-to-one with the smooth layer's channels and cannot repeat them")
    return (f"the input columns of {c.weight} read the scaled channels in another order or subset; "
            "llm-compressor scales balance column j by smooth channel j")


def not_expressible_reason(g: ScaleGroup, params: dict[str, torch.Tensor]) -> str | None:
    """Why ``g`` cannot be an AWQMapping, or None when it can (``params``: the model's parameters)."""
    if not any(c.quantize for c in g.consumers):
        return (f"none of its consumers ({', '.join(c.weight for c in g.consumers)}) is quantized, so AWQ "
                "leaves this group unscaled")
    reason = _producer_reason(g, params)
    if reason:
        return reason
    for c in g.consumers:
        reason = _consumer_reason(c, g, params)
        if reason:
            return reason
    return None


# -- collapsing across layers and building verified patterns -------------------------------

def _template(path: str) -> tuple[str, ...]:
    """The path with every numeric component (layer, expert index) replaced by ``#``."""
    return tuple("#" if part.isdigit() else part for part in path.split("."))


def _render(names: list[str], length: int, alternate: bool) -> str:
    """``.*`` + the last ``length`` components of ``names`` (which share one template); numeric
    components that differ become ``[0-9]+`` or, with ``alternate``, ``(i|j|...)``."""
    columns = list(zip(*(n.split(".") for n in names)))[-length:]
    parts = []
    for values in columns:
        distinct = sorted(set(values), key=lambda v: (len(v), v))
        if len(distinct) == 1:
            parts.append(distinct[0])
        else:
            parts.append(f"({'|'.join(distinct)})" if alternate else "[0-9]+")
    return ".*" + ".".join(parts) + "$"


def _matches(pattern: str, module_names: list[str]) -> set[str]:
    rx = re.compile(pattern)
    return {n for n in module_names if rx.match(n)}


def module_pattern(names: list[str], module_names: list[str]) -> str:
    """The shortest ``re:`` pattern matching exactly ``names`` among ``module_names``."""
    want = set(names)
    unique = sorted(want)
    depth = len(unique[0].split("."))
    parts = list(zip(*(n.split(".") for n in unique)))
    for alternate in (False, True):
        for length in range(1, depth + 1):
            if length < depth and any(v.isdigit() for v in parts[-length]):
                continue  # a suffix starts at a name, not at an index
            pattern = _render(unique, length, alternate)
            if _matches(pattern, module_names) == want:
                return f"re:{pattern}"
    pattern = "(" + "|".join(re.escape(n) for n in unique) + ")$"
    if _matches(pattern, module_names) != want:
        raise ValueError(f"modules {unique} are not all among the model's modules; pass the module that was captured.")
    return f"re:{pattern}"


def llm_compressor_mappings(discovery: Discovery, model: nn.Module) -> MappingReport:
    """The groups of ``discovery`` (found on ``model``) as collapsed llm-compressor AWQMappings."""
    params = dict(model.named_parameters(remove_duplicate=False))
    module_names = [n for n, _ in model.named_modules()]
    collapsed: dict[tuple, list[ScaleGroup]] = {}
    rest: list[NotExpressible] = []
    for g in discovery.groups:
        reason = not_expressible_reason(g, params)
        if reason:
            rest.append(NotExpressible(g.name, reason))
            continue
        key = (_template(g.producer.path), tuple(dict.fromkeys(_template(c.path) for c in g.consumers)))
        collapsed.setdefault(key, []).append(g)
    mappings = []
    for (_, consumer_templates), groups in collapsed.items():
        smooth = module_pattern([g.producer.path for g in groups], module_names)
        balance = [module_pattern([c.path for g in groups for c in g.consumers if _template(c.path) == t], module_names)
                   for t in consumer_templates]
        offsets = sorted({g.producer.offset for g in groups if g.producer.offset})
        note = ""
        if offsets:
            note = (f"smooth layer computes x * ({'/'.join(f'{o:g}' for o in offsets)} + weight); llm-compressor "
                    "smooths it only for norm classes it converts to x * weight while calibrating")
        mappings.append(AWQMappingEntry(smooth, balance, [g.name for g in groups], note))
    return MappingReport(mappings, rest)
