"""Discovery on 19 architectures: exact groups, fold equivalence, negative controls, front-ends.

The expected groups below are the contract documented in docs/architectures.md. Notation:
``kind producer[channels] -> consumers``; ``xN`` = each producer channel feeds N consumer
columns (GQA / multi-query repeat); ``(noquant)`` = scaled with its group but not quantized
(MoE router, LM head).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from tiny_models import ARCHITECTURES, EXTRA_ARCHITECTURES, build, token_ids

import awqfx
from awqfx.graph import DATA_MOVEMENT, IDENTITY, linear_op, op_name, param_name, shape_of
from awqfx.groups import Consumer, Producer, ScaleGroup
from awqfx.passes.discover import DiscoveryError, discover
from awqfx.passes.fold import fold_scales
from awqfx.passes.region import extract_region


def summarize(group: ScaleGroup) -> str:
    j = group.to_json()
    chans = ",".join(f"{a}:{b}" for a, b in j["channels"])
    cons = []
    for c, m in zip(group.consumers, j["consumer_maps"]):
        cons.append(c.weight + ("" if c.quantize else "(noquant)") + (f"x{m['repeat']}" if m["repeat"] > 1 else ""))
    return f"{group.producer.kind} {group.producer.weight or group.producer.node}[{chans}] -> {' '.join(cons)}"


# llama, qwen2, qwen3 (q/k norms are blocked, not grouped) and mistral share one layout
LLAMA_LIKE = [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.q_proj.weight model.layers.0.self_attn.k_proj.weight model.layers.0.self_attn.v_proj.weight",
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "norm model.layers.0.post_attention_layernorm.weight[0:64] -> model.layers.0.mlp.gate_proj.weight model.layers.0.mlp.up_proj.weight",
        "linear model.layers.0.mlp.up_proj.weight[0:96] -> model.layers.0.mlp.down_proj.weight",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.q_proj.weight model.layers.1.self_attn.k_proj.weight model.layers.1.self_attn.v_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "norm model.layers.1.post_attention_layernorm.weight[0:64] -> model.layers.1.mlp.gate_proj.weight model.layers.1.mlp.up_proj.weight",
        "linear model.layers.1.mlp.up_proj.weight[0:96] -> model.layers.1.mlp.down_proj.weight",
        "norm model.norm.weight[0:64] -> lm_head.weight(noquant)",
]

EXPECTED = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gemma": [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.q_proj.weight model.layers.0.self_attn.k_proj.weight model.layers.0.self_attn.v_proj.weight",
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "norm model.layers.0.post_attention_layernorm.weight[0:64] -> model.layers.0.mlp.gate_proj.weight model.layers.0.mlp.up_proj.weight",
        "linear model.layers.0.mlp.up_proj.weight[0:96] -> model.layers.0.mlp.down_proj.weight",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.q_proj.weight model.layers.1.self_attn.k_proj.weight model.layers.1.self_attn.v_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "norm model.layers.1.post_attention_layernorm.weight[0:64] -> model.layers.1.mlp.gate_proj.weight model.layers.1.mlp.up_proj.weight",
        "linear model.layers.1.mlp.up_proj.weight[0:96] -> model.layers.1.mlp.down_proj.weight",
    ],
    "gemma2": [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.q_proj.weight model.layers.0.self_attn.k_proj.weight model.layers.0.self_attn.v_proj.weight",
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "norm model.layers.0.pre_feedforward_layernorm.weight[0:64] -> model.layers.0.mlp.gate_proj.weight model.layers.0.mlp.up_proj.weight",
        "linear model.layers.0.mlp.up_proj.weight[0:96] -> model.layers.0.mlp.down_proj.weight",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.q_proj.weight model.layers.1.self_attn.k_proj.weight model.layers.1.self_attn.v_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "norm model.layers.1.pre_feedforward_layernorm.weight[0:64] -> model.layers.1.mlp.gate_proj.weight model.layers.1.mlp.up_proj.weight",
        "linear model.layers.1.mlp.up_proj.weight[0:96] -> model.layers.1.mlp.down_proj.weight",
    ],
    "gemma3": None,  # same as gemma2, filled below
    "phi3": [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.qkv_proj.weight",
        "linear model.layers.0.self_attn.qkv_proj.weight[96:128] -> model.layers.0.self_attn.o_proj.weightx2",
        "norm model.layers.0.post_attention_layernorm.weight[0:64] -> model.layers.0.mlp.gate_up_proj.weight",
        "linear model.layers.0.mlp.gate_up_proj.weight[96:192] -> model.layers.0.mlp.down_proj.weight",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.qkv_proj.weight",
        "linear model.layers.1.self_attn.qkv_proj.weight[96:128] -> model.layers.1.self_attn.o_proj.weightx2",
        "norm model.layers.1.post_attention_layernorm.weight[0:64] -> model.layers.1.mlp.gate_up_proj.weight",
        "linear model.layers.1.mlp.gate_up_proj.weight[96:192] -> model.layers.1.mlp.down_proj.weight",
        "norm model.norm.weight[0:64] -> lm_head.weight(noquant)",
    ],
    "opt": [
        "norm model.decoder.layers.0.self_attn_layer_norm.weight[0:64] -> model.decoder.layers.0.self_attn.q_proj.weight model.decoder.layers.0.self_attn.k_proj.weight model.decoder.layers.0.self_attn.v_proj.weight",
        "linear model.decoder.layers.0.self_attn.v_proj.weight[0:64] -> model.decoder.layers.0.self_attn.out_proj.weight",
        "norm model.decoder.layers.0.final_layer_norm.weight[0:64] -> model.decoder.layers.0.fc1.weight",
        "linear model.decoder.layers.0.fc1.weight[0:96] -> model.decoder.layers.0.fc2.weight",
        "norm model.decoder.layers.1.self_attn_layer_norm.weight[0:64] -> model.decoder.layers.1.self_attn.q_proj.weight model.decoder.layers.1.self_attn.k_proj.weight model.decoder.layers.1.self_attn.v_proj.weight",
        "linear model.decoder.layers.1.self_attn.v_proj.weight[0:64] -> model.decoder.layers.1.self_attn.out_proj.weight",
        "norm model.decoder.layers.1.final_layer_norm.weight[0:64] -> model.decoder.layers.1.fc1.weight",
        "linear model.decoder.layers.1.fc1.weight[0:96] -> model.decoder.layers.1.fc2.weight",
    ],
    "gpt2": [
        "norm transformer.h.0.ln_1.weight[0:64] -> transformer.h.0.attn.c_attn.weight",
        "linear transformer.h.0.attn.c_attn.weight[128:192] -> transformer.h.0.attn.c_proj.weight",
        "norm transformer.h.0.ln_2.weight[0:64] -> transformer.h.0.mlp.c_fc.weight",
        "activation mul_11[0:256] -> transformer.h.0.mlp.c_proj.weight",
        "norm transformer.h.1.ln_1.weight[0:64] -> transformer.h.1.attn.c_attn.weight",
        "linear transformer.h.1.attn.c_attn.weight[128:192] -> transformer.h.1.attn.c_proj.weight",
        "norm transformer.h.1.ln_2.weight[0:64] -> transformer.h.1.mlp.c_fc.weight",
        "activation mul_15[0:256] -> transformer.h.1.mlp.c_proj.weight",
    ],
    "falcon": [
        "norm transformer.h.0.input_layernorm.weight[0:64] -> transformer.h.0.self_attention.query_key_value.weight transformer.h.0.mlp.dense_h_to_4h.weight",
        "linear transformer.h.0.self_attention.query_key_value.weight[80:96] -> transformer.h.0.self_attention.dense.weightx4",
        "activation gelu[0:256] -> transformer.h.0.mlp.dense_4h_to_h.weight",
        "norm transformer.h.1.input_layernorm.weight[0:64] -> transformer.h.1.self_attention.query_key_value.weight transformer.h.1.mlp.dense_h_to_4h.weight",
        "linear transformer.h.1.self_attention.query_key_value.weight[80:96] -> transformer.h.1.self_attention.dense.weightx4",
        "activation gelu_1[0:256] -> transformer.h.1.mlp.dense_4h_to_h.weight",
    ],
    "bloom": [
        "norm transformer.h.0.input_layernorm.weight[0:64] -> transformer.h.0.self_attention.query_key_value.weight",
        "linear transformer.h.0.self_attention.query_key_value.weight[32:48,80:96,128:144,176:192] -> transformer.h.0.self_attention.dense.weight",
        "norm transformer.h.0.post_attention_layernorm.weight[0:64] -> transformer.h.0.mlp.dense_h_to_4h.weight",
        "activation mul_10[0:256] -> transformer.h.0.mlp.dense_4h_to_h.weight",
        "norm transformer.h.1.input_layernorm.weight[0:64] -> transformer.h.1.self_attention.query_key_value.weight",
        "linear transformer.h.1.self_attention.query_key_value.weight[32:48,80:96,128:144,176:192] -> transformer.h.1.self_attention.dense.weight",
        "norm transformer.h.1.post_attention_layernorm.weight[0:64] -> transformer.h.1.mlp.dense_h_to_4h.weight",
        "activation mul_20[0:256] -> transformer.h.1.mlp.dense_4h_to_h.weight",
    ],
    "mixtral": [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.q_proj.weight model.layers.0.self_attn.k_proj.weight model.layers.0.self_attn.v_proj.weight",
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "norm model.layers.0.post_attention_layernorm.weight[0:64] -> model.layers.0.mlp.gate.weight(noquant) model.layers.0.mlp.experts.gate_up_proj",
        "linear model.layers.0.mlp.experts.gate_up_proj[96:192] -> model.layers.0.mlp.experts.down_proj",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.q_proj.weight model.layers.1.self_attn.k_proj.weight model.layers.1.self_attn.v_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "norm model.layers.1.post_attention_layernorm.weight[0:64] -> model.layers.1.mlp.gate.weight(noquant) model.layers.1.mlp.experts.gate_up_proj",
        "linear model.layers.1.mlp.experts.gate_up_proj[96:192] -> model.layers.1.mlp.experts.down_proj",
        "norm model.norm.weight[0:64] -> lm_head.weight(noquant)",
    ],
    "qwen2_moe": [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.q_proj.weight model.layers.0.self_attn.k_proj.weight model.layers.0.self_attn.v_proj.weight",
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "norm model.layers.0.post_attention_layernorm.weight[0:64] -> model.layers.0.mlp.shared_expert.gate_proj.weight model.layers.0.mlp.shared_expert.up_proj.weight model.layers.0.mlp.gate.weight(noquant) model.layers.0.mlp.experts.gate_up_proj model.layers.0.mlp.shared_expert_gate.weight",
        "linear model.layers.0.mlp.shared_expert.up_proj.weight[0:48] -> model.layers.0.mlp.shared_expert.down_proj.weight",
        "linear model.layers.0.mlp.experts.gate_up_proj[32:64] -> model.layers.0.mlp.experts.down_proj",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.q_proj.weight model.layers.1.self_attn.k_proj.weight model.layers.1.self_attn.v_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "norm model.layers.1.post_attention_layernorm.weight[0:64] -> model.layers.1.mlp.shared_expert.gate_proj.weight model.layers.1.mlp.shared_expert.up_proj.weight model.layers.1.mlp.gate.weight(noquant) model.layers.1.mlp.experts.gate_up_proj model.layers.1.mlp.shared_expert_gate.weight",
        "linear model.layers.1.mlp.shared_expert.up_proj.weight[0:48] -> model.layers.1.mlp.shared_expert.down_proj.weight",
        "linear model.layers.1.mlp.experts.gate_up_proj[32:64] -> model.layers.1.mlp.experts.down_proj",
        "norm model.norm.weight[0:64] -> lm_head.weight(noquant)",
    ],
    "qwen3_moe": [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.q_proj.weight model.layers.0.self_attn.k_proj.weight model.layers.0.self_attn.v_proj.weight",
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "norm model.layers.0.post_attention_layernorm.weight[0:64] -> model.layers.0.mlp.gate.weight(noquant) model.layers.0.mlp.experts.gate_up_proj",
        "linear model.layers.0.mlp.experts.gate_up_proj[32:64] -> model.layers.0.mlp.experts.down_proj",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.q_proj.weight model.layers.1.self_attn.k_proj.weight model.layers.1.self_attn.v_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "norm model.layers.1.post_attention_layernorm.weight[0:64] -> model.layers.1.mlp.gate.weight(noquant) model.layers.1.mlp.experts.gate_up_proj",
        "linear model.layers.1.mlp.experts.gate_up_proj[32:64] -> model.layers.1.mlp.experts.down_proj",
        "norm model.norm.weight[0:64] -> lm_head.weight(noquant)",
    ],
    "granite": LLAMA_LIKE,  # logits_scaling: lm_head is still the head
    "cohere": [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.q_proj.weight model.layers.0.self_attn.k_proj.weight model.layers.0.self_attn.v_proj.weight model.layers.0.mlp.gate_proj.weight model.layers.0.mlp.up_proj.weight",
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "linear model.layers.0.mlp.up_proj.weight[0:96] -> model.layers.0.mlp.down_proj.weight",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.q_proj.weight model.layers.1.self_attn.k_proj.weight model.layers.1.self_attn.v_proj.weight model.layers.1.mlp.gate_proj.weight model.layers.1.mlp.up_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "linear model.layers.1.mlp.up_proj.weight[0:96] -> model.layers.1.mlp.down_proj.weight",
    ],  # parallel attention + MLP on one norm; tied head
    "olmo2": [
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "linear model.layers.0.mlp.up_proj.weight[0:96] -> model.layers.0.mlp.down_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "linear model.layers.1.mlp.up_proj.weight[0:96] -> model.layers.1.mlp.down_proj.weight",
        "norm model.norm.weight[0:64] -> lm_head.weight(noquant)",
    ],  # post-norms (blocked by the residual), q/k norms over all heads
    "starcoder2": [
        "norm model.layers.0.input_layernorm.weight[0:64] -> model.layers.0.self_attn.q_proj.weight model.layers.0.self_attn.k_proj.weight model.layers.0.self_attn.v_proj.weight",
        "linear model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weightx2",
        "norm model.layers.0.post_attention_layernorm.weight[0:64] -> model.layers.0.mlp.c_fc.weight",
        "activation gelu[0:96] -> model.layers.0.mlp.c_proj.weight",
        "norm model.layers.1.input_layernorm.weight[0:64] -> model.layers.1.self_attn.q_proj.weight model.layers.1.self_attn.k_proj.weight model.layers.1.self_attn.v_proj.weight",
        "linear model.layers.1.self_attn.v_proj.weight[0:32] -> model.layers.1.self_attn.o_proj.weightx2",
        "norm model.layers.1.post_attention_layernorm.weight[0:64] -> model.layers.1.mlp.c_fc.weight",
        "activation gelu_1[0:96] -> model.layers.1.mlp.c_proj.weight",
    ],
}
EXPECTED["gemma3"] = EXPECTED["gemma2"]  # sandwich norms; its q/k norms are blocked


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name):
        if name not in cache:
            model = build(name)
            cache[name] = (model, awqfx.capture(model))
        return cache[name]

    return get


def logits(fn, ids):
    with torch.no_grad():
        out = fn(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("arch", ARCHITECTURES + EXTRA_ARCHITECTURES)
def test_groups_exact(arch, captured):
    _, gm = captured(arch)
    found = [summarize(g) for g in discover(gm).groups]
    assert found == EXPECTED[arch]


@pytest.mark.parametrize("arch", ARCHITECTURES + EXTRA_ARCHITECTURES)
def test_fold_random_scales_keeps_logits(arch, captured):
    model, gm = captured(arch)
    ids = token_ids(batch=2, seq=12)
    ref = logits(lambda x: model(x, use_cache=False), ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = discover(gm)
    g2 = copy.deepcopy(gm)
    gen = torch.Generator().manual_seed(7)
    fold_scales(g2, d.groups, [torch.rand(g.channels.numel(), generator=gen) * 1.5 + 0.5 for g in d.groups])
    out = logits(g2, ids)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, f"{arch}: folding changed logits by {rel:.2e}"
    # the weights really changed (the check is not vacuous) and the caller's model did not
    changed = sum(not torch.equal(p, gm.get_parameter(n)) for n, p in g2.named_parameters() if n in dict(gm.named_parameters()))
    assert changed > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def region_ops(gm, group: ScaleGroup) -> list[fx.Node]:
    """The compute nodes of ``group``'s loss region, cut as the search cuts it."""
    reg = extract_region(gm, group)
    return [n for n in reg.gm.graph.nodes if n.op in ("call_function", "call_method")]


def output_projection(gm, group: ScaleGroup) -> str | None:
    """The weight of the linear whose result the region outputs (through casts, dropout, views)."""
    node = next(n for n in gm.graph.nodes if n.name == group.region_output)
    while linear_op(gm, node) is None and op_name(gm, node) in DATA_MOVEMENT | IDENTITY:
        node = node.args[0]
    lin = linear_op(gm, node)
    return lin.weight.name if lin else None


def next_group(groups: list[ScaleGroup], group: ScaleGroup) -> ScaleGroup:
    """The linear group produced by one of ``group``'s consumers (v->o after qkv, up->down after gate/up)."""
    weights = {c.weight for c in group.consumers}
    return next(g for g in groups if g.producer.kind == "linear" and g.producer.weight in weights)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "bloom"])
def test_norm_to_qkv_region_is_the_attention_block(arch, captured):
    """Fused q/k/v (phi3 qkv_proj, gpt2 c_attn, bloom query_key_value) gets llama's region: the
    attention up to the output projection's result, not the fused linear alone."""
    _, gm = captured(arch)
    groups = discover(gm).groups
    qkv = groups[0]
    assert qkv.producer.kind == "norm"
    ops = {op_name(gm, n) for n in region_ops(gm, qkv)}
    assert ops & {"scaled_dot_product_attention", "softmax"}, sorted(ops)
    assert output_projection(gm, qkv) == next_group(groups, qkv).consumers[0].weight


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_norm_to_gate_up_region_is_the_mlp(arch, captured):
    """Fused gate/up (phi3 gate_up_proj) gets llama's region: the gated MLP up to down_proj's result."""
    _, gm = captured(arch)
    groups = discover(gm).groups
    mlp = next(g for g in groups if g.producer.kind == "norm" and g is not groups[0])
    nodes = region_ops(gm, mlp)
    computed = set(nodes)
    gating = [n for n in nodes if op_name(gm, n) == "mul" and all(a in computed for a in n.args)]
    assert gating, [op_name(gm, n) for n in nodes]
    assert output_projection(gm, mlp) == next_group(groups, mlp).consumers[0].weight


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_projection_region_reaches_the_next_projection(arch, captured):
    """A norm group's consumer whose output rows only partly feed the next group (a fused qkv or
    gate/up projection) must not end the loss region: the next group's consumer is inside it."""
    _, gm = captured(arch)
    groups = discover(gm).groups
    checked = 0
    for g in groups:
        if g.producer.kind != "norm":
            continue
        inside = {n.name for n in region_ops(gm, g)}
        for c in g.consumers:
            fused = [h for h in groups if h.producer.kind == "linear" and h.producer.weight == c.weight
                     and h.channels.numel() < h.producer.num_channels]
            for h in fused:
                assert {k.node for k in h.consumers} <= inside, f"{g.name}: region ends at {g.region_output}"
                checked += 1
    fused_archs = {"phi3", "gpt2", "falcon", "bloom", "mixtral", "qwen2_moe", "qwen3_moe"}
    assert (checked > 0) == (arch in fused_archs)


def test_negative_control_wrong_edges_change_logits(captured):
    """Scaling through a residual add, or with a wrong channel map, must break equivalence."""
    model, gm = captured("llama")
    ids = token_ids()
    ref = logits(gm, ids)
    d = discover(gm)
    # 1) a blocked candidate: o_proj rows feed the residual stream; pretend they feed layer 1's q/k/v
    o = "model.layers.0.self_attn.o_proj.weight"
    bad = ScaleGroup(
        Producer("linear", "linear_3", 64, weight=o, out_dim=0),
        [Consumer("x", f"model.layers.1.self_attn.{p}_proj.weight", 1, torch.arange(64)) for p in "qkv"],
        torch.arange(64),
    )
    g2 = copy.deepcopy(gm)
    fold_scales(g2, [bad], [torch.linspace(0.5, 2.0, 64)])
    assert ((logits(g2, ids) - ref).abs().max() / ref.abs().max()) > 1e-3
    # 2) the real v->o group, with the GQA channel map shifted by one column
    vo = next(g for g in d.groups if g.producer.weight == "model.layers.0.self_attn.v_proj.weight")
    wrong = copy.deepcopy(vo)
    wrong.consumers[0].columns = torch.roll(wrong.consumers[0].columns, 1)
    g3 = copy.deepcopy(gm)
    fold_scales(g3, [wrong], [torch.linspace(0.5, 2.0, vo.channels.numel())])
    assert ((logits(g3, ids) - ref).abs().max() / ref.abs().max()) > 1e-3


def test_gqa_channel_map_is_exact(captured):
    _, gm = captured("llama")
    vo = next(g for g in discover(gm).groups if g.producer.weight == "model.layers.0.self_attn.v_proj.weight")
    heads, kv, hd = 4, 2, 16
    expected = torch.tensor([(h // (heads // kv)) * hd + d for h in range(heads) for d in range(hd)])
    assert torch.equal(vo.consumers[0].columns, expected)


def test_gemma_norm_offset_and_qk_norm(captured):
    _, gm = captured("gemma")
    d = discover(gm)
    assert {g.producer.offset for g in d.groups if g.producer.kind == "norm"} == {1.0}
    _, gm3 = captured("qwen3")
    d3 = discover(gm3)
    blocked = {r.producer for r in d3.rejected}
    assert "model.layers.0.self_attn.q_norm.weight" in blocked
    assert all("q_norm" not in (g.producer.weight or "") for g in d3.groups)


def test_post_layernorm_is_blocked_by_residual():
    model = build("opt", do_layer_norm_before=False)
    d = discover(awqfx.capture(model))
    assert [g.producer.kind for g in d.groups].count("norm") == 0
    rej = {r.producer: r for r in d.rejected}
    r = rej["model.decoder.layers.0.self_attn_layer_norm.weight"]
    assert "add" in r.reason and r.channels.numel() == 64


def test_tied_lm_head_blocks_final_norm():
    model = build("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    d = discover(awqfx.capture(model))
    assert all(g.producer.weight != "model.norm.weight" for g in d.groups)
    r = next(r for r in d.rejected if r.producer == "model.norm.weight")
    assert "shared (tied) weight" in r.reason


def test_attention_qk_and_quantizable(captured):
    _, gm = captured("llama")
    d = discover(gm)
    assert d.attention_qk == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "kq"]
    assert "lm_head.weight" not in d.quantizable and len(d.quantizable) == 14
    _, moe = captured("mixtral")
    assert "model.layers.0.mlp.gate.weight" not in discover(moe).quantizable  # router: scaled, not quantized


def expected_quantizable(model: nn.Module) -> list[str]:
    """Every matmul weight (2-D linear weights, 3-D expert weights) except the input and output
    embeddings and the MoE routers (modules that pick ``top_k`` experts), read from the modules."""
    skip = {id(model.get_output_embeddings().weight)}
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) or hasattr(mod, "top_k"):
            skip |= {id(p) for p in mod.parameters(recurse=False)}
    return sorted(n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in skip)


@pytest.mark.parametrize("arch", ARCHITECTURES + EXTRA_ARCHITECTURES)
def test_quantizable_is_every_linear_but_head_and_routers(arch, captured):
    model, gm = captured(arch)
    assert discover(gm).quantizable == expected_quantizable(model)


@pytest.mark.parametrize("arch, post", [("gemma2", ["div", "tanh", "mul"]), ("granite", ["div"]), ("cohere", ["mul"])])
def test_logits_are_post_processed(arch, post, captured):
    """These models really post-process their logits after the head (the test above is not vacuous)."""
    _, gm = captured(arch)
    node, ops = next(n for n in gm.graph.nodes if n.op == "output").args[0][0], []
    while linear_op(gm, node) is None:
        ops.insert(0, op_name(gm, node))
        node = node.args[0]
    assert ops == post


class _PostProcessedHead(nn.Module):
    def __init__(self, post):
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.post = post

    def forward(self, x):
        h = self.body(x)
        return self.post(self, self.head(h), h)


@pytest.mark.parametrize("post, is_head", [
    (lambda m, y, h: torch.tanh(y / 30.0) * 30.0, True),  # final-logit softcapping
    (lambda m, y, h: (y * m.scale).float().view(-1, 2, 4), True),  # learnt scalar, cast, view
    (lambda m, y, h: torch.clamp(y + 1.0, -5.0, 5.0), True),
    (lambda m, y, h: y * h[..., :8], False),  # gated by activations: not logit post-processing
    (lambda m, y, h: torch.softmax(y, -1) + y, False),  # two users
], ids=["softcap", "scale-cast-view", "clamp", "gated", "two-users"])
def test_head_detection_follows_elementwise_post_processing(post, is_head):
    gm = awqfx.capture(_PostProcessedHead(post).eval(), example_inputs=(torch.randn(3, 16),))
    assert ("head.weight" not in discover(gm).quantizable) == is_head
    assert "head.weight" in discover(gm, quantize_head=True).quantizable


def group_identity(group: ScaleGroup) -> tuple:
    """Everything that defines a group except node names (they differ between export and dynamo):
    the producer (kind, weight, bias, offset, out dim; the owning module of an inserted scale), the
    scaled channels, and each consumer's weight, contraction dim, quantize flag and column map."""
    p = group.producer
    producer = (p.kind, p.weight or p.path, p.bias, p.offset, p.out_dim, p.num_channels)
    consumers = tuple((c.weight, c.in_dim, c.quantize, tuple(c.columns.tolist())) for c in group.consumers)
    return producer, tuple(group.channels.tolist()), consumers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_torch_compile_backend_finds_the_same_groups(arch, captured):
    model, gm = captured(arch)
    torch._dynamo.reset()
    be = awqfx.AWQBackend()
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        compiled(token_ids(), use_cache=False)
    dyn = [group_identity(g) for d in be.discoveries for g in d.groups]
    exported = [group_identity(g) for g in discover(gm).groups]
    assert len(exported) == len(EXPECTED[arch])
    assert dyn == exported


class _SeparatorNames(nn.Module):
    """Attribute names containing dynamo's own name separators (``_modules_``, ``_parameters_``)."""

    def __init__(self):
        super().__init__()
        self.my_modules_list = nn.ModuleList([nn.Linear(8, 8)])
        self.w_parameters_x = nn.Parameter(torch.ones(8))
        self.register_buffer("scale_parameters_buf", torch.ones(8))

    def forward(self, x):
        return self.my_modules_list[0](x * self.w_parameters_x) * self.scale_parameters_buf


def test_dynamo_parameters_are_named_from_graph_metadata():
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_SeparatorNames().eval(), backend=keep)(torch.randn(2, 8))
    (gm,) = graphs
    names = {param_name(gm, n) for n in gm.graph.nodes if n.op == "placeholder"}
    assert names - {None} == {"my_modules_list.0.weight", "my_modules_list.0.bias", "w_parameters_x"}


class _UserMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        h = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(h)


def test_call_module_graph_from_symbolic_trace():
    torch.manual_seed(0)
    m = _UserMLP().eval()
    with torch.no_grad():
        m.norm.weight.normal_(1, 0.1)
        m.norm.bias.normal_(0, 0.1)
    gm = awqfx.capture(torch.fx.symbolic_trace(m), example_inputs=(torch.randn(3, 16),))
    d = discover(gm)
    assert [summarize(g) for g in d.groups] == [
        "norm norm.weight[0:16] -> fc1.weight",
        "linear fc1.weight[0:32] -> fc2.weight",
    ]
    x = torch.randn(5, 16)
    ref = m(x)
    fold_scales(gm, d.groups, [torch.rand(g.channels.numel()) + 0.5 for g in d.groups])
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: not exportable
            return self.fc(x)
        return x


def test_captured_graph_reports_inference_mode(captured):
    model, gm = captured("llama")
    model.train()
    gm2 = awqfx.capture(model)
    assert model.training  # the caller's mode is restored
    assert not gm.training and not any(m.training for m in gm2.modules())  # traced in eval mode, says so
    model.eval()


def test_unexportable_model_gets_a_clear_error():
    with pytest.raises(awqfx.CaptureError) as e:
        awqfx.capture(_DataDependent(), example_inputs=(torch.randn(2, 4),))
    msg = str(e.value)
    assert "_DataDependent" in msg and "Try:" in msg and "\n" not in msg


def test_graph_without_linear_layers():
    class NoLinear(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    gm = awqfx.capture(NoLinear(), example_inputs=(torch.randn(2, 4),))
    with pytest.raises(DiscoveryError, match="no linear layers"):
        discover(gm)


def test_graph_without_shapes():
    gm = torch.fx.symbolic_trace(_UserMLP())
    with pytest.raises(DiscoveryError, match="no shape information"):
        discover(gm)


def test_a_data_dependent_size_does_not_stop_discovery():
    """MoE layers that route with ``nonzero`` (JetMoE's experts) give nodes a size with no example
    value; reading shapes must not fail on it, and the groups around it are still found."""

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8)

        def forward(self, x):
            h = self.norm(x)
            rows = (h[:, 0] > 0).nonzero()[:, 0]  # a data-dependent number of rows
            return x.index_add(0, rows, self.down(torch.relu(self.up(h[rows]))))

    gm = torch.export.export(Routed().eval(), (torch.randn(6, 8),)).module()
    routed = next(n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    n_rows, width = shape_of(routed)
    assert width == 16 and n_rows >= 1
    groups = discover(gm).groups
    assert [(g.producer.weight, [c.weight for c in g.consumers]) for g in groups] == [
        ("norm.weight", ["up.weight"]), ("up.weight", ["down.weight"])]
