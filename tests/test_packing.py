"""Bit packing (awqfx.packing) and foreign layouts (awqfx.formats): exact round trips and independent checks.

Hypothesis example counts are modest by default so the file runs in seconds;
set AWQFX_HYPOTHESIS_EXAMPLES to raise them.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awqfx.formats.autoawq import AWQ_ORDER, from_autoawq_gemm, to_autoawq_gemm
from awqfx.formats.compressed_tensors import compressed_tensors_config, from_compressed_tensors, to_compressed_tensors
from awqfx.packing import pack_int32, packed_length, unpack_int32
from awqfx.quant import QuantSpec, dequantize, quantize_weight

N_EXAMPLES = int(os.environ.get("AWQFX_HYPOTHESIS_EXAMPLES", "60"))
HSET = settings(
    max_examples=N_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MAGNITUDES = [0.0, 1e-30, 1e-8, 1.0, 1e4, 1e30]


def make_weight(seed: int, out: int, inp: int, kind: str, mag: float, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    if kind == "const_rows":
        w = w[:, :1].expand(out, inp).clone()
    elif kind == "zeros":
        w = torch.zeros(out, inp)
    elif kind == "mixed":
        # per-row magnitudes spanning 60 orders of magnitude
        row_mag = torch.tensor([1e-30, 1.0, 1e30])[torch.arange(out) % 3]
        w = w * row_mag[:, None]
        mag = 1.0
    elif kind == "positive":
        w = w.abs() + 0.1
    return (w * mag).to(dtype)


@st.composite
def layer_cases(draw, out_mult=1, in_mult_of_group=False, bits=None, max_out=9, max_in=70):
    b = draw(st.integers(2, 8)) if bits is None else bits
    sym = draw(st.booleans())
    out = out_mult * draw(st.integers(1, max_out))
    if in_mult_of_group:
        g = draw(st.sampled_from([-1, 1, 2, 3, 4, 8, 16, 32]))
        if g == -1:
            inp = draw(st.integers(1, max_in))
        else:
            inp = g * draw(st.integers(1, 6))
    else:
        inp = draw(st.integers(1, max_in))
        g = draw(st.one_of(st.just(-1), st.integers(1, inp)))
    kind = draw(st.sampled_from(["randn", "const_rows", "zeros", "mixed", "positive"]))
    mag = draw(st.sampled_from(MAGNITUDES))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    if dtype != torch.float32 and (mag > 6e4 or kind == "mixed"):
        dtype = torch.float32  # keep the requested magnitude representable
    w = make_weight(seed, out, inp, kind, mag, dtype)
    return w, QuantSpec(bits=b, group_size=g, symmetric=sym)


# --------------------------------------------------------------------------- raw packing


def test_pack_literals():
    # 4 bits: 8 values per word, first value in the lowest nibble.
    v = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0xF]])
    p = pack_int32(v, 4)
    assert p.dtype == torch.int32 and p.shape == (1, 2)
    assert p[0, 0].item() == (0x87654321 - (1 << 32)) and p[0, 1].item() == 0xF
    # 3 bits, dense: 11 values of 7 fill bits 0..32 -> word0 all ones, word1 = 1.
    p = pack_int32(torch.full((1, 11), 7), 3)
    assert p.tolist() == [[-1, 1]]
    # 3 bits: value 10 (bits 30..32) straddles the word boundary.
    v = torch.zeros(1, 12, dtype=torch.uint8)
    v[0, 10] = 0b101
    assert pack_int32(v, 3).tolist() == [[1 << 30, 0b1]]
    # 8 bits along dim 0
    v = torch.tensor([[1], [2], [3], [4], [5]])
    assert pack_int32(v, 8, dim=0).tolist() == [[0x04030201], [5]]
    assert packed_length(576, 4) == 72 and packed_length(11, 3) == 2 and packed_length(32, 3) == 3


@HSET
@given(
    bits=st.integers(1, 8),
    rows=st.integers(1, 5),
    n=st.integers(1, 130),
    dim=st.sampled_from([0, 1, -1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_roundtrip(bits, rows, n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.int64)
    if dim == 0:
        v = v.t()
    p = pack_int32(v, bits, dim=dim)
    assert p.dtype == torch.int32
    assert p.shape[dim] == packed_length(n, bits)
    u = unpack_int32(p, bits, n, dim=dim)
    assert u.dtype == torch.uint8 and torch.equal(u.long(), v)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int32(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_int32(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="need 1 words"):
        unpack_int32(torch.zeros(1, 2, dtype=torch.int32), 4, 8)


# --------------------------------------------------------------------------- our format round trip


@HSET
@given(case=layer_cases())
def test_quantize_pack_unpack_dequantize_exact(case):
    w, spec = case
    qw = quantize_weight(w, spec)
    assert torch.isfinite(qw.scale).all() and torch.isfinite(qw.dequantize()).all()
    packed = pack_int32(qw.q, spec.bits)
    q2 = unpack_int32(packed, spec.bits, w.shape[1])
    assert torch.equal(q2, qw.q)
    zp = pack_int32(qw.zero, spec.bits, dim=0)
    assert torch.equal(unpack_int32(zp, spec.bits, w.shape[0], dim=0).int(), qw.zero)
    assert torch.equal(dequantize(q2, qw.scale, qw.zero, spec), qw.dequantize())


# --------------------------------------------------------------------------- AutoAWQ GEMM


def reference_awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """Independent AutoAWQ unpacker written from the documented layout.

    Word j of a row holds output columns 8j..8j+7; nibble k (shift 4*k) holds
    column 8j + AWQ_ORDER[k]. Plain Python loops over ints, no awqfx helpers.
    """
    rows, n_words = words.shape
    out = torch.zeros(rows, n_words * 8, dtype=torch.int64)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    assert tuple(order) == AWQ_ORDER
    for r in range(rows):
        for j in range(n_words):
            word = int(words[r, j]) & 0xFFFFFFFF
            for k in range(8):
                out[r, 8 * j + order[k]] = (word >> (4 * k)) & 0xF
    return out


def test_autoawq_literal_word():
    # out columns 0..7 hold q = 0..7 -> nibbles (k=0..7) hold columns [0,2,4,6,1,3,5,7]
    # -> word 0x75316420.
    q = torch.arange(8, dtype=torch.uint8)[:, None].expand(8, 4).contiguous()  # [out=8, in=4]
    qw = quantize_weight(torch.zeros(8, 4), QuantSpec(4, 4))
    qw.q = q
    t = to_autoawq_gemm(qw)
    assert t["qweight"].shape == (4, 1) and t["qweight"].dtype == torch.int32
    assert (t["qweight"] == 0x75316420).all()
    assert t["qzeros"].shape == (1, 1) and t["scales"].shape == (1, 8) and t["scales"].dtype == torch.float16


@HSET
@given(case=layer_cases(out_mult=8, in_mult_of_group=True, bits=4, max_out=3))
def test_autoawq_roundtrip_and_reference(case):
    w, spec = case
    if spec.symmetric:
        spec = QuantSpec(4, spec.group_size, False)
    qw = quantize_weight(w, spec)
    if not torch.isfinite(qw.scale.half()).all():
        with pytest.raises(ValueError, match="float16"):
            to_autoawq_gemm(qw)
        return
    t = to_autoawq_gemm(qw)
    out_f, in_f = w.shape
    G = qw.n_groups
    assert t["qweight"].shape == (in_f, out_f // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (G, out_f // 8) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (G, out_f) and t["scales"].dtype == torch.float16
    # independent reference: qweight is [in, out] (transposed), qzeros [G, out]
    assert torch.equal(reference_awq_unpack(t["qweight"]), qw.q.t().long())
    assert torch.equal(reference_awq_unpack(t["qzeros"]), qw.zero.t().long())
    back = from_autoawq_gemm(t, spec.group_size, in_f)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale.half().float())
    assert back.shape == qw.shape and back.spec == spec
    # reference dequant (AutoAWQ convention (q - z) * s, fp16 scales widened)
    g = in_f if spec.group_size == -1 else spec.group_size
    s = t["scales"].float().repeat_interleave(g, dim=0)  # [in, out]
    z = reference_awq_unpack(t["qzeros"]).repeat_interleave(g, dim=0)
    ref = ((reference_awq_unpack(t["qweight"]) - z).float() * s).t()
    assert torch.equal(ref, back.dequantize())


def test_autoawq_symmetric_exports_as_zero_8():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    qw = quantize_weight(w, QuantSpec(4, 16, symmetric=True))
    back = from_autoawq_gemm(to_autoawq_gemm(qw), 16, 32)
    assert (back.zero == 8).all() and torch.equal(back.q, qw.q)
    # exact up to the fp16 scale rounding AutoAWQ imposes:
    qw.scale = qw.scale.half().float()
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_autoawq_constraints():
    w = torch.randn(16, 576)
    with pytest.raises(ValueError, match="in_features % group_size == 0.*576.*128"):
        to_autoawq_gemm(quantize_weight(w, QuantSpec(4, 128)))
    with pytest.raises(ValueError, match="out_features % 8 == 0.*12"):
        to_autoawq_gemm(quantize_weight(torch.randn(12, 64), QuantSpec(4, 64)))
    with pytest.raises(ValueError, match="4-bit weights only.*bits=3"):
        to_autoawq_gemm(quantize_weight(torch.randn(16, 64), QuantSpec(3, 64)))
    with pytest.raises(ValueError, match="float16"):
        to_autoawq_gemm(quantize_weight(torch.randn(16, 64) * 1e10, QuantSpec(4, 64)))


# --------------------------------------------------------------------------- compressed-tensors


@HSET
@given(case=layer_cases(in_mult_of_group=True))
def test_compressed_tensors_roundtrip(case):
    w, spec = case
    qw = quantize_weight(w, spec)
    t = to_compressed_tensors(qw)
    out_f, in_f = w.shape
    assert t["weight_packed"].shape == (out_f, packed_length(in_f, spec.bits))
    assert t["weight_packed"].dtype == torch.int32
    assert t["weight_scale"].shape == (out_f, qw.n_groups) and t["weight_scale"].dtype == torch.float32
    assert t["weight_shape"].tolist() == [out_f, in_f] and t["weight_shape"].dtype == torch.int64
    if spec.symmetric:
        assert "weight_zero_point" not in t
    else:
        assert t["weight_zero_point"].shape == (packed_length(out_f, spec.bits), qw.n_groups)
    back = from_compressed_tensors(t, spec)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale) and back.shape == qw.shape
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_compressed_tensors_ragged_rejected():
    qw = quantize_weight(torch.randn(8, 576), QuantSpec(4, 128))
    with pytest.raises(ValueError, match="in_features % group_size == 0.*576.*128"):
        to_compressed_tensors(qw)


def _ct_scheme(spec):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig.model_validate(compressed_tensors_config(spec, ignore=["lm_head"]))
    return ct, cfg.config_groups["group_0"]


def _ct_decompress(tensors, spec):
    _, scheme = _ct_scheme(spec)
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_compressed_tensors_package_decompress_exact(bits, symmetric, group_size):
    torch.manual_seed(bits * 10 + symmetric + (group_size > 0))
    spec = QuantSpec(bits, group_size, symmetric)
    for out_f, in_f in [(8, 64), (13, 96), (1, 32)]:
        w = torch.randn(out_f, in_f) * torch.logspace(-3, 2, out_f)[:, None]
        qw = quantize_weight(w, spec)
        t = to_compressed_tensors(qw)
        ours = qw.dequantize()
        theirs = _ct_decompress(t, spec)
        assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
        assert torch.equal(theirs, ours)


@HSET
@given(case=layer_cases(in_mult_of_group=True))
def test_compressed_tensors_package_decompress_property(case):
    """All bits 2..8 (dense packing at 3/5/6/7), odd shapes, extreme magnitudes."""
    w, spec = case
    qw = quantize_weight(w, spec)
    assert torch.equal(_ct_decompress(to_compressed_tensors(qw), spec), qw.dequantize())


def test_compressed_tensors_package_compress_matches_ours():
    """Their compressor, fed our dequantized weight and signed qparams, packs the same words."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    torch.manual_seed(5)
    for spec in (QuantSpec(4, 32), QuantSpec(3, 32), QuantSpec(8, -1, True), QuantSpec(4, 16, True)):
        _, scheme = _ct_scheme(spec)
        qw = quantize_weight(torch.randn(24, 64), spec)
        half = 1 << (spec.bits - 1)
        sd = {"weight": qw.dequantize(), "weight_scale": qw.scale}
        sd["weight_zero_point"] = (qw.zero - half).to(torch.int8)  # signed zero point
        theirs = PackedQuantizationCompressor.compress(sd, scheme)
        ours = to_compressed_tensors(qw)
        assert set(theirs) == set(ours)
        for k in ours:
            assert torch.equal(theirs[k], ours[k]), k


def test_compressed_tensors_3d_experts():
    torch.manual_seed(6)
    for spec in (QuantSpec(4, 16), QuantSpec(4, -1, True), QuantSpec(8, 32)):
        w = torch.randn(3, 16, 64)
        qw = quantize_weight(w, spec)
        t = to_compressed_tensors(qw)
        assert t["weight_packed"].shape == (3, 16, packed_length(64, spec.bits))
        assert t["weight_shape"].tolist() == [3, 16, 64]
        back = from_compressed_tensors(t, spec)
        assert torch.equal(back.q, qw.q) and torch.equal(back.zero, qw.zero)
        assert torch.equal(_ct_decompress(t, spec), qw.dequantize())


def test_compressed_tensors_low_precision_scale():
    """With the model's dtype as scale dtype (what llm-compressor writes) the package's
    dequant runs in that dtype; it equals ours computed with the rounded scale."""
    torch.manual_seed(7)
    spec = QuantSpec(4, 32)
    qw = quantize_weight(torch.randn(8, 64), spec)
    for dt in (torch.bfloat16, torch.float16):
        t = to_compressed_tensors(qw, scale_dtype=dt)
        assert t["weight_scale"].dtype == dt
        theirs = _ct_decompress(t, spec)
        assert theirs.dtype == dt
        expected = ((qw.q.float() - qw.zero.float().repeat_interleave(32, 1)).to(dt)) * t[
            "weight_scale"
        ].repeat_interleave(32, 1)
        assert torch.equal(theirs, expected)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(4, 128), QuantSpec(4, 64, True), QuantSpec(8, -1), QuantSpec(3, -1, True), QuantSpec(2, 32)],
)
def test_compressed_tensors_config_schema(spec):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    cfg_dict = compressed_tensors_config(spec, ignore=["lm_head"])
    assert cfg_dict["quant_method"] == "compressed-tensors" and cfg_dict["format"] == "pack-quantized"
    cfg = QuantizationConfig.model_validate(cfg_dict)
    assert cfg.format == CompressionFormat.pack_quantized.value
    assert cfg.ignore == ["lm_head"] and cfg.quantization_status == "compressed"
    scheme = cfg.config_groups["group_0"]
    assert scheme.targets == ["Linear"]
    wa = scheme.weights
    assert wa.num_bits == spec.bits and wa.type == "int" and wa.symmetric == spec.symmetric
    if spec.group_size == -1:
        assert wa.strategy == QuantizationStrategy.CHANNEL and wa.group_size is None
    else:
        assert wa.strategy == QuantizationStrategy.GROUP and wa.group_size == spec.group_size
    assert scheme.input_activations is None and scheme.output_activations is None
    # Our dict is what the package itself serialises (apart from the keys
    # ModelCompressor.update_config adds on save).
    dumped = cfg.model_dump()
    for k, v in dumped.items():
        if k == "config_groups":
            assert v["group_0"] == cfg_dict["config_groups"]["group_0"] | {"format": "pack-quantized"}
        elif k != "moe_sparsity_config":
            assert v == cfg_dict[k], k
    # transformers accepts it as a quantization_config
    from transformers.utils.quantization_config import CompressedTensorsConfig

    hf = CompressedTensorsConfig.from_dict(dict(cfg_dict))
    assert hf.quantization_config is not None
