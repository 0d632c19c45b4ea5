"""Benchmark: capture + discovery of a TinyLlama-1.1B-shaped random model on the meta device.

    python benchmarks/discovery.py [--layers 22]

Prints the wall time of each stage and the peak RSS; no weights are materialised (meta device).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import awqfx
from awqfx.passes.discover import discover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--layers", type=int, default=22)
    args = ap.parse_args()
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg).eval()
    t1 = time.perf_counter()
    gm = awqfx.capture(model)
    t2 = time.perf_counter()
    d = discover(gm)
    t3 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(p.numel() for p in model.parameters())
    print(f"TinyLlama-1.1B shape ({n_params / 1e9:.2f}B params, {args.layers} layers) on meta")
    print(f"  build model      {t1 - t0:6.2f} s")
    print(f"  capture          {t2 - t1:6.2f} s  ({len(gm.graph.nodes)} nodes)")
    print(f"  discover         {t3 - t2:6.2f} s  ({len(d.groups)} groups, {len(d.rejected)} rejected)")
    print(f"  capture+discover {t3 - t1:6.2f} s   peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
