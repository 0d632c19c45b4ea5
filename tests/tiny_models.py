"""Tiny random-init causal LMs for 20 architectures, built from transformers configs (no hub).

Sizes are chosen so every structural feature is present (GQA with 2 query heads per kv head,
2 layers, MoE with 4 experts) while a forward pass takes milliseconds.
"""
from __future__ import annotations

import torch
import transformers as T
from safetensors.torch import load_file

VOCAB = 128
ARCHITECTURES = [
    "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt2",
    "falcon", "bloom", "mixtral", "qwen2_moe", "qwen3_moe",
]
# Also asserted exactly, on exported graphs only: the torch.compile backend finds no groups on
# olmo2 and starcoder2 yet.
EXTRA_ARCHITECTURES = ["granite", "cohere", "olmo2", "starcoder2"]


def config(name: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    special_tokens = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocab
    builders = {
        "llama": lambda: T.LlamaConfig(**common),
        "qwen2": lambda: T.Qwen2Config(**common),
        "qwen3": lambda: T.Qwen3Config(**common, head_dim=16),
        "mistral": lambda: T.MistralConfig(**common),
        "gemma": lambda: T.GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**common, head_dim=16, attn_implementation="eager"),
        "gemma3": lambda: T.Gemma3TextConfig(**common, head_dim=16),
        "phi3": lambda: T.Phi3Config(**common, pad_token_id=0),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                                   pad_token_id=0),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, attn_implementation="eager"),
        "mixtral": lambda: T.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=48),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              head_dim=16),
        "granite": lambda: T.GraniteConfig(**common, logits_scaling=4.0, embedding_multiplier=2.0,
                                           residual_multiplier=0.5, attention_multiplier=0.25),
        "cohere": lambda: T.CohereConfig(**common, logit_scale=0.25, **special_tokens),
        "olmo2": lambda: T.Olmo2Config(**common, **special_tokens),
        "starcoder2": lambda: T.Starcoder2Config(**common, **special_tokens),
        # not in the lists above: its experts' clamped GLU makes down_proj's group an activation group
        "gpt_oss": lambda: T.GptOssConfig(**common, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
    }
    cfg = builders[name]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A deterministic tiny model in eval mode. Norm weights are randomised too (they init to 1/0,
    which would hide a wrongly folded norm)."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config(name, **overrides)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if pname.endswith("bias") else 1.0))
    return model


def token_ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def calib_ids(n: int = 8, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Random calibration token ids ``[n, seq]`` for the tiny models."""
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def char_tokenizer():
    """A character-level fast tokenizer over ASCII (ids 0..127 = code points; others -> 0), built
    locally so CLI tests need no hub and no real model."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="\x00"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="\x00", eos_token="\x03", pad_token="\x00")


def save_model_dir(path, name: str = "llama", **overrides):
    """A Hugging Face model directory (config, weights, tokenizer) of a tiny model."""
    model = build(name, **overrides)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model


def saved_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files directly in ``path`` (one file or shards)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out
