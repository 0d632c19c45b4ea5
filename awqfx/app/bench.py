"""``awqfx bench``: size and speed of fp32, bf16 and packed int4 versions of one model.

Numbers: on-disk size (safetensors), resident weight bytes (parameters + buffers, int4 kernel
cache included), prefill tokens/s (one forward over the prompt) and decode tokens/s (greedy
single-token steps with the KV cache), best of ``repeats``. The int4 model is packed from an RTN
plan: packing and kernels do not depend on how the scales were searched.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from awqfx.api import prepare, search
from awqfx.app import assets
from awqfx.app.jobs import dir_size
from awqfx.apply import apply_plan
from awqfx.capture import capture
from awqfx.config import AWQConfig
from awqfx.formats import save_quantized
from awqfx.packed_model import fp_weight_bytes, packed_weight_bytes
from awqfx.quant import QuantSpec


def resident_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _disk_bytes(model: nn.Module, packed: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        if packed:
            save_quantized(model, out, fmt="awqfx")
        else:
            model.save_pretrained(out)
        return sum(f.stat().st_size for f in out.glob("*.safetensors")) or dir_size(out)


@torch.no_grad()
def _speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
    best_pre, best_dec = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(prompt, use_cache=False)
        best_pre = min(best_pre, time.perf_counter() - t0)
        out = model(prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        best_dec = min(best_dec, time.perf_counter() - t0)
    return prompt.shape[1] / best_pre, new_tokens / best_dec


_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def packed_rest_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the packed model's float parts (embeddings, norms, head) and activations:
    the loaded model's when it is half precision, else bfloat16 (the int4 kernels compute in bf16)."""
    return dtype if dtype in _SHORT else torch.bfloat16


def run_bench(model_path: str | None, bits: int = 4, group_size: int = 64, prompt_len: int = 128,
              new_tokens: int = 32, repeats: int = 3, device: str = "cpu",
              dtype: str | torch.dtype = "auto") -> dict[str, Any]:
    """The ``awqfx bench`` table: fp32, bf16 and packed rows for the model loaded in ``dtype``."""
    model, _ = assets.load_model(model_path, dtype)
    rest = packed_rest_dtype(model.dtype)
    half = copy.deepcopy(model).to(rest)  # before .float(), which casts the model in place
    model = model.float().eval()
    bf16 = half if rest == torch.bfloat16 else copy.deepcopy(model).to(torch.bfloat16)
    cfg = AWQConfig.rtn(QuantSpec(bits, group_size))
    plan = search(prepare(capture(model), cfg), cfg, progress=False)
    variants = {
        "fp32": model,
        "bf16": bf16,
        f"int{bits} packed ({_SHORT[rest]} rest)": apply_plan(half, plan, weights="packed"),
    }
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    rows = []
    for name, m in variants.items():
        m = m.to(device)
        packed = "packed" in name
        if packed:  # the quantized layers only: packed codes + scales + zeros vs the same layers in bf16
            lin_bytes = packed_weight_bytes(m, include_kernel_cache=False, include_unquantized=False)
            lin_ref = fp_weight_bytes(m, torch.bfloat16, include_unquantized=False)
        else:
            lin_bytes = lin_ref = 0
        pre, dec = _speed(m, prompt.to(device), new_tokens, repeats)
        rows.append({"model": name, "device": device, "disk_bytes": _disk_bytes(m, packed),
                     "resident_bytes": resident_bytes(m), "quantized_layer_bytes": lin_bytes,
                     "same_layers_bf16_bytes": lin_ref, "prefill_tok_s": pre, "decode_tok_s": dec})
    bf = next(r for r in rows if r["model"] == "bf16")
    for r in rows:
        r["quantized_layers_vs_bf16"] = r["quantized_layer_bytes"] / r["same_layers_bf16_bytes"] if r["same_layers_bf16_bytes"] else None
        r["decode_vs_bf16"] = r["decode_tok_s"] / bf["decode_tok_s"]
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "bits": bits,
            "group_size": group_size, "threads": torch.get_num_threads(), "rows": rows}


def format_bench(res: dict[str, Any]) -> str:
    head = f"{'model':<32}{'disk MiB':>10}{'resident MiB':>14}{'q-layers vs bf16':>18}{'prefill tok/s':>15}{'decode tok/s':>14}{'decode vs bf16':>16}"
    lines = [f"prompt {res['prompt_len']} tokens, {res['new_tokens']} decode steps, best of {res['repeats']}, "
             f"{res['threads']} threads", head, "-" * len(head)]
    for r in res["rows"]:
        ratio = f"{r['quantized_layers_vs_bf16']:.1%}" if r["quantized_layers_vs_bf16"] is not None else "-"
        lines.append(f"{r['model'] + ' (' + r['device'] + ')':<32}{r['disk_bytes'] / 2**20:>10.1f}{r['resident_bytes'] / 2**20:>14.1f}"
                     f"{ratio:>18}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.1f}{r['decode_vs_bf16']:>15.2f}x")
    return "\n".join(lines)
