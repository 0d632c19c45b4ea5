"""The knobs of the AWQ pass, as typed parts, validated before any work starts.

``AWQConfig`` is composed of the quantizer spec (:class:`~awqfx.quant.QuantSpec`: bits, group
size, symmetric), the activation quantizer (:class:`ActSpec`, or None: weight-only), the scale
search (:class:`ScaleSearch`) or SmoothQuant's fixed scales (:class:`SmoothQuant`), the clip
search (:class:`ClipSearch`) and the runtime settings (:class:`Runtime`). Round-to-nearest is the
config with no scale search and no clip search (``AWQConfig.rtn(spec)``). Defaults are the measured best on SmolLM2-135M
(docs/results.md, "AWQ quality"); the reference defaults (AutoAWQ / the paper) are noted where
ours differ.

``AWQConfig.of(bits=3, group_size=64, clip="sym", method="rtn", ...)`` builds one from the flat
names the CLI flags use (``FLAT_FIELDS``).
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from awqfx.quant import QuantSpec

__all__ = ["AWQConfig", "ScaleSearch", "SmoothQuant", "ClipSearch", "Refine", "Runtime", "GroupSpec", "ActSpec", "FLAT_FIELDS",
           "ConfigError", "ACT_GRANULARITIES", "ACT_MODE_WEIGHTS"]

_SCALE_FORMS = ("x", "duo", "both")
_CLIPS = ("asym", "minmax", "sym")
_PROPAGATE = ("fp", "quant")
_AUTOCAST = ("auto", "bfloat16", "float16")
_METHODS = ("awq", "rtn", "smoothquant", "gptq")
_REFINES = ("gptq", "block")
ACT_GRANULARITIES = ("per-token", "per-tensor")


def fast_half_matmul(device, dtype: torch.dtype) -> bool:
    """Whether ``device`` multiplies ``dtype`` (bfloat16 / float16) matrices at least as fast as
    float32: CUDA with bf16 support (sm80+) or any CUDA for float16; CPUs with avx512_bf16 / AMX
    for bfloat16 (elsewhere torch's CPU half matmuls are tens of times slower than float32)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dtype == torch.float16 or torch.cuda.is_bf16_supported())
    if dev.type == "cpu" and dtype == torch.bfloat16:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


class ConfigError(ValueError):
    """The config does not fit the model (e.g. a group size larger than a layer's inputs)."""


def _need_int(owner: str, name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{owner}.{name} must be an integer >= {lo}, got {v!r}")


def _need_choice(owner: str, name: str, v: Any, choices: tuple) -> None:
    if v not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")


def _need_bool(owner: str, name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{owner}.{name} must be True or False, got {v!r}")


@dataclass(frozen=True)
class ActSpec:
    """How the input activations of every quantized linear are quantized (weight-activation mode,
    W8A8 as llmc does it; ``--act-bits``, ``--act-granularity``).

    Dynamic and symmetric: the scale is computed at run time from the activation itself,
    ``max |x| / (2^(bits-1) - 1)`` per token (``"per-token"``: per row of the linear's input) or
    over the whole input tensor (``"per-tensor"``), and ``q = round(x / scale)`` is a signed
    ``bits``-bit integer (:mod:`awqfx.act_quant`). bits: 4..8.
    """

    bits: int = 8
    granularity: str = "per-token"

    def __post_init__(self) -> None:
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int) or not 4 <= b <= 8:
            raise ConfigError(f"activation bits (--act-bits) must be an integer from 4 to 8, got {b!r}")
        if self.granularity not in ACT_GRANULARITIES:
            raise ConfigError(f"activation granularity (--act-granularity) must be one of "
                              f"{', '.join(ACT_GRANULARITIES)}, got {self.granularity!r}")

    @property
    def per_token(self) -> bool:
        return self.granularity == "per-token"

    @property
    def qmax(self) -> int:
        """Largest signed code, ``2^(bits-1) - 1`` (the codes lie in ``[-qmax, qmax]``)."""
        return (1 << (self.bits - 1)) - 1


#: The weight quantizer's flat defaults in weight-activation mode (the CLI's when ``--act-bits`` is
#: given): 8-bit, symmetric, one scale per output row (the int8 kernel multiplies by one weight scale
#: per output channel), clipped ``sym`` (max |w|, the range a symmetric grid uses), as llmc quantizes
#: W8A8. Any other weight spec is still allowed.
ACT_MODE_WEIGHTS: dict[str, Any] = {"bits": 8, "group_size": -1, "symmetric": True, "clip": "sym"}


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant's scales on the discovered groups (the baseline of weight-activation AWQ): no
    search, ``s = max|X|^alpha / max|W|^(1-alpha)`` per channel (``max|X|`` over every calibration
    token, ``max|W|`` over the rows of the group's quantized consumers; ``max|W|`` and ``s``
    clamped at 1e-5, as the reference does), folded like AWQ's (:mod:`awqfx.search.smoothquant`).
    alpha in [0, 1] (``--sq-alpha``, default 0.5, the paper's)."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ConfigError(f"SmoothQuant alpha (--sq-alpha) must be a number in [0, 1], got {a!r}")
        object.__setattr__(self, "alpha", float(a))


@dataclass(frozen=True)
class ScaleSearch:
    """The per-group scale search (docs/design.md, "The search").

    n_grid: ratios alpha = 0, 1/n, ..., (n-1)/n. form: ``"x"`` (s = x_mean^alpha, the paper's;
    default: on SmolLM2 it recovers more of RTN's gap than ``duo`` at 3 and 4 bits),
    ``"duo"`` (s = x_mean^alpha / w_mean^(1-alpha), AutoAWQ's default) or ``"both"`` (both
    grids, best loss wins). include_identity: also try s = 1 (plain RTN), so the search never
    picks scales worse than RTN on its own loss. propagate: ``"fp"`` (each group sees the float
    outputs of earlier groups, like the reference) or ``"quant"`` (the already-quantized ones).
    drop_unfoldable: leave unscaled (s = 1) every group whose scale no parameter can absorb (an
    activation producer, GELU -> fc2: its ``1/s`` needs an inserted scale node), for outputs
    that cannot hold such a node (``--drop-unfoldable``; ``ObservedGraph.dropped`` lists them).
    guard_samples: calibration sequences held back from the search (recorded after the loss
    sample) on which each group's chosen scale must lower its region loss against s = 1; a group
    whose scale does not is left unscaled (``--guard-samples``; 0: no guard; docs/design.md,
    "The per-group guard").
    grid_stride: the search first evaluates every ``grid_stride``-th point of each form's grid
    (the identity included), then the points within ``grid_stride - 1`` of the best of those, in
    its form; 1 evaluates the whole grid (docs/design.md, "The search").
    """

    n_grid: int = 20
    grid_stride: int = 4
    form: str = "x"
    include_identity: bool = True
    propagate: str = "fp"
    drop_unfoldable: bool = False
    guard_samples: int = 0

    def __post_init__(self) -> None:
        _need_int("ScaleSearch", "n_grid", self.n_grid, 1)
        _need_int("ScaleSearch", "grid_stride", self.grid_stride, 1)
        _need_choice("ScaleSearch", "form", self.form, _SCALE_FORMS)
        _need_bool("ScaleSearch", "include_identity", self.include_identity)
        _need_choice("ScaleSearch", "propagate", self.propagate, _PROPAGATE)
        _need_bool("ScaleSearch", "drop_unfoldable", self.drop_unfoldable)
        _need_int("ScaleSearch", "guard_samples", self.guard_samples, 0)


@dataclass(frozen=True)
class ClipSearch:
    """The per-(row, group) clip search.

    mode: ``"minmax"`` (shrink each group's max and min separately), ``"asym"`` (max and min by
    one ratio, llmc) or ``"sym"`` (max |w|, the reference). grid: steps of 1/grid from 1.0 down to
    max_shrink (exclusive: 1.0, 0.95, ..., 0.55 for the defaults). rounds: passes refining each
    group's choice against the whole linear's output error after the per-group loss (0 = the
    per-group loss only; on SmolLM2 w4 g64 the per-group variants recover 54-59 % of RTN's gap,
    the refinement 76 %, docs/results.md). skip_qk: skip weights feeding attention queries/keys
    (the reference's default). tokens: loss-sample tokens (evenly spaced) the clip losses use.
    """

    mode: str = "minmax"
    grid: int = 20
    rounds: int = 2
    max_shrink: float = 0.5
    skip_qk: bool = True
    tokens: int = 4096

    def __post_init__(self) -> None:
        _need_choice("ClipSearch", "mode", self.mode, _CLIPS)
        _need_int("ClipSearch", "grid", self.grid, 1)
        _need_int("ClipSearch", "rounds", self.rounds, 0)
        _need_int("ClipSearch", "tokens", self.tokens, 1)
        _need_bool("ClipSearch", "skip_qk", self.skip_qk)
        ms = self.max_shrink
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0.0 <= ms < 1.0:
            raise ValueError(f"ClipSearch.max_shrink must be a number in [0, 1), got {ms!r}")

    def shrink_ratios(self) -> list[float]:
        """Candidates: 1.0, 1 - 1/grid, ... while above ``max_shrink``."""
        n = self.grid
        return [1.0 - i / n for i in range(n) if 1.0 - i / n > self.max_shrink + 1e-9]


@dataclass(frozen=True)
class Refine:
    """The integer rounding refined after the scale and clip searches (``--refine``).

    method: ``"gptq"``: each linear's codes rounded by GPTQ on the grid the searches chose (its
    scales and zero points unchanged), against the input Gram of the loss sample's tokens
    (:mod:`awqfx.search.gptq`); ``"block"``: every weight's rounding and each group's range
    learnt against its block's output on the loss sample (:mod:`awqfx.search.block_rounding`).
    damp: added to the Gram's diagonal, as a fraction of its mean (GPTQ's 0.01). act_order: round
    the columns by decreasing input energy (the grid is fixed beforehand, so any order keeps the
    groups' scales). iters / lr / batch (``block``): signed-gradient steps per block, the first
    step's size (None: 1 / iters, decaying linearly to 0) and sequences per step. samples
    (``block``): calibration sequences it learns on, spread over the calibration set, the search's
    loss sample first (``prepare`` records as many); 32 by measurement: on the loss sample's 8 it
    fits them more than it learns what holds on other texts, and 64 is 30 % slower for a mixed
    gain (docs/results.md, "The refine on more sequences").
    """

    method: str = "gptq"
    damp: float = 0.01
    act_order: bool = True
    iters: int = 50
    lr: float | None = None
    batch: int = 2
    samples: int = 32

    def __post_init__(self) -> None:
        _need_choice("Refine", "method", self.method, _REFINES)
        _need_int("Refine", "samples", self.samples, 1)
        _need_bool("Refine", "act_order", self.act_order)
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ConfigError(f"Refine.damp (--refine-damp) must be a number in (0, 1], got {d!r}")
        object.__setattr__(self, "damp", float(d))
        _need_int("Refine", "iters", self.iters, 1)
        _need_int("Refine", "batch", self.batch, 1)
        lr = self.lr
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < lr <= 1.0:
                raise ConfigError(f"Refine.lr (--refine-lr) must be a number in (0, 1], got {lr!r}")
            object.__setattr__(self, "lr", float(lr))


@dataclass(frozen=True)
class Runtime:
    """Where and how the work runs.

    device: where calibration and search run (None: where the graph's parameters are).
    batch_size: sequences per calibration forward when ``calib`` is one [N, L] tensor.
    loss_samples: calibration sequences kept (as token ids) for the region and clip losses;
    statistics (mean |x|) always use every calibration token.
    calib_dtype / search_dtype: ``None`` (the graph's own precision), ``"bfloat16"`` /
    ``"float16"`` (``torch.autocast`` in that dtype; statistics and losses still accumulate in
    float32+), or ``"auto"`` (default): bfloat16 where the hardware has fast bf16 matmuls
    (avx512_bf16/AMX CPUs, sm80+ GPUs) for a float32 model, else None.
    """

    device: str | None = None
    batch_size: int = 8
    loss_samples: int = 8
    calib_dtype: str | None = "auto"
    search_dtype: str | None = "auto"

    def __post_init__(self) -> None:
        _need_int("Runtime", "batch_size", self.batch_size, 1)
        _need_int("Runtime", "loss_samples", self.loss_samples, 1)
        if self.device is not None:
            dev = str(self.device)
            if not (dev == "cpu" or dev == "cuda" or dev.startswith("cuda:")):
                raise ValueError(f"Runtime.device must be 'cpu', 'cuda', 'cuda:N' or None, got {self.device!r}")
            object.__setattr__(self, "device", dev)
        for name in ("calib_dtype", "search_dtype"):
            v = getattr(self, name)
            if v is not None and v not in _AUTOCAST:
                raise ValueError(f"Runtime.{name} must be None, 'auto', 'bfloat16' or 'float16', got {v!r}")


@dataclass(frozen=True)
class GroupSpec:
    """A scale group declared by name (``AWQConfig.extra_groups``, ``--group``): a producer (a norm or a
    linear, by module or parameter name) and the linears that read its channels.

    ``GroupSpec.parse("model.layers.0.post_attention_layernorm:model.layers.0.mlp.gate_proj,model.layers.0.mlp.up_proj")``.
    Whether it is a real equivalence is checked on the model (:mod:`awqfx.targets`).
    """

    producer: str
    consumers: tuple[str, ...]

    def __post_init__(self) -> None:
        consumers = (self.consumers,) if isinstance(self.consumers, str) else tuple(self.consumers)
        object.__setattr__(self, "consumers", consumers)
        names = (self.producer, *consumers)
        if not consumers or not all(isinstance(n, str) and n and not set(n) & {":", ",", " "} for n in names):
            raise ValueError(f"a declared scale group is PRODUCER:CONSUMER[,CONSUMER...] with module or parameter "
                             f"names, got producer {self.producer!r} and consumers {list(consumers)!r}")

    @classmethod
    def parse(cls, text: str) -> "GroupSpec":
        """``"PRODUCER:CONSUMER[,CONSUMER...]"`` (the ``--group`` flag's form)."""
        producer, sep, rest = str(text).partition(":")
        if not sep:
            raise ValueError(f"declared scale group {text!r}: expected PRODUCER:CONSUMER[,CONSUMER...], e.g. "
                             "model.layers.0.post_attention_layernorm:model.layers.0.mlp.gate_proj,model.layers.0.mlp.up_proj")
        return cls(producer.strip(), tuple(c.strip() for c in rest.split(",")))

    @classmethod
    def of(cls, v: Any) -> "GroupSpec":
        """A GroupSpec from itself, its ``"P:C,C"`` text, a ``{"producer", "consumers"}`` dict or a pair."""
        if isinstance(v, GroupSpec):
            return v
        if isinstance(v, str):
            return cls.parse(v)
        if isinstance(v, dict) and set(v) == {"producer", "consumers"}:
            return cls(v["producer"], v["consumers"])
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return cls(v[0], v[1])
        raise ValueError(f"AWQConfig.extra_groups entries must be GroupSpec, 'PRODUCER:CONSUMER,...' or "
                         f"(producer, [consumers]), got {v!r}")

    def __str__(self) -> str:
        return f"{self.producer}:{','.join(self.consumers)}"


def _need_patterns(name: str, v: Any) -> tuple[str, ...]:
    """``v`` as a tuple of regular expressions (one string is one pattern), each compiled once to check it."""
    items = (v,) if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
        raise ValueError(f"AWQConfig.{name} must be a list of regular expressions, got {v!r}")
    for p in items:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"AWQConfig.{name}: {p!r} is not a valid regular expression ({e})") from None
    return tuple(items)


#: flat name (CLI flag) -> (part, field)
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "bits": ("weights", "bits"), "group_size": ("weights", "group_size"), "symmetric": ("weights", "symmetric"),
    "scheme": ("weights", "scheme"),
    "n_grid": ("scales", "n_grid"), "grid_stride": ("scales", "grid_stride"), "scale_form": ("scales", "form"),
    "include_identity": ("scales", "include_identity"),
    "propagate": ("scales", "propagate"), "drop_unfoldable": ("scales", "drop_unfoldable"),
    "guard_samples": ("scales", "guard_samples"),
    "clip": ("clip", "mode"), "clip_grid": ("clip", "grid"), "clip_rounds": ("clip", "rounds"),
    "max_shrink": ("clip", "max_shrink"), "clip_skip_qk": ("clip", "skip_qk"), "clip_tokens": ("clip", "tokens"),
    "device": ("runtime", "device"), "batch_size": ("runtime", "batch_size"), "loss_samples": ("runtime", "loss_samples"),
    "calib_dtype": ("runtime", "calib_dtype"), "search_dtype": ("runtime", "search_dtype"),
    "act_bits": ("activations", "bits"), "act_granularity": ("activations", "granularity"),
    "sq_alpha": ("smoothquant", "alpha"),
    "refine_damp": ("refine", "damp"), "refine_act_order": ("refine", "act_order"),
    "refine_iters": ("refine", "iters"), "refine_lr": ("refine", "lr"), "refine_batch": ("refine", "batch"),
    "refine_samples": ("refine", "samples"),
}


@dataclass(frozen=True)
class AWQConfig:
    """How to quantize and how hard to search.

    weights: the quantizer (bits 2..8, group_size > 0 or -1 for one group per row, a ragged last
    group is fine; symmetric False: integer zero point, the AWQ default). scales / clip: the
    searches, or None to skip one (both None: round-to-nearest). refine: the codes rounded again
    after the searches (:class:`Refine`: GPTQ on the searched grid), or None (round to nearest on
    it); with no scale or clip search it is plain GPTQ (method ``"gptq"``). smoothquant: SmoothQuant's fixed
    scales instead of the scale search (:class:`SmoothQuant`; ``scales`` must then be None).
    activations: the input activations of every quantized linear are quantized too
    (:class:`ActSpec`: weight-activation mode, W8A8), and the searches score their losses with
    them quantized; None: weight-only. runtime: device, batch size, loss sample, autocast.
    quantize_head: also quantize the LM head (off, as in every reference).

    Targets (:mod:`awqfx.targets`; docs/design.md, "Targets"): ignore / only: regular expressions
    (``re.search``) over linear weight and module names; a match of ``ignore`` stays float, and
    with ``only`` set, only matches are quantized. extra_groups: scale groups declared by name
    (:class:`GroupSpec`), checked to be exact equivalences on the model; exclude_groups: patterns
    over the discovered groups' producers dropping those groups (their scale stays 1).
    """

    weights: QuantSpec = field(default_factory=QuantSpec)
    scales: ScaleSearch | None = field(default_factory=ScaleSearch)
    clip: ClipSearch | None = field(default_factory=ClipSearch)
    runtime: Runtime = field(default_factory=Runtime)
    quantize_head: bool = False
    ignore: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    extra_groups: tuple[GroupSpec, ...] = ()
    exclude_groups: tuple[str, ...] = ()
    activations: ActSpec | None = None
    smoothquant: SmoothQuant | None = None
    refine: Refine | None = None

    def __post_init__(self) -> None:
        for name, cls, optional in (("weights", QuantSpec, False), ("scales", ScaleSearch, True),
                                    ("clip", ClipSearch, True), ("runtime", Runtime, False),
                                    ("activations", ActSpec, True), ("smoothquant", SmoothQuant, True),
                                    ("refine", Refine, True)):
            v = getattr(self, name)
            if not (isinstance(v, cls) or (optional and v is None)):
                raise ValueError(f"AWQConfig.{name} must be a {cls.__name__}{' or None' if optional else ''}, "
                                 f"got {type(v).__name__}")
        if self.smoothquant is not None and self.scales is not None:
            raise ConfigError("SmoothQuant's scales replace the AWQ scale search: a config has one or the other "
                              "(AWQConfig.of(method='smoothquant') builds one)")
        if self.refine is not None and self.weights.scheme != "int":
            raise ConfigError(f"--refine {self.refine.method} rounds to integer codes with zero points; the GGUF block "
                              f"type {self.weights.scheme} has its own rounding: use --refine none")
        if self.refine is not None and self.refine.method == "block" and self.activations is not None:
            raise ConfigError("--refine block learns weight rounding against float activations; with --act-bits use "
                              "--refine gptq or none")
        if self.refine is not None and self.refine.method == "block" and self.scales is None and self.clip is None:
            raise ConfigError("--refine block refines the searched weights of method awq")
        _need_bool("AWQConfig", "quantize_head", self.quantize_head)
        for name in ("ignore", "only", "exclude_groups"):
            object.__setattr__(self, name, _need_patterns(name, getattr(self, name)))
        groups = self.extra_groups
        if isinstance(groups, (str, GroupSpec, dict)) or not isinstance(groups, (list, tuple)):
            groups = (groups,)
        object.__setattr__(self, "extra_groups", tuple(GroupSpec.of(g) for g in groups))

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def rtn(cls, weights: QuantSpec | None = None, **parts: Any) -> "AWQConfig":
        """Round-to-nearest: no scale search, no clip search."""
        return cls(weights=weights or QuantSpec(), scales=None, clip=None, **parts)

    @classmethod
    def of(cls, method: str = "awq", clip: str = "minmax", quantize_head: bool = False, ignore: Any = (),
           only: Any = (), extra_groups: Any = (), exclude_groups: Any = (), refine: str = "none",
           **flat: Any) -> "AWQConfig":
        """A config from flat names (``FLAT_FIELDS``, as the CLI flags spell them): ``method`` is
        ``"awq"``, ``"rtn"`` (no searches), ``"smoothquant"`` (SmoothQuant's scales, ``sq_alpha``;
        no clip search) or ``"gptq"`` (no searches, GPTQ rounding); ``clip="none"`` skips the clip
        search; ``refine`` (``"none"`` or ``"gptq"``, with ``refine_damp`` / ``refine_act_order``)
        refines the rounding of ``"awq"`` (``"rtn"`` and ``"smoothquant"`` stay unrefined); ``act_bits`` (None: weight-only)
        and ``act_granularity`` set the activation quantizer; the target fields (``ignore``,
        ``only``, ``extra_groups``, ``exclude_groups``) as in the class."""
        if method not in _METHODS:
            raise ConfigError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
        unknown = sorted(set(flat) - set(FLAT_FIELDS))
        if unknown:
            raise ValueError(f"unknown AWQConfig field(s): {', '.join(unknown)}")
        if refine != "none" and refine not in _REFINES:
            raise ConfigError(f"refine must be 'none' or one of {', '.join(map(repr, _REFINES))}, got {refine!r}")
        parts: dict[str, dict[str, Any]] = {"weights": {}, "scales": {}, "clip": {}, "runtime": {},
                                            "activations": {}, "smoothquant": {}, "refine": {}}
        for k, v in flat.items():
            if v is None and FLAT_FIELDS[k][0] in ("activations", "smoothquant", "refine"):
                continue  # not set: the part's default (or no part)
            part, name = FLAT_FIELDS[k]
            parts[part][name] = v
        if clip != "none":
            parts["clip"]["mode"] = clip
        if parts["activations"] and "bits" not in parts["activations"]:
            raise ConfigError(f"activation granularity {parts['activations']['granularity']!r} (--act-granularity) "
                              "needs the activation bits (--act-bits 4..8)")
        searched = method == "awq"
        if method == "gptq" or (searched and refine != "none"):
            parts["refine"]["method"] = "gptq" if method == "gptq" else refine
        return cls(weights=QuantSpec(**parts["weights"]),
                   scales=ScaleSearch(**parts["scales"]) if searched else None,
                   clip=ClipSearch(**parts["clip"]) if searched and clip != "none" else None,
                   runtime=Runtime(**parts["runtime"]), quantize_head=quantize_head, ignore=ignore, only=only,
                   extra_groups=extra_groups, exclude_groups=exclude_groups,
                   activations=ActSpec(**parts["activations"]) if parts["activations"] else None,
                   smoothquant=SmoothQuant(**parts["smoothquant"]) if method == "smoothquant" else None,
                   refine=Refine(**parts["refine"]) if "method" in parts["refine"] else None)

    def with_(self, **flat: Any) -> "AWQConfig":
        """A copy with some flat fields changed (``method``/``clip`` as in :meth:`of`)."""
        return AWQConfig.of(**{**self.flat(), **flat})

    # -- views --------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """``"smoothquant"`` with SmoothQuant's scales, else ``"awq"`` when any search runs, ``"rtn"``
        when none does."""
        if self.smoothquant is not None:
            return "smoothquant"
        if self.scales is None and self.clip is None:
            return "rtn" if self.refine is None else "gptq"
        return "awq"

    @property
    def needs_calibration(self) -> bool:
        """Whether a search or a refinement runs or SmoothQuant's scales are computed (and so
        calibration data is needed)."""
        return (self.scales is not None or self.clip is not None or self.smoothquant is not None
                or self.refine is not None)

    @property
    def guard_samples(self) -> int:
        """Sequences held back for the per-group guard (0 without a scale search)."""
        return self.scales.guard_samples if self.scales is not None else 0

    @property
    def refine_samples(self) -> int:
        """Calibration sequences ``--refine block`` learns on, the first ones recorded (0 without it)."""
        return self.refine.samples if self.refine is not None and self.refine.method == "block" else 0

    @property
    def replayed_samples(self) -> int:
        """Calibration sequences the search replays: the loss sample and the guard's held-back
        ones (0 when nothing is searched)."""
        return self.runtime.loss_samples + self.guard_samples if self.needs_calibration else 0

    @property
    def recorded_samples(self) -> int:
        """Calibration sequences ``prepare`` records as graph inputs: the search's replayed ones,
        then as many more as the block refine learns on (0 when nothing is searched)."""
        return max(self.replayed_samples, self.refine_samples) if self.needs_calibration else 0

    @property
    def scaled(self) -> bool:
        """Whether the groups get scales (searched, or SmoothQuant's)."""
        return self.scales is not None or self.smoothquant is not None

    @property
    def spec(self) -> QuantSpec:
        return self.weights

    def flat(self) -> dict[str, Any]:
        """The flat names of :meth:`of` (inverse of it)."""
        out: dict[str, Any] = {"method": self.method, "quantize_head": self.quantize_head,
                               "clip": self.clip.mode if self.clip else "none",
                               "refine": self.refine.method if self.refine else "none", **self.selection()}
        for k, (part, name) in FLAT_FIELDS.items():
            obj = getattr(self, part)
            if obj is not None and k != "clip":
                out[k] = getattr(obj, name)
        return out

    def selection(self) -> dict[str, tuple]:
        """The target fields: what is quantized and which groups are scaled (:mod:`awqfx.targets`)."""
        return {"ignore": self.ignore, "only": self.only, "extra_groups": self.extra_groups,
                "exclude_groups": self.exclude_groups}

    def autocast(self, stage: str, device, model_dtype=None):
        """``torch.autocast`` context for ``stage`` ("calib" or "search"), or a null context."""
        name = self.resolved_dtype(stage, device, model_dtype)
        if name is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, name))

    def resolved_dtype(self, stage: str, device, model_dtype=None) -> str | None:
        """The autocast dtype of ``stage`` on ``device``: ``"auto"`` is bfloat16 for a float32 model
        (``model_dtype``; None: assumed float32) where the hardware has fast bf16 matmuls (CPU:
        avx512_bf16 / AMX; CUDA: sm80+), else None (no autocast: a half-precision model runs as is)."""
        name = self.runtime.calib_dtype if stage == "calib" else self.runtime.search_dtype
        if name != "auto":
            return name
        if model_dtype is not None and model_dtype != torch.float32:
            return None
        return "bfloat16" if fast_half_matmul(device, torch.bfloat16) else None

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples as lists), equal to what a saved plan's JSON reads back."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AWQConfig":
        """From :meth:`to_dict`, or from the flat dict older plans stored."""
        if "weights" not in d:
            known = set(FLAT_FIELDS) | {"method", "clip", "refine", "quantize_head", "ignore", "only", "extra_groups",
                                        "exclude_groups"}
            return cls.of(**{k: v for k, v in d.items() if k in known})
        parts = {"weights": QuantSpec, "scales": ScaleSearch, "clip": ClipSearch, "runtime": Runtime,
                 "activations": ActSpec, "smoothquant": SmoothQuant, "refine": Refine}
        kw = {}
        for name, part in parts.items():
            v = d.get(name)
            kw[name] = None if v is None else part(**{f.name: v[f.name] for f in fields(part) if f.name in v})
        targets = {k: tuple(d[k]) for k in ("ignore", "only", "extra_groups", "exclude_groups") if d.get(k)}
        return cls(**kw, quantize_head=bool(d.get("quantize_head", False)), **targets)


