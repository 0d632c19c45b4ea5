"""Benchmark: the most any faster linear kernel can give decode (issue #15's eager target).

    python benchmarks/decode_ceiling.py [--model MODEL] [--compile] [--new-tokens 32] [--repeats 3]

Decodes at batch 1 (``awqfx.app.bench.decode_tok_s``: static KV cache, best of ``--repeats``)
with the bf16 model, then with the same model whose decoder linears (every ``nn.Linear`` but the
LM head) cost nothing: each returns a preallocated zero tensor of its output's shape. The ratio
of the two is the ceiling of decode speed-up for any quantized linear that leaves the rest of the
step (attention, norms, rotary, the head, Python) as it is.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from awqfx.app import assets
from awqfx.app.bench import decode_tok_s


class FreeLinear(nn.Module):
    """A linear that costs nothing: the same zero tensor for every input of a shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.outputs: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if shape not in self.outputs:
            self.outputs[shape] = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return self.outputs[shape]


def free_linears(model: nn.Module, keep: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` but ``keep`` (the head) made free."""
    kept = {n for n, m in model.named_modules() if m is keep}
    out = copy.deepcopy(model)
    for name, parent in list(out.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in kept:
                setattr(parent, child_name, FreeLinear(child.out_features))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step of both models")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, _ = assets.load_model(args.model, torch.bfloat16)
    model = model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    rows = {"bf16": model, "bf16, decoder linears free": free_linears(model, model.get_output_embeddings())}
    speed = {}
    for name, m in rows.items():
        speed[name] = decode_tok_s(m, prompt, args.new_tokens, args.repeats, compile=args.compile)
        print(f"{name:28s} decode batch 1: {speed[name]:.1f} tok/s" + (" (compiled)" if args.compile else ""),
              flush=True)
    print(f"ceiling: {speed['bf16, decoder linears free'] / speed['bf16']:.2f}x bf16")


if __name__ == "__main__":
    main()
