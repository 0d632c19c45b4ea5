"""QuantLinear and the awqfx::int4_linear / awqfx::dequant_linear custom ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from awqfx import kernels
from awqfx.modules import QuantLinear
from awqfx.quant import QuantSpec, quantize_weight

BF16_U = 2.0**-8  # bf16 unit roundoff (8 significant bits)


def _qw(out_f, in_f, bits, group_size, symmetric=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    return quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric))


def _x(*shape, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _bias(n, seed=2):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ dequant path


@pytest.mark.parametrize(
    "bits,group_size,in_f",
    [(2, 64, 256), (3, 32, 256), (4, 64, 256), (8, 128, 256), (5, 32, 96), (4, 32, 80), (3, -1, 80)],
)
def test_dequant_backend_matches_reference(bits, group_size, in_f):
    qw = _qw(48, in_f, bits, group_size)
    b = _bias(48)
    m = QuantLinear.from_quantized(qw, b, backend="dequant")
    assert m.active_backend == "dequant"
    x = _x(3, 5, in_f)
    ref = F.linear(x, qw.dequantize(), b)
    y = m(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.equal(m.dequantize_weight(), qw.dequantize())  # bit-exact


def test_ragged_group_auto_falls_back_to_dequant():
    qw = _qw(32, 80, 4, 32)  # 80 = 2*32 + 16: ragged last group
    m = QuantLinear.from_quantized(qw, None)
    assert m.active_backend == "dequant"
    assert m.scales.shape == (32, 3)
    x = _x(4, 80)
    torch.testing.assert_close(m(x), F.linear(x, qw.dequantize()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        QuantLinear.from_quantized(qw, None, backend="int4pack")


def test_dequant_half_and_bf16_inputs():
    qw = _qw(32, 64, 3, 32)
    m = QuantLinear.from_quantized(qw, _bias(32), backend="dequant")
    for dt in (torch.float16, torch.bfloat16):
        x = _x(4, 64, dtype=dt)
        y = m(x)
        assert y.dtype == dt
        ref = F.linear(x.float(), qw.dequantize(), m.bias)
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


# ------------------------------------------------------------------------------ int4pack path


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4pack_backend_matches_reference(group_size, symmetric):
    qw = _qw(64, 256, 4, group_size, symmetric=symmetric)
    b = _bias(64)
    m = QuantLinear.from_quantized(qw, b, backend="int4pack")
    assert m.active_backend == "int4pack"
    for shape in [(1, 256), (2, 7, 256)]:
        x = _x(*shape)
        y = m(x)
        assert y.shape == (*shape[:-1], 64) and y.dtype == torch.float32
        xb = x.to(torch.bfloat16).float()
        ref = F.linear(xb, qw.dequantize(), b)
        scale = ref.abs().max().item()
        # bf16 weights (scale and float zero rounded) + bf16 output: ~1% of the output range
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * scale)
        assert ((y - ref).norm() / ref.norm()).item() < 1e-2
        # the kernel multiplies by exactly its effective weight (up to the bf16 output rounding)
        eff = kernels.int4pack_effective_weight(m._int4_weight, m._int4_scale_zeros, group_size, 256)
        ref_eff = F.linear(xb, eff, b)
        torch.testing.assert_close(y, ref_eff, rtol=1e-2, atol=BF16_U * scale)


def test_int4pack_bf16_input_and_output_dtype():
    qw = _qw(32, 128, 4, 64)
    m = QuantLinear.from_quantized(qw, None, backend="int4pack")
    x = _x(3, 128, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), qw.dequantize())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    y16 = m(x.to(torch.float16))
    assert y16.dtype == torch.float16


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4pack_representation(symmetric):
    """What the int4 kernel multiplies by, recovered by running it on an identity matrix."""
    out_f, in_f, g = 48, 128, 32
    qw = _qw(out_f, in_f, 4, g, symmetric=symmetric)
    m = QuantLinear.from_quantized(qw, None, backend="int4pack")
    w, sz = m._int4_weight, m._int4_scale_zeros
    assert w.dtype == torch.uint8 and w.shape == (out_f, in_f // 2)
    assert sz.dtype == torch.bfloat16 and sz.shape == (in_f // g, out_f, 2)

    # 1. the integer codes survive the kernel layout exactly
    codes = kernels.int4pack_unpack_codes(w, g, in_f, out_f)
    assert torch.equal(codes, qw.q.to(torch.int32))

    # 2. the kernel computes (q - 8) * s + z with our bf16 s and z (bit for bit on the AVX-512
    #    machine this was written on; allow 1 bf16 ulp for other kernel code paths)
    gidx = torch.arange(in_f) // g
    s_b = sz[..., 0].float().t()[:, gidx]
    z_b = sz[..., 1].float().t()[:, gidx]
    eff = kernels.int4pack_effective_weight(w, sz, g, in_f)
    formula = (qw.q.float() - 8.0) * s_b + z_b
    torch.testing.assert_close(eff, formula.to(torch.bfloat16).float(), rtol=2.0**-7, atol=1e-30)

    # 3. vs the exact fp32 weight: only bf16 rounding of s, of z = (8 - zp) s and of the result
    W = qw.dequantize()
    s = qw.scale[:, gidx]
    zp = qw.zero.float()[:, gidx]
    bound = BF16_U * ((qw.q.float() - 8).abs() * s + (8 - zp).abs() * s + W.abs()) * 1.001 + 1e-30
    assert ((eff - W).abs() <= bound).all()

    # 4. symmetric (z = 0) with bf16-representable scales: exact in bf16 terms
    if symmetric:
        qw_b = copy.copy(qw)
        qw_b.scale = qw.scale.to(torch.bfloat16).float()
        m_b = QuantLinear.from_quantized(qw_b, None, backend="int4pack")
        eff_b = kernels.int4pack_effective_weight(m_b._int4_weight, m_b._int4_scale_zeros, g, in_f)
        assert torch.equal(eff_b, qw_b.dequantize().to(torch.bfloat16).float())
        assert torch.equal(m_b.dequantize_weight(), qw_b.dequantize())

    # and dequantize_weight() is the exact fp32 weight regardless of backend
    assert torch.equal(m.dequantize_weight(), W)


def test_backend_selection():
    # auto: int4pack when 4-bit, group in {32..256}, in % g == 0 and (CPU) out % 16 == 0
    assert QuantLinear.from_quantized(_qw(32, 128, 4, 128), None).active_backend == "int4pack"
    assert QuantLinear.from_quantized(_qw(24, 128, 4, 128), None).active_backend == "dequant"
    assert QuantLinear.from_quantized(_qw(32, 128, 4, 16), None).active_backend == "dequant"
    assert QuantLinear.from_quantized(_qw(32, 128, 8, 128), None).active_backend == "dequant"
    with pytest.raises(ValueError):
        QuantLinear.from_quantized(_qw(32, 128, 3, 128), None, backend="int4pack")
    with pytest.raises(ValueError):
        QuantLinear.from_quantized(_qw(24, 128, 4, 128), None, backend="int4pack")
    with pytest.raises(ValueError):
        QuantLinear(128, 32, bits=4, group_size=48, backend="int4pack")
    with pytest.raises(ValueError):
        QuantLinear(128, 32, backend="fast")
    r = repr(QuantLinear.from_quantized(_qw(32, 128, 4, 64), None))
    assert "bits=4" in r and "group_size=64" in r and "backend=int4pack" in r


# ------------------------------------------------------------------------------ storage


@pytest.mark.parametrize("backend", ["int4pack", "dequant"])
def test_state_dict_holds_packed_tensors_only(backend):
    out_f, in_f = 64, 256
    qw = _qw(out_f, in_f, 4, 64)
    b = _bias(out_f)
    m = QuantLinear.from_quantized(qw, b, backend=backend)
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "qzeros", "bias"}
    assert sd["qweight"].dtype == torch.int32 and sd["qweight"].shape == (out_f, in_f * 4 // 32)
    for t in sd.values():
        assert not (t.is_floating_point() and t.numel() >= out_f * in_f)
    assert not list(m.parameters())
    # resident bytes: one layout of the codes (int32 qweight, or the kernel's uint8 [N, K/2]: the
    # same 4 bits a weight), fp32 scales, uint8 zeros, and the int4 kernel's bf16 scale/zeros
    codes_and_groups = out_f * in_f // 2 + out_f * 4 * 4 + out_f * 4
    kernel_scales = (in_f // 64) * out_f * 2 * 2 if backend == "int4pack" else 0
    assert m.weight_bytes() == codes_and_groups + kernel_scales
    assert (m.qweight is None) == (backend == "int4pack")
    assert m.weight_bytes() < out_f * in_f * 2 * 0.35  # under 35 % of a bf16 weight

    # skeleton + load_state_dict rebuilds the kernel cache
    sk = QuantLinear(in_f, out_f, bits=4, group_size=64, bias=True, backend=backend)
    sk.load_state_dict(sd)
    assert sk.active_backend == backend
    x = _x(3, in_f)
    assert torch.equal(sk(x), m(x))

    # loading through a parent module (post hooks run per submodule), also with assign=True
    parent_sd = torch.nn.Sequential(m).state_dict()
    for assign in (False, True):
        dev = "meta" if assign else None
        parent = torch.nn.Sequential(
            QuantLinear(in_f, out_f, bits=4, group_size=64, bias=True, backend=backend, device=dev)
        )
        parent.load_state_dict(parent_sd, assign=assign)
        assert parent[0].active_backend == backend
        assert torch.equal(parent(x), m(x))


def test_dtype_casts_keep_scales_exact_and_rebuild_cache():
    qw = _qw(32, 128, 4, 32)
    m = QuantLinear.from_quantized(qw, _bias(32), backend="int4pack")
    m.half()
    assert m.scales.dtype == torch.float32 and m.bias.dtype == torch.float16
    assert m._int4_scale_zeros.dtype == torch.bfloat16
    assert m.active_backend == "int4pack"
    assert torch.equal(m.dequantize_weight(), qw.dequantize())
    assert m(_x(2, 128, dtype=torch.float16)).dtype == torch.float16
    # meta device: no kernel there -> dequant; back on cpu -> int4pack, same numbers
    m2 = copy.deepcopy(m).to("meta")
    assert m2.active_backend == "dequant" and m2._int4_weight is None
    assert m2(torch.empty(2, 128, dtype=torch.float16, device="meta")).shape == (2, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_move_repacks():
    qw = _qw(64, 256, 4, 64)
    m = QuantLinear.from_quantized(qw, _bias(64), backend="auto")
    x = _x(5, 256)
    y_cpu = m(x)
    m = m.cuda()
    assert torch.equal(m.dequantize_weight().cpu(), qw.dequantize())
    y = m(x.cuda()).cpu()
    ref = F.linear(x.bfloat16().float(), qw.dequantize(), m.bias.cpu())
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    torch.testing.assert_close(y, y_cpu, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    m = m.cpu()
    assert m.active_backend == "int4pack" and torch.equal(m(x), y_cpu)


# ------------------------------------------------------------------------------ export


def _tiny_model():
    return torch.nn.Sequential(
        QuantLinear.from_quantized(_qw(64, 128, 4, 32, seed=3), _bias(64), backend="int4pack"),
        torch.nn.ReLU(),
        QuantLinear.from_quantized(_qw(48, 64, 3, 32, seed=4), None),  # dequant, 3-bit
        torch.nn.ReLU(),
        QuantLinear.from_quantized(_qw(16, 48, 4, 32, seed=5), _bias(16, seed=6)),  # ragged 48 = 32 + 16
    ).eval()


def test_export_save_load_roundtrip(tmp_path):
    model = _tiny_model()
    x = _x(4, 128)
    batch = Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.awqfx.int4_linear.default in targets
    assert targets.count(torch.ops.awqfx.dequant_linear.default) == 2
    # fake impls: symbolic batch dim propagated through the custom ops
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target in (
            torch.ops.awqfx.int4_linear.default,
            torch.ops.awqfx.dequant_linear.default,
        ):
            val = n.meta["val"]
            assert isinstance(val.shape[0], torch.SymInt)
            assert val.shape[1] == {128: 64, 64: 48, 48: 16}[n.args[0].meta["val"].shape[1]]
    path = tmp_path / "tiny.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    for bs in (1, 4, 9):
        xb = _x(bs, 128, seed=bs)
        assert torch.equal(loaded(xb), model(xb))


def _called(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_torch_compile_calls_the_int4_kernel_itself_below_the_dense_threshold():
    """Below a layer's dense threshold a compiled graph calls the int4 kernel directly (the custom
    op's Python dispatch would run on every call of the compiled step); from it on, the op (its
    dense path); an exported graph always holds the op. Compiled outputs equal eager ones."""
    model = _tiny_model()
    model[0]._dense_from = 8
    graphs = []

    def record(gm, example_inputs):
        graphs.append(_called(gm))
        return gm.forward

    compiled = torch.compile(model, backend=record, dynamic=False)
    with torch.no_grad():
        for rows in (1, 8):
            x = _x(rows, 128, seed=rows)
            assert torch.equal(compiled(x), model(x))
    few, many = graphs
    kernel, op = "aten._weight_int4pack_mm_for_cpu", "awqfx.int4_linear"
    assert kernel in few and op not in few
    assert op in many and kernel not in many
    assert f"{op}.default" in _called(torch.export.export(model, (_x(1, 128),)).graph_module)
    torch._dynamo.reset()
    inductor = torch.compile(model, dynamic=False)
    try:
        with torch.no_grad():
            for rows in (1, 8):
                x = _x(rows, 128, seed=rows)
                torch.testing.assert_close(inductor(x), model(x), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_export_3d_input_dynamic_dims():
    model = _tiny_model()
    x = _x(2, 5, 128)
    ep = torch.export.export(
        model, (x,), dynamic_shapes=({0: Dim("b", max=64), 1: Dim("t", max=4096)},)
    )
    out = ep.module()(_x(3, 11, 128))
    assert out.shape == (3, 11, 16)
    assert torch.equal(out, model(_x(3, 11, 128)))


def test_fake_impls_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw = _qw(32, 80, 3, 32)
    m = QuantLinear.from_quantized(qw, None, backend="dequant")
    m4 = QuantLinear.from_quantized(_qw(32, 128, 4, 64), _bias(32), backend="int4pack")
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.awqfx.dequant_linear(
            torch.empty(6, 2, 80), m.qweight, m.scales, m.qzeros, 3, 32, 80, None
        )
        y4 = torch.ops.awqfx.int4_linear(
            torch.empty(6, 128, dtype=torch.bfloat16), m4._int4_weight, m4._int4_scale_zeros, 64, m4.bias
        )
    assert y.shape == (6, 2, 32) and y.dtype == torch.float32
    assert y4.shape == (6, 32) and y4.dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_unpack_codes_matches_packing(bits):
    from awqfx.packing import pack_int32, unpack_int32

    for n in (77, 64, 5):
        q = torch.randint(0, 1 << bits, (5, n), generator=torch.Generator().manual_seed(bits))
        packed = pack_int32(q, bits)
        got = kernels.unpack_codes(packed, bits, n)
        assert torch.equal(got.to(torch.int64), q)
        assert torch.equal(got.to(torch.uint8), unpack_int32(packed, bits, n))
