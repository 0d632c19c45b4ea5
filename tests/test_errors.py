"""The bad-input rows of docs/errors.md not covered next to their feature's own tests.

Each test asserts the message a user sees, not just the exception type.
"""
from __future__ import annotations

import json

import pytest
import torch

import awqfx
from awqfx.api import AWQConfig, NonFiniteActivationError, apply_plan, calibrate, prepare, search
from awqfx.app.cli import main
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
