"""Perplexity over fixed token windows, for HF models and any ``input_ids -> logits`` callable."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .assets import text_windows

logger = logging.getLogger(__name__)

__all__ = ["extract_logits", "perplexity", "windows_for_eval"]


def extract_logits(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``.logits``, ``["logits"]``, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        if len(out) == 1:
            return next(iter(out.values()))
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _is_hf_model(model: Any) -> bool:
    return isinstance(model, PreTrainedModel)


@torch.no_grad()
def perplexity(
    model_or_callable: Callable[..., Any],
    input_ids_windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> float:
    """``exp(mean NLL)`` over all predicted tokens of ``[N, L]`` windows, each scored on its own.

    Token ``t`` of a window is predicted from tokens ``< t`` of the same window, so each window
    contributes ``L - 1`` predictions. The NLL of a window is computed in float32 (from logits cast
    to float32) and accumulated across windows in float64.

    ``model_or_callable``: a transformers ``PreTrainedModel`` (called as
    ``model(input_ids=..., use_cache=False)``) or any callable ``f(input_ids)`` whose output is the
    logits or holds them (``.logits``, ``["logits"]``, or ``[0]``), e.g. an exported / FX
    ``GraphModule``. The model must already be on ``device``; windows are moved there.
    Raises ``ValueError`` when a window's logits are not finite.
    """
    ids = torch.as_tensor(input_ids_windows)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"expected [N >= 1, L >= 2] token windows, got shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = ids.long()
    n, seq_len = ids.shape
    hf = _is_hf_model(model_or_callable)
    if isinstance(model_or_callable, torch.nn.Module) and model_or_callable.training:
        logger.warning("perplexity: the model is in training mode (dropout active); call .eval() first")

    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    bar = tqdm(total=n, desc="perplexity", unit="win", disable=not progress)
    try:
        for start in range(0, n, batch_size):
            batch = ids[start : start + batch_size].to(device)
            out = model_or_callable(input_ids=batch, use_cache=False) if hf else model_or_callable(batch)
            logits = extract_logits(out)
            if logits.shape[:2] != batch.shape:
                raise ValueError(
                    f"logits of shape {tuple(logits.shape)} do not match input windows {tuple(batch.shape)}"
                )
            for j in range(batch.shape[0]):
                lg = logits[j, :-1].float()
                if not torch.isfinite(lg).all():
                    bad = "NaN" if torch.isnan(lg).any() else "infinite"
                    raise ValueError(f"{bad} logits in window {start + j} (of {n})")
                nll = F.cross_entropy(lg, batch[j, 1:], reduction="sum")
                total_nll += nll.double().cpu()
                total_tokens += seq_len - 1
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{math.exp(total_nll.item() / total_tokens):.3f}")
    finally:
        bar.close()
    return math.exp(total_nll.item() / total_tokens)


def windows_for_eval(tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """``[N, seq_len]`` non-overlapping windows of ``text``, evenly spaced over it when ``max_windows``
    is smaller than the number available (``N <= max_windows``)."""
    return text_windows(tokenizer, text, seq_len, max_windows)
