"""Quantizer math: hand-checked cases and invariants (awqfx.quant)."""

import pytest
import torch

from awqfx.quant import (
    SCALE_EPS,
    QuantizedWeight,
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    group_bounds,
    num_groups,
    quantize,
    quantize_weight,
)

# Values below are chosen so every scale is a power of two (0.25): the expected
# integers and dequantized values are exact and can be checked by hand.


def test_group_bounds_and_count():
    assert num_groups(576, 128) == 5
    assert group_bounds(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert group_bounds(6, 4) == [(0, 4), (4, 6)]
    assert group_bounds(8, 4) == [(0, 4), (4, 8)]
    assert num_groups(576, -1) == 1 and group_bounds(576, -1) == [(0, 576)]
    assert num_groups(5, 5) == 1


def test_asymmetric_hand_checked():
    # group: min -1.25, max 2.5 -> scale 3.75/15 = 0.25, zero = -round(-1.25/0.25) = 5
    # q = round(w/0.25) + 5 = [-5+5, 0+5, round(2.4)+5, 10+5] = [0, 5, 7, 15]
    w = torch.tensor([[-1.25, 0.0, 0.6, 2.5]])
    spec = QuantSpec(bits=4, group_size=4)
    scale, zero = compute_qparams(w, spec)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32
    assert scale.tolist() == [[0.25]] and zero.tolist() == [[5]]
    q = quantize(w, scale, zero, spec)
    assert q.dtype == torch.uint8 and q.tolist() == [[0, 5, 7, 15]]
    w_hat = dequantize(q, scale, zero, spec)
    assert w_hat.dtype == torch.float32
    assert w_hat.tolist() == [[-1.25, 0.0, 0.5, 2.5]]


def test_ragged_group_hand_checked():
    # in=6, g=4 -> groups [0:4] and a ragged [4:6].
    # group 0 (row 0): as above, scale 0.25, zero 5.
    # group 1 (row 0): [-3, 0.75], range 3.75 -> scale 0.25, zero = -round(-12) = 12, q = [0, 15].
    # group 1 (row 1): [0.5, 4.25] all positive: min 0.5 -> zero = clamp(-2) = 0 (AutoAWQ
    #   convention: 0 is not forced into the range), q = [round(2), clamp(17)] = [2, 15].
    #   Zero-padding the tail to 4 would have made min 0 and range 4.25: a different scale.
    # group 0 (row 1): all zero -> scale = 1e-5/15, zero 0, q 0, w_hat 0 (no NaN).
    w = torch.tensor(
        [
            [-1.25, 0.0, 0.6, 2.5, -3.0, 0.75],
            [0.0, 0.0, 0.0, 0.0, 0.5, 4.25],
        ]
    )
    spec = QuantSpec(bits=4, group_size=4)
    qw = quantize_weight(w, spec)
    eps_scale = (torch.tensor(SCALE_EPS, dtype=torch.float32) / 15).item()
    assert qw.scale.tolist() == [[0.25, 0.25], [eps_scale, 0.25]]
    assert qw.zero.tolist() == [[5, 12], [0, 0]]
    assert qw.q.tolist() == [[0, 5, 7, 15, 0, 15], [0, 0, 0, 0, 2, 15]]
    assert qw.dequantize().tolist() == [
        [-1.25, 0.0, 0.5, 2.5, -3.0, 0.75],
        [0.0, 0.0, 0.0, 0.0, 0.5, 3.75],
    ]
    assert qw.shape == (2, 6) and qw.n_groups == 2
    # The ragged group is quantized exactly as if it stood alone.
    s_tail, z_tail = compute_qparams(w[:, 4:], QuantSpec(bits=4, group_size=2))
    assert torch.equal(s_tail[:, 0], qw.scale[:, 1]) and torch.equal(z_tail[:, 0], qw.zero[:, 1])


def test_symmetric_hand_checked():
    # absmax 1.75 -> scale 1.75/7 = 0.25, zero 8; q_signed = [-7, 2, 4, -1] -> q = [1, 10, 12, 7]
    w = torch.tensor([[-1.75, 0.5, 1.0, -0.25]])
    spec = QuantSpec(bits=4, group_size=-1, symmetric=True)
    qw = quantize_weight(w, spec)
    assert qw.scale.tolist() == [[0.25]] and qw.zero.tolist() == [[8]]
    assert qw.q.tolist() == [[1, 10, 12, 7]]
    assert qw.dequantize().tolist() == w.tolist()


def test_symmetric_vs_asymmetric_structure():
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    for bits in range(2, 9):
        half = 1 << (bits - 1)
        sym = quantize_weight(w, QuantSpec(bits, 32, symmetric=True))
        assert (sym.zero == half).all()
        q_signed = sym.q.int() - half
        # scale = absmax / (2^(b-1) - 1): the signed range used is symmetric.
        assert q_signed.min() >= -(half - 1) and q_signed.max() <= half - 1
        assert q_signed.abs().amax() == half - 1
        asym = quantize_weight(w, QuantSpec(bits, 32, symmetric=False))
        assert asym.q.max() <= (1 << bits) - 1
        # randn groups span 0, so zero is not clamped and each group's min maps to 0.
        assert (asym.q.view(16, 3, 32).amin(-1) == 0).all()
        # asymmetric uses the full range: never worse on the worst element per group.
        err_sym = (sym.dequantize() - w).abs().amax()
        err_asym = (asym.dequantize() - w).abs().amax()
        assert err_asym <= err_sym * 1.01


def test_bits8_error_tiny():
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    spec = QuantSpec(bits=8, group_size=64)
    qw = quantize_weight(w, spec)
    err = (qw.dequantize() - w).abs()
    # rounding error is at most half a step per group
    step = qw.scale.repeat_interleave(64, dim=1)
    assert (err <= step * 0.5 + 1e-6).all()
    assert err.max() < 0.02 and (err.pow(2).mean() / w.pow(2).mean()) < 1e-4


def test_max_min_override():
    # observed min/max [-1.25, 2.5]; override min -2.5, max 1.25 -> scale 0.25, zero 10.
    # q = round(w/0.25)+10 = [5, 10, 12, clamp(20)=15]: 2.5 saturates to (15-10)*0.25 = 1.25.
    w = torch.tensor([[-1.25, 0.0, 0.6, 2.5]])
    spec = QuantSpec(bits=4, group_size=4)
    qw = quantize_weight(w, spec, max_val=torch.tensor([[1.25]]), min_val=torch.tensor([[-2.5]]))
    assert qw.scale.tolist() == [[0.25]] and qw.zero.tolist() == [[10]]
    assert qw.q.tolist() == [[5, 10, 12, 15]]
    assert qw.dequantize().tolist() == [[-1.25, 0.0, 0.5, 1.25]]
    # only max given: min stays observed (-1.25): range 2.5 -> scale 1/6
    s, z = compute_qparams(w, spec, max_val=torch.tensor([[1.25]]))
    assert torch.allclose(s, torch.tensor([[2.5 / 15]]))
    # symmetric: absmax = max(|max_val|, |observed min|) = 1.75 -> scale 0.25
    s, z = compute_qparams(w, QuantSpec(4, 4, True), max_val=torch.tensor([[1.75]]))
    assert s.tolist() == [[0.25]] and z.tolist() == [[8]]
    # fake_quantize honours the override too
    assert fake_quantize(w, spec, max_val=torch.tensor([[1.25]]), min_val=torch.tensor([[-2.5]])).tolist() == [
        [-1.25, 0.0, 0.5, 1.25]
    ]
    with pytest.raises(ValueError, match="max_val"):
        compute_qparams(w, spec, max_val=torch.ones(2, 2))


def test_all_zero_and_constant_rows_are_finite():
    w = torch.zeros(3, 10)
    w[1] = 7.0
    w[2] = -1e-30
    for bits in (2, 4, 8):
        for sym in (False, True):
            spec = QuantSpec(bits, 4, sym)
            qw = quantize_weight(w, spec)
            assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
            w_hat = qw.dequantize()
            assert torch.isfinite(w_hat).all()
            assert (w_hat[0] == 0).all()
            assert torch.equal(fake_quantize(w, spec), w_hat)


def test_fake_quantize_matches_and_keeps_dtype():
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = torch.randn(8, 70).to(dtype)
        for spec in (QuantSpec(4, 32), QuantSpec(3, -1, True), QuantSpec(5, 7)):
            fq = fake_quantize(w, spec)
            assert fq.dtype == dtype and fq.shape == w.shape
            qw = quantize_weight(w, spec)
            assert torch.equal(fq, qw.dequantize(dtype))


def test_3d_expert_weights_are_rows():
    torch.manual_seed(3)
    w = torch.randn(3, 8, 40)
    spec = QuantSpec(4, 16)
    qw = quantize_weight(w, spec)
    assert qw.q.shape == (3, 8, 40) and qw.scale.shape == (3, 8, 3) and qw.zero.shape == (3, 8, 3)
    for e in range(3):
        one = quantize_weight(w[e], spec)
        assert torch.equal(one.q, qw.q[e]) and torch.equal(one.scale, qw.scale[e])
        assert torch.equal(one.zero, qw.zero[e])
    assert torch.equal(fake_quantize(w, spec), qw.dequantize())


def test_quantized_weight_container():
    w = torch.randn(4, 8)
    qw = quantize_weight(w, QuantSpec(4, 4))
    assert isinstance(qw, QuantizedWeight)
    assert qw.in_features == 8 and qw.out_features == 4 and qw.n_groups == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits must be an integer from 2 to 8"),
        (dict(bits=9), "bits must be an integer from 2 to 8"),
        (dict(group_size=0), "group_size must be a positive integer or -1"),
        (dict(group_size=-2), "group_size must be a positive integer or -1"),
    ],
)
def test_bad_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_group_larger_than_in_features():
    spec = QuantSpec(4, 128)
    spec.validate(128)
    spec.validate(576)
    with pytest.raises(ValueError, match="group_size 128 is larger than in_features 64"):
        spec.validate(64)
    with pytest.raises(ValueError, match="larger than in_features"):
        compute_qparams(torch.randn(4, 64), spec)
    QuantSpec(4, -1).validate(3)


def test_non_finite_weight_rejected():
    w = torch.randn(2, 8)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(w, QuantSpec(4, 4))
