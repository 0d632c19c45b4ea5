"""The bad-input rows of docs/errors.md not covered next to their feature's own tests.

Each test asserts the message a user sees, not just the exception type.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from tiny_models import build

import awqfx
from awqfx.api import (
    AWQConfig,
    CalibrationError,
    NonFiniteActivationError,
    apply_awq_pass,
    apply_plan,
    calibrate,
    prepare,
    search,
)
from awqfx.app.cli import main


def _calib(n=4, seq=16):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(0))


def test_fp16_overflow_during_calibration_names_the_node():
    m = build("llama").to(torch.float16)
    with torch.no_grad():  # activations past fp16's 65504 after the MLP up projection
        m.model.layers[0].mlp.up_proj.weight.mul_(3000.0)
        m.model.layers[0].mlp.gate_proj.weight.mul_(3000.0)
    gm = awqfx.capture(m)
    obs = prepare(gm, AWQConfig.of(group_size=16))
    with pytest.raises(NonFiniteActivationError) as err:
        calibrate(obs, _calib(), progress=False)
    msg = str(err.value)
    assert "activation at node" in msg and ("Inf" in msg or "NaN" in msg)


class _HeadsLM(nn.Module):
    """Embedding viewed as heads and merged back, norm, two linears. With ``specialize`` the head view
    reads the input's sizes as Python ints, so torch.export can only capture it with static shapes
    (the graph then holds ``view(2, 8, 2, 8)``); eagerly it runs at any shape."""

    def __init__(self, specialize: bool):
        super().__init__()
        self.specialize = specialize
        self.embed = nn.Embedding(32, 16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, input_ids):
        batch, seq = map(int, input_ids.shape) if self.specialize else input_ids.shape
        h = self.embed(input_ids).view(batch, seq, 2, 8).flatten(2)
        return self.down(torch.relu(self.up(self.norm(h))))


def _token_ids(batch, seq=8):
    return torch.randint(0, 32, (batch, seq), generator=torch.Generator().manual_seed(0))


def test_static_capture_warns_and_calibration_refuses_other_shapes():
    torch.manual_seed(0)
    model, calib, cfg = _HeadsLM(specialize=True).eval(), _token_ids(8), AWQConfig.of(group_size=16)
    with pytest.warns(UserWarning, match=r"_HeadsLM could not be exported with a dynamic batch and sequence length"
                                         r".*static in batch = 2 and sequence length = 8.*static_inputs"):
        gm = awqfx.capture(model, example_inputs=(_token_ids(2),))
    with pytest.raises(CalibrationError, match=r"batch of shape \[8, 8\].*static input shape \[2, 8\]"
                                               r".*static_inputs=\(calib\[:batch_size\],\)"):
        calibrate(prepare(gm, cfg), calib, progress=False)
    with pytest.warns(UserWarning, match=r"static in batch = 8 and sequence length = 8"):
        at_calib_shape = awqfx.capture(model, example_inputs=(_token_ids(2),), static_inputs=(calib[:8],))
    qgm = apply_awq_pass(at_calib_shape, calib, cfg)
    assert qgm(calib).shape == (8, 8, 16)


def test_dynamic_capture_does_not_warn_and_calibrates_any_shape():
    model = _HeadsLM(specialize=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = awqfx.capture(model, example_inputs=(_token_ids(2),))
    observed = calibrate(prepare(gm, AWQConfig.of(group_size=16)), _token_ids(8, seq=12), progress=False)
    assert observed.calibration["sequences"] == 8


def test_plan_that_does_not_match_the_model():
    llama = build("llama")
    cfg = AWQConfig.of(group_size=16, method="rtn")
    plan = search(prepare(awqfx.capture(llama), cfg), cfg, progress=False)
    with pytest.raises(ValueError, match="the plan names parameters this module does not have"):
        apply_plan(build("gpt2"), plan)


def test_group_size_larger_than_in_features_and_bits_outside_range():
    gm = awqfx.capture(build("llama"))
    with pytest.raises(ValueError, match="group_size"):
        prepare(gm, AWQConfig.of(group_size=256))
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            AWQConfig.of(bits=bits)


def test_nan_weights_are_rejected_with_the_weight_name():
    m = build("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError) as err:  # before any calibration work
        prepare(awqfx.capture(m), AWQConfig.of(group_size=16))
    assert "model.layers.1.mlp.down_proj.weight" in str(err.value) and "NaN or Inf" in str(err.value)


def test_cli_runtime_failure_is_exit_1_with_one_paragraph(tmp_path, capsys):
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("awqfx: ") and "Traceback" not in err and err.count("\n") == 1


def test_quantized_tied_head_is_refused_before_calibration(tmp_path, monkeypatch):
    """quantize_head on a model whose head is tied to the embeddings: no format can store a packed
    tied head, so quantize_model refuses right after discovery, naming lm_head."""
    from tiny_models import save_model_dir

    import awqfx.app.jobs
    from awqfx.app.jobs import quantize_model
    from awqfx.formats import FormatError

    def too_late(*args, **kwargs):
        raise AssertionError("calibration or search was reached: the refusal came too late")

    monkeypatch.setattr(awqfx.app.jobs, "calibrate", too_late)
    monkeypatch.setattr(awqfx.app.jobs, "search", too_late)
    save_model_dir(tmp_path / "model", "llama", tie_word_embeddings=True)
    cfg = AWQConfig.of(group_size=32, quantize_head=True)
    with pytest.raises(FormatError, match=r"layer lm_head\.weight .* is tied"):
        quantize_model(str(tmp_path / "model"), str(tmp_path / "q"), cfg, samples=2, seq_len=16, progress=False)
    assert not (tmp_path / "q").exists()


def test_workflow_imports_without_the_posix_resource_module(monkeypatch):
    """``resource`` is POSIX-only: without it awqfx.app.jobs still imports and the report says n/a."""
    import importlib
    import sys

    import awqfx.app.jobs
    import awqfx.memory

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` now raises ImportError
    try:
        importlib.reload(awqfx.memory)
        workflow = importlib.reload(awqfx.app.jobs)
        assert workflow.peak_rss_mb() is None
        assert "peak memory (RSS)  n/a" in workflow.Report().table()
    finally:
        monkeypatch.undo()
        importlib.reload(awqfx.memory)
        importlib.reload(awqfx.app.jobs)
    assert awqfx.app.jobs.peak_rss_mb() > 0


def test_input_scales_that_do_not_match_the_graph_are_refused():
    """An activation group's input scale attaches by consumer weight name and size, or not at all."""
    from tiny_models import build

    from awqfx.passes.input_scales import InputScaleError, insert_input_scales

    gm = awqfx.capture(build("gpt2"))
    with pytest.raises(InputScaleError, match=r"no linear op of this graph reads: \['transformer.h.0.mlp.fc9.weight'\]"):
        insert_input_scales(gm, {"transformer.h.0.mlp.fc9.weight": torch.ones(256)})
    with pytest.raises(InputScaleError, match="has 5 entries but its linear op .* reads 256 input channels"):
        insert_input_scales(gm, {"transformer.h.0.mlp.c_proj.weight": torch.ones(5)})
    attrs = insert_input_scales(gm, {"transformer.h.0.mlp.c_proj.weight": torch.full((256,), 0.5)})
    muls = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in attrs.values()]
    assert len(muls) == 1 and torch.equal(getattr(gm, attrs["transformer.h.0.mlp.c_proj.weight"]), torch.full((256,), 0.5))
