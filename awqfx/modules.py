"""Quantized modules.

:class:`QuantLinear` is the inference-time replacement for ``nn.Linear`` after AWQ. It holds only
packed integer codes plus per-group scales and zero points, and runs one of the
:mod:`awqfx.kernels` custom ops in ``forward`` (so graphs using it re-export with
``torch.export`` and save as ``.pt2``).

Storage and device moves
------------------------
``state_dict`` always holds the **portable packing** (besides an optional bias):

* ``qweight``  int32 ``[out, ceil(in * bits / 32)]``: codes packed along ``in`` as one dense
  LSB-first bit stream per row (:func:`awqfx.packing.pack_int32`; the compressed-tensors
  ``weight_packed`` layout), 2..8 bits.
* ``scales``   float32 ``[out, n_groups]`` (kept fp32 even under ``module.half()`` /
  ``.to(torch.bfloat16)``, so :meth:`QuantLinear.dequantize_weight` stays exact).
* ``qzeros``   uint8 ``[out, n_groups]``: unsigned integer zero points (symmetric: ``2**(bits-1)``).
* ``bias``     optional, float, follows the module's dtype casts like any buffer.

The module holds **one layout of the codes** at a time. On the ``dequant`` path it is
``qweight``. When the ``int4pack`` backend is active it is the kernel's own layout for the
device (``_int4_weight``, plus the kernel's bf16 ``_int4_scale_zeros``; non-persistent buffers,
captured by ``torch.export``), and the ``qweight`` buffer is ``None``: ``state_dict`` (a
post-hook), :meth:`QuantLinear.portable_qweight` and :meth:`QuantLinear.dequantize_weight` read
the codes back out of the kernel layout. The kernel layout is built when the module is created,
after ``load_state_dict`` and after every ``_apply`` (``.to(device)``, ``.cuda()``, ``.half()``,
``to_empty``...): a move first restores ``qweight`` from the old layout, moves it, and packs
again for the new device (the CPU and CUDA layouts differ). On a device without an int4 kernel
(meta, mps, CUDA < sm80, or a layer the kernel can't take) the module keeps ``qweight`` and runs
the ``dequant`` path. :meth:`weight_bytes` reports what is resident.

A ``.pt2`` exported with the int4pack backend holds the device-specific layout: export on the
device you will run on, or use ``backend="dequant"`` for a device-portable program.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from awqfx import (
    kernel_choice,
    kernels,  # noqa: F401  (registers torch.ops.awqfx.*)
)
from awqfx.kernels import (
    dequantize_packed,
    int4_linear_eager,
    int4pack_codes_t,
    int4pack_layer_supported,
    int4pack_supported,
    pack_int4_scale_zeros,
    pack_int4_weight,
    takes_dense_path,
    unpack_codes,
)
from awqfx.packing import pack_int32, packed_length
from awqfx.quant import num_groups

__all__ = ["QuantLinear"]

_BACKENDS = ("auto", "int4pack", "dequant")
_SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def recording() -> bool:
    """A graph that outlives this call is being recorded (torch.export / FX / TorchScript
    tracing): the int4 kernel must appear there as the ``awqfx::`` custom op, which chooses its
    path by the row count at run time. ``torch.compile`` alone knows the row count when it traces
    (its graphs are guarded on shapes), so ``QuantLinear`` lets it trace the int4 kernel itself:
    through the custom op, each of a decode step's calls paid Python dispatch inside the
    compiled step (docs/results.md, "Decode with --compile")."""
    return torch.compiler.is_exporting() or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.jit.is_tracing()


def capturing() -> bool:
    """A graph is being captured (torch.export / torch.compile / FX / TorchScript tracing): the
    W8A8 kernel appears as the ``awqfx::`` custom op then, not as the ops inside it."""
    return recording() or torch.compiler.is_compiling()


# module-level hooks (not lambdas) so the module stays picklable


def _add_portable_codes(module: "QuantLinear", state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` holds the portable codes whichever layout is resident."""
    if module.qweight is None:
        state_dict[prefix + "qweight"] = module.portable_qweight()


def _make_room_for_codes(module: "QuantLinear", state_dict, prefix: str, *args) -> None:
    """Loading ``qweight`` into a module that holds the kernel layout: give it a buffer again."""
    if module.qweight is None and prefix + "qweight" in state_dict:
        module.qweight = torch.empty(
            module.out_features, packed_length(module.in_features, module.bits), dtype=torch.int32,
            device=module.scales.device,
        )


def _rebuild_after_load(module: "QuantLinear", incompatible_keys) -> None:
    module.refresh()


class QuantLinear(nn.Module):
    """``nn.Linear`` replacement with group-wise quantized weights (see the module docstring).

    Build it with :meth:`from_quantized`. The constructor only allocates zero-filled buffers
    of the right shapes (useful to create a skeleton and ``load_state_dict`` into it); it does
    not build the int4 kernel cache (``load_state_dict``, a device move or :meth:`refresh` do).

    ``backend``:
        ``"auto"``: int4pack when the layer and current device allow it, else dequant.
        ``"int4pack"``: PyTorch's int4 kernels (4 bits, group 32/64/128/256, ``in % group == 0``,
        CPU ``out % 16 == 0`` / CUDA sm80+ ``out % 8 == 0``); bf16 compute. Raises if the layer
        can never use it; falls back to dequant (with a warning) on an unsupported device.
        ``"dequant"``: dequantize this layer per call and ``F.linear`` in the input dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        backend: str = "auto",
        symmetric: bool = False,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if bits not in _SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {_SUPPORTED_BITS}, got {bits}")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {group_size}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.backend = backend
        if backend == "int4pack":
            ok, reason = int4pack_layer_supported(in_features, bits, group_size)
            if not ok:
                raise ValueError(f"backend='int4pack' cannot run this layer: {reason}")

        ng = num_groups(in_features, group_size)
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_length(in_features, bits), dtype=torch.int32, device=device),
        )
        self.register_buffer("scales", torch.zeros(out_features, ng, dtype=torch.float32, device=device))
        self.register_buffer("qzeros", torch.zeros(out_features, ng, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_buffer("bias", None)
        self.register_buffer("_int4_weight", None, persistent=False)
        self.register_buffer("_int4_scale_zeros", None, persistent=False)
        self._int4_device: Optional[torch.device] = None
        self._active = "dequant"
        self._warned = False
        self._dense_from = 0
        self._dense_dtype = torch.float32
        # the kernel cache is built by from_quantized / load_state_dict / device moves / refresh()
        self.register_state_dict_post_hook(_add_portable_codes)
        self._register_load_state_dict_pre_hook(_make_room_for_codes, with_module=True)
        self.register_load_state_dict_post_hook(_rebuild_after_load)

    # ---------------------------------------------------------------------------------------
    # construction
    # ---------------------------------------------------------------------------------------

    @classmethod
    def from_quantized(cls, qw, bias: Optional[Tensor] = None, backend: str = "auto") -> "QuantLinear":
        """Build from an ``awqfx.quant.QuantizedWeight`` (codes, fp32 scales, int zeros)."""
        if len(qw.shape) != 2:
            raise ValueError(f"QuantLinear takes a 2-D [out, in] weight, got shape {tuple(qw.shape)}")
        out_features, in_features = (int(d) for d in qw.shape)
        spec = qw.spec
        if tuple(qw.q.shape) != (out_features, in_features):
            raise ValueError(f"q has shape {tuple(qw.q.shape)}, expected {(out_features, in_features)}")
        ng = num_groups(in_features, spec.group_size)
        if tuple(qw.scale.shape) != (out_features, ng) or tuple(qw.zero.shape) != (out_features, ng):
            raise ValueError(
                f"scale/zero must be [{out_features}, {ng}], got {tuple(qw.scale.shape)} / {tuple(qw.zero.shape)}"
            )
        zero = qw.zero.to(torch.int32)
        if zero.numel() and (int(zero.min()) < 0 or int(zero.max()) > 255):
            raise ValueError("zero points must lie in 0..255 (unsigned zero point)")
        dev = qw.q.device
        if backend == "int4pack":
            ok, reason = int4pack_supported(out_features, in_features, spec.bits, spec.group_size, dev)
            if not ok:
                raise ValueError(f"backend='int4pack' cannot run this layer on {dev}: {reason}")
        m = cls(
            in_features,
            out_features,
            bits=spec.bits,
            group_size=spec.group_size,
            bias=bias is not None,
            backend=backend,
            symmetric=spec.symmetric,
            device="meta",  # no throw-away allocations; real buffers are assigned below
        )
        with torch.no_grad():
            packed = pack_int32(qw.q, spec.bits, dim=-1).contiguous()
            if tuple(packed.shape) != tuple(m.qweight.shape):
                raise RuntimeError(f"pack_int32 gave {tuple(packed.shape)}, expected {tuple(m.qweight.shape)}")
            m.qweight = packed
            m.scales = qw.scale.detach().to(device=dev, dtype=torch.float32).contiguous()
            m.qzeros = zero.to(device=dev, dtype=torch.uint8).contiguous()
            if bias is not None:
                m.bias = bias.detach().to(dev).clone()
        m.refresh()
        return m

    # ---------------------------------------------------------------------------------------
    # kernel cache management
    # ---------------------------------------------------------------------------------------

    @property
    def active_backend(self) -> str:
        """The backend ``forward`` uses right now on the current device."""
        return self._active

    def refresh(self, force: bool = True) -> None:
        """(Re)build the device-specific kernel layout; it then replaces the portable codes."""
        dev = self.scales.device
        if self.backend == "dequant":
            ok, reason = False, "backend='dequant'"
        elif dev.type == "meta":
            ok, reason = False, "meta device"
        else:
            ok, reason = int4pack_supported(
                self.out_features, self.in_features, self.bits, self.group_size, dev
            )
        if not ok:
            if self.backend == "int4pack" and dev.type != "meta" and not self._warned:
                warnings.warn(f"QuantLinear: int4pack unavailable ({reason}); using dequant", stacklevel=3)
                self._warned = True
            self.qweight = self.portable_qweight()
            self._int4_weight = None
            self._int4_scale_zeros = None
            self._int4_device = None
            self._active = "dequant"
            return
        cached = (
            self._int4_weight is not None
            and self._int4_scale_zeros is not None
            and self._int4_device == dev
            and self._int4_weight.device == dev
            and self._int4_scale_zeros.dtype == torch.bfloat16
        )
        if force or not cached:
            with torch.no_grad():
                q = unpack_codes(self.portable_qweight(), self.bits, self.in_features)
                self._int4_weight = pack_int4_weight(q, dev)
                self._int4_scale_zeros = pack_int4_scale_zeros(self.scales, self.qzeros)
            self._int4_device = dev
        self.qweight = None  # one resident layout: the kernel's (state_dict derives the codes)
        chosen = kernel_choice.choice(self.out_features, self.in_features, self.group_size, dev)
        self._dense_from = chosen.dense_from or 0
        self._dense_dtype = getattr(torch, chosen.dense_dtype)
        self._active = "int4pack"

    def portable_qweight(self) -> Tensor:
        """The portable int32 packing of the codes (``qweight``), derived from the kernel
        layout when that is the one held."""
        if self.qweight is not None:
            return self.qweight
        codes = int4pack_codes_t(self._int4_weight, self.group_size, self.in_features, self.out_features)
        return pack_int32(codes.t(), self.bits, dim=-1).contiguous()

    def _apply(self, fn, recurse: bool = True):
        if self.qweight is None:  # a move re-packs for the new device from the portable codes
            self.qweight = self.portable_qweight()
            self._int4_weight = None
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales is not None and self.scales.dtype != torch.float32 and scales.dtype == torch.float32:
            # a dtype cast (model.half(), .to(bf16)) must not round the quantization scales
            self.scales = scales.to(device=self.scales.device)
        self.refresh(force=False)
        return self

    # ---------------------------------------------------------------------------------------
    # compute
    # ---------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self._active == "int4pack":
            args = (x, self._int4_weight, self._int4_scale_zeros, self.group_size, self.bias, self._dense_from,
                    self._dense_dtype)
            if recording() or (torch.compiler.is_compiling()
                               and takes_dense_path(x.numel() // x.shape[-1], self._dense_from, x.device)):
                return torch.ops.awqfx.int4_linear(*args)
            # same code without the custom op's dispatch cost (about as much as the int4 kernel in
            # decode); torch.compile traces through it to the int4 kernel itself
            return int4_linear_eager(*args)
        return torch.ops.awqfx.dequant_linear(
            x,
            self.qweight,
            self.scales,
            self.qzeros,
            self.bits,
            self.group_size,
            self.in_features,
            self.bias,
        )

    def dequantize_weight(self) -> Tensor:
        """The exact fp32 weight ``(q - zero) * scale`` (== ``QuantizedWeight.dequantize()``)."""
        return dequantize_packed(
            self.portable_qweight(), self.scales, self.qzeros, self.bits, self.group_size, self.in_features
        )

    def weight_bytes(self) -> int:
        """Resident bytes of the packed weight (the codes in whichever layout is held, scales,
        zero points, and the int4 kernel's bf16 scale/zeros); the bias is not counted."""
        total = 0
        for name in ("qweight", "_int4_weight", "scales", "qzeros", "_int4_scale_zeros"):
            t = getattr(self, name)
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else self.group_size
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={g}, symmetric={self.symmetric}, bias={self.bias is not None}, "
            f"backend={self._active}"
        )
        if self.backend != self._active:
            s += f" (requested {self.backend})"
        return s
