"""The model's own precision, end to end: loading (``--dtype``), the pass on a bf16 model (fold,
search, fake quantization in float32, cast back once), and what each format saves for a bf16 model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import build, calib_ids, char_tokenizer, token_ids

import awqfx
from awqfx.api import AWQConfig, apply_awq_pass, calibrate, prepare, search
from awqfx.app import assets
from awqfx.app.cli import main
from awqfx.apply import apply_plan, deepcopy_module
from awqfx.export import load_quantized, save_quantized
from awqfx.graph import shallow_copy
from awqfx.params import along, column_scale, fake_quantize_param, full_scale, get_param
from awqfx.passes.discover import discover
from awqfx.passes.fold import fold_scales
from awqfx.quant import QuantSpec, fake_quantize
from awqfx.search.scales import candidate_weight

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = torch.bfloat16
CFG = AWQConfig.of(bits=4, group_size=16, n_grid=4, clip_grid=4, clip_rounds=1, loss_samples=4)
# the packed tensors of each format: everything else a saved model holds is the model's own float data
PACKED = {"qweight", "qzeros", "scales", "weight_packed", "weight_zero_point", "weight_shape", "weight_scale",
          "awqfx_input_scale"}


def _bf16(arch: str, **overrides) -> torch.nn.Module:
    return build(arch, **overrides).to(BF16)


def _plan(model: torch.nn.Module, cfg: AWQConfig = CFG):
    obs = prepare(awqfx.capture(model), cfg)
    calibrate(obs, calib_ids(), progress=False)
    return search(obs, cfg, progress=False)


@pytest.fixture(scope="module")
def llama16():
    """``(float32 graph, bf16 graph)`` of the same tiny llama."""
    return awqfx.capture(build("llama")), awqfx.capture(_bf16("llama"))


@pytest.fixture(scope="module")
def qwen16():
    """A bf16 tiny qwen2 (q/k/v biases) and its packed AWQ version."""
    model = _bf16("qwen2")
    return model, apply_plan(model, _plan(model), weights="packed", backend="dequant")


def _float_dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()}


def _stored_dtypes(path) -> dict[str, str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}


# ----------------------------------------------------------------------------- loading


def _save_dir(path, dtype: torch.dtype = BF16, config_key: str | None = "dtype"):
    """A tiny llama checkpoint stored in ``dtype``; ``config_key`` names its precision in config.json
    (``"dtype"``, ``"torch_dtype"``, or None for neither)."""
    build("llama").to(dtype).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    name = cfg.pop("dtype", None) or cfg.pop("torch_dtype", None)
    assert name == str(dtype).removeprefix("torch.")
    if config_key:
        cfg[config_key] = name
    cfg_file.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("key, want", [("dtype", BF16), ("torch_dtype", BF16), (None, torch.float32)])
def test_auto_loads_the_checkpoint_dtype(tmp_path, key, want):
    d = _save_dir(tmp_path / "m", config_key=key)
    assert assets.checkpoint_dtype(d) == want
    model, _ = assets.load_model(d)  # auto
    assert {p.dtype for p in model.parameters()} == {want}
    model, _ = assets.load_model(d, "float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_resolve_dtype(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert assets.resolve_dtype(gguf, "auto") == torch.float32  # dequantized to float32
    assert assets.resolve_dtype(gguf, "bfloat16") == BF16
    assert assets.resolve_dtype(gguf, torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        assets.resolve_dtype(gguf, "int8")


# ----------------------------------------------------------------------------- the pass on bf16


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: an activation group (GELU -> c_proj input scale)
@pytest.mark.parametrize("weights", ["fake", "packed"])
def test_awq_pass_keeps_the_model_dtype(arch, weights, llama16):
    """No float tensor of the result is float32 unless it was (packed layers' quantizer scales aside)."""
    gm = llama16[1] if arch == "llama" else awqfx.capture(_bf16(arch))
    before = _float_dtypes(gm)
    q = apply_awq_pass(gm, calib_ids(), CFG, progress=False, weights=weights)
    plan = q.meta["awqfx_plan"]
    assert plan.groups and all(torch.isfinite(torch.tensor(g.info["losses"])).all() for g in plan.groups)
    after = _float_dtypes(q)
    for name, dt in after.items():
        if name in before:
            assert dt == before[name], name
        elif name.endswith(".scales"):  # QuantLinear: the quantizer's float32 scales
            assert weights == "packed" and dt == torch.float32, name
        elif name.endswith(".bias"):  # a packed linear's bias
            assert weights == "packed" and dt == BF16, name
        else:  # an activation group's inserted input scale
            assert name.startswith("awqfx_input_scale_") and dt == BF16, name
    if arch == "gpt2":
        assert any(n.startswith("awqfx_input_scale_") for n in after)
    with torch.no_grad():
        out = q(token_ids())
    assert out.dtype == BF16 and torch.isfinite(out.float()).all()


def _random_scales(groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(grp.channels.numel(), generator=g) * 1.5 + 0.5 for grp in groups]  # in [0.5, 2]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fold_of_random_scales_on_bf16_is_exact_up_to_bf16_rounding(arch, llama16):
    """The fold computes ``w * s`` in float64 and rounds once to bf16: the logits move by no more
    than bf16 rounding itself moves them (measured against the float32 model)."""
    gm32, gm = llama16 if arch == "llama" else (awqfx.capture(build(arch)), awqfx.capture(_bf16(arch)))
    groups = discover(gm).groups
    scales = _random_scales(groups)
    folded = fold_scales(deepcopy_module(gm), groups, scales)
    ids = token_ids()
    with torch.no_grad():
        ref32, ref, got = gm32(ids), gm(ids).float(), folded(ids).float()
    bf16_err = (ref - ref32).abs().max()
    assert 0 < (got - ref).abs().max() <= 2 * bf16_err
    # one group's consumer weight: exactly the float64 product rounded once to bf16
    grp, s = groups[0], scales[0]
    one = fold_scales(shallow_copy(gm), [grp], [s])
    c = grp.consumers[0]
    w = get_param(gm, c.weight)
    want = (w.double() * along(column_scale(c.columns, full_scale(grp, s).double()), c.in_dim, w.dim())).to(BF16)
    assert get_param(one, c.weight).dtype == BF16 and torch.equal(get_param(one, c.weight), want)


def test_fake_quantization_computes_in_float32_and_casts_back_once():
    w = torch.randn(8, 48).to(BF16)
    spec = QuantSpec(4, 16)
    q = fake_quantize(w, spec)
    assert q.dtype == BF16 and torch.equal(q, fake_quantize(w.float(), spec).to(BF16))
    assert torch.equal(fake_quantize_param(w.t(), 0, spec), q.t())


def test_search_candidate_quantizes_the_weight_the_fold_stores(llama16):
    """On bf16, ``W diag(s)`` is rounded to bf16 (as the fold stores it) before quantization."""
    gm = llama16[1]
    grp = discover(gm).groups[0]
    c = grp.consumers[0]
    w = get_param(gm, c.weight)
    s_full = full_scale(grp, _random_scales([grp])[0])
    cand = candidate_weight(w, c, s_full, QuantSpec(4, 16))
    folded = fold_scales(shallow_copy(gm), [grp], [s_full])
    cs = along(column_scale(c.columns, s_full), c.in_dim, w.dim())
    want = (fake_quantize_param(get_param(folded, c.weight), c.in_dim, QuantSpec(4, 16)).float() / cs).to(BF16)
    assert cand.dtype == BF16 and torch.equal(cand, want)


def test_search_on_bf16_gives_finite_losses_close_to_float32(llama16):
    plan32, plan16 = (_plan(gm) for gm in llama16)
    for g16, g32 in zip(plan16.groups, plan32.groups):
        losses = torch.tensor(g16.info["losses"])
        assert torch.isfinite(losses).all() and g16.info["loss"] <= g16.info["loss_identity"]
        assert g16.info["loss_identity"] == pytest.approx(g32.info["loss_identity"], rel=0.2)
    assert all(torch.isfinite(wp.max_val).all() for wp in plan16.weights.values() if wp.max_val is not None)


def test_auto_compute_dtype_leaves_a_bf16_model_alone(monkeypatch):
    """'auto' autocasts only a float32 model, even where the hardware has fast bf16."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    cfg = AWQConfig()
    assert cfg.resolved_dtype("calib", "cpu", torch.float32) == "bfloat16"
    for dt in (BF16, torch.float16):
        assert cfg.resolved_dtype("calib", "cpu", dt) is None and cfg.resolved_dtype("search", "cpu", dt) is None


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt, scale_key, scale_dtype", [
    ("awqfx", "scales", "F32"),  # native: the quantizer's exact float32 scales
    ("autoawq", "scales", "F16"),  # AutoAWQ GEMM / its kernels: float16 scales
    ("compressed-tensors", "weight_scale", "BF16"),  # compressed-tensors: the weight's own dtype
])
def test_saved_bf16_model_keeps_bf16_for_every_unquantized_tensor(tmp_path, fmt, scale_key, scale_dtype, qwen16):
    packed = qwen16[1]
    d = save_quantized(packed, tmp_path / "q", fmt=fmt)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    stored = _stored_dtypes(d)
    rest = {k: v for k, v in stored.items() if k.rsplit(".", 1)[-1] not in PACKED}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight"} <= set(rest)
    assert set(rest.values()) == {"BF16"}, {k: v for k, v in rest.items() if v != "BF16"}
    assert {v for k, v in stored.items() if k.endswith("." + scale_key)} == {scale_dtype}


def test_bf16_native_round_trip_with_input_scales_is_exact(tmp_path):
    model = _bf16("gpt2")
    packed = apply_plan(model, _plan(model), weights="packed", backend="dequant")
    d = save_quantized(packed, tmp_path / "q")
    stored = _stored_dtypes(d)
    assert {v for k, v in stored.items() if k.endswith(".awqfx_input_scale")} == {"F32"}
    assert {v for k, v in stored.items() if k.endswith(".bias") or k.endswith("ln_f.weight")} == {"BF16"}
    loaded = load_quantized(d, backend="dequant")
    assert set(_float_dtypes(loaded).values()) == {BF16, torch.float32}  # float32: QuantLinear scales only
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, packed(ids).logits)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_compressed_tensors_bf16_scales_decompress_with_the_package(tmp_path, qwen16):
    """compressed-tensors gives ``weight_scale`` the weight's dtype and dequantizes in it: the package
    reads our bf16 export back to ``(q - zero) * scale`` in bf16, and transformers loads it."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from awqfx.export import load_compressed_tensors_qweights

    packed = qwen16[1]
    d = save_quantized(packed, tmp_path / "ct", fmt="compressed-tensors")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    stored = safe_open(str(d / "model.safetensors"), "pt")
    for fqn, qw in load_compressed_tensors_qweights(d).items():
        p = fqn[: -len(".weight")]
        local = {k: stored.get_tensor(f"{p}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                           "weight_shape")}
        w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        scale = local["weight_scale"]
        assert w.dtype == scale.dtype == BF16
        want = ((qw.q.to(BF16) - qw.zero.to(BF16).repeat_interleave(16, -1)) * scale.repeat_interleave(16, -1))
        assert torch.equal(w, want), fqn
        assert torch.equal(qw.scale, scale.float())
    hf = AutoModelForCausalLM.from_pretrained(d, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert hf.model.embed_tokens.weight.dtype == BF16
    ids = token_ids()
    with torch.no_grad():
        got, ours = hf(ids).logits.float(), packed(ids).logits.float()
    assert (got - ours).abs().max() <= 0.05 * ours.abs().max()  # bf16 scales and bf16 dequant arithmetic


# ----------------------------------------------------------------------------- CLI


QUICK = ["--samples", "4", "--seq-len", "16", "--quiet", "--n-grid", "4", "--group-size", "32"]


@pytest.mark.parametrize("flag, want", [(None, "bfloat16"), ("float32", "float32")])
def test_cli_quantize_dtype(tmp_path, capsys, flag, want):
    src, out = _save_dir(tmp_path / "m"), tmp_path / "q"
    argv = ["quantize", str(src), "--out", str(out), "--method", "rtn", "--mode", "whole"] + QUICK + (
        ["--dtype", flag] if flag else [])
    assert main(argv) == 0
    assert f"torch.{want}, in memory" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == want
    assert _stored_dtypes(out)["model.embed_tokens.weight"] == {"bfloat16": "BF16", "float32": "F32"}[want]


@pytest.mark.parametrize("fast", [True, False])
def test_quantize_eval_of_bf16_runs_in_float32_where_bf16_matmuls_are_slow(tmp_path, capsys, monkeypatch, fast):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: fast)
    src, out = _save_dir(tmp_path / "m"), tmp_path / "q"
    assert main(["quantize", str(src), "--out", str(out), "--method", "rtn", "--mode", "whole", "--eval", "-",
                 "--eval-windows", "1"] + QUICK) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "perplexity before" in ln)
    assert ("computed in torch.float32" in line) == (not fast)
    assert _stored_dtypes(out)["model.embed_tokens.weight"] == "BF16"  # the output keeps bf16 either way


def test_cli_eval_dtype(tmp_path):
    src, js = _save_dir(tmp_path / "m"), tmp_path / "r.json"
    assert main(["eval", str(src), "--bits", "4", "--methods", "fp,rtn", "--max-windows", "2", "--json", str(js)]
                + QUICK) == 0
    fp = json.loads(js.read_text())["rows"][0]
    assert (fp["method"], fp["bits"]) == ("fp", 16)  # auto: the checkpoint's bf16 (float32 gives 32, test_cli)


@pytest.mark.parametrize("fast", [True, False])
def test_warns_when_the_cpu_has_no_native_half_matmuls(monkeypatch, caplog, fast):
    from awqfx.app.jobs import warn_if_half_is_slow

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: fast)
    with caplog.at_level("WARNING", logger="awqfx.app.jobs"):
        warn_if_half_is_slow(torch.nn.Linear(2, 2).to(BF16), None)
        warn_if_half_is_slow(torch.nn.Linear(2, 2).to(BF16), "cuda")
        warn_if_half_is_slow(torch.nn.Linear(2, 2), None)
    assert [r.getMessage().startswith("this CPU") for r in caplog.records] == ([] if fast else [True])
    assert fast or "no native bfloat16 matmuls" in caplog.text
