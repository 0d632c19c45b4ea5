"""``awqfx bench``: size and speed of float and packed versions of one model.

Rows: fp32, bf16, and the model packed at ``bits`` with its float parts (embeddings, norms, head,
attention) in bf16 (fp16 when the checkpoint is fp16), and in fp32 (the fast float dtype on a CPU
without bf16 arithmetic). The packed rows come from a round-to-nearest plan: packing and kernels do
not depend on how the scales were searched, and an AWQ search would only cost minutes here. With
``act`` (``--act-bits``) the packed rows are weight-activation ones (``Int8Linear``: the input
quantized per token at run time, ``torch._int_mm`` or, from the input length where that is faster on
this CPU, the same integers multiplied in float32), weights symmetric.

Figures: on-disk size (safetensors), resident bytes (parameters and buffers), the packed layers'
bytes against the same layers in bf16, prefill tokens/s (one forward over a random prompt, per
prompt length) and decode tokens/s (greedy single-token steps on a static KV cache after a prompt
of the first length, per batch size), best of ``repeats``. With ``compile`` the decode step is
``torch.compile``'d for every row alike (compiled once per row and batch size, before timing).
"""
from __future__ import annotations

import copy
import inspect
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import StaticCache

from awqfx.api import prepare, search
from awqfx.app import assets
from awqfx.app.jobs import dir_size
from awqfx.apply import apply_plan
from awqfx.capture import capture
from awqfx.config import ActSpec, AWQConfig
from awqfx.formats import save_quantized
from awqfx.int8_linear import int8_modules
from awqfx.packed_model import fp_weight_bytes, packed_modules, packed_weight_bytes
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


def _best_seconds(fn: Callable[..., Any], repeats: int, device: str, setup: Callable[[], tuple] = tuple) -> float:
    """The fastest of ``repeats`` timed calls ``fn(*setup())``; ``setup`` runs untimed before each."""
    best = float("inf")
    for _ in range(repeats):
        args = setup()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def prefill_tok_s(model: nn.Module, prompt: torch.Tensor, repeats: int) -> float:
    """Tokens/s of one forward over ``prompt`` ``[batch, length]`` without a cache."""
    model(prompt, use_cache=False)  # warm-up
    return prompt.numel() / _best_seconds(lambda: model(prompt, use_cache=False), repeats, prompt.device.type)


@torch.no_grad()
def decode_tok_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int,
                 compile: bool = False) -> float:
    """Tokens/s of ``new_tokens`` greedy steps for every row of ``prompt`` on a static KV cache
    (the step ``torch.compile``'d when ``compile``; its compilation happens before the timing).
    Only the steps are timed, each repeat after its own untimed prefill."""
    batch, length = prompt.shape
    step = torch.compile(model.forward, dynamic=False) if compile else model.forward
    # transformers 5 renames the forward's past_key_values to cache (5.24 warns on the old name)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill() -> tuple[StaticCache, torch.Tensor]:
        cache = StaticCache(config=model.config, max_cache_len=length + new_tokens)
        out = model(prompt, use_cache=True, cache_position=torch.arange(length, device=prompt.device),
                    **{cache_arg: cache})
        return cache, out.logits[:, -1:].argmax(-1)

    def decode(cache: StaticCache, token: torch.Tensor) -> None:
        for i in range(new_tokens):
            position = torch.tensor([length + i], device=prompt.device)
            out = step(token, use_cache=True, cache_position=position, **{cache_arg: cache})
            token = out.logits[:, -1:].argmax(-1)

    decode(*prefill())  # warm-up (and compilation)
    # only the steps are timed: the prefill, often slower than all the steps together, runs before
    # the clock starts (timing both and subtracting a separately timed prefill added its noise)
    return batch * new_tokens / _best_seconds(decode, repeats, prompt.device.type, setup=prefill)


_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def packed_rest_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the packed model's float parts (embeddings, norms, head) and activations:
    the loaded model's when it is half precision, else bfloat16 (the int4 kernels compute in bf16)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def kernel_choices(model: nn.Module) -> dict[str, str]:
    """``{"int4 NxKgG": "int4 kernel" | "dense float32 from T tokens"}`` for the model's int4 layers,
    ``{"int8 NxKgG": "torch._int_mm" | "float32 from T tokens"}`` for its W8A8 layers."""
    out = {}
    for m in packed_modules(model).values():
        if m.active_backend != "int4pack":
            continue
        key = f"int4 {m.out_features}x{m.in_features}g{m.group_size}"
        dtype = str(m._dense_dtype).removeprefix("torch.")
        out[key] = f"dense {dtype} from {m._dense_from} tokens" if m._dense_from else "int4 kernel"
    for m in int8_modules(model).values():
        key = f"int8 {m.out_features}x{m.in_features}g{m.group_size}"
        out[key] = f"float32 from {m.dense_from} tokens" if m.dense_from else "torch._int_mm"
    return out


def run_bench(model_path: str | None, bits: int = 4, group_size: int = 64, prompt_lens: Sequence[int] = (128, 512),
              batches: Sequence[int] = (1, 8), new_tokens: int = 32, repeats: int = 3, device: str = "cpu",
              dtype: str | torch.dtype = "auto", compile: bool = False, act: ActSpec | None = None) -> dict[str, Any]:
    """The ``awqfx bench`` table for the model loaded in ``dtype`` (see the module docstring)."""
    model, _ = assets.load_model(model_path, dtype)
    rest = packed_rest_dtype(model.dtype)
    half = copy.deepcopy(model).to(rest)  # before .float(), which casts the model in place
    model = model.float().eval()
    bf16 = half if rest == torch.bfloat16 else copy.deepcopy(model).to(torch.bfloat16)
    cfg = AWQConfig.rtn(QuantSpec(bits, group_size, symmetric=act is not None), activations=act)
    plan = search(prepare(capture(model), cfg), cfg, progress=False)
    label = f"w{bits}a{act.bits}" if act else f"int{bits}"
    variants = {
        "fp32": model,
        "bf16": bf16,
        f"{label} packed ({_SHORT[rest]} rest)": apply_plan(half, plan, weights="packed"),
        f"{label} packed (fp32 rest)": apply_plan(model, plan, weights="packed"),
    }
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in prompt_lens}
    decode_prompts = {b: torch.randint(0, vocab, (b, prompt_lens[0]), generator=gen) for b in batches}
    rows = []
    for name, m in variants.items():
        m = m.to(device).eval()
        packed = "packed" in name
        row = {"model": name, "device": device, "disk_bytes": _disk_bytes(m, packed), "resident_bytes": resident_bytes(m),
               "quantized_layer_bytes": packed_weight_bytes(m, include_unquantized=False) if packed else 0,
               "same_layers_bf16_bytes": fp_weight_bytes(m, torch.bfloat16, include_unquantized=False) if packed else 0,
               "kernels": kernel_choices(m) if packed else {},
               "prefill_tok_s": {n: prefill_tok_s(m, p.to(device), repeats) for n, p in prompts.items()},
               "decode_tok_s": {b: decode_tok_s(m, p.to(device), new_tokens, repeats, compile)
                                for b, p in decode_prompts.items()}}
        rows.append(row)
    bf = next(r for r in rows if r["model"] == "bf16")
    for r in rows:
        r["quantized_layers_vs_bf16"] = (r["quantized_layer_bytes"] / r["same_layers_bf16_bytes"]
                                         if r["same_layers_bf16_bytes"] else None)
        r["prefill_vs_bf16"] = {n: v / bf["prefill_tok_s"][n] for n, v in r["prefill_tok_s"].items()}
        r["decode_vs_bf16"] = {b: v / bf["decode_tok_s"][b] for b, v in r["decode_tok_s"].items()}
    return {"prompt_lens": list(prompt_lens), "batches": list(batches), "new_tokens": new_tokens, "repeats": repeats,
            "bits": bits, "group_size": group_size, "act_bits": act.bits if act else None,
            "act_granularity": act.granularity if act else None, "compile": compile, "threads": torch.get_num_threads(),
            "rows": rows}


def format_bench(res: dict[str, Any]) -> str:
    pre = [f"prefill {n}" for n in res["prompt_lens"]]
    dec = [f"decode b{b}" for b in res["batches"]]
    head = f"{'model':<30}{'disk MiB':>9}{'resident MiB':>13}{'q-layers/bf16':>14}" + "".join(
        f"{c:>15}" for c in pre + dec)
    lines = [f"tokens/s (x bf16); prompts {', '.join(map(str, res['prompt_lens']))}; decode {res['new_tokens']} steps "
             f"after {res['prompt_lens'][0]} tokens{', compiled' if res['compile'] else ', eager'}; "
             f"best of {res['repeats']}; {res['threads']} threads", head, "-" * len(head)]
    for r in res["rows"]:
        ratio = f"{r['quantized_layers_vs_bf16']:.1%}" if r["quantized_layers_vs_bf16"] is not None else "-"
        cells = [f"{r['prefill_tok_s'][n]:.1f} ({r['prefill_vs_bf16'][n]:.2f}x)" for n in res["prompt_lens"]]
        cells += [f"{r['decode_tok_s'][b]:.1f} ({r['decode_vs_bf16'][b]:.2f}x)" for b in res["batches"]]
        lines.append(f"{r['model']:<30}{r['disk_bytes'] / 2**20:>9.1f}{r['resident_bytes'] / 2**20:>13.1f}{ratio:>14}"
                     + "".join(f"{c:>15}" for c in cells))
    kernels = next((r["kernels"] for r in res["rows"] if r["kernels"]), {})
    if kernels:
        lines.append("kernels: " + "; ".join(f"{k}: {v}" for k, v in kernels.items()))
    return "\n".join(lines)
