"""``awqfx inspect --mappings llm-compressor``: groups as llm-compressor AWQMapping entries.

Every emitted mapping is resolved with compressed-tensors' ``match_modules_set`` (what
llm-compressor's AWQ modifier resolves mappings with) and must give back exactly the
discovered groups, layer by layer; groups it cannot express must be listed with the reason.
"""
from __future__ import annotations

import ast
import json
import re

import pytest
from compressed_tensors.utils.match import match_modules_set
from tiny_models import build, save_model_dir

import awqfx
from awqfx.app.cli import main
from awqfx.app.mappings import llm_compressor_mappings, module_pattern
from awqfx.passes.discover import discover

# llm-compressor's registry entries for Llama (default_mappings) and Phi-3 (_phi_mappings)
LLAMA = [
    {"smooth_layer": "re:.*input_layernorm$", "balance_layers": ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]},
    {"smooth_layer": "re:.*v_proj$", "balance_layers": ["re:.*o_proj$"]},
    {"smooth_layer": "re:.*post_attention_layernorm$", "balance_layers": ["re:.*gate_proj$", "re:.*up_proj$"]},
    {"smooth_layer": "re:.*up_proj$", "balance_layers": ["re:.*down_proj$"]},
]
PHI3 = [
    {"smooth_layer": "re:.*input_layernorm$", "balance_layers": ["re:.*qkv_proj$"]},
    {"smooth_layer": "re:.*qkv_proj$", "balance_layers": ["re:.*o_proj$"]},
    {"smooth_layer": "re:.*post_attention_layernorm$", "balance_layers": ["re:.*gate_up_proj$"]},
    {"smooth_layer": "re:.*gate_up_proj$", "balance_layers": ["re:.*down_proj$"]},
]
MHA = {"num_key_value_heads": 4}  # as many kv heads as query heads: v -> o needs no repeat

_CACHE: dict = {}


def discovered(arch: str, **overrides):
    """``(model, discovery, report)`` of a tiny model, captured once per test session."""
    key = (arch, tuple(sorted(overrides.items())))
    if key not in _CACHE:
        model = build(arch, **overrides)
        d = discover(awqfx.capture(model))
        _CACHE[key] = model, d, llm_compressor_mappings(d, model)
    return _CACHE[key]


def test_llama_gives_llm_compressors_four_mappings():
    _, _, report = discovered("llama", **MHA)
    assert report.to_json()["mappings"] == LLAMA
    [head] = report.not_expressible  # the final norm feeds only the unquantized LM head
    assert head.group == "model.norm.weight" and "lm_head.weight" in head.reason and "quantized" in head.reason


def test_gqa_v_to_o_is_listed_as_not_expressible():
    _, _, report = discovered("llama")  # 2 query heads per kv head
    assert report.to_json()["mappings"] == [LLAMA[0], LLAMA[2], LLAMA[3]]
    rest = {n.group: n.reason for n in report.not_expressible}
    assert set(rest) == {"model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                         "model.norm.weight"}
    assert "each of the 32 scaled channels 2 times" in rest["model.layers.0.self_attn.v_proj.weight"]


def test_fused_phi3_matches_llm_compressors_phi_mappings():
    """qkv_proj -> o_proj scales only the v rows, the last of the fused weight: llm-compressor's rule."""
    _, _, report = discovered("phi3", **MHA)
    assert report.to_json()["mappings"] == PHI3
    _, _, gqa = discovered("phi3")
    assert [m["smooth_layer"] for m in gqa.to_json()["mappings"]] == [
        "re:.*input_layernorm$", "re:.*post_attention_layernorm$", "re:.*gate_up_proj$"]
    assert any("qkv_proj" in n.group and "2 times" in n.reason for n in gqa.not_expressible)


@pytest.mark.parametrize("arch,overrides", [("llama", MHA), ("llama", {}), ("phi3", MHA), ("opt", {}),
                                            ("bloom", {}), ("gpt2", {}), ("qwen3_moe", {})])
def test_llm_compressor_resolves_each_mapping_to_exactly_its_groups(arch, overrides):
    model, d, report = discovered(arch, **overrides)
    by_name = {g.name: g for g in d.groups}
    listed = [g for m in report.mappings for g in m.groups] + [n.group for n in report.not_expressible]
    assert sorted(listed) == sorted(by_name)  # every group once: mapped or listed with its reason
    names = [n for n, _ in model.named_modules()]
    module_name = {id(m): n for n, m in model.named_modules()}
    for m in report.mappings:
        groups = [by_name[n] for n in m.groups]
        assert {n for n in names if re.match(m.smooth_layer[3:], n)} == {g.producer.path for g in groups}
        hits = [{n for n in names if re.match(p[3:], n)} for p in m.balance_layers]
        assert all(hits) and sum(map(len, hits)) == len(set().union(*hits))  # disjoint, none empty
        assert set().union(*hits) == {c.path for g in groups for c in g.consumers}
        resolved = {(module_name[id(s)], frozenset(module_name[id(b)] for bl in balance for b in bl))
                    for [s], *balance in match_modules_set(model, (m.smooth_layer, *m.balance_layers))}
        assert resolved == {(g.producer.path, frozenset(c.path for c in g.consumers)) for g in groups}


def test_pattern_grows_until_it_matches_only_its_modules():
    """OPT has a final_layer_norm outside the layers: ``.*final_layer_norm$`` would catch it too."""
    model, _, report = discovered("opt")
    [m] = [m for m in report.mappings if "final_layer_norm" in m.smooth_layer]
    assert m.smooth_layer == "re:.*layers.[0-9]+.final_layer_norm$"
    assert "model.decoder.final_layer_norm" in dict(model.named_modules())


def test_module_pattern_takes_the_shortest_exact_suffix():
    mods = ["", "m", "m.layers"] + [f"m.layers.{i}.{x}" for i in range(3) for x in ("up_proj", "gate_up_proj", "norm")]
    mods.append("m.norm")
    all_up = [f"m.layers.{i}.up_proj" for i in range(3)]
    assert module_pattern([f"m.layers.{i}.gate_up_proj" for i in range(3)], mods) == "re:.*gate_up_proj$"
    assert module_pattern(all_up, mods) == "re:.*layers.[0-9]+.up_proj$"  # .*up_proj$ also hits gate_up_proj
    assert module_pattern(all_up[::2], mods) == "re:.*layers.(0|2).up_proj$"  # some layers only
    assert module_pattern(["m.layers.1.up_proj"], mods) == "re:.*layers.1.up_proj$"
    assert module_pattern(["m.norm"], mods) == "re:.*m.norm$"
    with pytest.raises(ValueError, match="not all among the model's modules"):
        module_pattern(["m.layers.7.up_proj"], mods)


def test_reasons_come_from_the_groups_data():
    def reasons(arch):
        return {n.group: n.reason for n in discovered(arch)[2].not_expressible}

    gpt2 = reasons("gpt2")
    assert "along dim 0 (an [in, out] weight)" in gpt2["transformer.h.0.ln_1.weight"]  # Conv1D c_attn reads dim 0
    assert "along dim 1 (an [in, out] weight)" in gpt2["transformer.h.0.attn.c_attn.weight"]
    assert sum("follows an activation (transformer.h.0.mlp.act)" in r for r in gpt2.values()) == 1
    bloom = reasons("bloom")  # per-head interleaved q,k,v: the v rows are not the last rows
    assert "are 32:48,80:96,128:144,176:192 of 192, not its last 64" in bloom[
        "transformer.h.0.self_attention.query_key_value.weight"]
    moe = reasons("qwen3_moe")
    assert "model.layers.0.mlp.experts.gate_up_proj (3-D)" in moe["model.layers.0.post_attention_layernorm.weight"]
    assert "(3-D)" in moe["model.layers.0.mlp.experts.gate_up_proj"]


def test_cli_prints_mappings_as_json_and_as_python(tmp_path, capsys):
    save_model_dir(tmp_path, "llama", **MHA)
    assert main(["inspect", str(tmp_path), "--mappings", "llm-compressor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == discovered("llama", **MHA)[2].to_json()
    assert data["mappings"] == LLAMA
    assert [n["group"] for n in data["not_expressible"]] == ["model.norm.weight"]

    assert main(["inspect", str(tmp_path), "--mappings", "llm-compressor"]) == 0
    text = capsys.readouterr().out
    tree = ast.parse(text)  # pasteable Python
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "AWQMapping"]
    assert [{"smooth_layer": ast.literal_eval(c.args[0]), "balance_layers": ast.literal_eval(c.args[1])}
            for c in calls] == LLAMA
    assert "#   model.norm.weight: none of its consumers (lm_head.weight) is quantized" in text


def test_cli_refuses_an_unknown_mapping_format(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--mappings", "autoawq"])
    assert e.value.code == 2 and "invalid choice: 'autoawq'" in capsys.readouterr().err
