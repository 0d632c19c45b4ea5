"""Benchmark: the whole pipeline on tiny random models of any transformers architecture.

    python benchmarks/architectures.py stablelm glm4 gpt_neox ... [--group-size 16]

For each model type (transformers' ``AutoConfig.for_model`` name), a 2-layer random-init model
with small sizes: capture -> prepare -> calibrate (8 x 16 random tokens) -> search -> the fake and
the packed module-tree models -> compressed-tensors save -> transformers' ``from_pretrained`` with
``CompressedTensorsConfig(dequantize=True)``. A plan the module tree or the format refuses because of
an unfoldable group is searched again with ``drop_unfoldable=True``. Prints one JSON line per
architecture: groups found, quantized weights, linear modules, the fake model's relative logit
error against fp, and the largest logit difference of packed against fake and of the transformers
load against packed (relative to the largest logit); or the error that stopped it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

import awqfx
from awqfx.api import AWQConfig, calibrate, prepare, search
from awqfx.apply import apply_plan
from awqfx.export import save_quantized

VOCAB = 128
# small sizes under the names configs use for them; each is set only where the config has it
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, moe_intermediate_size=32,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
             shared_expert_intermediate_size=48, ffn_dim=96, n_embd=64, n_layer=2, n_head=4, n_positions=256,
             d_model=64, n_heads=4, n_layers=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=64)


def tiny_config(model_type: str):
    cfg = AutoConfig.for_model(model_type)
    for key, value in SIZES.items():
        old = getattr(cfg, key, "absent")
        if old is None or (isinstance(old, (int, float)) and not isinstance(old, bool)):
            setattr(cfg, key, value)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:cfg.num_hidden_layers]
    if hasattr(cfg, "mlp_only_layers"):
        cfg.mlp_only_layers = []
    return cfg


def tiny_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    with torch.no_grad():  # norms init to 1/0, which would hide a wrongly folded norm
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.endswith("bias") else 1.0))
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def run(model_type: str, group_size: int, drop_unfoldable: bool) -> dict:
    model = tiny_model(model_type)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    fp = logits(model, ids)
    cfg = AWQConfig.of(bits=4, group_size=group_size, drop_unfoldable=drop_unfoldable)
    observed = prepare(awqfx.capture(model), cfg)
    row = {"arch": model_type, "drop_unfoldable": drop_unfoldable, "groups": len(observed.groups),
           "linears": sum(isinstance(m, torch.nn.Linear) for m in model.modules())}
    calibrate(observed, calib, progress=False)
    plan = search(observed, cfg, progress=False)
    row["quantized"] = len(plan.weights)
    fake = logits(apply_plan(model, plan, weights="fake"), ids)
    packed_model = apply_plan(model, plan, weights="packed", backend="dequant")
    packed = logits(packed_model, ids)
    row["fake_vs_fp"] = ((fake - fp).norm() / fp.norm()).item()
    row["packed_vs_fake"] = ((packed - fake).abs().max() / fake.abs().max()).item()
    with tempfile.TemporaryDirectory() as tmp:
        out = save_quantized(packed_model, Path(tmp) / "ct", fmt="compressed-tensors")
        loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
        row["load_vs_packed"] = ((logits(loaded.eval(), ids) - packed).abs().max() / packed.abs().max()).item()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_types", nargs="+", help="transformers model types (config.model_type)")
    ap.add_argument("--group-size", type=int, default=16)
    args = ap.parse_args()
    for model_type in args.model_types:
        try:
            try:
                row = run(model_type, args.group_size, drop_unfoldable=False)
            except ValueError as e:  # the module tree or the format cannot hold an unfoldable group
                if "drop-unfoldable" not in str(e):
                    raise
                row = run(model_type, args.group_size, drop_unfoldable=True)
        except Exception as e:  # noqa: BLE001 - one line per architecture, then the next
            row = {"arch": model_type, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
