"""The exports opened by the libraries that serve them, on the real model (SmolLM2-135M, w4 g64)."""
from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import awqfx
from awqfx.api import AWQConfig, prepare, search
from awqfx.apply import apply_plan
from awqfx.export import save_quantized

pytestmark = pytest.mark.real

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def packed_smollm2(real_model):
    """SmolLM2 quantized at w4 g64 and packed (round to nearest: the layout is what is tested, and
    an AWQ plan only changes the float weights the quantizer sees). The ``dequant`` kernels compute
    what compressed-tensors' decompression computes, ``(q - zero) * scale`` in float32; the int4
    kernels round scales to bf16 and may flip a near tie in a greedy decode."""
    model, tok = real_model
    cfg = AWQConfig.of(bits=4, group_size=64, method="rtn")
    plan = search(prepare(awqfx.capture(model), cfg), cfg, progress=False)
    return apply_plan(model, plan, weights="packed", backend="dequant"), tok


def _greedy(model, tok) -> list[int]:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


# compressed-tensors 0.18.0-0.20.1 build the empty model with an unpacked weight_zero_point, so a plain
# from_pretrained of any asymmetric pack-quantized checkpoint (also one its own compressor writes) fails
# with a size mismatch; 0.17.1 loads it (docs/formats.md, "compressed-tensors: versions").
CT_PLAIN_LOAD_FAILS = Version("0.18") <= Version(version("compressed-tensors")) <= Version("0.20.1")


def test_compressed_tensors_export_generates_in_transformers_like_awqfx(packed_smollm2, tmp_path):
    packed, tok = packed_smollm2
    out = save_quantized(packed, tmp_path / "ct", fmt="compressed-tensors", tokenizer=tok)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["weights"]["group_size"] == 64
    ours = _greedy(packed, tok)
    assert len(ours) == NEW_TOKENS
    if CT_PLAIN_LOAD_FAILS:
        with pytest.raises(Exception, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(out)
        hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    else:
        hf = AutoModelForCausalLM.from_pretrained(out)
    assert _greedy(hf.eval(), tok) == ours
