"""The staged API: isolation of the caller's graph/model, errors, plan save/load and the two appliers."""
from __future__ import annotations

import pytest
import torch
from tiny_models import build, calib_ids, token_ids

import awqfx
import awqfx.api as api
from awqfx.api import (
    AWQConfig,
    AWQPlan,
    CalibrationError,
    NonFiniteActivationError,
    apply_awq_pass,
    apply_plan,
    calibrate,
    convert,
    prepare,
    search,
)

pytestmark = pytest.mark.usefixtures("one_thread")
_calib = calib_ids


def _snapshot(model, gm):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: v.detach().clone() for k, v in gm.state_dict().items()}, gm.code, len(gm.graph.nodes))


def _assert_unchanged(model, gm, snap):
    sd_m, sd_g, code, n_nodes = snap
    assert model.state_dict().keys() == sd_m.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd_m[k]), f"model tensor {k} changed"
    for k, v in gm.state_dict().items():
        assert torch.equal(v, sd_g[k]), f"graph tensor {k} changed"
    assert gm.code == code and len(gm.graph.nodes) == n_nodes


@pytest.fixture(scope="module")
def llama():
    m = build("llama")
    return m, awqfx.capture(m)


def test_callers_model_and_graph_untouched(llama):
    m, gm = llama
    snap = _snapshot(m, gm)
    q = apply_awq_pass(gm, _calib(), AWQConfig.of(bits=3, group_size=16, propagate="quant"), progress=False)
    _assert_unchanged(m, gm, snap)
    assert q is not gm
    assert not any(n.op == "call_module" for n in q.graph.nodes)  # observers removed
    with torch.no_grad():
        assert not torch.equal(q(token_ids()), gm(token_ids()))


def test_pass_output_compiles_with_inductor(llama):
    """export -> apply_awq_pass -> torch.compile: the pass is one stage of a compile pipeline."""
    _, gm = llama
    q = apply_awq_pass(gm, _calib(), AWQConfig.of(bits=4, group_size=16, n_grid=2), progress=False)
    compiled = torch.compile(q, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(token_ids()), q(token_ids()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [
    {"bits": 9}, {"bits": 1}, {"group_size": 0}, {"group_size": -2}, {"n_grid": 0}, {"clip": "max"},
    {"scale_form": "y"}, {"propagate": "int"}, {"max_shrink": 1.0}, {"loss_samples": 0}, {"clip_tokens": 0},
    {"method": "hqq"}, {"device": "tpu"}, {"clip_grid": 0}, {"grid_stride": 0},
])
def test_bad_config_rejected_before_any_work(bad, llama, monkeypatch):
    with pytest.raises(ValueError):
        AWQConfig.of(**bad)

    def boom(*a, **k):
        raise AssertionError("prepare ran before the config was validated")

    monkeypatch.setattr(api, "prepare", boom)
    with pytest.raises(ValueError):
        apply_awq_pass(llama[1], _calib(), bad, progress=False)


def test_group_size_larger_than_a_layer_fails_in_prepare(llama):
    with pytest.raises(ValueError, match="group_size 128 is larger than in_features"):
        prepare(llama[1], AWQConfig.of(group_size=128))


def test_empty_and_too_short_calibration(llama):
    gm = llama[1]
    with pytest.raises(CalibrationError, match="empty"):
        apply_awq_pass(gm, torch.zeros(0, 16, dtype=torch.long), AWQConfig.of(group_size=16), progress=False)
    with pytest.raises(CalibrationError, match="too short"):
        apply_awq_pass(gm, torch.zeros(4, 1, dtype=torch.long), AWQConfig.of(group_size=16), progress=False)
    obs = prepare(gm, AWQConfig.of(group_size=16))
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(obs, [], progress=False)
    with pytest.raises(RuntimeError, match="calibrate"):
        search(obs, progress=False)  # no statistics yet


def test_nan_activation_names_the_node():
    m = build("llama")
    with torch.no_grad():
        m.model.layers[0].post_attention_layernorm.weight[3] = float("nan")
    gm = awqfx.capture(m)
    obs = prepare(gm, AWQConfig.of(group_size=16))
    group = next(g for g in obs.groups if g.name == "model.layers.0.post_attention_layernorm.weight")
    node = obs.data_of[group.consumers[0].node]
    with pytest.raises(NonFiniteActivationError) as err:
        calibrate(obs, _calib(), progress=False)
    msg = str(err.value)
    assert f"NaN activation at node {node!r}" in msg and "post_attention_layernorm" in msg


def test_interrupted_calibration_leaves_graph_untouched(llama):
    m, gm = llama
    snap = _snapshot(m, gm)

    def batches():
        yield _calib(2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        apply_awq_pass(gm, batches(), AWQConfig.of(group_size=16), progress=False)
    _assert_unchanged(m, gm, snap)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_plan_round_trip_and_both_appliers(name, tmp_path):
    m = build(name)
    gm = awqfx.capture(m)
    cfg = AWQConfig.of(bits=4, group_size=16)
    obs = prepare(gm, cfg)
    calibrate(obs, _calib(), progress=False)
    plan = search(obs, progress=False)
    q = convert(gm, plan)

    plan.save(tmp_path / "plan")
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["plan.json", "plan.safetensors"]
    loaded = AWQPlan.load(tmp_path / "plan")
    assert loaded.config == plan.config and len(loaded.groups) == len(plan.groups)
    for a, b in zip(plan.groups, loaded.groups):
        assert a.name == b.name and torch.equal(a.scale, b.scale)
        assert all(torch.equal(x.columns, y.columns) for x, y in zip(a.group.consumers, b.group.consumers))
    for w, wp in plan.weights.items():
        lw = loaded.weights[w]
        assert lw.spec == wp.spec and lw.in_dim == wp.in_dim
        assert (wp.max_val is None) == (lw.max_val is None)
        if wp.max_val is not None:
            assert torch.equal(wp.max_val, lw.max_val) and torch.equal(wp.min_val, lw.min_val)
    assert loaded.metadata["timings"]["search_s"] > 0

    ids = token_ids()
    fresh = awqfx.capture(m)  # a new capture of the same model
    snap = _snapshot(m, fresh)
    graph_q = apply_plan(fresh, loaded)
    module_q = apply_plan(m, loaded)  # the nn.Module tree (a copy)
    _assert_unchanged(m, fresh, snap)
    with torch.no_grad():
        expect = q(ids)
        assert torch.equal(graph_q(ids), expect)
        torch.testing.assert_close(module_q(ids, use_cache=False).logits, expect, rtol=1e-5, atol=1e-5)


def test_config_parts_and_flat_names_agree():
    """AWQConfig is composed of typed parts; the flat names (CLI flags) build the same thing, and
    both serialisations (nested, and the flat dict older plans stored) round-trip."""
    from awqfx.config import ClipSearch, Runtime, ScaleSearch
    from awqfx.quant import QuantSpec

    cfg = AWQConfig.of(bits=3, group_size=64, scale_form="duo", clip="sym", clip_grid=10, loss_samples=4)
    assert cfg == AWQConfig(QuantSpec(3, 64), ScaleSearch(form="duo"), ClipSearch(mode="sym", grid=10),
                            Runtime(loss_samples=4))
    assert AWQConfig.from_dict(cfg.to_dict()) == cfg == AWQConfig.from_dict(cfg.flat())
    assert AWQConfig.of(method="rtn", bits=3) == AWQConfig.rtn(QuantSpec(3)) and AWQConfig.rtn().method == "rtn"
    assert AWQConfig.of(clip="none").clip is None and AWQConfig.of(clip="none").method == "awq"
    with pytest.raises(ValueError, match="unknown AWQConfig field"):
        AWQConfig.of(group=64)


def test_clip_only_search_keeps_scales_at_one(llama):
    """No scale search, clip search on: no group is scaled, every clipped weight gets a range."""
    from awqfx.config import ClipSearch, Runtime
    from awqfx.quant import QuantSpec

    cfg = AWQConfig(QuantSpec(4, 16), scales=None, clip=ClipSearch(grid=4, rounds=0), runtime=Runtime(loss_samples=2))
    obs = prepare(llama[1], cfg)
    calibrate(obs, _calib(), progress=False)
    plan = search(obs, progress=False)
    assert plan.groups == []
    clipped = {w for w, wp in plan.weights.items() if wp.max_val is not None}
    assert clipped == set(plan.weights) - set(obs.discovery.attention_qk)
    rtn = search(obs, AWQConfig.rtn(QuantSpec(4, 16)), progress=False)
    assert all(wp.max_val is None for wp in rtn.weights.values())


def test_module_tree_refuses_an_input_scale_inside_fused_experts():
    """gpt-oss: gate_up_proj and down_proj are parameters of one experts module, with a clamped GLU
    between them, so down_proj's group is an activation group whose ``1/s`` sits inside the module. The
    graph applier holds it as a node; a pre-hook on the module's input would scale the hidden states
    gate_up_proj reads, so the module-tree applier refuses the plan (before any work) instead."""
    m = build("gpt_oss")
    gm = awqfx.capture(m)
    ids = token_ids()
    for drop in (False, True):
        cfg = AWQConfig.of(bits=4, group_size=16, drop_unfoldable=drop)
        obs = prepare(gm, cfg)
        calibrate(obs, _calib(), progress=False)
        plan = search(obs, progress=False)
        acts = [gp.group.consumers[0].weight for gp in plan.groups if gp.group.producer.kind == "activation"]
        if not drop:
            assert acts == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
            with torch.no_grad():
                apply_plan(awqfx.capture(m), plan)(ids)  # the graph applier holds the scale
            with pytest.raises(ValueError, match="inside module 'model.layers.0.mlp.experts', whose input feeds "
                                                 "model.layers.0.mlp.experts.gate_up_proj instead"):
                apply_plan(m, plan)
            continue
        assert acts == []
        with torch.no_grad():
            expect = apply_plan(awqfx.capture(m), plan)(ids)
            torch.testing.assert_close(apply_plan(m, plan)(ids, use_cache=False).logits, expect, rtol=1e-5, atol=1e-5)
