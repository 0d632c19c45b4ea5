"""Benchmark: `awqfx quantize` on a random-init LLaMA-shaped bf16 checkpoint (memory and time per block).

    python benchmarks/big_model.py --shape tinyllama-1.1b|llama-2-7b|tiny [--dir DIR] [--regen] [--keep]
        [--mode sequential|whole] [--samples 8] [--seq-len 256] [--json FILE] [--extrapolate]
        [-- EXTRA AWQFX QUANTIZE FLAGS, e.g. --device cuda]

1. Writes (once; reused while DIR holds a complete one) a checkpoint like a hub download: bf16
   tensors in safetensors shards of at most --shard-mb with model.safetensors.index.json, plus
   config.json, generation_config.json and a BPE tokenizer trained on the bundled calibration plays.
   Names and shapes come from a LlamaForCausalLM built on the meta device; tensors are generated and
   written one shard at a time (normal(0, initializer_range) for matrices, ones for norms, seeded),
   so the whole model is never in memory.
2. Runs `python -m awqfx quantize DIR --out OUT [--sequential] --samples N --seq-len L --report R
   --quiet EXTRA` as a subprocess, measures its wall time and peak RSS (getrusage of children), and
   prints: checkpoint bytes, peak RSS (MB and as a fraction of the checkpoint), time, time per block
   (first / median / last / max, and whether it is flat across depth), output bytes, and the FLOPs
   of the calibration forward per block with the achieved GFLOP/s. From the --report JSON it reads
   "stages" ({name: seconds}), "facts", "peak_rss_mb" and "blocks" ([{"index": i, "seconds": s, ...}];
   any other numeric key of a block is summarized too); --no-report leaves the per-block rows out.

FLOPs of one block's calibration forward over n sequences of L tokens (T = n * L tokens):
    2 * P * T  +  4 * n * L^2 * d
P = weights of the block's linear layers (q, k, v, o, gate, up, down), d = heads * head_dim.
The first term is the linears (a multiply-add per weight per token), the second QK^T and AV over
the full L x L square (a causal kernel may skip half). Norms, rotary, softmax and SiLU are O(T * d)
and left out, as is the lm_head. "Achieved GFLOP/s" divides this by the block's whole time, which
also includes the AWQ search, so it is a forward-equivalent rate, not the hardware's.

With --extrapolate, also an ESTIMATE for 128 x 512 calibration tokens: the measured median block
time scaled by the ratio of forward FLOPs, and for an H100-class GPU the forward FLOPs at
--gpu-tflops x --gpu-util sustained (default 400 TFLOP/s bf16 dense at 40 %), plus the whole
per-block work converted to GPU time through a matmul micro-benchmark on the measured device.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from awqfx.app.assets import cache_dir, calibration_text

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, positions
    "tiny": (256, 688, 4, 8, 4, 2048),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 2048),
    "llama-2-7b": (4096, 11008, 32, 32, 32, 4096),
}
VOCAB = 32000
STAMP = "bench_checkpoint.json"  # written last: its presence marks a complete checkpoint
STAMP_FORMAT = 1


def make_config(shape: str) -> LlamaConfig:
    hidden, inter, layers, heads, kv, pos = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB,
                       max_position_embeddings=pos, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def tensor_specs(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a LlamaForCausalLM of ``cfg`` saves, in state_dict order."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def plan_shards(specs, max_bytes: int, elem_bytes: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in specs:
        nbytes = math.prod(shape) * elem_bytes
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    return shards + [cur] if cur else shards


def init_tensor(name: str, shape, std: float, gen: torch.Generator) -> torch.Tensor:
    """Like HF's init: normal(0, std) for linears and embeddings, ones for norms, zeros for biases."""
    if len(shape) >= 2:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)
    return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=torch.bfloat16)


def train_tokenizer(vocab_size: int, max_len: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the calibration plays, padded with unused tokens up to ``vocab_size``."""
    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(calibration_text().split("\n\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    short = vocab_size - tok.get_vocab_size()
    if short > 0:  # the text did not yield enough merges
        tok.add_special_tokens([f"<unused_{i}>" for i in range(short)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_len)


def checkpoint_ok(d: Path, shape: str, seed: int) -> bool:
    try:
        stamp = json.loads((d / STAMP).read_text())
        index = json.loads((d / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    files = set(index["weight_map"].values())
    return (stamp == {"shape": shape, "seed": seed, "format": STAMP_FORMAT}
            and all((d / f).is_file() for f in files) and (d / "tokenizer.json").is_file())


def write_checkpoint(d: Path, shape: str, seed: int, shard_mb: int) -> None:
    """Write the checkpoint into a temporary sibling of ``d``, then rename it to ``d``."""
    cfg = make_config(shape)
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, shard_mb * 2**20)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{d.name}-", dir=d.parent))
    try:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(cfg.vocab_size, cfg.max_position_embeddings)
        assert len(tokenizer) <= cfg.vocab_size, (len(tokenizer), cfg.vocab_size)
        tokenizer.save_pretrained(tmp)
        print(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - t0:.1f} s)", flush=True)
        cfg.save_pretrained(tmp)
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        gen = torch.Generator().manual_seed(seed)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            t0 = time.perf_counter()
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: init_tensor(name, shape_, cfg.initializer_range, gen) for name, shape_ in shard}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            os.chmod(tmp / fname, 0o644)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            total += nbytes
            weight_map.update({name: fname for name, _ in shard})
            print(f"shard {i + 1}/{len(shards)}: {len(shard)} tensors, {nbytes / 1e9:.2f} GB "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / STAMP).write_text(json.dumps({"shape": shape, "seed": seed, "format": STAMP_FORMAT}))
        os.chmod(tmp, 0o755)
        os.rename(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def block_flops(cfg: LlamaConfig, specs, n: int, seq_len: int) -> tuple[float, int]:
    """(FLOPs of one block's calibration forward, linear weights per block); formula in the module docstring."""
    p = sum(math.prod(s) for k, s in specs if k.startswith("model.layers.0.") and len(s) == 2)
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return 2.0 * p * n * seq_len + 4.0 * n * seq_len**2 * d_attn, p


def cpu_matmul_gflops(hidden: int) -> float:
    """Best fp32/bf16 CPU matmul rate on [t, k] x [k, k] (k = min(hidden, 1024)), t doubled from 32 until one
    product takes 0.1 s or t = 2048, so a CPU without a fast bf16 path costs well under a second."""
    k, best = min(hidden, 1024), 0.0
    for dtype in (torch.float32, torch.bfloat16):
        b, t = torch.randn(k, k, dtype=dtype), 32
        while True:
            a = torch.randn(t, k, dtype=dtype)
            a @ b
            t0 = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t0
            best = max(best, 2 * t * k * k / dt / 1e9)
            if dt >= 0.1 or t >= 2048:
                break
            t *= 2
    return best


def flat_verdict(secs: list[float]) -> str:
    """Median of the last third over the first third (block 0 left out as warm-up when there are >= 4)."""
    s = secs[1:] if len(secs) >= 4 else secs
    k = max(1, len(s) // 3)
    ratio = statistics.median(s[-k:]) / max(statistics.median(s[:k]), 1e-9)
    return f"{'flat' if 0.8 <= ratio <= 1.25 else 'NOT flat'} (last third / first third = {ratio:.2f})"


def device_of(extra: list[str]) -> str:
    """The --device given to awqfx quantize (default cpu)."""
    for i, a in enumerate(extra):
        if a.startswith("--device="):
            return a.split("=", 1)[1]
        if a == "--device" and i + 1 < len(extra):
            return extra[i + 1]
    return "cpu"


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Flags after -- go to awqfx quantize.")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True, help="model shape (tiny: for testing this script)")
    ap.add_argument("--dir", type=Path, help="checkpoint directory (default: $AWQFX_CACHE/bench/SHAPE or "
                    "~/.cache/awqfx/bench/SHAPE); reused when it holds a complete one")
    ap.add_argument("--regen", action="store_true", help="rewrite the checkpoint even if DIR holds a complete one")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    ap.add_argument("--shard-mb", type=int, default=None,
                    help="largest shard in MiB (default 2000; 16 for --shape tiny, so it has several shards)")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    ap.add_argument("--mode", choices=["sequential", "whole"], default="sequential",
                    help="sequential: pass --sequential (block by block); whole: the whole-graph pipeline")
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences (default 8)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    ap.add_argument("--out", type=Path, help="quantized output (default: DIR-awq-MODE beside DIR, replaced if it exists)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized output (default: delete it after measuring)")
    ap.add_argument("--no-report", action="store_true",
                    help="do not pass --report to awqfx quantize (for a version without it; no per-block numbers)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that runs `-m awqfx quantize` (default: the one running this script)")
    ap.add_argument("--json", type=Path, help="also write every number as JSON to this file")
    ap.add_argument("--extrapolate", action="store_true", help="also print the projected time for 128 x 512 tokens")
    ap.add_argument("--gpu-tflops", type=float, default=400.0,
                    help="assumed peak dense bf16 TFLOP/s of the GPU for --extrapolate (default 400, H100-class)")
    ap.add_argument("--gpu-util", type=float, default=0.4, help="assumed sustained fraction of --gpu-tflops (default 0.4)")
    own, extra = split_extra(sys.argv[1:])
    args = ap.parse_args(own)

    ckpt = args.dir or cache_dir() / "bench" / args.shape
    shard_mb = args.shard_mb or (16 if args.shape == "tiny" else 2000)
    if checkpoint_ok(ckpt, args.shape, args.seed) and not args.regen:
        print(f"checkpoint: reusing {ckpt}")
    else:
        if ckpt.exists():
            if not (ckpt / STAMP).is_file():
                sys.exit(f"{ckpt} exists and was not written by this script; give another --dir")
            if not args.regen:
                sys.exit(f"{ckpt} holds another shape/seed or is incomplete; pass --regen to rewrite it")
            shutil.rmtree(ckpt)
        t0 = time.perf_counter()
        write_checkpoint(ckpt, args.shape, args.seed, shard_mb)
        print(f"checkpoint: wrote {ckpt} in {time.perf_counter() - t0:.1f} s, "
              f"peak RSS of this script {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.write_only:
        return 0

    cfg = LlamaConfig.from_pretrained(ckpt)
    specs = tensor_specs(cfg)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    out = args.out or ckpt.parent / f"{ckpt.name}-awq-{args.mode}"
    if args.out is None and out.exists():
        shutil.rmtree(out)
    report_path = out.parent / f"{out.name}.report.json"
    report_path.unlink(missing_ok=True)
    cmd = [args.python, "-m", "awqfx", "quantize", str(ckpt), "--out", str(out)]
    cmd += ["--sequential"] if args.mode == "sequential" else []
    cmd += ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--group-size", "128", "--quiet"]  # the
    # group size real-size checkpoints are published with; flags after -- override it
    cmd += [] if args.no_report else ["--report", str(report_path)]
    cmd += extra
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        print(f"awqfx quantize failed with exit code {rc}", file=sys.stderr)
        return rc
    rep = json.loads(report_path.read_text()) if report_path.is_file() else {}
    out_bytes = dir_bytes(out)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)

    device = device_of(extra)
    peak_mb = ru.ru_maxrss / 1024
    res = {"shape": args.shape, "mode": args.mode, "device": device, "checkpoint": str(ckpt),
           "checkpoint_bytes": ckpt_bytes, "peak_rss_mb": peak_mb, "peak_rss_over_checkpoint": peak_mb * 2**20 / ckpt_bytes,
           "report_peak_rss_mb": rep.get("peak_rss_mb"), "wall_seconds": wall,
           "cpu_seconds": ru.ru_utime + ru.ru_stime, "output_bytes": out_bytes, "stages": rep.get("stages", {}),
           "facts": rep.get("facts", {}), "samples": args.samples, "seq_len": args.seq_len,
           "layers": cfg.num_hidden_layers, "command": cmd}
    f_blk, p_blk = block_flops(cfg, specs, args.samples, args.seq_len)
    res.update(flops_per_block=f_blk, linear_weights_per_block=p_blk)
    rows = [("model", f"{args.shape}: {sum(math.prod(s) for _, s in specs) / 1e9:.2f}B params, "
                      f"{cfg.num_hidden_layers} blocks, bf16"),
            ("mode / device", f"{args.mode} / {device}"),
            ("calibration", f"{args.samples} x {args.seq_len} tokens (requested)"),
            ("checkpoint", f"{ckpt_bytes / 1e9:.2f} GB ({ckpt_bytes:,} bytes, {len(list(ckpt.glob('*.safetensors')))} shards)"),
            ("peak RSS (getrusage)", f"{peak_mb:,.0f} MB = {res['peak_rss_over_checkpoint']:.2f} x checkpoint"),
            ("peak RSS (--report)", "n/a" if rep.get("peak_rss_mb") is None else f"{rep['peak_rss_mb']:,.0f} MB"),
            ("wall time", f"{wall:.1f} s (CPU {res['cpu_seconds']:.0f} s)")]
    rows += [(f"  stage: {k}", f"{v:.1f} s") for k, v in res["stages"].items()]
    rows.append(("output", f"{out_bytes / 1e9:.3f} GB ({out_bytes:,} bytes){'' if args.keep else ', deleted'}"))
    rows.append(("forward FLOPs per block", f"{f_blk / 1e9:,.1f} GFLOP (2 x {p_blk / 1e6:.1f}M weights x "
                 f"{args.samples * args.seq_len} tokens + 4 x n x L^2 x d)"))
    blocks = [b for b in rep.get("blocks", []) if isinstance(b.get("seconds"), (int, float))]
    blocks.sort(key=lambda b: b.get("index", 0))
    if blocks:
        secs = [b["seconds"] for b in blocks]
        med = statistics.median(secs)
        res["block_seconds"] = {"first": secs[0], "median": med, "last": secs[-1], "max": max(secs),
                                "all": secs, "flat": flat_verdict(secs)}
        res["gflops_per_s"] = f_blk / med / 1e9
        rows += [("time per block", f"first {secs[0]:.2f} s, median {med:.2f} s, last {secs[-1]:.2f} s, "
                                    f"max {max(secs):.2f} s ({len(secs)} blocks)"),
                 ("  across depth", flat_verdict(secs)),
                 ("achieved (forward-equivalent)", f"{res['gflops_per_s']:.1f} GFLOP/s per block (median)")]
        for key in sorted({k for b in blocks for k, v in b.items() if isinstance(v, (int, float))} - {"index", "seconds"}):
            vals = [b[key] for b in blocks if isinstance(b.get(key), (int, float))]
            rows.append((f"  block {key}", f"first {vals[0]:.4g}, median {statistics.median(vals):.4g}, "
                                          f"last {vals[-1]:.4g}, max {max(vals):.4g}"))
    elif "calibrate" in res["stages"]:
        res["gflops_per_s"] = f_blk * cfg.num_hidden_layers / res["stages"]["calibrate"] / 1e9
        rows.append(("achieved (calibrate stage)", f"{res['gflops_per_s']:.1f} GFLOP/s"))
    else:
        rows.append(("time per block", "n/a (no per-block times in the report)"))

    if args.extrapolate and blocks:
        f_target, _ = block_flops(cfg, specs, 128, 512)
        scale = f_target / f_blk
        dev_s = res["block_seconds"]["median"] * scale * cfg.num_hidden_layers
        gpu_rate = args.gpu_tflops * args.gpu_util * 1e12
        gpu_fwd = f_target * cfg.num_hidden_layers / gpu_rate
        ext = {"device_seconds": dev_s, "flops_ratio": scale, "gpu_forward_seconds": gpu_fwd,
               "gpu_tflops": args.gpu_tflops, "gpu_util": args.gpu_util}
        rows += [("ESTIMATE, 128 x 512 tokens", f"forward FLOPs x {scale:.1f} per block"),
                 (f"  on this {device}", f"{dev_s:,.0f} s = median block time x {scale:.1f} x {cfg.num_hidden_layers} "
                                         "blocks (assumes all block work scales with forward FLOPs)"),
                 ("  H100-class GPU, forward only", f"{gpu_fwd:.3g} s (forward FLOPs at {args.gpu_tflops:.0f} TFLOP/s x "
                                                    f"{args.gpu_util:.0%} = {gpu_rate / 1e12:.0f} TFLOP/s sustained)")]
        if device == "cpu":
            mm = cpu_matmul_gflops(cfg.hidden_size) * 1e9
            ext.update(cpu_matmul_gflops=mm / 1e9, gpu_all_work_seconds=dev_s * mm / gpu_rate)
            rows.append(("  H100-class GPU, all work", f"{dev_s * mm / gpu_rate:.3g} s (the cpu estimate taken as "
                         f"matmul work at this CPU's best matmul rate, {mm / 1e9:,.0f} GFLOP/s, done at "
                         f"{gpu_rate / 1e12:.0f} TFLOP/s)"))
        res["extrapolate_128x512"] = ext
    elif args.extrapolate:
        rows.append(("ESTIMATE", "n/a: needs per-block times (--report with blocks)"))

    w = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in rows))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
