"""Module surgery: swap float linear layers for packed :class:`~awqfx.modules.QuantLinear`.

:func:`pack_model` is the last step of the module-tree applier: the AWQ plan has been applied
(scales folded, weights quantized into :class:`~awqfx.quant.QuantizedWeight` objects keyed by
weight FQN), and every quantized 2-D weight now becomes a ``QuantLinear`` that stores only the
packed integers, the per-group scales and the zero points. The result is still an ordinary HF
model (``generate``, ``save_quantized``).

Which modules can be replaced
-----------------------------
Any module that owns a 2-D ``weight`` (and optionally a 1-D ``bias``) and computes

* ``x @ W.T + b`` (``in_dim == 1``; ``nn.Linear`` and friends), or
* ``x @ W + b``   (``in_dim == 0``; e.g. transformers' GPT-2 ``Conv1D`` whose weight is
  ``[in, out]``).

Callers say which via ``in_dims[fqn]`` (the plan records it); we never look at class names.
``QuantizedWeight`` is always ``[out, in]``, so the ``QuantLinear`` is the same whichever the
original orientation was. Modules that are not ``nn.Linear`` get a one-row numerical probe
(``module(x)`` vs the expected matmul) before they are replaced, so a module with some other
forward (a norm with a 2-D weight, a custom op) is refused instead of silently changed.

Fused 3-D MoE expert weights (``[E, out, in]``) have no packed module: they are refused with a
``ValueError``; keep them as fake-quantized float parameters.

Tied weights: a weight shared by several modules (``lm_head`` tied to the input embeddings) is
refused too. Packing it would silently untie the model (the embedding still needs the float
matrix), and HF's ``tie_weights`` on reload would try to put the embedding back into a module
that no longer has a ``weight``. Other ties in the model are not touched: the surgery only
replaces the listed modules, so ``lm_head.weight is model.embed_tokens.weight`` stays true.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from awqfx.modules import QuantLinear
from awqfx.packing import unpack_int32
from awqfx.quant import QuantizedWeight, QuantSpec

__all__ = [
    "pack_model",
    "packed_modules",
    "quantized_weight_of",
    "packed_weight_bytes",
    "fp_weight_bytes",
]


def _split_fqn(fqn: str) -> str:
    if not fqn.endswith(".weight") and fqn != "weight":
        raise ValueError(f"pack_model: {fqn!r} is not a weight name (expected '<module>.weight').")
    return fqn[: -len(".weight")] if fqn != "weight" else ""


def parent_map(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute name) under which it is registered (modules may be shared)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():  # each parent once
        for child_name, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, child_name))
    return out


def _tied_users(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every FQN under which that exact parameter object is reachable."""
    users: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(name)
    return users


def _probe_forward(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, in_dim: int, fqn: str) -> None:
    """Check on one random row that ``module`` computes the matmul we are about to replace."""
    if weight.device.type == "meta":
        return
    in_features = weight.shape[in_dim]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, in_features, generator=gen).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            got = module.forward(x)  # the module's own math, without hooks (an input-scale hook is kept)
        except Exception as err:  # noqa: BLE001 - any failure means "not a plain linear"
            raise ValueError(
                f"pack_model: cannot replace {fqn}: calling {type(module).__name__} on a [1, {in_features}] "
                f"input failed ({type(err).__name__}: {err}); only modules computing x @ W.T + b "
                "(in_dim 1) or x @ W + b (in_dim 0) can be packed."
            ) from err
        w = weight if in_dim == 1 else weight.t()
        want = F.linear(x, w, bias)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(
        got.float(), want.float(), rtol=1e-3, atol=1e-4
    ):
        raise ValueError(
            f"pack_model: cannot replace {fqn}: {type(module).__name__}.forward is not "
            f"{'x @ W.T + b' if in_dim == 1 else 'x @ W + b'} (in_dim={in_dim}). "
            "Pass the right in_dims entry, or leave this weight fake-quantized."
        )


def pack_model(
    model: nn.Module,
    qweights: Mapping[str, QuantizedWeight],
    in_dims: Mapping[str, int] | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace the owner of every weight in ``qweights`` with a :class:`QuantLinear`, in place.

    ``qweights`` maps weight FQNs (``model.layers.0.mlp.down_proj.weight``) to their
    :class:`QuantizedWeight` (always ``[out, in]``). ``in_dims[fqn]`` is the dim of the
    *module's* weight that is contracted with the input: 1 (default) for ``x @ W.T`` modules,
    0 for ``x @ W`` modules such as GPT-2's ``Conv1D``. The module's bias is kept (same dtype);
    the ``QuantLinear`` goes to the device of the module's weight. Returns ``model``.

    Raises ``ValueError`` (before changing anything) for: a name that is not a module weight, a
    3-D (MoE expert) weight, a shape that does not match ``qw.shape`` for the given ``in_dim``,
    a tied (shared) weight, or a module whose forward is not the plain matmul.
    """
    in_dims = dict(in_dims or {})
    tied = _tied_users(model)
    plan: list[tuple[str, nn.Module, QuantizedWeight, torch.Tensor | None]] = []
    for fqn, qw in qweights.items():
        if len(qw.shape) != 2:
            raise ValueError(
                f"pack_model: {fqn} is quantized with shape {tuple(qw.shape)}; only 2-D linear weights can be "
                "packed into QuantLinear. 3-D fused MoE expert weights have no packed module: leave them out "
                "of qweights and keep them fake-quantized in float."
            )
        prefix = _split_fqn(fqn)
        if not prefix:
            raise ValueError(f"pack_model: {fqn!r} belongs to the root module; wrap it in a parent module first.")
        try:
            module = model.get_submodule(prefix)
        except AttributeError as err:
            raise ValueError(f"pack_model: the model has no module {prefix!r} (for weight {fqn!r}).") from err
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"pack_model: module {prefix!r} has no tensor 'weight' (for {fqn!r}).")
        if len(qw.shape) != 2 or weight.dim() != 2:
            raise ValueError(
                f"pack_model: {fqn} has shape {tuple(weight.shape)} (quantized as {tuple(qw.shape)}); only 2-D "
                "linear weights can be packed into QuantLinear. 3-D fused MoE expert weights have no packed "
                "module: leave them out of qweights and keep them fake-quantized in float."
            )
        in_dim = int(in_dims.get(fqn, 1))
        if in_dim not in (0, 1):
            raise ValueError(f"pack_model: in_dims[{fqn!r}] must be 0 or 1, got {in_dim}.")
        out_f, in_f = qw.shape
        expected = (out_f, in_f) if in_dim == 1 else (in_f, out_f)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"pack_model: {fqn} has shape {tuple(weight.shape)} but its QuantizedWeight is [out, in] = "
                f"{tuple(qw.shape)}, which with in_dim={in_dim} means a weight of shape {expected}."
            )
        names = tied.get(id(weight), [fqn])
        if len(names) > 1:
            raise ValueError(
                f"pack_model: {fqn} is tied (the same parameter as {', '.join(n for n in names if n != fqn)}); "
                "packing it would untie the model. Leave it out of qweights (keep it in float)."
            )
        bias = getattr(module, "bias", None)
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_f,)):
            raise ValueError(
                f"pack_model: module {prefix!r} has a bias of shape "
                f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}, expected ({out_f},)"
                + (
                    f" (if it computes x @ W + b with an [in, out] weight, pass in_dims[{fqn!r}] = 0)."
                    if in_dim == 1
                    else "."
                )
            )
        if not isinstance(module, nn.Linear) or in_dim != 1:
            _probe_forward(module, weight, bias, in_dim, fqn)
        plan.append((fqn, module, qw, bias))

    # build every QuantLinear before touching the model, so a failure leaves it unchanged
    built = []
    for fqn, module, qw, bias in plan:
        dev = module.weight.device
        qw_dev = qw if qw.q.device == dev or dev.type == "meta" else _to_device(qw, dev)
        ql = QuantLinear.from_quantized(qw_dev, bias=None if bias is None else bias.detach(), backend=backend)
        if ql.scales.device != dev and dev.type != "meta":
            ql = ql.to(dev)
        built.append((module, ql))
    parents = parent_map(model)
    for module, ql in built:
        # an activation group's 1/s lives in a forward pre-hook on its consumer: keep it
        ql._forward_pre_hooks.update(module._forward_pre_hooks)
        for parent, child_name in parents.get(id(module), []):
            setattr(parent, child_name, ql)
    return model


def _to_device(qw: QuantizedWeight, dev: torch.device) -> QuantizedWeight:
    return QuantizedWeight(
        q=qw.q.to(dev), scale=qw.scale.to(dev), zero=qw.zero.to(dev), spec=qw.spec, shape=tuple(qw.shape)
    )


def packed_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """``{module name: QuantLinear}`` in ``named_modules`` order (shared modules once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantized_weight_of(module: QuantLinear) -> QuantizedWeight:
    """The :class:`QuantizedWeight` held by a ``QuantLinear`` (codes unpacked, scales fp32)."""
    spec = QuantSpec(bits=int(module.bits), group_size=int(module.group_size), symmetric=bool(module.symmetric))
    q = unpack_int32(module.portable_qweight().detach().to(torch.int32), spec.bits, int(module.in_features), dim=-1)
    return QuantizedWeight(
        q=q,
        scale=module.scales.detach().to(torch.float32),
        zero=module.qzeros.detach().to(torch.int32),
        spec=spec,
        shape=(int(module.out_features), int(module.in_features)),
    )


def _is_linear_like(module: nn.Module) -> bool:
    """A float module with a 2-D weight that is not an embedding (nn.Linear, GPT-2 Conv1D...)."""
    if isinstance(module, (QuantLinear, nn.Embedding, nn.EmbeddingBag)):
        return False
    w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return isinstance(w, torch.Tensor) and w.dim() == 2


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), t.storage_offset())


def _is_packed(module: nn.Module) -> bool:
    """A packed linear: ``QuantLinear`` or another module that reports its packed ``weight_bytes()``
    (``awqfx.int8_linear.Int8Linear``, which imports this module)."""
    return isinstance(module, QuantLinear) or callable(getattr(type(module), "weight_bytes", None))


def packed_weight_bytes(model: nn.Module, include_unquantized: bool = True) -> int:
    """Resident bytes of the model's linear weights as they are now.

    Each packed module (``QuantLinear``, ``Int8Linear``: a module with ``weight_bytes()``) counts
    its resident packed buffers (:meth:`QuantLinear.weight_bytes`);
    with ``include_unquantized``
    every other linear-like float weight (``nn.Linear``, 2-D-weight modules such as GPT-2's
    ``Conv1D``; not embeddings) counts at its own dtype, each storage once (a tied ``lm_head``
    is counted once). Biases are not counted. On an unpacked model this equals
    ``fp_weight_bytes(model, <its dtype>)``.
    """
    total = 0
    seen: set[tuple] = set()
    for _name, m in model.named_modules():
        if _is_packed(m):
            total += m.weight_bytes()
        elif include_unquantized and _is_linear_like(m):
            w = m.weight
            key = _storage_key(w)
            if key not in seen:
                seen.add(key)
                total += w.numel() * w.element_size()
    return total


def fp_weight_bytes(model: nn.Module, dtype: torch.dtype, include_unquantized: bool = True) -> int:
    """Bytes the same linear weights take as dense ``dtype`` matrices (the float baseline).

    Packed layers (``QuantLinear``, ``Int8Linear``) count as ``out * in`` elements; with ``include_unquantized`` the other
    linear-like weights count too (each storage once), exactly the set
    :func:`packed_weight_bytes` counts. Works on the packed model and on the float original.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    seen: set[tuple] = set()
    for _name, m in model.named_modules():
        if _is_packed(m):
            total += int(m.out_features) * int(m.in_features) * itemsize
        elif include_unquantized and _is_linear_like(m):
            w = m.weight
            key = _storage_key(w)
            if key not in seen:
                seen.add(key)
                total += w.numel() * itemsize
    return total
