"""The knobs of the AWQ pass, validated before any work starts.

Defaults are the measured best on SmolLM2-135M (docs/results.md, "AWQ quality"); the reference
defaults (AutoAWQ / the paper) are noted next to each field where ours differ.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from awqfx.quant import QuantSpec

__all__ = ["AWQConfig", "ConfigError"]

_SCALE_FORMS = ("x", "duo", "both")
_CLIPS = ("asym", "minmax", "sym", "none")
_PROPAGATE = ("fp", "quant")
_METHODS = ("awq", "rtn")
_AUTOCAST = ("auto", "bfloat16", "float16")


class ConfigError(ValueError):
    """The config does not fit the model (e.g. a group size larger than a layer's inputs)."""


@dataclass
class AWQConfig:
    """How to quantize and how hard to search.

    Quantizer
        bits (2..8), group_size (>0, or -1 for one group per output row; a ragged last group is
        fine), symmetric (False: integer zero point, the AWQ default).
    Scale search (DESIGN §4)
        n_grid: ratios alpha = 0, 1/n, ..., (n-1)/n. scale_form: ``"x"`` (s = x_mean^alpha),
        ``"duo"`` (s = x_mean^alpha / w_mean^(1-alpha), AutoAWQ's default) or ``"both"`` (both
        grids, best loss wins). ``"x"`` (the paper's form) is the default: on SmolLM2 it recovers
        more of RTN's gap than ``duo`` at both 3 and 4 bits (docs/results.md).
        include_identity: also try s = 1 (plain RTN), so the search never picks scales that are
        worse than RTN on its own loss. loss_samples: calibration sequences kept (as token ids)
        for the region losses and the clip search; statistics (mean |x|) always use every
        calibration token. propagate: ``"fp"`` (each group sees the float outputs of earlier
        groups, like the reference) or ``"quant"`` (it sees the already-quantized earlier groups).
    Clip search
        clip: ``"minmax"`` (shrink the max and the min of each group separately), ``"asym"``
        (shrink max and min by one ratio, llmc), ``"sym"`` (shrink max |w|, the reference) or
        ``"none"``. clip_grid steps of 1/clip_grid from 1.0 down to max_shrink (exclusive: 1.0,
        0.95, ..., 0.55 for the defaults). clip_rounds: after the reference's per-group loss, refine
        each group's choice against the whole linear's output error (the groups' errors add up or
        cancel on one output), this many passes over the groups; 0 = the per-group loss only. On
        SmolLM2 w4 g64 the per-group variants recover 54-59 % of RTN's gap, the refinement 76 %
        (docs/results.md).
        clip_skip_qk skips weights feeding attention queries/keys (the reference's default, kept).
        clip_tokens: loss-sample tokens (evenly spaced) the clip losses use.
    Other
        method: ``"awq"`` or ``"rtn"`` (round-to-nearest baseline: no scales, no clip).
        device: where calibration and search run (None: where the graph's parameters are).
        calib_dtype / search_dtype: ``None`` (the graph's own precision), ``"bfloat16"`` /
        ``"float16"``: run the calibration forwards / the loss-sample replay and region losses under
        ``torch.autocast`` in that dtype (statistics and losses still accumulate in float32+), or
        ``"auto"`` (default): bfloat16 where the hardware has fast bf16 matmuls (avx512_bf16/AMX
        CPUs, sm80+ GPUs), else None. On SmolLM2 it cuts calibration 122 -> 82 s and the search
        231 -> 168 s on a 2-core Zen 4 at the same perplexity (docs/results.md).
        batch_size: sequences per calibration forward when ``calib`` is one [N, L] tensor.
        quantize_head: also quantize the LM head (off, as in every reference).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    n_grid: int = 20
    scale_form: str = "x"
    include_identity: bool = True
    clip: str = "minmax"
    clip_grid: int = 20
    clip_rounds: int = 2
    max_shrink: float = 0.5
    clip_skip_qk: bool = True
    clip_tokens: int = 4096
    loss_samples: int = 8
    propagate: str = "fp"
    device: str | None = None
    method: str = "awq"
    quantize_head: bool = False
    batch_size: int = 8
    calib_dtype: str | None = "auto"
    search_dtype: str | None = "auto"

    def __post_init__(self) -> None:
        # QuantSpec raises its own precise ValueError for bits / group_size.
        QuantSpec(self.bits, self.group_size, bool(self.symmetric))

        def need_int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"AWQConfig.{name} must be an integer >= {lo}, got {v!r}")

        def need_choice(name: str, choices: tuple[str, ...]) -> None:
            v = getattr(self, name)
            if v not in choices:
                raise ValueError(f"AWQConfig.{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")

        need_int("n_grid", 1)
        need_int("clip_grid", 1)
        need_int("clip_tokens", 1)
        need_int("clip_rounds", 0)
        need_int("loss_samples", 1)
        need_int("batch_size", 1)
        need_choice("scale_form", _SCALE_FORMS)
        need_choice("clip", _CLIPS)
        need_choice("propagate", _PROPAGATE)
        need_choice("method", _METHODS)
        ms = self.max_shrink
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0.0 <= ms < 1.0:
            raise ValueError(f"AWQConfig.max_shrink must be a number in [0, 1), got {ms!r}")
        if self.device is not None:
            dev = str(self.device)
            if not (dev == "cpu" or dev == "cuda" or dev.startswith("cuda:")):
                raise ValueError(f"AWQConfig.device must be 'cpu', 'cuda', 'cuda:N' or None, got {self.device!r}")
            self.device = dev
        for name in ("calib_dtype", "search_dtype"):
            v = getattr(self, name)
            if v is not None and v not in _AUTOCAST:
                raise ValueError(f"AWQConfig.{name} must be None, 'auto', 'bfloat16' or 'float16', got {v!r}")
        for name in ("symmetric", "include_identity", "clip_skip_qk", "quantize_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AWQConfig.{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)

    def autocast(self, stage: str, device, model_dtype=None) -> "object":
        """``torch.autocast`` context for ``stage`` ("calib" or "search"), or a null context."""
        import contextlib

        import torch

        name = self.resolved_dtype(stage, device, model_dtype)
        if name is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, name))

    def resolved_dtype(self, stage: str, device, model_dtype=None) -> str | None:
        """The autocast dtype of ``stage`` on ``device``: ``"auto"`` is bfloat16 for a float32 model
        (``model_dtype``; None: assumed float32) where the hardware has fast bf16 matmuls (CPU:
        avx512_bf16 / AMX; CUDA: sm80+), else None (no autocast: a half-precision model runs as is)."""
        import torch

        name = self.calib_dtype if stage == "calib" else self.search_dtype
        if name != "auto":
            return name
        if model_dtype is not None and model_dtype != torch.float32:
            return None
        dev = torch.device(device)
        if dev.type == "cuda":
            return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
        if dev.type == "cpu":
            try:
                return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
            except (AttributeError, RuntimeError):
                return None
        return None

    def shrink_ratios(self) -> list[float]:
        """Clip candidates: 1.0, 1 - 1/clip_grid, ... while above ``max_shrink`` (1 - max_shrink of the range)."""
        n = self.clip_grid
        return [1.0 - i / n for i in range(n) if 1.0 - i / n > self.max_shrink + 1e-9]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AWQConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
