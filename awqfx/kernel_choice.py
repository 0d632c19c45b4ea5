"""Which kernel multiplies by a packed int4 weight, chosen by shape from timings on this machine.

PyTorch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) dequantizes the weight inside its
inner loop, once per small block of tokens: it wins for a few tokens (decode) and can lose to
"dequantize the layer once into a buffer, then one dense matmul" for many tokens (prefill),
by how much depends on the CPU (AVX-512 with bf16 dot products, or AVX2 where bf16 matmuls are
slow and float32 ones fast). So the choice is measured, not assumed: for each weight shape
``(N, K, group)`` :func:`measure` times the int4 kernel and the dense path in float32 and in
bfloat16 over a ladder of token counts, and the layer uses the dense path from the smallest
count where it is faster at that count and every larger one measured (``dense_from``). The
result is cached per machine (CPU model and vector extension, torch version, thread count) in
``$AWQFX_CACHE`` (default ``~/.cache/awqfx``), ``kernel-choice-<key>.json``.

``AWQFX_DENSE_FROM`` overrides: ``never`` (int4 kernel at every length), or a token count (dense
float32 from that many tokens on), or ``measure`` (the default).

Both paths multiply by the same weight, ``(q - 8) * scale + zero`` from the kernel's bf16
``scale_zeros``; they differ only in the precision of the activations (the int4 kernel rounds
them to bf16) and in summation order.

The W8A8 layer (:class:`awqfx.int8_linear.Int8Linear`, ``kind="int8"``) is chosen the same way:
``torch._int_mm`` on the int8 codes against the same codes multiplied in float32 (the weight
dequantized into a reused buffer, the activations' int8 codes as floats, then scaled), which gives
the same values up to float32 summation order. ``torch._int_mm`` is fast where the CPU has int8 dot
products (VNNI, AMX) and 25x slower than float32 on an AVX2 CPU without them (docs/results.md).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from awqfx.cache import cache_dir
from awqfx.kernels import dense_linear, int4pack_matmul, pack_int4_scale_zeros, pack_int4_weight
from awqfx.kernels_int8 import int8_linear_eager
from awqfx.quant import num_groups

__all__ = ["KernelChoice", "ENV_DENSE_FROM", "LADDER", "choice", "measure", "measure_int8", "machine_key", "cache_file"]

log = logging.getLogger(__name__)

ENV_DENSE_FROM = "AWQFX_DENSE_FROM"
LADDER = (1, 8, 32, 64, 128, 256, 512, 1024)
DENSE_DTYPES = ("float32", "bfloat16")
KINDS = ("int4", "int8")
_SLOW_CALL_S = 0.25  # stop climbing the ladder once one int4 call takes this long

_lock = threading.Lock()
_memory: dict[tuple, KernelChoice] = {}


@dataclass(frozen=True)
class KernelChoice:
    """For one weight shape: from how many tokens the dense path runs, and in which dtype.

    ``dense_from``: ``None`` means the int4 kernel always. ``timings``: seconds per call at each
    ``ladder`` entry for ``int4`` and each dense dtype (empty when forced by the environment).
    """

    dense_from: int | None
    dense_dtype: str = "float32"
    ladder: tuple[int, ...] = ()
    timings: dict[str, list[float]] = field(default_factory=dict)

    def dense_dtype_for(self, tokens: int) -> torch.dtype | None:
        """The dtype of the dense path for ``tokens`` rows, or ``None`` for the int4 kernel."""
        if self.dense_from is None or tokens < self.dense_from:
            return None
        return getattr(torch, self.dense_dtype)


def machine_key() -> str:
    """What the timings depend on: CPU model, vector extension, torch version, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [cpu, torch.backends.cpu.get_cpu_capability(), torch.__version__, f"threads={torch.get_num_threads()}"]
    return "|".join(parts)


def cache_file() -> Path:
    digest = hashlib.sha1(machine_key().encode()).hexdigest()[:12]
    return cache_dir() / f"kernel-choice-{digest}.json"


def _shape_key(out_features: int, in_features: int, group_size: int) -> str:
    return f"{out_features}x{in_features}g{group_size}"


def _forced() -> KernelChoice | None:
    value = os.environ.get(ENV_DENSE_FROM, "measure").strip().lower()
    if value == "measure":
        return None
    if value == "never":
        return KernelChoice(dense_from=None)
    try:
        tokens = int(value)
    except ValueError:
        raise ValueError(f"{ENV_DENSE_FROM} must be 'measure', 'never' or a token count, got {value!r}") from None
    if tokens < 1:
        raise ValueError(f"{ENV_DENSE_FROM} must be at least 1, got {tokens}")
    return KernelChoice(dense_from=tokens)


def choice(out_features: int, in_features: int, group_size: int, device: torch.device | str = "cpu",
           kind: str = "int4") -> KernelChoice:
    """The kernel choice for this shape on ``device`` (CPU: forced, cached, or measured now);
    ``kind``: ``"int4"`` (the int4 kernel against dequantize + matmul) or ``"int8"`` (the W8A8
    layer's ``torch._int_mm`` against the same integers multiplied in float32)."""
    forced = _forced()
    if forced is not None:
        return forced
    if torch.device(device).type != "cpu":
        return KernelChoice(dense_from=None)  # the dense path reads the CPU layout only
    if kind not in KINDS:
        raise ValueError(f"kernel kind must be one of {', '.join(KINDS)}, got {kind!r}")
    shape = _shape_key(out_features, in_features, group_size)
    key = (shape if kind == "int4" else f"{kind}:{shape}", machine_key())
    with _lock:
        if key in _memory:
            return _memory[key]
        path = cache_file()
        stored = _read(path)
        if key[0] in stored:
            found = KernelChoice(**{**stored[key[0]], "ladder": tuple(stored[key[0]]["ladder"])})
        else:
            log.info("timing the %s kernel against its dense float path for %s (once per machine; cached in %s)",
                     kind, key[0], path)
            found = (measure if kind == "int4" else measure_int8)(out_features, in_features, group_size)
            stored[key[0]] = asdict(found)
            _write(path, stored)
        _memory[key] = found
        return found


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, stored: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        tmp.replace(path)
    except OSError as err:  # a read-only home: keep the choice in memory only
        log.warning("could not cache the kernel choice in %s: %s", path, err)


def _seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def measure(out_features: int, in_features: int, group_size: int, ladder: tuple[int, ...] = LADDER,
            repeats: int = 3) -> KernelChoice:
    """Time the int4 kernel and the dense path (float32, bfloat16) for this shape on the CPU."""
    n, k = out_features, in_features
    gen = torch.Generator().manual_seed(0)
    weight = pack_int4_weight(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32), "cpu")
    n_groups = k // group_size
    scale_zeros = pack_int4_scale_zeros(torch.rand(n, n_groups, generator=gen) * 0.01,
                                        torch.randint(0, 16, (n, n_groups), generator=gen))
    timings: dict[str, list[float]] = {"int4": [], **{d: [] for d in DENSE_DTYPES}}
    measured: list[int] = []
    for tokens in ladder:
        x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)
        timings["int4"].append(_seconds(functools.partial(int4pack_matmul, x, weight, scale_zeros, group_size),
                                        repeats))
        for d in DENSE_DTYPES:
            dense = functools.partial(dense_linear, x, weight, scale_zeros, group_size, getattr(torch, d))
            timings[d].append(_seconds(dense, repeats))
        measured.append(tokens)
        if timings["int4"][-1] > _SLOW_CALL_S:
            break
    dense_dtype = min(DENSE_DTYPES, key=lambda d: timings[d][-1])
    return KernelChoice(dense_from=_dense_from(measured, timings[dense_dtype], timings["int4"]),
                        dense_dtype=dense_dtype, ladder=tuple(measured), timings=timings)


def _dense_from(measured: list[int], dense: list[float], kernel: list[float]) -> int | None:
    """The smallest measured token count from which the dense path is faster at it and every larger one."""
    found = None
    for i in reversed(range(len(measured))):
        if dense[i] >= kernel[i]:
            break
        found = measured[i]
    return found


@torch.inference_mode()
def measure_int8(out_features: int, in_features: int, group_size: int, ladder: tuple[int, ...] = LADDER,
                 repeats: int = 3) -> KernelChoice:
    """Time the W8A8 layer's integer path (``torch._int_mm``) and its float32 path (the same
    integers multiplied as float32, :func:`awqfx.kernels_int8.int8_linear_eager`) on the CPU."""
    n, k = out_features, in_features
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, num_groups(k, group_size), generator=gen) * 0.01
    timings: dict[str, list[float]] = {"int8": [], "float32": []}
    measured: list[int] = []
    for tokens in ladder:
        x = torch.randn(tokens, k, generator=gen)
        for name, dense_from in (("int8", 0), ("float32", 1)):
            run = functools.partial(int8_linear_eager, x, weight, scale, None, group_size, 8, True, None, dense_from)
            timings[name].append(_seconds(run, repeats))
        measured.append(tokens)
        if timings["int8"][-1] > _SLOW_CALL_S:
            break
    return KernelChoice(dense_from=_dense_from(measured, timings["float32"], timings["int8"]), dense_dtype="float32",
                        ladder=tuple(measured), timings=timings)
