"""The smoothed format: the AWQ-transformed float model as a plain checkpoint (scales folded,
weights clamped to their clip ranges, not quantized), loaded by plain transformers and turned
into awqfx's AWQ integers by round-to-nearest."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import build, calib_ids, char_tokenizer, save_model_dir, saved_tensors, token_ids
from transformers import AutoModelForCausalLM

import awqfx
from awqfx import sequential
from awqfx.api import AWQConfig, calibrate, prepare, search
from awqfx.app.cli import main
from awqfx.app.jobs import refuse_unfit_format
from awqfx.apply import apply_plan
from awqfx.formats import PLAN_SUBDIR, FormatError, save_quantized
from awqfx.params import get_param, rows_view
from awqfx.plan import AWQPlan
from awqfx.quant import quantize_weight
from awqfx.sequential import open_sequential, quantize_sequential

CFG = AWQConfig.of(bits=4, group_size=32, n_grid=4, loss_samples=4, batch_size=4, clip_grid=10, clip_rounds=1)
QUICK = ["--group-size", "32", "--samples", "4", "--seq-len", "16", "--quiet", "--n-grid", "4"]


def _plan(model, cfg=CFG):
    obs = prepare(awqfx.capture(model), cfg)
    calibrate(obs, calib_ids(8, 16), progress=False)
    return search(obs, cfg, progress=False)


def _save(model, plan, out, tmp_path):
    plan_dir = plan.save(tmp_path / "plan")
    return save_quantized(apply_plan(model, plan, weights="smoothed"), out, fmt="smoothed",
                          tokenizer=char_tokenizer(), plan_dir=plan_dir)


def _load_plain(path, **kw):
    """``AutoModelForCausalLM.from_pretrained`` as any user calls it; fails on any missing,
    unexpected or mis-shaped tensor."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def _source(arch, dtype, path):
    """A tiny model as ``from_pretrained`` builds it in ``dtype`` (``.to(bf16)`` would also round the
    rotary ``inv_freq`` buffer, which a loaded model computes in float32)."""
    build(arch).to(dtype).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _groups(w_rows, spec):
    """``[rows, n_groups, g]`` (whole groups only: the test models' inputs divide the group size)."""
    return w_rows.float().reshape(-1, w_rows.shape[-1] // spec.group_size, spec.group_size)


# ----------------------------------------------------------------------------- (a) a plain checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_transformers_loads_it_and_computes_the_folded_clamped_model(dtype, tmp_path):
    model = _source("llama", dtype, tmp_path / "src")
    plan = _plan(model)
    out = _save(model, plan, tmp_path / "smoothed", tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == str(dtype).removeprefix("torch.")
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert AWQPlan.load(out / PLAN_SUBDIR).weights.keys() == plan.weights.keys()
    stored = saved_tensors(out)
    assert {t.dtype for t in stored.values()} == {dtype}  # bf16 stays bf16, nothing widened
    assert stored.keys() == model.state_dict().keys()  # the tensors of the float model, under their own names

    loaded = _load_plain(out)  # dtype "auto": the config's
    assert next(loaded.parameters()).dtype == dtype
    expected = apply_plan(model, plan, weights="smoothed")  # awqfx's folded + clamped model, fake quant off
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, expected(token_ids()).logits)
        # not the float model, and not the quantized one either
        assert not torch.equal(loaded(token_ids()).logits, model(token_ids()).logits)
        assert not torch.equal(loaded(token_ids()).logits, apply_plan(model, plan, weights="fake")(token_ids()).logits)


def test_a_packed_model_is_refused(tmp_path):
    model = build("llama")
    rtn = AWQConfig.rtn(CFG.spec)
    plan = search(prepare(awqfx.capture(model), rtn), rtn, progress=False)
    with pytest.raises(FormatError, match="takes the float model"):
        save_quantized(apply_plan(model, plan, weights="packed", backend="dequant"), tmp_path / "x", fmt="smoothed")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- (b) RTN gives the AWQ integers


def test_rtn_of_the_smoothed_fp32_weights_is_exactly_the_awq_quantization():
    """Clamping makes each clipped group's min/max the plan's clip range, so round-to-nearest of the
    smoothed weight (per-group min/max, no range given) computes awqfx's scales and zero points,
    and every clamped value lands on the code its unclamped original saturates to."""
    model = build("llama")
    plan = _plan(model)
    folded = apply_plan(model, plan, weights="float")  # what awqfx quantizes (and packs)
    smoothed = apply_plan(model, plan, weights="smoothed")
    clipped = 0
    for name, wp in plan.weights.items():
        awq = plan.quantized_weight(folded, name)
        w = rows_view(get_param(smoothed, name).detach(), wp.in_dim)
        rtn = quantize_weight(w, wp.spec)  # plain RTN at the same bits and group size
        if wp.max_val is not None:
            clipped += 1
            g = _groups(w, wp.spec)
            assert torch.equal(g.amax(-1), wp.max_val.reshape(g.shape[:2])), name
            assert torch.equal(g.amin(-1), wp.min_val.reshape(g.shape[:2])), name
            # the clip max maps to the top code (no rounding tie), so saturated weights agree too
            assert torch.equal(torch.round(wp.max_val / awq.scale) + awq.zero,
                               torch.full_like(awq.scale, wp.spec.qmax)), name
        else:  # not clipped (attention q/k): nothing clamped, the folded weight itself
            assert torch.equal(w, rows_view(get_param(folded, name).detach(), wp.in_dim)), name
        assert torch.equal(rtn.scale, awq.scale) and torch.equal(rtn.zero, awq.zero), name
        assert torch.equal(rtn.q, awq.q), name
        assert torch.equal(rtn.dequantize(), awq.dequantize()), name
    assert clipped > 0


@pytest.mark.parametrize("clip", ["minmax", "asym"])
def test_rtn_reproduces_groups_whose_weights_all_share_one_sign(clip):
    """A one-signed group's clip range stays inside its own values (the zero-side bound does not
    move outward, where a clamp could not follow it), so round-to-nearest of the smoothed weight
    gives awqfx's scales, zero points and codes there too."""
    model = build("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        w = get_param(model, name)
        w[0], w[1] = w[0].abs() + 0.01, -(w[1].abs() + 0.01)
    plan = _plan(model, CFG.with_(clip=clip))
    wp = plan.weights[name]
    folded = apply_plan(model, plan, weights="float")
    f = _groups(rows_view(get_param(folded, name).detach(), wp.in_dim), wp.spec)
    assert (f[0] > 0).all() and (f[1] < 0).all()
    assert (wp.max_val <= f.amax(-1)).all() and (wp.min_val >= f.amin(-1)).all()
    awq = plan.quantized_weight(folded, name)
    rtn = quantize_weight(rows_view(get_param(apply_plan(model, plan, weights="smoothed"), name).detach(),
                                    wp.in_dim), wp.spec)
    assert torch.equal(rtn.scale, awq.scale) and torch.equal(rtn.zero, awq.zero)
    assert torch.equal(rtn.q, awq.q)


def test_rtn_of_the_smoothed_bf16_weights_uses_the_clip_range_rounded_to_bf16():
    """In bf16 the fold rounds once (the same rounding as the weights awqfx quantizes) and a clamped
    value is the float32 clip bound rounded to bf16. Exact: every unclamped value is the folded
    weight's; each group's min/max is the rounded range; RTN gives the scales and zero points of
    awqfx's quantizer with that rounded range, and its codes in every group whose rounded max maps
    to the top code. Against awqfx's own integers (float32 range): the scales differ by the bounds'
    rounding (half a bf16 ulp each, 2^-8 of the bound) and the codes by at most one."""
    dtype = torch.bfloat16
    model = build("llama").to(dtype)
    plan = _plan(model)
    folded = apply_plan(model, plan, weights="float")
    smoothed = apply_plan(model, plan, weights="smoothed")
    groups = ties = 0
    for name, wp in plan.weights.items():
        f = rows_view(get_param(folded, name).detach(), wp.in_dim)
        w = rows_view(get_param(smoothed, name).detach(), wp.in_dim)
        assert w.dtype == dtype
        awq = plan.quantized_weight(folded, name)
        rtn = quantize_weight(w, wp.spec)
        if wp.max_val is None:
            assert torch.equal(w, f) and torch.equal(rtn.q, awq.q) and torch.equal(rtn.scale, awq.scale), name
            continue
        hi, lo = wp.max_val.to(dtype), wp.min_val.to(dtype)  # the range as a bf16 weight can hold it
        gw, gf = _groups(w, wp.spec), _groups(f, wp.spec)
        inside = (gf <= wp.max_val[..., None]) & (gf >= wp.min_val[..., None])
        assert torch.equal(gw[inside], gf[inside]), name
        assert torch.equal(gw.amax(-1), hi.float()) and torch.equal(gw.amin(-1), lo.float()), name
        ref = quantize_weight(f, wp.spec, hi, lo)  # awqfx's quantizer with the rounded range
        assert torch.equal(rtn.scale, ref.scale) and torch.equal(rtn.zero, ref.zero), name
        top = (torch.round(hi.float() / ref.scale) + ref.zero) == wp.spec.qmax
        same = (rtn.q == ref.q).reshape(gw.shape).all(-1)
        assert same[top].all(), name
        groups, ties = groups + top.numel(), ties + int((~top).sum())
        # against the AWQ integers themselves
        bound = 2.0**-8 * (wp.max_val.abs() + wp.min_val.abs()) / (wp.max_val - wp.min_val)
        assert ((rtn.scale - awq.scale).abs() <= bound * awq.scale * (1 + 1e-6)).all(), name
        assert ((rtn.q.int() - awq.q.int()).abs() <= 1).all(), name
    assert ties < groups / 100  # rounding ties are the rare exception


# ----------------------------------------------------------------------------- (c) activation groups


def test_activation_groups_are_refused_before_calibration_or_dropped(tmp_path):
    model = build("gpt2")
    consumers = ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"]
    with pytest.raises(FormatError) as e:
        refuse_unfit_format("smoothed", prepare(awqfx.capture(model), CFG), CFG)
    msg = str(e.value)
    assert "2 layers read their input through an AWQ scale node" in msg and "--drop-unfoldable" in msg
    assert all(c in msg for c in consumers)

    cfg = CFG.with_(drop_unfoldable=True)
    obs = prepare(awqfx.capture(model), cfg)
    assert [g.site for g in obs.dropped] == [f"transformer.h.{i}.mlp.act -> {c}" for i, c in enumerate(consumers)]
    assert all(g.foldable for g in obs.groups) and len(obs.groups) == 6
    refuse_unfit_format("smoothed", obs, cfg)  # nothing left to refuse
    calibrate(obs, calib_ids(8, 16), progress=False)
    plan = search(obs, cfg, progress=False)
    assert not plan.input_scales and plan.metadata["groups_dropped"] == [g.site for g in obs.dropped]
    out = _save(model, plan, tmp_path / "smoothed", tmp_path)
    loaded = _load_plain(out)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, apply_plan(model, plan, weights="smoothed")(token_ids()).logits)

    # the writer refuses a model that still has an activation scale (a pre-hook) rather than dropping it
    with_act = _plan(model)
    assert with_act.input_scales
    with pytest.raises(FormatError, match=r"transformer\.h\.0\.mlp\.c_proj.*--drop-unfoldable"):
        save_quantized(apply_plan(model, with_act, weights="smoothed"), tmp_path / "x", fmt="smoothed")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("smoothed_gpt2")
    save_model_dir(path, "gpt2")
    return path


@pytest.mark.parametrize("mode", ["whole", "sequential"])
def test_cli_refuses_activation_groups_or_drops_them_with_one_warning(gpt2_dir, mode, tmp_path, capsys, caplog,
                                                                      monkeypatch):
    import awqfx.app.jobs

    out = tmp_path / "q"
    args = ["quantize", str(gpt2_dir), "--out", str(out), "--format", "smoothed", "--mode", mode] + QUICK
    real = awqfx.app.jobs.calibrate, awqfx.app.jobs.quantize_sequential

    def too_late(*a, **k):
        raise AssertionError("calibration was reached: the refusal came too late")

    monkeypatch.setattr(awqfx.app.jobs, "calibrate", too_late)
    monkeypatch.setattr(awqfx.app.jobs, "quantize_sequential", too_late)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "awqfx: error: --format smoothed cannot hold this model" in err
    assert "transformer.h.0.mlp.c_proj.weight" in err and "--drop-unfoldable" in err
    assert not out.exists()

    monkeypatch.setattr(awqfx.app.jobs, "calibrate", real[0])
    monkeypatch.setattr(awqfx.app.jobs, "quantize_sequential", real[1])
    with caplog.at_level(logging.WARNING, logger="awqfx.app.jobs"):
        assert main(args + ["--drop-unfoldable"]) == 0
    said = [r.getMessage() for r in caplog.records if "--drop-unfoldable" in r.getMessage()]
    assert said == [("--drop-unfoldable: 2 scale groups after an activation left unscaled (s = 1): "
                     "transformer.h.0.mlp.act -> transformer.h.0.mlp.c_proj.weight; "
                     "transformer.h.1.mlp.act -> transformer.h.1.mlp.c_proj.weight")]
    assert "2 dropped (--drop-unfoldable)" in capsys.readouterr().out
    plan = AWQPlan.load(out / PLAN_SUBDIR)
    assert not plan.input_scales and len(plan.groups) == 6
    original = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        assert torch.equal(_load_plain(out)(token_ids()).logits,
                           apply_plan(original, plan, weights="smoothed")(token_ids()).logits)


# ----------------------------------------------------------------------------- (d) the CLI, both modes


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("smoothed_llama")
    save_model_dir(path, "llama")
    return path


def test_cli_writes_a_smoothed_checkpoint_whole_and_block_by_block(llama_dir, tmp_path, capsys):
    whole, blocks = tmp_path / "whole", tmp_path / "blocks"
    assert main(["quantize", str(llama_dir), "--out", str(whole), "--format", "smoothed", "--mode", "whole"]
                + QUICK) == 0
    assert "time: fold + clamp" in capsys.readouterr().out
    assert main(["quantize", str(llama_dir), "--out", str(blocks), "--format", "smoothed", "--sequential"]
                + QUICK) == 0
    a, b = saved_tensors(whole), saved_tensors(blocks)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same plan, the same weights
    original = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    plan = AWQPlan.load(whole / PLAN_SUBDIR)
    folded = apply_plan(original, plan, weights="float")
    loaded = _load_plain(blocks)
    for name, wp in plan.weights.items():  # RTN of what was written is the AWQ quantization
        rtn = quantize_weight(rows_view(get_param(loaded, name).detach(), wp.in_dim), wp.spec)
        awq = plan.quantized_weight(folded, name)
        assert torch.equal(rtn.q, awq.q) and torch.equal(rtn.scale, awq.scale), name
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, apply_plan(original, plan, weights="smoothed")(token_ids()).logits)


def test_block_by_block_shards_load_in_plain_transformers(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sequential, "OUTPUT_SHARD_BYTES", 20_000)
    out = tmp_path / "q"
    plan, _ = quantize_sequential(open_sequential(llama_dir), calib_ids(8, 16), CFG, out, fmt="smoothed",
                                  tokenizer=char_tokenizer(), progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    original = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        assert torch.equal(_load_plain(out)(token_ids()).logits,
                           apply_plan(original, plan, weights="smoothed")(token_ids()).logits)
