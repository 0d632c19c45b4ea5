"""User targets (awqfx.targets): --ignore / --only leave linears out of the plan and float on disk,
--exclude-group / --group drop and declare scale groups, declared groups are checked numerically,
every refusal comes before calibration with real names, and block-by-block mode follows them."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
from tiny_models import build, calib_ids, save_model_dir, saved_tensors, token_ids

import awqfx
from awqfx.api import calibrate, prepare, search
from awqfx.app.cli import _config_from_args, build_parser, main
from awqfx.apply import apply_plan
from awqfx.config import AWQConfig, GroupSpec
from awqfx.formats import load_quantized, save_quantized
from awqfx.params import get_param
from awqfx.plan import AWQPlan
from awqfx.sequential import open_sequential, quantize_sequential
from awqfx.targets import GroupCheckError, TargetError

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = AWQConfig.of(bits=4, group_size=32, loss_samples=4, batch_size=4, n_grid=5, clip_grid=5, clip_rounds=1)
QUICK = ["--samples", "4", "--seq-len", "16", "--quiet", "--n-grid", "4", "--group-size", "32"]
POST1 = "model.layers.1.post_attention_layernorm"
MLP1 = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


@pytest.fixture(scope="module")
def llama():
    model = build("llama")
    return model, awqfx.capture(model)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("targets_llama")
    save_model_dir(path, "llama")
    return path


def _plan(gm, cfg, calib=None):
    observed = prepare(gm, cfg)
    if cfg.needs_calibration:
        calibrate(observed, calib_ids(8, 16) if calib is None else calib, progress=False)
    return search(observed, cfg, progress=False)


def _quantizable(gm):
    return set(prepare(gm, CFG.with_(method="rtn")).discovery.quantizable)


# ------------------------------------------------------------------------------- ignore / only

def test_ignored_linears_are_not_in_the_plan_and_stay_float_in_every_format(llama, tmp_path):
    model, gm = llama
    plan = _plan(gm, CFG.with_(ignore=["down_proj"]))
    down = {w for w in _quantizable(gm) if w.endswith(".mlp.down_proj.weight")}
    down_modules = {w.removesuffix(".weight") for w in down}
    assert len(down) == 2 and set(plan.weights) == _quantizable(gm) - down
    # up_proj -> down_proj has no quantized consumer left: that group keeps s = 1, down_proj is untouched
    assert not [g.name for g in plan.groups if any(c.weight in down for c in g.group.consumers)]
    assert AWQConfig.from_dict(AWQPlan.load(plan.save(tmp_path / "plan")).config).ignore == ("down_proj",)

    packed = apply_plan(model, plan, weights="packed")
    for fmt, listed in (("awqfx", None), ("autoawq", "modules_to_not_convert"), ("compressed-tensors", "ignore")):
        out = save_quantized(packed, tmp_path / fmt, fmt=fmt)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        tensors = saved_tensors(out)
        for w in down:
            assert torch.equal(tensors[w], get_param(model, w)), (fmt, w)  # the float weight, as it was
            assert [k for k in tensors if k.startswith(w.removesuffix("weight"))] == [w]  # no qweight / scales
        if listed is None:
            assert set(qc["modules"]) == {w.removesuffix(".weight") for w in plan.weights}
        else:
            assert set(qc[listed]) == down_modules | {"lm_head"}
    back = load_quantized(tmp_path / "awqfx")
    assert all(type(back.get_submodule(m)) is nn.Linear for m in down_modules)
    with torch.no_grad():
        torch.testing.assert_close(back(token_ids()).logits, packed(token_ids()).logits)


def test_an_ignored_consumer_still_takes_its_groups_scale_exactly(llama):
    """Ignoring q_proj keeps input_layernorm -> q,k,v scaled: q_proj's columns absorb s (exact) and it stays float."""
    model, gm = llama
    q = "model.layers.0.self_attn.q_proj.weight"
    plan = _plan(gm, CFG.with_(ignore=[r"layers\.0\.self_attn\.q_proj$"]))
    assert q not in plan.weights and "model.layers.1.self_attn.q_proj.weight" in plan.weights
    gp = next(g for g in plan.groups if g.name == "model.layers.0.input_layernorm.weight")
    assert [(c.weight.split(".")[-2], c.quantize) for c in gp.group.consumers] == \
        [("q_proj", False), ("k_proj", True), ("v_proj", True)]
    folded = apply_plan(model, plan, weights="float")
    packed = apply_plan(model, plan, weights="packed")
    with torch.no_grad():
        torch.testing.assert_close(folded(token_ids()).logits, model(token_ids()).logits, rtol=1e-5, atol=1e-5)
    layer = packed.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer) is nn.Linear and torch.equal(layer.weight, get_param(folded, q))
    assert not torch.equal(layer.weight, get_param(model, q)) or bool((gp.scale == 1).all())


def test_only_restricts_quantization_and_ignore_still_applies(llama):
    _, gm = llama
    every = _quantizable(gm)
    rtn = AWQConfig.of(method="rtn", group_size=32, only=[r"\.mlp\."])
    assert set(_plan(gm, rtn).weights) == {w for w in every if ".mlp." in w}
    both = rtn.with_(ignore=["gate_proj"])
    assert set(_plan(gm, both).weights) == {w for w in every if ".mlp." in w and "gate_proj" not in w}
    # the search scales only groups with a quantized consumer: no attention group is left
    observed = prepare(gm, CFG.with_(only=[r"\.mlp\."]))
    assert [g.name.removeprefix("model.") for g in observed.groups] == [
        "layers.0.post_attention_layernorm.weight", "layers.0.mlp.up_proj.weight",
        "layers.1.post_attention_layernorm.weight", "layers.1.mlp.up_proj.weight"]


@pytest.mark.parametrize("fields, needles", [
    (dict(ignore=["dwn_proj"]), ["ignore pattern 'dwn_proj' matches no linear layer", "model.layers.0.mlp.down_proj"]),
    (dict(only=[r"attn\.qproj"]), [r"only pattern 'attn\\.qproj' matches no linear layer", "self_attn.q_proj"]),
    (dict(exclude_groups=["post_attention_layernrm"]),
     ["exclude-group pattern 'post_attention_layernrm' matches no discovered scale group",
      "model.layers.0.post_attention_layernorm"]),
    (dict(ignore=["proj"]), ["leave no weight to quantize"]),
])
def test_a_pattern_that_matches_nothing_is_refused_with_real_names(llama, fields, needles):
    with pytest.raises(TargetError) as e:
        prepare(llama[1], CFG.with_(**fields))
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize("mode", ["whole", "sequential"])
def test_cli_refuses_a_pattern_that_matches_nothing_before_calibration(llama_dir, tmp_path, capsys, no_calibration,
                                                                       mode):
    out = tmp_path / "q"
    assert main(["quantize", str(llama_dir), "--out", str(out), "--mode", mode, "--ignore", "dwn_proj"] + QUICK) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("awqfx")]
    assert len(err) == 1 and err[0].startswith("awqfx: error: ignore pattern 'dwn_proj' matches no linear layer")
    assert "model.layers.0.mlp.down_proj" in err[0] and not out.exists()


def test_cli_ignore_lands_in_the_formats_list_of_float_linears(llama_dir, tmp_path):
    out = tmp_path / "ct"
    assert main(["quantize", str(llama_dir), "--out", str(out), "--method", "rtn", "--format", "compressed-tensors",
                 "--ignore", r"layers\.1\.mlp", "--only", "mlp"] + QUICK) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(qc["ignore"]) == sorted(["lm_head", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                           "model.layers.1.mlp.down_proj"] +
                                          [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"])
    plan = json.loads((out / "awq_plan" / "plan.json").read_text())
    assert sorted(plan["weights"]) == [f"model.layers.0.mlp.{p}_proj.weight" for p in ("down", "gate", "up")]


def test_target_flags_and_fields_round_trip():
    args = build_parser().parse_args(["quantize", "--out", "x", "--ignore", "down_proj", "--ignore", r"layers\.0\.",
                                      "--only", "mlp", "--group", "a.norm:a.l1,a.l2", "--exclude-group", "post"])
    cfg = _config_from_args(args)
    assert cfg.ignore == ("down_proj", r"layers\.0\.") and cfg.only == ("mlp",) and cfg.exclude_groups == ("post",)
    assert cfg.extra_groups == (GroupSpec("a.norm", ("a.l1", "a.l2")),)
    assert AWQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg == AWQConfig.from_dict(cfg.flat())
    assert cfg.with_(bits=3).extra_groups == cfg.extra_groups
    with pytest.raises(ValueError, match=r"AWQConfig.ignore: '\(' is not a valid regular expression"):
        AWQConfig.of(ignore=["("])
    with pytest.raises(ValueError, match="expected PRODUCER:CONSUMER"):
        AWQConfig.of(extra_groups=["a.norm"])
    assert main(["quantize", "--out", "x", "--group", "a.norm:"]) == 2


# ------------------------------------------------------------------------------- scale groups

def test_a_declared_group_is_accepted_and_planned_as_discovery_plans_it(llama):
    """Drop a discovered group, declare it again (module names, or parameter names): the same group and plan."""
    _, gm = llama
    dropped = prepare(gm, CFG.with_(exclude_groups=[r"layers\.1\.post_attention"]))
    assert POST1 + ".weight" not in [g.name for g in dropped.groups]
    assert {m + ".weight" for m in MLP1} <= set(dropped.discovery.quantizable)  # still quantized, just unscaled

    ref_obs = prepare(gm, CFG)
    for spec in (f"{POST1}:{','.join(MLP1)}", GroupSpec(POST1 + ".weight", tuple(m + ".weight" for m in MLP1))):
        obs = prepare(gm, CFG.with_(exclude_groups=[r"layers\.1\.post_attention"], extra_groups=[spec]))
        assert [g.to_json() for g in obs.groups] == [g.to_json() for g in ref_obs.groups]
        for a, b in zip(obs.groups, ref_obs.groups):
            assert all(torch.equal(x.columns, y.columns) for x, y in zip(a.consumers, b.consumers))
    cfg = CFG.with_(exclude_groups=[r"layers\.1\.post_attention"], extra_groups=[f"{POST1}:{','.join(MLP1)}"])
    declared, reference = _plan(gm, cfg), _plan(gm, CFG)
    assert [g.name for g in declared.groups] == [g.name for g in reference.groups]
    assert all(torch.equal(a.scale, b.scale) for a, b in zip(declared.groups, reference.groups))
    assert all(torch.equal(declared.weights[w].max_val, reference.weights[w].max_val)
               for w in reference.weights if reference.weights[w].max_val is not None)


@pytest.mark.parametrize("exclude, group", [
    # a norm declared over linears it does not feed (input_layernorm feeds q/k/v, not the MLP)
    ([r"layers\.0\.input_layernorm", r"layers\.0\.post_attention"],
     "model.layers.0.input_layernorm:model.layers.0.mlp.gate_proj,model.layers.0.mlp.up_proj"),
    # q_proj's channels go through rope into the attention scores, never to o_proj's columns
    ([r"layers\.0\.self_attn\.v_proj"], "model.layers.0.self_attn.q_proj:model.layers.0.self_attn.o_proj"),
    # a true group with one consumer left out: up_proj reads the scaled channels uncompensated
    ([r"layers\.0\.post_attention"], "model.layers.0.post_attention_layernorm:model.layers.0.mlp.gate_proj"),
])
def test_a_declared_group_that_changes_the_model_is_refused_with_the_measured_error(llama, exclude, group):
    with pytest.raises(GroupCheckError) as e:
        prepare(llama[1], CFG.with_(exclude_groups=exclude, extra_groups=[group]))
    m = re.search(r"max relative error of (\S+) \(tolerance (\S+)\)", str(e.value))
    assert m and float(m.group(1)) > 10 * float(m.group(2)), str(e.value)
    assert str(e.value).startswith("declared scale group ")


@pytest.mark.parametrize("fields, needle", [
    (dict(extra_groups=["model.layers.0.input_layernorm:model.layers.0.mlp.gate_prj"]),
     ("the consumer 'model.layers.0.mlp.gate_prj' is not a linear layer of this model; close names: "
      "model.layers.0.mlp.gate_proj")),
    (dict(extra_groups=["model.layers.0.post_attention_norm:model.layers.0.mlp.gate_proj"]),
     "close names: model.layers.0.post_attention_layernorm"),
    (dict(exclude_groups=[r"layers\.0\.mlp\.up_proj"],
          extra_groups=["model.layers.0.self_attn.q_proj:model.layers.0.mlp.down_proj"]),
     ("model.layers.0.mlp.down_proj.weight reads 96 input features but model.layers.0.self_attn.q_proj.weight has "
      "64 output channels")),
    (dict(extra_groups=[f"{POST1}:{','.join(MLP1)}"]), f"{POST1}.weight already heads the scale group"),
    (dict(exclude_groups=[r"layers\.0\.self_attn\.v_proj"],
          extra_groups=["model.layers.0.self_attn.q_proj:model.layers.0.self_attn.k_proj"]),
     ("model.layers.0.self_attn.k_proj.weight is already a consumer of the scale group "
      "model.layers.0.input_layernorm.weight")),
])
def test_a_declared_group_naming_what_does_not_fit_is_refused(llama, fields, needle):
    with pytest.raises(TargetError) as e:
        prepare(llama[1], CFG.with_(**fields))
    assert needle in str(e.value) and not isinstance(e.value, GroupCheckError)


# ------------------------------------------------------------------------------- block by block

def test_block_by_block_mode_follows_the_targets(llama_dir, tmp_path):
    """--ignore and a declared group, block by block: the plan and every written tensor equal the
    whole-graph mode's; the ignored weights are the checkpoint's own floats."""
    cfg = CFG.with_(ignore=["down_proj"], exclude_groups=[r"layers\.1\.post_attention"],
                    extra_groups=[f"{POST1}:{','.join(MLP1)}"])
    calib = calib_ids(8, 16)
    plan, records = quantize_sequential(open_sequential(llama_dir, config=cfg), calib, cfg, tmp_path / "seq",
                                        progress=False)
    model = build("llama")
    whole = _plan(awqfx.capture(model), cfg, calib)
    assert set(plan.weights) == set(whole.weights) and not [w for w in plan.weights if "down_proj" in w]
    assert [r.weights for r in records] == [0, 6, 6, 0]
    by_name = {g.name: g for g in plan.groups}
    assert sorted(by_name) == sorted(g.name for g in whole.groups) and POST1 + ".weight" in by_name
    assert all(torch.equal(by_name[g.name].scale, g.scale) for g in whole.groups)
    save_quantized(apply_plan(model, whole, weights="packed"), tmp_path / "whole")
    seq, ref, ckpt = saved_tensors(tmp_path / "seq"), saved_tensors(tmp_path / "whole"), saved_tensors(llama_dir)
    assert seq.keys() == ref.keys() and all(torch.equal(seq[k], ref[k]) for k in ref)
    assert all(torch.equal(seq[f"model.layers.{i}.mlp.down_proj.weight"], ckpt[f"model.layers.{i}.mlp.down_proj.weight"])
               for i in (0, 1))
    with pytest.raises(TargetError, match=r"open it with open_sequential\(\.\.\., config=cfg\)"):
        quantize_sequential(open_sequential(llama_dir), calib, cfg, tmp_path / "other", progress=False)


def test_block_by_block_mode_refuses_a_declared_group_that_changes_the_model(llama_dir, tmp_path):
    cfg = CFG.with_(exclude_groups=[r"layers\.0\.post_attention"],
                    extra_groups=["model.layers.0.post_attention_layernorm:model.layers.0.mlp.gate_proj"])
    with pytest.raises(GroupCheckError, match=r"max relative error of \S+ \(tolerance 1e-03\)"):
        quantize_sequential(open_sequential(llama_dir, config=cfg), calib_ids(8, 16), cfg, tmp_path / "q",
                            progress=False)
    assert not (tmp_path / "q").exists()
