"""GGUF: the block quantizers equal the gguf package's, the written file loads in transformers as
the fake-quantized model, a GGUF source's metadata is copied, and what GGUF cannot hold is refused."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny_models import VOCAB, build, save_model_dir, token_ids
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from awqfx.app import cli
from awqfx.app.cli import main
from awqfx.app.evaluate import perplexity, windows_for_eval
from awqfx.app.jobs import Report
from awqfx.apply import apply_plan
from awqfx.formats import check_format, save_quantized
from awqfx.formats.common import Layer
from awqfx.formats.gguf import GGUF_NAME, ggml_type, load_gguf
from awqfx.gguf_blocks import GGUF_TYPES, clamp_blocks
from awqfx.gguf_blocks import fake_quantize as gguf_fake_quantize
from awqfx.params import get_param, set_param
from awqfx.plan import AWQPlan
from awqfx.quant import QuantSpec, compute_qparams, fake_quantize

TYPES = list(GGUF_TYPES)
QUICK = ["--samples", "4", "--seq-len", "16", "--quiet", "--n-grid", "4", "--clip-grid", "4", "--clip-rounds", "1"]


def gguf_qdq(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """The gguf package's own round trip: what llama.cpp and transformers read back."""
    t = ggml_type(type_name)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.float().numpy(), t), t)).reshape(w.shape)


def edge_case_weights() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(24, 256) * 0.05
    w[0, :32] = 0.0                                    # all-zero block
    w[1, :32] = -torch.rand(32)                        # all negative: the largest |w| is negative
    w[1, 32:64] = torch.rand(32) * 0.1
    w[1, 40] = -0.5                                    # negative max |w| in a mixed block
    w[2, :32] = 0.25                                   # constant block
    w[3, :32] = torch.arange(32) * 0.125 - 2.0         # values on the grid (round-half cases)
    w[4, :32] = torch.rand(32)
    w[4, 3] = -w[4, :32].max()                         # |w| tie: the first of them sets d's sign
    w[5] *= 1e4                                        # large
    w[6] *= 1e-4                                       # small (fp16 d is subnormal)
    w[7, :32] = torch.randn(32) * 1e-9                 # d underflows in fp16
    return w


@pytest.mark.parametrize("type_name", TYPES)
def test_fake_quant_equals_gguf_package_exactly(type_name):
    w = edge_case_weights()
    ours = fake_quantize(w, QuantSpec.gguf(type_name))
    ref = gguf_qdq(w, type_name)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[0, :32], torch.zeros(32))
    assert not torch.equal(ours, w)  # it did quantize


@pytest.mark.parametrize("type_name", TYPES)
def test_clip_range_clamps_then_quantizes_with_the_block_quantizer(type_name):
    w = edge_case_weights()
    g = torch.Generator().manual_seed(3)
    mx = w.reshape(24, 8, 32).amax(-1) * (0.6 + 0.4 * torch.rand(24, 8, generator=g))
    mn = w.reshape(24, 8, 32).amin(-1) * (0.6 + 0.4 * torch.rand(24, 8, generator=g))
    clamped = clamp_blocks(w, mx, mn)
    expect = torch.minimum(torch.maximum(w.reshape(24, 8, 32), mn[..., None]), mx[..., None]).reshape(w.shape)
    assert torch.equal(clamped, expect) and not torch.equal(clamped, w)
    ours = fake_quantize(w, QuantSpec.gguf(type_name), max_val=mx, min_val=mn)
    assert torch.equal(ours, gguf_qdq(clamped, type_name))
    # a block whose clamp bites sets the block's scale from the clipped range
    assert not torch.equal(ours, fake_quantize(w, QuantSpec.gguf(type_name)))


def test_gguf_spec_is_the_type_and_refuses_what_contradicts_it():
    assert QuantSpec.gguf("q4_0") == QuantSpec(4, 32, True, "q4_0")
    assert QuantSpec.gguf("q4_1") == QuantSpec(4, 32, False, "q4_1")
    assert QuantSpec.gguf("q8_0") == QuantSpec(8, 32, True, "q8_0")
    with pytest.raises(ValueError, match=r"GGUF q4_0 has bits=4, group_size=32, symmetric=True; got bits=4, "
                                         r"group_size=128, symmetric=False"):
        QuantSpec(scheme="q4_0")
    with pytest.raises(ValueError, match="scheme must be 'int' or a GGUF type"):
        QuantSpec(scheme="q5_k")
    with pytest.raises(ValueError, match="in_features 48 is not a multiple of 32"):
        fake_quantize(torch.randn(4, 48), QuantSpec.gguf("q4_1"))
    with pytest.raises(ValueError, match="compute_qparams needs the integer quantizer"):
        compute_qparams(torch.randn(4, 64), QuantSpec.gguf("q4_0"))


# --------------------------------------------------------------------------- end to end


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE over the first VOCAB bytes (no merges), built locally: the kind
    of tokenizer llama.cpp's converter (gguf.vocab.BpeVocab) reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    enc = gguf.vocab.bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={enc[b]: b for b in range(VOCAB)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=enc[1], eos_token=enc[2])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_gguf")
    build("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8)
    return path


def expected_model(plan: AWQPlan) -> torch.nn.Module:
    """The tiny llama with the plan fake-quantized, and the tensors outside the plan as the writer
    stores them: 2-D ones (embedding, untied head) in Q8_0, norms in F32."""
    fake = apply_plan(build("llama"), plan, weights="fake")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        set_param(fake, name, gguf_fake_quantize(get_param(fake, name), "q8_0"))
    return fake


@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_file_loads_in_transformers_as_the_fake_quantized_model(type_name, llama_dir, calib, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(llama_dir), "--out", str(out), "--format", "gguf", "--gguf-type", type_name,
                 "--calib", str(calib), "--clip-qk"] + QUICK) == 0
    plan = AWQPlan.load(out / "awq_plan")
    assert plan.groups and len(plan.weights) == 14
    assert {wp.spec for wp in plan.weights.values()} == {QuantSpec.gguf(type_name)}
    assert all(wp.max_val is not None for wp in plan.weights.values())  # q/k clipped too: permuted after the clamp
    assert plan.config["clip"]["mode"] == ("minmax" if type_name == "q4_1" else "sym")

    reader = gguf.GGUFReader(out / GGUF_NAME)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == ggml_type(type_name)
    assert types["token_embd.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType[f"MOSTLY_{type_name.upper()}"]
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == VOCAB
    assert reader.get_field("llama.attention.head_count_kv").contents() == 2

    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    expect = expected_model(plan)
    got = loaded.state_dict()
    for name, t in expect.state_dict().items():
        assert torch.equal(got[name], t), name  # bit for bit, q/k un-permuted by transformers
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expect(ids).logits, rtol=1e-5, atol=1e-5)


def test_eval_measures_the_written_file_as_transformers_loads_it(llama_dir, calib, tmp_path, capsys):
    """The model in memory is the folded float one; --eval reads the file back instead (the format's reader)."""
    out = tmp_path / "q"
    assert main(["quantize", str(llama_dir), "--out", str(out), "--format", "gguf", "--gguf-type", "q4_0",
                 "--calib", str(calib), "--eval", str(calib), "--eval-windows", "2"] + QUICK) == 0
    after = next(line for line in capsys.readouterr().out.splitlines() if "perplexity after" in line)
    wins = windows_for_eval(AutoTokenizer.from_pretrained(llama_dir), calib.read_text(), 16, max_windows=2)
    ppl = perplexity(load_gguf(out), wins, progress=False)
    assert after.split()[-6:] == [f"{ppl:.3f}", "(model.gguf", "as", "transformers", "loads", "it)"]


def test_gguf_source_metadata_and_tokenizer_are_copied(llama_dir, calib, tmp_path, monkeypatch):
    monkeypatch.setenv("AWQFX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"  # a llama.cpp-style source file: the tiny llama, plain Q8_0
    assert main(["quantize", str(llama_dir), "--out", str(src), "--format", "gguf", "--gguf-type", "q8_0",
                 "--method", "rtn", "--quiet", "--seq-len", "16"]) == 0
    source = gguf.GGUFReader(src / GGUF_NAME)
    for t in source.tensors:  # round to nearest is the gguf package's own quantization of the weights
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and t.name.startswith("blk."):
            assert t.data.dtype == np.uint8
    out = tmp_path / "q"
    assert main(["quantize", str(src / GGUF_NAME), "--out", str(out), "--format", "gguf", "--gguf-type", "q4_1",
                 "--calib", str(calib), "--ignore", r"layers\.1\.mlp\.down_proj"] + QUICK) == 0
    written = gguf.GGUFReader(out / GGUF_NAME)
    own = ("GGUF.", "general.file_type", "general.quantization_version")
    copied = {k: f.contents() for k, f in source.fields.items() if not k.startswith(own)}
    assert copied and {k: written.fields[k].contents() for k in copied} == copied
    assert written.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert {t.name for t in written.tensors} == {t.name for t in source.tensors}
    types = {t.name: t.tensor_type for t in written.tensors}
    linears = [n for n in types if n.startswith("blk.") and "norm" not in n]
    assert len(linears) == 14 and types.pop("blk.1.ffn_down.weight") == gguf.GGMLQuantizationType.F32  # --ignore
    assert {types[n] for n in linears if n in types} == {gguf.GGMLQuantizationType.Q4_1}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert written.get_field("tokenizer.ggml.tokens").contents() == source.get_field("tokenizer.ggml.tokens").contents()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("flags, needle", [
    (["--format", "gguf"], "--format gguf needs --gguf-type"),
    (["--gguf-type", "q4_0"], "add --format gguf"),
    (["--format", "gguf", "--gguf-type", "q4_0", "--bits", "3"], "drop --bits 3"),
    (["--format", "gguf", "--gguf-type", "q8_0", "--group-size", "16"], "drop --group-size 16"),
    (["--format", "gguf", "--gguf-type", "q4_1", "--symmetric"], "drop --symmetric"),
    (["--format", "gguf", "--gguf-type", "q8_0", "--bits", "4"], "drop --bits 4"),  # --bits' default, given
    (["--format", "gguf", "--gguf-type", "q4_0", "--group-size", "64"], "drop --group-size 64"),  # the default
    (["--format", "gguf", "--gguf-type", "q4_0", "--no-symmetric"], "drop --no-symmetric"),
    (["--format", "gguf", "--gguf-type", "q4_0", "--mode", "sequential"], "--mode sequential) it is not supported"),
])
def test_flags_that_contradict_the_gguf_type_are_refused(flags, needle, llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(llama_dir), "--out", str(out)] + flags + QUICK) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("awqfx: error: ") and "Traceback" not in err
    assert not out.exists()


def test_flags_that_repeat_the_gguf_types_own_values_are_accepted(llama_dir, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(cli, "quantize_model", lambda model, out, cfg, **kw: asked.append(cfg) or Report())
    flags = ["--format", "gguf", "--gguf-type", "q8_0", "--bits", "8", "--group-size", "32", "--symmetric"]
    assert main(["quantize", str(llama_dir), "--out", str(tmp_path / "q")] + flags + QUICK) == 0
    spec = asked[0].weights
    assert (spec.scheme, spec.bits, spec.group_size, spec.symmetric) == ("q8_0", 8, 32, True)
    assert asked[0].clip.mode == "sym"


@pytest.mark.parametrize("arch, overrides, needles", [
    ("qwen2", {}, ["--format gguf cannot hold this model", "'qwen2'", "writes GGUF for the 'llama' architecture only"]),
    ("llama", {"intermediate_size": 80}, ["model.layers.0.mlp.down_proj.weight", "blocks of 32 inputs",
                                          "80 is not a multiple of 32"]),
    ("llama", {"attention_bias": True}, ["--format gguf cannot hold this model", "biases"]),
    ("mixtral", {}, ["--format gguf cannot hold this model", "3-D fused MoE expert weight"]),
], ids=["not-llama", "in-not-multiple-of-32", "biases", "moe-3d"])
def test_what_gguf_cannot_hold_is_refused_before_calibration(arch, overrides, needles, calib, tmp_path, capsys,
                                                             no_calibration):
    model_dir = tmp_path / "model"
    save_model_dir(model_dir, arch, **overrides)
    capsys.readouterr()
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--format", "gguf", "--gguf-type", "q4_0",
                 "--calib", str(calib)] + QUICK) == 2
    messages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("awqfx: ")]
    assert len(messages) == 1 and messages[0].startswith("awqfx: error: ")
    for needle in needles:
        assert needle in messages[0]
    assert not out.exists()


def test_other_formats_refuse_gguf_specs_and_save_quantized_refuses_gguf():
    layer = Layer("model.layers.0.mlp.down_proj.weight", (64, 96), 1, QuantSpec.gguf("q4_0"))
    for fmt in ("awqfx", "autoawq", "compressed-tensors"):  # the packed formats: codes on the integer grid
        assert any("only --format gguf stores them" in p for p in check_format(fmt, [layer])), fmt
    assert check_format("gguf", [layer]) == []
    int_layer = Layer(layer.name, layer.shape, 1, QuantSpec(4, 32))
    assert any("awqfx's integer grid" in p for p in check_format("gguf", [int_layer]))
    with pytest.raises(ValueError, match="not written by save_quantized"):
        save_quantized(build("llama"), "unused", fmt="gguf")
