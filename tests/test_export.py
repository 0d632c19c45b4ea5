"""pack_model (module surgery) and the three on-disk formats of awqfx.export."""

from __future__ import annotations

import copy
import errno
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import build, token_ids
from torch import nn

from awqfx.config import ActSpec
from awqfx.export import (
    PLAN_SUBDIR,
    QuantizedFileError,
    load_autoawq_qweights,
    load_compressed_tensors_qweights,
    load_quantized,
    save_quantized,
)
from awqfx.formats import load_written
from awqfx.int8_linear import Int8Linear, pack_int8_model
from awqfx.modules import QuantLinear
from awqfx.packed_model import fp_weight_bytes, pack_model, packed_weight_bytes, quantized_weight_of
from awqfx.quant import QuantizedWeight, QuantSpec, quantize_weight

ASYM4 = QuantSpec(bits=4, group_size=32, symmetric=False)


# ----------------------------------------------------------------------------- helpers


def _is_transposed(module: nn.Module) -> bool:
    # The test knows GPT-2's Conv1D stores [in, out]; the library is told through in_dims.
    return type(module).__name__ == "Conv1D"


def _quantize_all(model: nn.Module, spec: QuantSpec) -> tuple[dict[str, QuantizedWeight], dict[str, int]]:
    """RTN-quantize every 2-D linear-like weight except lm_head; weights given as [out, in]."""
    qws, in_dims = {}, {}
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        if w is None or w.dim() != 2 or isinstance(mod, nn.Embedding) or name == "lm_head":
            continue
        fqn = f"{name}.weight"
        in_dims[fqn] = 0 if _is_transposed(mod) else 1
        qws[fqn] = quantize_weight(w.detach().t() if in_dims[fqn] == 0 else w.detach(), spec)
    return qws, in_dims


def _fake_quant_reference(model: nn.Module, qws, in_dims) -> nn.Module:
    """The same model with each weight replaced by its dequantized value (plain float layers)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, qw in qws.items():
            w = qw.dequantize()
            ref.get_parameter(fqn).copy_(w.t() if in_dims[fqn] == 0 else w)
    return ref


def _packed(arch: str, spec: QuantSpec = ASYM4, backend: str = "dequant", **cfg):
    model = build(arch, **cfg)
    qws, in_dims = _quantize_all(model, spec)
    ref = _fake_quant_reference(model, qws, in_dims)
    pack_model(model, qws, in_dims, backend=backend)
    return model, ref, qws


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids()).logits


def _listing(d) -> list[str]:
    return sorted(os.listdir(d))


# ----------------------------------------------------------------------------- pack_model + native


PACK_CASES = [
    ("llama", QuantSpec(4, 32, False)),
    ("llama", QuantSpec(3, 32, False)),
    ("llama", QuantSpec(8, 32, True)),
    ("llama", QuantSpec(4, 48, False)),  # hidden 64: ragged last group (48 + 16)
    ("gpt2", QuantSpec(4, 32, False)),  # Conv1D, in_dim 0, tied lm_head
]


@pytest.mark.parametrize("arch,spec", PACK_CASES, ids=["llama-w4g32", "llama-w3g32", "llama-w8g32sym", "llama-w4g48ragged", "gpt2-w4g32"])
def test_pack_model_and_native_roundtrip(tmp_path, arch, spec):
    model, ref, qws = _packed(arch, spec, tie_word_embeddings=True)
    n_q = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_q == len(qws) > 0
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tie kept

    out = _logits(model)
    torch.testing.assert_close(out, _logits(ref), rtol=1e-5, atol=1e-5)
    ids = token_ids(batch=1, seq=6)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, use_cache=True)
    assert gen.shape == (1, 11)

    assert packed_weight_bytes(model, include_unquantized=False) < fp_weight_bytes(model, torch.float32, False) / 3
    assert fp_weight_bytes(model, torch.float32) == fp_weight_bytes(ref, torch.float32) == packed_weight_bytes(ref)

    d = save_quantized(model, tmp_path / "q", fmt="awqfx")
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "awqfx" and qc["format_version"] == 1
    assert set(qc["modules"]) == {k[: -len(".weight")] for k in qws}
    entry = next(iter(qc["modules"].values()))
    assert set(entry) == {"bits", "group_size", "symmetric", "in_features", "out_features", "bias"}
    assert (entry["bits"], entry["group_size"], entry["symmetric"]) == (spec.bits, spec.group_size, spec.symmetric)
    stored = load_file(d / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied: saved once
    prefix = next(iter(qc["modules"]))
    assert {f"{prefix}.{n}" for n in ("qweight", "scales", "qzeros")} <= set(stored)

    loaded = load_quantized(d, backend="dequant")
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert torch.equal(_logits(loaded), out)
    for fqn, qw in qws.items():
        m = loaded.get_submodule(fqn[: -len(".weight")])
        assert isinstance(m, QuantLinear)
        assert torch.equal(m.dequantize_weight(), qw.dequantize())


def test_bf16_model_roundtrip(tmp_path):
    model, _, qws = _packed("llama", tie_word_embeddings=True, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    d = save_quantized(model, tmp_path / "q")
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_quantized(d, backend="dequant")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(_logits(loaded), _logits(model))
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.scales.dtype == torch.float32  # exact scales, not rounded to bf16
    assert torch.equal(q.dequantize_weight(), qws["model.layers.0.self_attn.q_proj.weight"].dequantize())


def test_load_with_int4_backend(tmp_path):
    model, ref, _ = _packed("llama", QuantSpec(4, 32, False))
    d = save_quantized(model, tmp_path / "q")
    loaded = load_quantized(d)  # backend auto
    backends = {m.active_backend for m in loaded.modules() if isinstance(m, QuantLinear)}
    # every linear of the tiny llama fits the CPU int4 kernel (4 bits, group 32, out % 16 == 0)
    assert backends == {"int4pack" if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else "dequant"}
    # bf16 activations in the int4 kernel: loose tolerance
    torch.testing.assert_close(_logits(loaded), _logits(ref), rtol=0.05, atol=0.05)


def test_pack_model_refusals():
    moe = build("mixtral")
    expert = next(n for n, p in moe.named_parameters() if p.dim() == 3)
    with pytest.raises(ValueError, match="3-D"):
        pack_model(moe, {expert: quantize_weight(moe.get_parameter(expert).detach(), ASYM4)})

    tied = build("llama", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied"):
        pack_model(tied, {"lm_head.weight": quantize_weight(tied.lm_head.weight.detach(), ASYM4)})
    assert isinstance(tied.lm_head, nn.Linear)

    gpt2 = build("gpt2")
    w = gpt2.transformer.h[0].mlp.c_fc.weight.detach()  # Conv1D [in=64, out=256]
    with pytest.raises(ValueError, match=r"in_dims\['transformer.h.0.mlp.c_fc.weight'\] = 0"):  # forgot in_dims
        pack_model(gpt2, {"transformer.h.0.mlp.c_fc.weight": quantize_weight(w, ASYM4)})
    sq = gpt2.transformer.h[0].attn.c_proj.weight.detach()  # square Conv1D: only the probe can tell
    with pytest.raises(ValueError, match="forward is not"):
        pack_model(gpt2, {"transformer.h.0.attn.c_proj.weight": quantize_weight(sq, ASYM4)},
                   in_dims={"transformer.h.0.attn.c_proj.weight": 1})
    assert not any(isinstance(m, QuantLinear) for m in gpt2.modules())  # nothing half-done


# ----------------------------------------------------------------------------- AutoAWQ GEMM


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _ref_unpack_awq(words: torch.Tensor, cols: int) -> torch.Tensor:
    """Written from the documented layout: nibble k of word j holds column 8j + order[k]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(words.shape[0], cols, dtype=torch.int64)
    for k in range(8):
        out[:, AWQ_ORDER[k]::8] = (w >> (4 * k)) & 0xF
    return out


@pytest.mark.parametrize("symmetric", [False, True])
def test_autoawq_export_matches_reference_unpacker(tmp_path, symmetric):
    model, _, qws = _packed("llama", QuantSpec(4, 32, symmetric), tie_word_embeddings=True)
    d = save_quantized(model, tmp_path / "awq", fmt="autoawq")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
                  "modules_to_not_convert": ["lm_head"]}
    t = load_file(d / "model.safetensors")
    assert "lm_head.weight" not in t and "model.embed_tokens.weight" in t
    for fqn, qw in qws.items():
        p = fqn[: -len(".weight")]
        out_f, in_f = qw.shape
        qweight, qzeros, scales = t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"]
        assert qweight.dtype == torch.int32 and qweight.shape == (in_f, out_f // 8)
        assert qzeros.dtype == torch.int32 and qzeros.shape == (in_f // 32, out_f // 8)
        assert scales.dtype == torch.float16 and scales.shape == (in_f // 32, out_f)
        q = _ref_unpack_awq(qweight, out_f)  # [in, out]
        z = _ref_unpack_awq(qzeros, out_f).repeat_interleave(32, dim=0)  # [in, out]
        s = scales.float().repeat_interleave(32, dim=0)
        w_ref = ((q - z).float() * s).t()
        ours = QuantizedWeight(qw.q, qw.scale.half().float(), qw.zero, qw.spec, qw.shape).dequantize()
        assert torch.equal(w_ref, ours)
        if symmetric:
            assert bool((z == 8).all())
    back = load_autoawq_qweights(d)
    assert set(back) == set(qws)
    for fqn, qw in back.items():
        assert torch.equal(qw.q, qws[fqn].q)


def test_autoawq_config_is_what_transformers_reads(tmp_path):
    from transformers import AwqConfig

    model, _, _ = _packed("llama", QuantSpec(4, 32, False))
    model.to(torch.bfloat16)
    d = save_quantized(model, tmp_path / "awq", fmt="autoawq")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    parsed = AwqConfig.from_dict(qc)  # transformers' AWQ integration
    assert (str(parsed.quant_method.value), parsed.bits, parsed.group_size, parsed.zero_point, str(parsed.format)) == (
        "awq", 4, 32, True, "gemm")
    assert parsed.modules_to_not_convert == ["lm_head"]
    # vLLM's AWQConfig.from_config: bits | w_bit, group_size | q_group_size, zero_point, modules_to_not_convert
    assert {"bits", "group_size", "zero_point", "modules_to_not_convert"} <= set(qc)
    stored = load_file(d / "model.safetensors")
    assert {t.dtype for k, t in stored.items() if k.endswith(".scales")} == {torch.float16}
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["model.norm.weight"].dtype == torch.bfloat16


def test_autoawq_refusals(tmp_path):
    ragged, _, _ = _packed("llama", QuantSpec(4, 48, False))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*ragged.*--group-size 32.*awqfx"):
        save_quantized(ragged, tmp_path / "a", fmt="autoawq")
    three, _, _ = _packed("llama", QuantSpec(3, 32, False))
    with pytest.raises(ValueError, match="4-bit"):
        save_quantized(three, tmp_path / "b", fmt="autoawq")
    conv, _, _ = _packed("gpt2")
    with pytest.raises(ValueError, match="Conv1D"):
        save_quantized(conv, tmp_path / "c", fmt="autoawq")
    assert _listing(tmp_path) == []  # refused before writing anything


# ----------------------------------------------------------------------------- compressed-tensors


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(8, 32, True)], ids=["w4asym", "w8sym"])
def test_compressed_tensors_export_decompresses_with_the_package(tmp_path, spec):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    model, _, qws = _packed("llama", spec, tie_word_embeddings=True)
    ours = _logits(model)
    d = save_quantized(model, tmp_path / "ct", fmt="compressed-tensors")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    stored = load_file(d / "model.safetensors")

    # 1. model-level decompression with the package: fresh float model from the same config,
    #    its quantization lifecycle applied, our tensors loaded, ModelCompressor.decompress_model.
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    config = AutoConfig.from_pretrained(d)
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config).eval()
    apply_quantization_config(fresh, compressor.quantization_config)
    compressor.compress_model(fresh)  # allocates weight_packed / weight_zero_point in their packed shapes
    result = fresh.load_state_dict(stored, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied
    compressor.decompress_model(fresh)
    fresh.tie_weights()
    for fqn, qw in qws.items():
        assert torch.equal(fresh.get_parameter(fqn), qw.dequantize()), fqn
    torch.testing.assert_close(_logits(fresh), ours, rtol=1e-5, atol=1e-5)

    # 2. the package's own compressor, fed our dequantized weights and qparams, writes the same bytes
    scheme = compressor.quantization_config.config_groups["group_0"]
    for fqn, qw in qws.items():
        p = fqn[: -len(".weight")]
        sd = {"weight": qw.dequantize(), "weight_scale": qw.scale}
        if not spec.symmetric:
            sd["weight_zero_point"] = (qw.zero - (1 << (spec.bits - 1))).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(sd, scheme)
        assert set(theirs) == {k[len(p) + 1:] for k in stored if k.startswith(p + ".")}
        for k, v in theirs.items():
            assert torch.equal(stored[f"{p}.{k}"], v), (p, k)

    # 3. transformers' loader (dequantize=True decompresses with compressed-tensors while loading)
    hf = AutoModelForCausalLM.from_pretrained(d, quantization_config=CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(_logits(hf), ours, rtol=1e-5, atol=1e-5)

    back = load_compressed_tensors_qweights(d)
    assert set(back) == set(qws)
    for fqn, qw in back.items():
        assert torch.equal(qw.dequantize(), qws[fqn].dequantize())


@pytest.mark.parametrize("act", [None, ActSpec(8, "per-token")], ids=["pack-quantized", "int-quantized"])
def test_compressed_tensors_loads_back_as_the_packed_model(tmp_path, act):
    """The format's reader (what ``--eval`` of a block-by-block run evaluates) rebuilds the packed
    model: qwen2's linear biases kept, W8A8 int-quantized layers as ``Int8Linear`` quantizing their inputs."""
    model = build("qwen2")
    qws, in_dims = _quantize_all(model, ASYM4 if act is None else QuantSpec(8, -1, True))
    if act is None:
        pack_model(model, qws, in_dims)
    else:
        pack_int8_model(model, qws, {fqn: act for fqn in qws}, in_dims)
    d = save_quantized(model, tmp_path / "ct", fmt="compressed-tensors")
    loaded = load_written("compressed-tensors", d, torch.float32)
    packed_type = QuantLinear if act is None else Int8Linear
    assert sorted(f"{n}.weight" for n, m in loaded.named_modules() if isinstance(m, packed_type)) == sorted(qws)
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.equal(_logits(loaded), _logits(model))


def test_compressed_tensors_reader_refuses_a_config_that_does_not_match_the_file(tmp_path):
    model, _, _ = _packed("llama")
    d = save_quantized(model, tmp_path / "ct", fmt="compressed-tensors")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(QuantizedFileError, match=r"does not match.*mlp.up_proj \(\[out, in\] = \[96, 64\]\) is not an"):
        load_written("compressed-tensors", d, torch.float32)


def test_compressed_tensors_refuses_ragged_groups(tmp_path):
    ragged, _, _ = _packed("llama", QuantSpec(4, 48, False))
    with pytest.raises(ValueError, match=r"compressed-tensors.*ragged.*awqfx"):
        save_quantized(ragged, tmp_path / "ct", fmt="compressed-tensors")
    assert _listing(tmp_path) == []


# ----------------------------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path):
    model, _, _ = _packed("llama")
    return save_quantized(model, tmp_path / "q")


def test_truncated_or_corrupt_safetensors(saved):
    f = saved / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(QuantizedFileError, match=r"model\.safetensors is corrupt or truncated"):
        load_quantized(saved)
    with open(f, "r+b") as fh:
        fh.truncate(4)
    with pytest.raises(QuantizedFileError, match="corrupt or truncated"):
        load_quantized(saved)


def test_config_that_does_not_match_the_file(saved):
    cfg_file = saved / "config.json"
    original = cfg_file.read_text()
    cfg = json.loads(original)
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.down_proj"]["group_size"] = 16
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(QuantizedFileError, match=r"does not match this model/config.*down_proj\.scales"):
        load_quantized(saved)

    cfg = json.loads(original)
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.down_proj"]["in_features"] = 128
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(QuantizedFileError, match=r"does not match this model/config.*down_proj"):
        load_quantized(saved)

    cfg = json.loads(original)
    cfg["intermediate_size"] = 128  # the architecture itself no longer matches the tensors
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(QuantizedFileError, match="does not match this model/config"):
        load_quantized(saved)

    cfg = json.loads(original)
    cfg["quantization_config"]["format_version"] = 99
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(QuantizedFileError, match="format_version 99"):
        load_quantized(saved)
    cfg_file.write_text(original)
    load_quantized(saved)  # restored: loads again


def test_missing_and_unexpected_tensors(saved):
    f = saved / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.k_proj.qzeros"]
    tensors["model.layers.1.extra"] = torch.zeros(3)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(QuantizedFileError, match=r"missing tensors.*k_proj\.qzeros.*unexpected tensor model\.layers\.1\.extra"):
        load_quantized(saved)


def test_missing_files(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(QuantizedFileError, match=r"model\.safetensors is missing"):
        load_quantized(saved)
    (saved / "config.json").unlink()
    with pytest.raises(QuantizedFileError, match=r"config\.json is missing"):
        load_quantized(saved)
    with pytest.raises(QuantizedFileError, match="no such"):
        load_quantized(tmp_path / "nope")


def test_load_quantized_names_a_foreign_format(tmp_path):
    model, _, _ = _packed("llama")
    d = save_quantized(model, tmp_path / "awq", fmt="autoawq")
    with pytest.raises(QuantizedFileError, match="AutoAWQ export"):
        load_quantized(d)


# ----------------------------------------------------------------------------- save behaviour


def test_existing_out_dir_and_overwrite(tmp_path):
    model, _, _ = _packed("llama")
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_quantized(model, out)
    assert _listing(out) == ["stale.txt"]
    save_quantized(model, out, overwrite=True)
    assert "stale.txt" not in _listing(out) and "model.safetensors" in _listing(out)
    assert _listing(tmp_path) == ["q"]  # no temp or backup dirs left


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, exc, overwrite):
    model, _, _ = _packed("llama")
    out = tmp_path / "q"
    if overwrite:
        out.mkdir()
        (out / "keep.txt").write_text("previous export")

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:  # a partial file, as a real failed write leaves
            fh.write(b"\0" * 100)
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(type(exc)) as info:
        save_quantized(model, out, fmt="compressed-tensors", overwrite=overwrite)
    if isinstance(exc, OSError):
        assert info.value.errno == errno.ENOSPC
    if overwrite:
        assert _listing(tmp_path) == ["q"] and _listing(out) == ["keep.txt"]  # old export untouched
    else:
        assert _listing(tmp_path) == []


def test_tokenizer_and_plan_are_copied(tmp_path):
    model, _, _ = _packed("llama")

    class Tok:
        def save_pretrained(self, d):
            with open(os.path.join(d, "tokenizer.json"), "w") as fh:
                fh.write("{}")

    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "plan.json").write_text("{}")
    (plan / "plan.safetensors").write_bytes(b"x")
    d = save_quantized(model, tmp_path / "q", tokenizer=Tok(), plan_dir=plan)
    assert {"config.json", "model.safetensors", "tokenizer.json", PLAN_SUBDIR} <= set(_listing(d))
    assert _listing(d / PLAN_SUBDIR) == ["plan.json", "plan.safetensors"]


@pytest.mark.parametrize("fmt", ["awqfx", "autoawq", "compressed-tensors"])
def test_no_local_path_in_the_output(tmp_path, fmt):
    src = tmp_path / "where" / "the" / "source" / "was"
    model, _, _ = _packed("llama")
    model.config._name_or_path = str(src)  # what from_pretrained(src) records
    d = save_quantized(model, tmp_path / "q", fmt=fmt)
    texts = [f.read_text() for f in d.rglob("*.json")]
    assert texts and not any(str(src) in t or "where/the/source" in t for t in texts)
    assert json.loads((d / "config.json").read_text())["quantization_config"]


def test_quantized_weight_of_roundtrip():
    model, _, qws = _packed("llama", QuantSpec(3, 48, False))
    for fqn, qw in qws.items():
        back = quantized_weight_of(model.get_submodule(fqn[: -len(".weight")]))
        assert torch.equal(back.q, qw.q) and torch.equal(back.zero, qw.zero) and torch.equal(back.scale, qw.scale)
        assert back.spec == qw.spec and back.shape == qw.shape
    # the model still computes what F.linear with the dequantized weight computes
    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(lin(x), F.linear(x, qws["model.layers.0.mlp.down_proj.weight"].dequantize()))


def test_activation_scales_survive_pack_save_load(tmp_path):
    """GPT-2's GELU -> c_proj group keeps its 1/s (a pre-hook in the module tree) through
    packing, the native file and loading; foreign formats refuse it instead of dropping it."""
    import awqfx
    from awqfx.api import AWQConfig, calibrate, prepare, search

    model = build("gpt2")
    cfg = AWQConfig.of(group_size=32, n_grid=4, loss_samples=2)
    obs = prepare(awqfx.capture(model), cfg)
    calibrate(obs, torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)), progress=False)
    plan = search(obs, cfg, progress=False)
    assert any(g.group.producer.kind == "activation" and not torch.all(g.scale == 1) for g in plan.groups)
    from awqfx.apply import apply_plan

    ids = token_ids()
    with torch.no_grad():
        ref = apply_plan(model, plan)(ids).logits  # fake-quant module tree (hooks + folded weights)
        graph = apply_plan(awqfx.capture(model), plan)(ids)  # the same plan on a graph: mul nodes
    torch.testing.assert_close(graph, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        packed = apply_plan(model, plan, weights="packed", backend="dequant")
        got = packed(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    _round_trip_native(packed, tmp_path / "q", ids, got)
    with pytest.raises(ValueError, match="scale node"):
        save_quantized(packed, tmp_path / "ct", fmt="compressed-tensors")


def _round_trip_native(packed, path, ids, got) -> None:
    """The native file loads back to a model with bit-identical logits."""
    save_quantized(packed, path)
    loaded = load_quantized(path, backend="dequant")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_experts_are_packed_saved_and_loaded(arch, tmp_path):
    """3-D expert weights become PackedExperts (no float copy kept), compute the fake-quant model's
    logits, round-trip through the native format, and are refused by the foreign formats."""
    import awqfx
    from awqfx.api import AWQConfig, calibrate, prepare, search
    from awqfx.apply import apply_plan
    from awqfx.packed_experts import PackedExperts, packed_experts

    model = build(arch)
    cfg = AWQConfig.of(bits=4, group_size=16, n_grid=2, loss_samples=2, clip_grid=4, clip_rounds=0)
    obs = prepare(awqfx.capture(model), cfg)
    calibrate(obs, torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)), progress=False)
    plan = search(obs, cfg, progress=False)
    experts = sorted(n for n in plan.weights if model.get_parameter(n).dim() == 3)
    assert len(experts) == 4
    ids = token_ids()
    with torch.no_grad():
        want = apply_plan(model, plan)(ids).logits
        packed = apply_plan(model, plan, weights="packed", backend="dequant")
        got = packed(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(packed_experts(packed)) == experts
    state = packed.state_dict()
    assert not set(experts) & set(state)  # the float expert weights are gone
    e = packed_experts(packed)[experts[0]]
    assert isinstance(e, PackedExperts) and e.weight_shape == tuple(model.get_parameter(experts[0]).shape)
    assert sum(t.numel() * t.element_size() for t in e.state_dict().values()) < model.get_parameter(experts[0]).numel()
    _round_trip_native(packed, tmp_path / "q", ids, got)
    with pytest.raises(ValueError, match="3-D fused MoE expert weight"):
        save_quantized(packed, tmp_path / "ct", fmt="compressed-tensors")
