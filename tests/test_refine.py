"""Refined rounding (``--refine gptq``): GPTQ on the searched grid, the plan's codes, every applier
and the flags."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from tiny_models import build, calib_ids, save_model_dir, token_ids

import awqfx
from awqfx.api import AWQConfig, calibrate, convert, prepare, search
from awqfx.app.cli import main
from awqfx.apply import apply_plan
from awqfx.config import ConfigError, Refine
from awqfx.export import PLAN_SUBDIR, load_quantized
from awqfx.params import get_param, rows_view
from awqfx.plan import AWQPlan
from awqfx.quant import QuantSpec, compute_qparams, dequantize, quantize, quantize_weight
from awqfx.search.clip import absolute_clip
from awqfx.search.gptq import gptq_codes

QUICK = dict(bits=4, group_size=32, n_grid=4, loss_samples=4, clip_grid=8)


def _output_error(w, codes, scale, zero, spec, gram):
    d = dequantize(codes, scale, zero, spec) - w
    return float(torch.einsum("ri,ij,rj->", d.double(), gram.double(), d.double()))


def _correlated_inputs(n_in: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    return (torch.randn(tokens, n_in, generator=g) @ mix) * torch.linspace(0.2, 3, n_in)


@pytest.mark.parametrize("n_in, group_size, symmetric", [(96, 32, False), (96, 64, False), (80, -1, True)])
def test_gptq_lowers_the_output_error_of_round_to_nearest_on_the_same_grid(n_in, group_size, symmetric):
    spec = QuantSpec(3, group_size, symmetric)
    w = torch.randn(48, n_in, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs(n_in)
    gram = x.t() @ x / x.shape[0]
    # a clipped range: every group's max and min shrunk to 0.8 of themselves
    n_groups = compute_qparams(w, spec)[0].shape[-1]
    hi, lo = absolute_clip(w, -1, spec, torch.full((48, n_groups), 0.8), "asym")
    scale, zero = compute_qparams(w, spec, hi, lo)
    rtn = quantize(w, scale, zero, spec)
    for act_order in (False, True):
        codes = gptq_codes(w, gram, spec, hi, lo, act_order=act_order)
        assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= spec.qmax
        e_gptq = _output_error(w, codes, scale, zero, spec, gram)
        e_rtn = _output_error(w, rtn, scale, zero, spec, gram)
        assert e_gptq < 0.85 * e_rtn, (act_order, e_gptq, e_rtn)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """A diagonal Gram couples no columns: no error is passed on, every code is the nearest one."""
    spec = QuantSpec(4, 32)
    w = torch.randn(16, 80)  # ragged last group of 16
    gram = torch.diag(torch.rand(80) + 0.1)
    gram[5, 5] = 0.0  # an input that is always zero: rounded alone
    want = quantize_weight(w, spec).q
    for act_order in (False, True):
        assert torch.equal(gptq_codes(w, gram, spec, act_order=act_order), want)


def test_gptq_refuses_a_gram_of_another_shape_and_a_gguf_grid():
    with pytest.raises(ValueError, match=r"GPTQ needs the \[64, 64\] input Gram of this weight, got \(32, 32\)"):
        gptq_codes(torch.randn(8, 64), torch.eye(32), QuantSpec(4, 32))
    with pytest.raises(ConfigError, match="--refine gptq rounds to integer codes"):
        AWQConfig(weights=QuantSpec.gguf("q4_0"), refine=Refine())


@pytest.fixture(scope="module")
def refined():
    """A tiny llama, its AWQ plan and the same search refined by GPTQ (one calibration)."""
    model = build("llama")
    gm = awqfx.capture(model)
    cfg = AWQConfig.of(**QUICK)
    observed = prepare(gm, cfg)
    calibrate(observed, calib_ids(), progress=False)
    plain = search(observed, cfg, progress=False)
    plan = search(observed, cfg.with_(refine="gptq"), progress=False)
    return model, gm, plain, plan


def test_a_refined_plan_keeps_the_searched_grid_and_changes_only_codes(refined):
    model, gm, plain, plan = refined
    assert AWQConfig.from_dict(plan.config).refine == Refine("gptq")
    assert set(plan.weights) == set(plain.weights) and all(wp.codes is not None for wp in plan.weights.values())
    torch.testing.assert_close([g.scale for g in plan.groups], [g.scale for g in plain.groups], rtol=0, atol=0)
    folded = apply_plan(model, plain, weights="float")
    changed = 0
    for name, wp in plan.weights.items():
        a, b = plain.quantized_weight(folded, name), plan.quantized_weight(folded, name)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
        changed += int((a.q != b.q).sum())
        assert wp.info["refine"] == "gptq" and wp.info["refine_tokens"] == 4 * 16
    assert changed > 0


def test_every_applier_and_the_saved_plan_use_the_refined_codes(refined, tmp_path):
    model, gm, plain, plan = refined
    ids = token_ids()
    fake_graph = convert(gm, plan)(ids)
    fake_tree = apply_plan(model, plan, weights="fake")(ids).logits
    packed = apply_plan(model, plan, weights="packed", backend="dequant")(ids).logits
    torch.testing.assert_close(fake_tree, fake_graph if isinstance(fake_graph, torch.Tensor) else fake_graph.logits,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, fake_tree, rtol=1e-4, atol=1e-4)
    unrefined = apply_plan(model, plain, weights="fake")(ids).logits
    assert (unrefined - fake_tree).abs().max() > 1e-3
    back = AWQPlan.load(plan.save(tmp_path / "plan"))
    for name, wp in plan.weights.items():
        assert torch.equal(back.weights[name].codes, wp.codes)
    torch.testing.assert_close(apply_plan(model, back, weights="fake")(ids).logits, fake_tree, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the plan's refined codes cannot be written so"):
        apply_plan(model, plan, weights="smoothed")


def test_gptq_alone_is_a_method_of_its_own(refined):
    model, gm, _, _ = refined
    cfg = AWQConfig.of(**QUICK, method="gptq")
    assert (cfg.method, cfg.scales, cfg.clip, cfg.refine) == ("gptq", None, None, Refine())
    observed = prepare(gm, cfg)
    calibrate(observed, calib_ids(), progress=False)
    plan = search(observed, cfg, progress=False)
    assert plan.groups == [] and all(wp.max_val is None and wp.codes is not None for wp in plan.weights.values())
    name = next(iter(plan.weights))
    w = rows_view(get_param(model, name).detach(), plan.weights[name].in_dim)
    assert not torch.equal(plan.weights[name].codes, quantize_weight(w, cfg.spec).q)
    assert AWQConfig.of(**QUICK, method="rtn", refine="gptq").refine is None  # the baseline stays plain


def test_refine_flags(tmp_path, capsys, no_calibration):
    model_dir = tmp_path / "m"
    save_model_dir(model_dir, "llama")
    argv = ["quantize", str(model_dir), "--samples", "2", "--seq-len", "16", "--quiet", "--n-grid", "2",
            "--group-size", "32", "--refine", "gptq"]
    assert main([*argv, "--out", str(tmp_path / "o1"), "--format", "smoothed"]) == 2
    assert "refined codes (--refine gptq) are not round-to-nearest" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "o2"), "--refine-damp", "0"]) == 2
    assert "--refine-damp) must be a number in (0, 1], got 0" in capsys.readouterr().err


def test_quantize_with_refine_saves_the_codes_it_packed(tmp_path, capsys):
    model_dir = tmp_path / "m"
    save_model_dir(model_dir, "llama")
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--samples", "2", "--seq-len", "16", "--quiet", "--n-grid", "2",
                 "--group-size", "32", "--refine", "gptq", "--out", str(out)]) == 0
    assert "; 14 rounded by gptq)" in capsys.readouterr().out  # 2 layers x 7 linears, every one refined
    saved = AWQPlan.load(out / PLAN_SUBDIR)
    assert saved.config["refine"]["method"] == "gptq" and all(wp.codes is not None for wp in saved.weights.values())
    loaded = load_quantized(out, backend="dequant")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    want = apply_plan(model, saved, weights="fake")
    ids = token_ids()
    torch.testing.assert_close(loaded(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- --refine block

BLOCK = dict(refine="block", refine_samples=8)  # every sequence of calib_ids()


@pytest.fixture(scope="module")
def block_refined():
    """A tiny llama calibrated once: its AWQ plan, the same search refined block by block on all 8
    calibration sequences, and the same with a step too small to move any rounding."""
    model = build("llama")
    gm = awqfx.capture(model)
    cfg = AWQConfig.of(**QUICK)
    observed = prepare(gm, cfg.with_(**BLOCK))
    calib = calib_ids()
    calibrate(observed, calib, progress=False)
    plain = search(observed, cfg, progress=False)
    plan = search(observed, cfg.with_(**BLOCK, refine_iters=40), progress=False)
    still = search(observed, cfg.with_(**BLOCK, refine_iters=4, refine_lr=1e-9), progress=False)
    return model, gm, observed.loss_inputs()["input_ids"], plain, plan, still


def _logit_error(model, plan, ids):
    with torch.no_grad():
        return float((apply_plan(model, plan, weights="fake")(ids).logits - model(ids).logits).pow(2).mean())


def test_block_refine_lowers_the_models_error_on_its_refine_sample(block_refined):
    """128 tokens train it here, so only the refine sample is asked to improve (held-out text on
    the real model: docs/results.md)."""
    model, _, sample, plain, plan, _ = block_refined
    assert sample.shape == (8, 16)
    assert _logit_error(model, plan, sample) < 0.5 * _logit_error(model, plain, sample)
    blocks = plan.metadata["refine_blocks"]
    assert [b["block"] for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert all(b["kept"] and b["loss_final"] < b["loss_start"] for b in blocks)


def test_block_refine_learns_codes_and_ranges_inside_the_groups_own(block_refined):
    model, gm, _, plain, plan, _ = block_refined
    folded = apply_plan(model, plain, weights="float")
    moved = 0
    for name, wp in plan.weights.items():
        w = rows_view(get_param(folded, name).detach(), wp.in_dim).float()
        own = w.reshape(w.shape[0], -1, QUICK["group_size"])
        mx, mn = own.amax(-1), own.amin(-1)
        assert wp.codes is not None and int(wp.codes.max()) <= wp.spec.qmax
        assert bool((wp.max_val <= mx + 1e-6).all() and (wp.min_val >= mn - 1e-6).all())
        assert bool((wp.max_val >= 0.5 * mx - 1e-6).all() and (wp.min_val <= 0.5 * mn + 1e-6).all())  # mixed signs
        assert wp.info["refine"] == "block" and wp.info["refine_tokens"] == 8 * 16
        moved += int((plan.quantized_weight(folded, name).q != quantize_weight(w, wp.spec, wp.max_val, wp.min_val).q).sum())
    assert moved > 0  # some codes are not the nearest ones on the learnt grid
    ids = token_ids()
    tree = apply_plan(model, plan, weights="fake")(ids).logits
    graph = convert(gm, plan)(ids)
    torch.testing.assert_close(graph if isinstance(graph, torch.Tensor) else graph.logits, tree, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_plan(model, plan, weights="packed", backend="dequant")(ids).logits, tree,
                               rtol=1e-4, atol=1e-4)


def test_a_block_the_refine_cannot_improve_keeps_the_searched_plan(block_refined):
    *_, plain, _, still = block_refined
    assert [b["kept"] for b in still.metadata["refine_blocks"]] == [False, False]
    for name, wp in still.weights.items():
        assert wp.codes is None and wp.info["block_kept"] is False
        for mine, theirs in ((wp.max_val, plain.weights[name].max_val), (wp.min_val, plain.weights[name].min_val)):
            assert (mine is None and theirs is None) or torch.equal(mine, theirs)


def test_block_refine_learns_on_more_sequences_than_the_loss_sample_when_asked():
    """``refine_samples``: prepare records that many sequences, the loss sample stays the first
    ``loss_samples`` of them (the searched scales and clips do not change) and the refine trains
    on all of them."""
    model = build("llama")
    gm = awqfx.capture(model)
    cfg = AWQConfig.of(**QUICK, refine="block", refine_iters=10, refine_samples=8)
    assert (cfg.recorded_samples, cfg.refine_samples) == (8, 8)
    base = prepare(gm, AWQConfig.of(**QUICK))
    observed = prepare(gm, cfg)
    calib = calib_ids(12)
    for o in (base, observed):
        calibrate(o, calib, progress=False)
    recorded = observed.loss_inputs()["input_ids"]
    assert recorded.shape == (8, 16) and torch.equal(recorded[:4], base.loss_inputs()["input_ids"])
    assert len({tuple(r.tolist()) for r in recorded}) == 8
    plan, plain = search(observed, cfg, progress=False), search(base, AWQConfig.of(**QUICK), progress=False)
    assert plan.metadata["loss_sample"] == {"input_ids": [4, 16]}
    assert plan.scales.keys() == plain.scales.keys() and plan.scales
    assert all(torch.equal(plan.scales[k], plain.scales[k]) for k in plain.scales)
    assert all(wp.info["refine_tokens"] == 8 * 16 for wp in plan.weights.values())
    with pytest.raises(ValueError, match="Refine.samples must be an integer >= 1, got 0"):
        Refine("block", samples=0)


def test_quantize_with_block_refine_counts_its_sequences_in_the_memory_estimate(tmp_path, capsys):
    model_dir = tmp_path / "m"
    save_model_dir(model_dir, "llama")
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--samples", "6", "--seq-len", "16", "--n-grid", "2", "--group-size", "32",
                 "--refine", "block", "--refine-iters", "2", "--refine-samples", "5", "--out", str(out)]) == 0
    estimate = next(line for line in capsys.readouterr().out.splitlines() if "memory estimate" in line)
    assert "refine 0.00 GiB" in estimate  # three streams of 5 x 16 tokens at a block boundary: a few kB here
    saved = AWQPlan.load(out / PLAN_SUBDIR)
    assert saved.config["refine"]["samples"] == 5
    assert all(wp.info["refine_tokens"] == 5 * 16 for wp in saved.weights.values())


def test_block_refine_settings_are_checked():
    assert AWQConfig.of(**QUICK, refine="block").refine == Refine("block")
    with pytest.raises(ConfigError, match="--refine block learns weight rounding against float activations"):
        AWQConfig.of(**QUICK, refine="block", act_bits=8)
    with pytest.raises(ConfigError, match="--refine block refines the searched weights of method awq"):
        AWQConfig(scales=None, clip=None, refine=Refine("block"))
    with pytest.raises(ValueError, match="Refine.iters must be an integer >= 1, got 0"):
        Refine("block", iters=0)
    with pytest.raises(ConfigError, match=r"--refine-lr\) must be a number in \(0, 1\], got 2"):
        Refine("block", lr=2)


def test_block_refine_of_a_bf16_model_keeps_its_dtype_and_lowers_its_error():
    model = build("llama").to(torch.bfloat16)
    gm = awqfx.capture(model)
    cfg = AWQConfig.of(**QUICK)
    observed = prepare(gm, cfg.with_(**BLOCK))
    calibrate(observed, calib_ids(), progress=False)
    plain = search(observed, cfg, progress=False)
    plan = search(observed, cfg.with_(**BLOCK, refine_iters=20), progress=False)
    assert all(b["kept"] for b in plan.metadata["refine_blocks"])
    sample = observed.loss_inputs()["input_ids"]
    fake = apply_plan(model, plan, weights="fake")
    assert {p.dtype for p in fake.parameters()} == {torch.bfloat16}
    assert _logit_error(model, plan, sample) < _logit_error(model, plain, sample)
