"""Capture a model into an FX GraphModule that discovery can read.

The front-end is ``torch.export`` in non-strict mode (docs/design.md, "Capture"): it works on every
transformers v5 causal LM we measured, keeps weights as ``get_attr`` nodes named by their real
parameter FQN, and records example values on every node. ``use_cache=False`` because a
DynamicCache is not a pytree; no ``run_decompositions`` because it turns linear into permute+mm.
"""
from __future__ import annotations

import inspect
import logging
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from awqfx.graph import has_shapes, propagate_shapes

log = logging.getLogger(__name__)

__all__ = ["capture", "CaptureError"]


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message says what failed and what to try."""


def _default_inputs(model: nn.Module, seq_len: int) -> tuple[torch.Tensor, ...]:
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise CaptureError(
            f"Cannot build example inputs for {type(model).__name__}: it has no config.vocab_size. "
            "Pass example_inputs=(tensor, ...) to awqfx.capture."
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(vocab), (2, seq_len), generator=gen)
    return (ids.to(device),)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _LogitsForward(nn.Module):
    """``input_ids -> logits`` view of a causal LM, sharing its children so FQNs are unchanged.

    Exporting through it keeps the graph signature to one tensor in, one tensor out (no
    ``use_cache`` placeholder, no ModelOutput pytree), while ``get_attr`` targets stay the
    model's own parameter names (``model.layers.0...``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        object.__setattr__(self, "_inner", model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self._inner(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


def _drop_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove the export guard call so the module pickles and re-traces (docs/design.md, "Capture")."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and "guards" in str(n.target) and not n.users:
            gm.graph.erase_node(n)
    out = fx.GraphModule(gm, gm.graph)
    out.meta.update(getattr(gm, "meta", {}))
    return out


def _explain(model: nn.Module, err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    detail = lines[0] if lines else type(err).__name__
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return (
        f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: {detail}. "
        "Try: load the model in eval mode with attn_implementation='sdpa' or 'eager'; for MoE models "
        "set experts_implementation='grouped_mm'; pass example_inputs with a realistic shape; or capture "
        "one decoder layer at a time. awqfx needs a graph of tensor ops (no Python control flow on "
        "tensor values)."
    )


_DIM_NAMES = {0: "batch", 1: "sequence length"}


def _warn_static(model: nn.Module, example: torch.Tensor, dynamic_dims: dict, err: Exception | None) -> None:
    """Say loudly which input dims the graph fixed: it will only run on inputs of that shape."""
    fixed = [d for d in range(example.dim()) if d not in dynamic_dims]
    dims = " and ".join(f"{_DIM_NAMES.get(d, f'dim {d}')} = {example.shape[d]}" for d in fixed)
    shape = [str(s) if d in fixed else "*" for d, s in enumerate(example.shape)]
    warnings.warn(
        f"awqfx.capture: {type(model).__name__} could not be exported with a dynamic batch and sequence length "
        f"({type(err).__name__}); the graph is static in {dims} and only runs on inputs of shape "
        f"[{', '.join(shape)}]. Pass a batch of the shape you will calibrate with: "
        "awqfx.capture(model, static_inputs=(calib[:batch_size],)).",
        stacklevel=3,  # the caller of awqfx.capture
    )


def capture(
    model: nn.Module,
    example_inputs: tuple | None = None,
    *,
    dynamic: bool = True,
    seq_len: int = 8,
    static_inputs: tuple | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into an FX GraphModule with parameters as named ``get_attr`` nodes.

    - A Hugging Face causal LM (or any module taking ``input_ids``) is exported with
      ``torch.export.export(..., strict=False)``; batch and sequence length are dynamic when the
      model allows it. Otherwise they are fixed, with a warning naming the fixed dims, at the shape
      of ``static_inputs`` (default: the example inputs): such a graph runs only on inputs of that
      shape, so pass a calibration batch as ``static_inputs``. Example inputs default to random
      token ids of shape ``[2, seq_len]``; a model on the ``meta`` device works (no compute happens).
    - An ``fx.GraphModule`` (e.g. from ``symbolic_trace``) is returned as is after recording
      shapes with ``example_inputs`` when it has none.

    The returned module shares parameters with ``model``: passes that rewrite weights copy first
    unless asked to work in place.
    """
    if isinstance(model, fx.GraphModule) and not hasattr(model, "config"):
        if not has_shapes(model):
            if example_inputs is None:
                raise CaptureError(
                    "This GraphModule has no shape information; pass example_inputs=(tensor, ...) so "
                    "awqfx can record shapes on its nodes."
                )
            propagate_shapes(model, tuple(example_inputs))
        return model
    was_training = model.training
    model.eval()
    if example_inputs is None:
        example_inputs = _default_inputs(model, seq_len)
    example_inputs = tuple(example_inputs)
    kwargs: dict = {}
    target: nn.Module = model
    if hasattr(model, "config") and _accepts(model, "use_cache") and len(example_inputs) == 1:
        target = _LogitsForward(model)
    elif _accepts(model, "use_cache"):
        kwargs = {"use_cache": False}
    static_inputs = example_inputs if static_inputs is None else tuple(static_inputs)
    attempts = []  # (inputs, dynamic_shapes): fewer dynamic dims each time, the fixed ones at static_inputs' sizes
    if dynamic and example_inputs and example_inputs[0].dim() >= 2:
        rest = [None] * (len(example_inputs) - 1)
        seq = torch.export.Dim("seq_len", min=2, max=65536)
        batch = torch.export.Dim("batch", min=1, max=4096)
        attempts.append((example_inputs, tuple([{0: batch, 1: seq}] + rest)))
        attempts.append((static_inputs, tuple([{1: seq}] + rest)))
    attempts.append((static_inputs, None))
    last: Exception | None = None
    try:
        for inputs, dyn in attempts:
            try:
                with torch.no_grad():
                    ep = torch.export.export(target, inputs, kwargs=kwargs, strict=False, dynamic_shapes=dyn)
                break
            except Exception as e:  # noqa: BLE001 - reported below with context
                last = e
                if dyn is not None:
                    log.info("export with dynamic shapes %s failed (%s); retrying with fewer", dyn, type(e).__name__)
        else:
            raise CaptureError(_explain(model, last)) from last
    finally:
        model.train(was_training)
    if dyn is not attempts[0][1]:  # the dynamic export was refused
        _warn_static(model, inputs[0], dyn[0] if dyn else {}, last)
    gm = _drop_guards(ep.module())
    for m in gm.modules():  # traced in eval mode (export's module() refuses .eval() and reports training)
        m.training = False
    gm.meta["awqfx_source"] = type(model).__name__
    return gm
