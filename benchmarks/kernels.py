"""Time one packed layer's kernels (int4, W8A8) against dense matmuls, per layer shape and token count.

    python benchmarks/kernels.py [--shapes 1536x576,576x1536,576x576] [--tokens 1,8,32,128,512]

Prints microseconds per call (best of 3 x 20 calls) of ``F.linear`` in bf16 and in fp32 and of
PyTorch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``, bf16 activations, group 64), and
of awqfx's dense path (dequantize the int4 layout into a reused buffer, one fp32 matmul): what
``awqfx.kernel_choice`` weighs on the running machine. Then the W8A8 layer
(``awqfx::int8_linear``: the fp32 input quantized per token, ``torch._int_mm``, one fp32 scale
per output channel), the same layer on its float32 path (the same integers multiplied in float32:
what ``awqfx.kernel_choice`` weighs against ``torch._int_mm``) and, to show where the time goes,
``torch._int_mm`` alone on int8 inputs and the per-token activation quantization alone.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from awqfx.act_quant import quantize_activation
from awqfx.config import ActSpec
from awqfx.kernels import dense_linear, int4pack_matmul, pack_int4_scale_zeros, pack_int4_weight
from awqfx.kernels_int8 import int8_linear


def best_us(fn, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1536x576,576x1536,576x576", help="N x K of the layers")
    ap.add_argument("--tokens", default="1,8,32,128,512", help="rows of the input")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    g = args.group_size
    gen = torch.Generator().manual_seed(0)
    print(f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; microseconds per call")
    cols = ["bf16", "fp32", "int4", "dense fp32", "w8a8", "w8a8 fp32", "_int_mm", "quant x"]
    print(f"{'N x K':>11}{'tokens':>8}" + "".join(f"{c:>11}" for c in cols))
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        scale = torch.rand(n, k // g, generator=gen) / 100
        zero = torch.randint(0, 16, (n, k // g), generator=gen)
        packed, sz = pack_int4_weight(q), pack_int4_scale_zeros(scale, zero)
        w32 = ((q.view(n, k // g, g) - zero[..., None]) * scale[..., None]).view(n, k)
        w16 = w32.bfloat16()
        w8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        s8 = torch.rand(n, 1, generator=gen) / 100
        act = ActSpec(8)
        for m in (int(v) for v in args.tokens.split(",")):
            x16 = torch.randn(m, k, generator=gen).bfloat16()
            x32 = x16.float()
            qx, w8t = quantize_activation(x32, ActSpec(8))[0], w8.t()
            times = [best_us(lambda: F.linear(x16, w16)), best_us(lambda: F.linear(x32, w32)),
                     best_us(lambda: int4pack_matmul(x16, packed, sz, g)),
                     best_us(lambda: dense_linear(x16, packed, sz, g, torch.float32)),
                     best_us(lambda: int8_linear(x32, w8, s8, None, -1, 8, True)),
                     best_us(lambda: int8_linear(x32, w8, s8, None, -1, 8, True, None, 1)),
                     best_us(lambda: torch._int_mm(qx, w8t)),
                     best_us(lambda: quantize_activation(x32, act))]
            print(f"{shape:>11}{m:>8}" + "".join(f"{t:>11,.0f}" for t in times))


if __name__ == "__main__":
    main()
