"""The bad-input rows of docs/errors.md not covered next to their feature's own tests.

Each test asserts the message a user sees, not just the exception type.
"""
from __future__ import annotations

import json

import pytest
import torch

import awqfx
from awqfx.api import AWQConfig, NonFiniteActivationError, apply_awq_pass, apply_plan, calibrate, prepare, search
from awqfx.cli import main
from tiny_models import build


def _calib(n=4, seq=16):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(0))


def test_fp16_overflow_during_calibration_names_the_node():
    m = build("llama").to(torch.float16)
    with torch.no_grad():  # activations past fp16's 65504 after the MLP up projection
        m.model.layers[0].mlp.up_proj.weight.mul_(3000.0)
        m.model.layers[0].mlp.gate_proj.weight.mul_(3000.0)
    gm = awqfx.capture(m)
    obs = prepare(gm, AWQConfig(group_size=16))
    with pytest.raises(NonFiniteActivationError) as err:
        calibrate(obs, _calib(), progress=False)
    msg = str(err.value)
    assert "activation at node" in msg and ("Inf" in msg or "NaN" in msg)


def test_plan_that_does_not_match_the_model():
    llama = build("llama")
    cfg = AWQConfig(group_size=16, method="rtn")
    plan = search(prepare(awqfx.capture(llama), cfg), cfg, progress=False)
    with pytest.raises(ValueError, match="the plan names parameters this module does not have"):
        apply_plan(build("gpt2"), plan)


def test_group_size_larger_than_in_features_and_bits_outside_range():
    gm = awqfx.capture(build("llama"))
    with pytest.raises(ValueError, match="group_size"):
        prepare(gm, AWQConfig(group_size=256))
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            AWQConfig(bits=bits)


def test_nan_weights_are_rejected_with_the_weight_name():
    m = build("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError) as err:  # before any calibration work
        prepare(awqfx.capture(m), AWQConfig(group_size=16))
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
    import awqfx.api
    from awqfx.formats import FormatError
    from awqfx.workflow import quantize_model
    from tiny_models import save_model_dir

    def too_late(*args, **kwargs):
        raise AssertionError("calibration or search was reached: the refusal came too late")

    monkeypatch.setattr(awqfx.api, "calibrate", too_late)
    monkeypatch.setattr(awqfx.api, "search", too_late)
    save_model_dir(tmp_path / "model", "llama", tie_word_embeddings=True)
    cfg = AWQConfig(group_size=32, quantize_head=True)
    with pytest.raises(FormatError, match=r"layer lm_head\.weight .* is tied"):
        quantize_model(str(tmp_path / "model"), str(tmp_path / "q"), cfg, samples=2, seq_len=16, progress=False)
    assert not (tmp_path / "q").exists()


def test_workflow_imports_without_the_posix_resource_module(monkeypatch):
    """``resource`` is POSIX-only: without it awqfx.workflow still imports and the report says n/a."""
    import importlib
    import sys

    import awqfx.workflow

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` now raises ImportError
    try:
        workflow = importlib.reload(awqfx.workflow)
        assert workflow.peak_rss_mb() is None
        assert "peak memory (RSS)  n/a" in workflow.Report().table()
    finally:
        monkeypatch.undo()
        importlib.reload(awqfx.workflow)
    assert awqfx.workflow.peak_rss_mb() > 0
