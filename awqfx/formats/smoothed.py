"""The smoothed format: the AWQ-transformed model as a plain float checkpoint, not quantized.

What other quantizers and converters take as input (AutoAWQ's ``export_compatible``): the plan
applied with ``apply_plan(model, plan, weights="smoothed")``, i.e. every scale folded into the
parameters and every quantized weight clamped per (row, group) to the clip range the search
found, in the model's own dtype. The directory is what ``model.save_pretrained`` writes for a
float model: ``config.json`` *without* a ``quantization_config`` (plain
``AutoModelForCausalLM.from_pretrained`` loads it as an ordinary model), ``model.safetensors``
(sharded with an index above 2 GiB), the tokenizer, ``generation_config.json``, and the plan in
``awq_plan/`` (bits, group size and clip ranges the clamps were made for).

Round-to-nearest of a smoothed weight at the plan's bits and group size (per-group min/max:
:func:`~awqfx.quant.quantize_weight` with no range) gives the plan's integers, because the clamp
makes each group's min/max the clip range (the clip search's ranges always lie inside the
group's own values): exactly, for asymmetric quantization of a float32 model, in every group
whose clip max maps to the top code (``round(max_val / scale) + zero == 2^b - 1``; it misses by
one only at a rounding tie, ``|max_val| == |min_val|``, where the plan saturates weights beyond
the range one code above the clamped ones). In a bf16/fp16 model a clamped value is the float32
bound rounded to that dtype, so round-to-nearest gives the plan's quantization with its bounds
rounded to the model's dtype (docs/cli.md, "The smoothed format"). Symmetric quantization
saturates clipped weights at the extra code ``-2^(b-1)``, which a clamped weight cannot reach:
there the codes come out one higher.

A group whose scale needs an inserted node (an activation producer, GELU -> fc2) has no place in
a plain checkpoint: :func:`check` refuses it, before calibration; ``--drop-unfoldable`` leaves
such groups unscaled instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from awqfx.formats.common import FormatError, Layer, dedupe_state, input_scales
from awqfx.modules import QuantLinear
from awqfx.packed_experts import packed_experts

NAME = "smoothed"
WEIGHTS = "smoothed"  # the apply_plan weights mode that makes the model this format writes
EVAL_NOTE = "smoothed float model, not quantized"  # what --eval's "perplexity after" measures


def check(layers: list[Layer]) -> list[str]:
    """Every reason a plain float checkpoint cannot hold ``layers`` after the plan is applied."""
    problems = [
        f"{layer.where} is tied (shared) with another module's weight: clamping it to its clip range would "
        "change that one too; leave it unquantized (quantize_head=False)"
        for layer in layers
        if layer.tied
    ]
    scaled = [layer.name for layer in layers if layer.input_scale]
    if scaled:
        problems.append(
            f"{len(scaled)} layers read their input through an AWQ scale node after an activation (GELU -> fc2 "
            f"style), which a plain checkpoint has no place for: {', '.join(scaled)}; pass --drop-unfoldable to "
            "leave those scale groups unscaled (s = 1), or use --format awqfx"
        )
    return problems


def payload(model: nn.Module, qmods: Mapping[str, QuantLinear]) -> tuple[dict[str, torch.Tensor], None]:
    """The float model's tensors (tied ones once), and no ``quantization_config``.

    ``model``: the plan applied with ``weights="smoothed"``; refused when it holds packed modules
    or activation scale hooks (neither exists in a plain checkpoint).
    """
    if qmods or packed_experts(model):
        raise FormatError(
            f"cannot export as {NAME}: the model holds packed modules ({', '.join(list(qmods)[:3]) or 'experts'}); "
            "the smoothed format takes the float model: apply_plan(model, plan, weights='smoothed')"
        )
    hooks = sorted(input_scales(model))
    if hooks:
        raise FormatError(
            f"cannot export as {NAME}: {', '.join(hooks)} read their input through an AWQ scale node after an "
            "activation, which a plain checkpoint has no place for; quantize with --drop-unfoldable "
            "(AWQConfig scales.drop_unfoldable) or use --format awqfx"
        )
    return dedupe_state(model.state_dict()), None


def load(out_dir: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The smoothed model in ``out_dir`` as plain transformers loads it, in ``dtype``."""
    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype, local_files_only=True).eval()
