"""Weight-activation AWQ (W8A8): the activation quantizer, its graph pass, the searches that score
with it, SmoothQuant, the packed int8 linear and its formats, and the flags."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import build, calib_ids, save_model_dir, token_ids

import awqfx
from awqfx import kernel_choice
from awqfx.act_quant import fake_quantize_activation, quantize_activation
from awqfx.api import AWQConfig, calibrate, convert, prepare, search
from awqfx.app.cli import main
from awqfx.apply import apply_plan
from awqfx.config import ActSpec, ConfigError
from awqfx.export import load_compressed_tensors_qweights, load_quantized, save_quantized
from awqfx.graph import linear_op
from awqfx.int8_linear import Int8Linear
from awqfx.passes.act_quantizers import ActQuantizer, is_act_quantizer
from awqfx.passes.quantize_linears import quantize_linears
from awqfx.plan import AWQPlan
from awqfx.quant import QuantSpec, fake_quantize, quantize_weight
from awqfx.search.clip import search_clip

W8A8 = dict(bits=8, group_size=-1, symmetric=True, act_bits=8)
QUICK_SEARCH = dict(n_grid=4, loss_samples=4, clip="sym", clip_grid=8)


def _plan(model, method: str, **flat):
    gm = awqfx.capture(model)
    cfg = AWQConfig.of(**{**W8A8, **QUICK_SEARCH, "method": method, **flat})
    observed = prepare(gm, cfg)
    if cfg.needs_calibration:
        calibrate(observed, calib_ids(), progress=False)
    return gm, observed, search(observed, cfg, progress=False)


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def planned(request):
    """A tiny model (llama; gpt2: Conv1D/addmm, GELU -> c_proj input scales; qwen2: biases) and its
    W8A8 AWQ plan."""
    model = build(request.param)
    gm, _, plan = _plan(model, "awq")
    return model, gm, plan


# ----------------------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_activation_quantizer_is_dynamic_symmetric_per_token_or_per_tensor(bits):
    x = torch.randn(3, 5, 40) * torch.linspace(0.1, 10, 40)
    qmax = 2 ** (bits - 1) - 1
    q, s = quantize_activation(x, ActSpec(bits, "per-token"))
    want_s = x.abs().amax(-1, keepdim=True) / qmax
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    assert q.dtype == torch.int8 and int(q.abs().max()) == qmax
    assert torch.equal(q.float(), torch.round(x / want_s))
    assert torch.equal(fake_quantize_activation(x, ActSpec(bits)), q * s)
    q_t, s_t = quantize_activation(x, ActSpec(bits, "per-tensor"))
    assert s_t.numel() == 1 and torch.equal(s_t.flatten(), (x.abs().max() / qmax).flatten())
    assert torch.equal(q_t.float(), torch.round(x / s_t))
    # a smoothing factor quantizes x / s and multiplies back: what the folded graph computes
    sm = torch.rand(40) + 0.5
    torch.testing.assert_close(fake_quantize_activation(x, ActSpec(bits), sm),
                               fake_quantize_activation(x / sm, ActSpec(bits)) * sm, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the pass


def test_activation_quantizers_sit_before_every_quantized_linear_and_nowhere_else(planned):
    model, gm, plan = planned
    fake = convert(gm, plan)
    quantizers = [n for n in fake.graph.nodes if is_act_quantizer(fake, n)]
    quantized_linears, float_linears = [], []
    for n in fake.graph.nodes:
        lin = linear_op(fake, n)
        if lin is not None:
            (quantized_linears if lin.weight.name in plan.weights else float_linears).append((n, lin))
    assert quantized_linears and float_linears  # the LM head stays float
    assert len(quantizers) == len(quantized_linears)
    for n, lin in quantized_linears:
        q = lin.data
        assert is_act_quantizer(fake, q), n.name
        assert list(q.users) == [n]
        mod = fake.get_submodule(q.target)
        assert mod.weight == lin.weight.name and mod.spec == ActSpec(8, "per-token") and mod.smooth is None
        assert not is_act_quantizer(fake, q.args[0])
    for n, lin in float_linears:
        assert not is_act_quantizer(fake, lin.data), n.name
    # where an activation group scales a linear's input, the scaled value is what gets quantized
    for w in plan.input_scales:
        (n, lin), = [(n, lin) for n, lin in quantized_linears if lin.weight.name == w]
        scaled = lin.data.args[0]
        assert scaled.op == "call_function" and "awqfx_input_scale" in str(scaled.args[1].target)
    assert bool(plan.input_scales) == (type(model).__name__ == "GPT2LMHeadModel")
    # weight-only plans get no quantizer
    wo = AWQPlan(plan.groups, {k: type(v)(v.spec, v.in_dim, v.max_val, v.min_val) for k, v in plan.weights.items()})
    assert not any(isinstance(m, ActQuantizer) for m in convert(gm, wo).modules())


# ----------------------------------------------------------------------------- packed int8


def test_fake_quant_graph_equals_the_packed_int8_modules(planned):
    model, gm, plan = planned
    fake = convert(gm, plan)
    packed_graph = convert(gm, plan, weights="packed")
    packed_tree = apply_plan(model, plan, weights="packed")
    mods = [m for m in packed_tree.modules() if isinstance(m, Int8Linear)]
    assert len(mods) == len(plan.weights) == sum(isinstance(m, Int8Linear) for m in packed_graph.modules())
    assert not any(isinstance(m, ActQuantizer) for m in packed_graph.modules())  # each module quantizes its input
    fake_tree = apply_plan(model, plan, weights="fake")  # the module tree's quantizers are forward pre-hooks
    ids = token_ids()
    with torch.no_grad():
        want = fake(ids)
        torch.testing.assert_close(packed_graph(ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed_tree(ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fake_tree(ids).logits, want, rtol=1e-5, atol=1e-5)
    # layer by layer on the same input: the int8 matmul is the fake-quantized float one, with the
    # converted graph's weights
    g = torch.Generator().manual_seed(0)
    for name, m in packed_tree.named_modules():
        if isinstance(m, Int8Linear):
            x = torch.randn(2, 7, m.in_features, generator=g) * 3
            w = fake.get_parameter(name + ".weight").detach()
            w = w if plan.weights[name + ".weight"].in_dim == 1 else w.t()  # GPT-2 Conv1D stores [in, out]
            ref = F.linear(fake_quantize_activation(x, m.act), w, m.bias)
            torch.testing.assert_close(m.forward(x), ref, rtol=1e-5, atol=1e-5)  # forward: no input-scale hook


@pytest.mark.parametrize("spec, act", [(QuantSpec(8, -1, True), ActSpec(8)), (QuantSpec(6, -1, True), ActSpec(6)),
                                       (QuantSpec(4, 24, False), ActSpec(8, "per-tensor"))],
                         ids=["w8a8", "w6a6", "w4g24asym-a8tensor"])
def test_int8_linear_multiplies_the_plans_integers(spec, act):
    w, b = torch.randn(40, 56), torch.randn(40)
    qw = quantize_weight(w, spec)
    m = Int8Linear.from_quantized(qw, act, b)
    back = m.quantized_weight()
    assert torch.equal(back.q, qw.q) and torch.equal(back.zero, qw.zero) and torch.equal(back.scale, qw.scale)
    assert m.int_weight.dtype == torch.int8 and (m.weight_zero is None) == spec.symmetric
    x = torch.randn(3, 9, 56)
    ref = F.linear(fake_quantize_activation(x, act), qw.dequantize(), b)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    # the kernel really multiplies quantized activations: float inputs give another result
    assert not torch.allclose(m(x), F.linear(x, qw.dequantize(), b), rtol=1e-4, atol=1e-4)
    assert m.half().weight_scale.dtype == torch.float32


@pytest.mark.parametrize("spec, act", [(QuantSpec(8, -1, True), ActSpec(8)),
                                       (QuantSpec(4, 24, False), ActSpec(8, "per-tensor"))],
                         ids=["w8a8", "w4g24asym-a8tensor"])
def test_the_float_path_multiplies_the_same_integers_from_its_threshold_on(spec, act, monkeypatch):
    """``AWQFX_DENSE_FROM=10``: inputs of 10 rows or more multiply the codes in float32, fewer take
    ``torch._int_mm``; both give ``F.linear(Q(x), dequantized W)`` (float32 summation order apart)."""
    w, b = torch.randn(40, 56), torch.randn(40)
    qw = quantize_weight(w, spec)
    m = Int8Linear.from_quantized(qw, act, b)
    x = torch.randn(3, 9, 56)
    ref = F.linear(fake_quantize_activation(x, act), qw.dequantize(), b)
    int_only, int_first = m(x), m(x[:1])
    monkeypatch.setenv(kernel_choice.ENV_DENSE_FROM, "10")
    m._dense_from = None  # choose again under the new setting
    assert m.dense_from == 10
    assert torch.equal(m(x[:1]), int_first)  # 9 rows: the integer kernel, bit for bit
    dense = m(x)  # 27 rows: the float path
    assert not torch.equal(dense, int_only)  # it really ran
    torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-5)


def test_packed_int8_graph_reexports_and_saves_as_pt2(planned, tmp_path):
    _, gm, plan = planned
    packed = convert(gm, plan, weights="packed")
    ids = token_ids()
    ep = torch.export.export(packed, (ids,), strict=False)
    assert any("awqfx.int8_linear" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    with torch.no_grad():
        assert torch.equal(loaded(ids), packed(ids))


# ----------------------------------------------------------------------------- the searches


def test_scale_search_scores_with_activations_quantized():
    model = build("llama")
    gm = awqfx.capture(model)
    observed = prepare(gm, AWQConfig.of(**W8A8, **QUICK_SEARCH))
    calibrate(observed, calib_ids(), progress=False)
    wo = search(observed, AWQConfig.of(**{**W8A8, "act_bits": None}, **QUICK_SEARCH), progress=False)
    a4 = search(observed, AWQConfig.of(**{**W8A8, "act_bits": 4}, **QUICK_SEARCH), progress=False)
    assert all(wp.act == ActSpec(4) for wp in a4.weights.values())
    assert all(wp.act is None for wp in wo.weights.values())
    # every region loss (RTN's and the chosen scale's) carries the activation error on top
    for g_wo, g_a4 in zip(wo.groups, a4.groups):
        assert g_a4.info["loss_identity"] > 1.5 * g_wo.info["loss_identity"], g_a4.name
        assert g_a4.info["loss"] > g_wo.info["loss"], g_a4.name
    # ... and the search's loss of a candidate is the converted graph's: scored Q(x / s) Q(W s)
    assert any(g.info["choice"] != "identity" for g in a4.groups)


def test_clip_search_minimises_llmcs_loss_with_quantized_activations():
    torch.manual_seed(0)
    w = torch.randn(16, 48)
    x = torch.randn(300, 48) * torch.linspace(0.2, 4, 48)
    act = ActSpec(4)
    xq = fake_quantize_activation(x, act)
    spec = QuantSpec(8, -1, True)
    ratios = [1 - i / 20 for i in range(10)]
    chosen = search_clip(w, x, spec, "sym", ratios, rounds=0, xq=xq)
    mx = w.abs().amax(-1, keepdim=True)
    losses = torch.stack([((xq @ fake_quantize(w, spec, max_val=mx * r, min_val=-mx * r).t() - x @ w.t()) ** 2).mean(0)
                          for r in ratios], -1)  # [rows, ratios]: mean over tokens of (Q(x) Q(w) - x w)^2
    best = torch.tensor(ratios)[losses.argmin(-1)]
    assert torch.equal(chosen.flatten(), best)
    weight_only = search_clip(w, x, spec, "sym", ratios, rounds=0)
    assert not torch.equal(weight_only, chosen)  # the quantized inputs change the choice


def test_smoothquant_scales_equal_the_formula():
    model = build("llama")
    _, observed, plan = _plan(model, "smoothquant", sq_alpha=0.5)
    assert plan.metadata["method"] == "smoothquant" and all(wp.max_val is None for wp in plan.weights.values())
    # max |x| at each linear's input over the calibration tokens, from the float model itself
    x_max = {}

    def hook(name):
        def record(module, args):
            m = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0)
            x_max[name] = m if name not in x_max else torch.maximum(x_max[name], m)
        return record

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for batch in calib_ids().split(AWQConfig().runtime.batch_size):
            model(batch)
    checked = 0
    for gp in plan.groups:
        if gp.group.producer.kind != "norm" and not gp.group.name.endswith("up_proj.weight"):
            continue  # norm -> q,k,v / gate,up and up -> down: consumers no earlier group rescales
        C = gp.group.producer.num_channels
        xm, wm = torch.zeros(C), torch.zeros(C)
        for c in gp.group.consumers:
            owner = c.weight[: -len(".weight")]
            ok = c.columns >= 0
            xm.scatter_reduce_(0, c.columns[ok], x_max[owner][ok], "amax")
            wm.scatter_reduce_(0, c.columns[ok], model.get_parameter(c.weight).detach().abs().amax(0)[ok], "amax")
        want = (xm.sqrt() / wm.clamp(min=1e-5).sqrt()).clamp(min=1e-5)
        torch.testing.assert_close(gp.scale, want, rtol=1e-5, atol=0)
        checked += 1
    assert checked == 6  # 2 layers x (input norm, post-attention norm, up -> down)
    other = search(observed, observed.config.with_(method="smoothquant", sq_alpha=0.8), progress=False)
    assert not torch.allclose(other.groups[0].scale, plan.groups[0].scale)


# ----------------------------------------------------------------------------- formats


def test_native_format_round_trip(tmp_path):
    model = build("llama", tie_word_embeddings=True)
    _, _, plan = _plan(model, "rtn")
    packed = apply_plan(model, plan, weights="packed")
    d = save_quantized(packed, tmp_path / "q", fmt="awqfx")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["modules"] == {} and set(qc["int8_modules"]) == {w[: -len(".weight")] for w in plan.weights}
    entry = next(iter(qc["int8_modules"].values()))
    assert (entry["bits"], entry["group_size"], entry["act_bits"], entry["act_granularity"]) == (8, -1, 8, "per-token")
    stored = load_file(d / "model.safetensors")
    assert stored["model.layers.0.mlp.down_proj.int_weight"].dtype == torch.int8
    loaded = load_quantized(d)
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == len(plan.weights)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, packed(ids).logits)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("granularity", ["per-token", "per-tensor"])
def test_compressed_tensors_int_quantized_loads_with_the_package_and_transformers(tmp_path, granularity):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    model = build("llama")
    _, _, plan = _plan(model, "awq", act_granularity=granularity)
    packed = apply_plan(model, plan, weights="packed")
    d = save_quantized(packed, tmp_path / "ct", fmt="compressed-tensors")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    assert group["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                "strategy": "channel", "dynamic": False}
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                          "strategy": "token" if granularity == "per-token" else "tensor",
                                          "dynamic": True}
    stored = load_file(d / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8

    # 1. the package: its scheme parsed from our config, its decompressor on our tensors
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    scheme = compressor.quantization_config.config_groups["group_0"]
    assert scheme.input_activations.dynamic and scheme.input_activations.num_bits == 8
    config = AutoConfig.from_pretrained(d)
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config).eval()
    apply_quantization_config(fresh, compressor.quantization_config)
    compressor.compress_model(fresh)
    result = fresh.load_state_dict(stored, strict=False)
    assert result.unexpected_keys == []
    compressor.decompress_model(fresh)
    float_model = apply_plan(model, plan, weights="float")
    for fqn, wp in plan.weights.items():
        assert torch.equal(fresh.get_parameter(fqn), plan.quantized_weight(float_model, fqn).dequantize()), fqn
    back = load_compressed_tensors_qweights(d)
    assert set(back) == set(plan.weights)
    for fqn, qw in back.items():
        assert torch.equal(qw.q, plan.quantized_weight(float_model, fqn).q)

    # 2. transformers' loader: our weights, and the activations quantized per token/tensor at run time, with
    #    compressed-tensors' own rounding (max|x| / 127.5, clamped to [-128, 127]; awqfx and vLLM divide by 127)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()

    def ct_activation(module, args):
        x = args[0].float()
        amax = x.abs().amax(-1, keepdim=True) if granularity == "per-token" else x.abs().amax()
        s = amax / 127.5
        return (torch.clamp(torch.round(x / s), -128, 127) * s,)

    emulated = apply_plan(model, plan, weights="float")
    quantize_linears(emulated, plan.weights)
    weight_only = [emulated(token_ids()).logits.detach()]
    for fqn in plan.weights:
        emulated.get_submodule(fqn[: -len(".weight")]).register_forward_pre_hook(ct_activation)
    ids = token_ids()
    with torch.no_grad():
        theirs = hf(ids).logits
        torch.testing.assert_close(theirs, emulated(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(theirs, weight_only[0], rtol=1e-4, atol=1e-4)  # the activations are quantized
        torch.testing.assert_close(theirs, packed(ids).logits, rtol=0.05, atol=0.05)


def test_weight_only_formats_refuse_quantized_activations(tmp_path):
    model = build("llama")
    _, _, plan = _plan(model, "rtn", bits=4, group_size=32, symmetric=False)
    packed = apply_plan(model, plan, weights="packed")
    with pytest.raises(ValueError, match="quantize their input activations.*--format awqfx or compressed-tensors"):
        save_quantized(packed, tmp_path / "a", fmt="autoawq")
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- configuration and CLI


@pytest.mark.parametrize("flat, needle", [
    (dict(act_bits=3), "activation bits (--act-bits) must be an integer from 4 to 8, got 3"),
    (dict(act_bits=9), "from 4 to 8, got 9"),
    (dict(act_bits=8.0), "from 4 to 8, got 8.0"),
    (dict(act_bits=8, act_granularity="per-channel"), "must be one of per-token, per-tensor, got 'per-channel'"),
    (dict(act_granularity="per-tensor"), "'per-tensor' (--act-granularity) needs the activation bits (--act-bits"),
    (dict(method="smoothquant", sq_alpha=1.5), "SmoothQuant alpha (--sq-alpha) must be a number in [0, 1], got 1.5"),
    (dict(method="hqq"), "method must be one of 'awq', 'rtn', 'smoothquant', 'gptq', got 'hqq'"),
])
def test_bad_values_raise_config_error(flat, needle):
    with pytest.raises(ConfigError) as e:
        AWQConfig.of(**flat)
    assert needle in str(e.value)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    save_model_dir(path, "llama")
    return path


CLI_QUICK = ["--samples", "4", "--seq-len", "16", "--quiet", "--n-grid", "4", "--clip-grid", "4"]


@pytest.mark.parametrize("flags, needle", [
    (["--act-bits", "12"], "--act-bits) must be an integer from 4 to 8, got 12"),
    (["--act-granularity", "per-tensor"], "needs the activation bits (--act-bits"),
    (["--act-bits", "8", "--format", "autoawq"], "quantize their input activations (--act-bits)"),
    (["--act-bits", "8", "--mode", "sequential"], "--mode sequential) it is not supported"),
])
def test_quantize_refuses_bad_activation_flags_before_work(flags, needle, tiny_dir, tmp_path, capsys, no_calibration):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--out", str(out)] + flags + CLI_QUICK) == 2
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("awqfx")]  # not transformers' progress bars
    assert len(messages) == 1 and messages[0].startswith("awqfx: error: ") and needle in messages[0]
    assert "Traceback" not in err and not out.exists()


def test_eval_compares_fp_rtn_smoothquant_and_awq_at_w8a8(tiny_dir, tmp_path, capsys):
    res_file = tmp_path / "r.json"
    assert main(["eval", str(tiny_dir), "--methods", "fp,rtn,smoothquant,awq", "--act-bits", "8", "--max-windows", "2",
                 "--json", str(res_file)] + CLI_QUICK) == 0
    out = capsys.readouterr().out
    assert "activations 8-bit per-token" in out and "W8A8" in out
    res = json.loads(res_file.read_text())
    assert [r["method"] for r in res["rows"]] == ["fp", "rtn", "smoothquant", "awq"]
    assert res["group_size"] == -1 and all(r["bits"] == 8 for r in res["rows"][1:])
    assert all(r["act_bits"] == 8 for r in res["rows"][1:])
    ppl = {r["method"]: r["ppl"] for r in res["rows"]}
    assert len(set(ppl.values())) == 4  # four different models
    assert main(["eval", str(tiny_dir), "--methods", "fp,smoothquant", "--sq-alpha", "2"] + CLI_QUICK) == 2
    assert "--sq-alpha) must be a number in [0, 1], got 2.0" in capsys.readouterr().err


def test_quantize_w8a8_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--out", str(out), "--act-bits", "8", "--format", "compressed-tensors",
                 "--eval", "-", "--eval-windows", "1"] + CLI_QUICK) == 0
    text = capsys.readouterr().out
    assert "quantized activations" in text and "8-bit per-token" in text
    assert "8-bit, group -1, symmetric" in text
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    plan = AWQPlan.load(out / "awq_plan")
    assert all(wp.act == ActSpec(8) and wp.spec == QuantSpec(8, -1, True) for wp in plan.weights.values())
    assert plan.config["clip"]["mode"] == "sym"
