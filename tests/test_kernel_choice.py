"""The int4 layers' kernel choice: the CPU layout read back, the dense path, the timed choice."""
from __future__ import annotations

import json

import pytest
import torch

import awqfx
from awqfx import kernel_choice, kernels
from awqfx.api import AWQConfig, prepare, search
from awqfx.apply import apply_plan
from awqfx.modules import QuantLinear
from awqfx.packed_model import packed_modules
from awqfx.quant import QuantSpec, quantize_weight


def _qw(out_f, in_f, group_size=32, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return quantize_weight(w, QuantSpec(bits=4, group_size=group_size))


@pytest.mark.parametrize("out_f", [16, 48, 80, 96, 576])
def test_codes_read_back_from_the_cpu_layout(out_f):
    """Full row blocks and the differently packed 16-row tail, against the kernel itself."""
    in_f, g = 128, 32
    q = torch.randint(0, 16, (out_f, in_f), generator=torch.Generator().manual_seed(out_f), dtype=torch.int32)
    packed = kernels.pack_int4_weight(q, "cpu")
    assert kernels.cpu_int4pack_layout(out_f) is not None
    assert torch.equal(kernels.int4pack_codes_t(packed, g, in_f, out_f).t().to(torch.int32), q)
    # the dequantized weight is the one the kernel multiplies by (which rounds it to bf16)
    scale_zeros = kernels.pack_int4_scale_zeros(torch.rand(out_f, in_f // g) / 16, torch.randint(0, 16, (out_f, in_f // g)))
    dense = kernels.int4pack_dequantize_t(packed, scale_zeros, g, in_f, torch.float32)
    kernel = kernels.int4pack_effective_weight(packed, scale_zeros, g, in_f)
    assert torch.equal(dense.t().to(torch.bfloat16).float(), kernel)


def test_dense_path_computes_what_the_int4_kernel_computes(monkeypatch):
    m = QuantLinear.from_quantized(_qw(96, 256), torch.randn(96), backend="int4pack")
    x = torch.randn(3, 40, 256)
    int4 = m(x)
    for dtype in ("float32", "bfloat16"):
        monkeypatch.setattr(kernel_choice, "choice", lambda *a, d=dtype: kernel_choice.KernelChoice(64, d))
        m.refresh()
        assert m._dense_from == 64
        assert torch.equal(m(x[:1]), int4[:1])  # 40 rows: still the int4 kernel
        dense = m(x)  # 120 rows: dequantize + one matmul
        tol = 2**-7 if dtype == "float32" else 2**-5  # bf16 output rounding; bf16 weights
        torch.testing.assert_close(dense, int4, rtol=tol, atol=tol * int4.abs().max().item())


def test_the_environment_forces_the_choice(monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV_DENSE_FROM, "never")
    assert kernel_choice.choice(64, 128, 32).dense_dtype_for(10**6) is None
    monkeypatch.setenv(kernel_choice.ENV_DENSE_FROM, "200")
    c = kernel_choice.choice(64, 128, 32)
    assert c.dense_dtype_for(199) is None and c.dense_dtype_for(200) == torch.float32
    monkeypatch.setenv(kernel_choice.ENV_DENSE_FROM, "soon")
    with pytest.raises(ValueError, match="AWQFX_DENSE_FROM must be 'measure', 'never' or a token count"):
        kernel_choice.choice(64, 128, 32)


def test_the_timed_choice_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_choice.ENV_DENSE_FROM, "measure")
    monkeypatch.setenv("AWQFX_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "_memory", {})
    calls = []
    real = kernel_choice.measure

    def timed(*args, **kw):
        calls.append(args)
        return real(*args, ladder=(1, 16), repeats=1)

    monkeypatch.setattr(kernel_choice, "measure", timed)
    first = kernel_choice.choice(32, 64, 32)
    assert calls == [(32, 64, 32)] and first.ladder == (1, 16)
    assert set(first.timings) == {"int4", "float32", "bfloat16"}
    assert all(len(t) == 2 and min(t) > 0 for t in first.timings.values())
    # dense_from is the first length from which the dense path wins at every longer length measured
    best = [min(first.timings["float32"][i], first.timings["bfloat16"][i]) for i in range(2)]
    wins = [first.timings[first.dense_dtype][i] < first.timings["int4"][i] for i in range(2)]
    assert first.dense_from == (1 if all(wins) else 16 if wins[1] else None)
    assert first.timings[first.dense_dtype][-1] == best[-1]
    stored = json.loads(kernel_choice.cache_file().read_text())
    assert stored["32x64g32"]["dense_from"] == first.dense_from
    # a new process (empty memory) reads the file instead of timing again
    monkeypatch.setattr(kernel_choice, "_memory", {})
    assert kernel_choice.choice(32, 64, 32) == first and len(calls) == 1


def test_the_int8_choice_is_timed_and_cached_apart_from_the_int4_one(monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_choice.ENV_DENSE_FROM, "measure")
    monkeypatch.setenv("AWQFX_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "_memory", {})
    real = kernel_choice.measure_int8
    monkeypatch.setattr(kernel_choice, "measure_int8", lambda *a: real(*a, ladder=(1, 16), repeats=1))
    found = kernel_choice.choice(32, 64, -1, kind="int8")
    assert set(found.timings) == {"int8", "float32"} and found.ladder == (1, 16)
    assert all(len(t) == 2 and min(t) > 0 for t in found.timings.values())
    wins = [found.timings["float32"][i] < found.timings["int8"][i] for i in range(2)]
    assert found.dense_from == (1 if all(wins) else 16 if wins[1] else None)
    assert json.loads(kernel_choice.cache_file().read_text())["int8:32x64g-1"]["dense_from"] == found.dense_from
    with pytest.raises(ValueError, match="kernel kind must be one of int4, int8"):
        kernel_choice.choice(32, 64, -1, kind="int2")


@pytest.mark.real
def test_the_kernel_choice_changes_logits_no_more_than_the_int4_kernel_does(real_model, monkeypatch):
    """SmolLM2 packed at w4 g64 on the int4 kernels, run on the prompt and the 32 tokens it
    generates greedily: with the dense path from one token on, the logits are no further from the
    exact float32 dequantized model than the int4 kernel's own (bf16 activations), and the argmax
    is the same wherever it is not a near tie. (Two kernels sum in different orders, so a greedy
    decode can flip at a near tie: on this prompt the 32nd token does, at a 0.04 logit margin.)"""
    model, tok = real_model
    cfg = AWQConfig.of(bits=4, group_size=64, method="rtn")
    plan = search(prepare(awqfx.capture(model), cfg), cfg, progress=False)
    packed = apply_plan(model, plan, weights="packed")
    exact = apply_plan(model, plan, weights="packed", backend="dequant")
    layers = packed_modules(packed).values()
    assert all(m.active_backend == "int4pack" for m in layers)
    ids = tok("ROMEO:\nBut soft, what light through yonder window breaks?\n", return_tensors="pt").input_ids
    logits = {}
    with torch.no_grad():
        seq = packed.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        for dense_from in ("never", "1"):
            monkeypatch.setenv(kernel_choice.ENV_DENSE_FROM, dense_from)
            for m in layers:
                m.refresh()
            logits[dense_from] = packed(seq).logits[0]
        reference = exact(seq).logits[0]
    int4, dense = logits["never"], logits["1"]
    assert not torch.equal(int4, dense)  # the dense path really ran
    assert (dense - reference).abs().mean() <= 1.25 * (int4 - reference).abs().mean()
    top2 = int4.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.25
    assert clear.sum() > 0.6 * len(clear)
    assert torch.equal(dense.argmax(-1)[clear], int4.argmax(-1)[clear])
