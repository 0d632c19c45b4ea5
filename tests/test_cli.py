"""The command line: exit codes, one-paragraph errors, inspect output (text, JSON, graph)."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build, save_model_dir, token_ids

from awqfx.app.cli import main
from awqfx.apply import apply_plan
from awqfx.export import PLAN_SUBDIR, load_quantized
from awqfx.params import get_param
from awqfx.plan import AWQPlan


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    save_model_dir(path, "llama")
    return path


def test_inspect_json_matches_state_dict_names(tiny_dir, capsys):
    assert main(["inspect", str(tiny_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    groups = data["groups"]
    assert len(groups) == 9 and {g["kind"] for g in groups} == {"norm->linear", "linear->linear"}
    assert groups[1]["producer"] == "model.layers.0.self_attn.v_proj.weight"
    assert groups[1]["consumers"] == ["model.layers.0.self_attn.o_proj.weight"]
    assert groups[1]["consumer_maps"][0]["repeat"] == 2  # GQA
    names = set(build("llama").state_dict())
    assert all(c in names for g in groups for c in g["consumers"])
    assert {r["blocking_op"] for r in data["rejected"]} >= {"add (residual or bias)", "silu", "graph output"}


def test_inspect_table_and_graph(tiny_dir, tmp_path, capsys):
    out = tmp_path / "g.html"
    assert main(["inspect", str(tiny_dir), "--graph", str(out)]) == 0
    text = capsys.readouterr().out
    assert "9 scale groups" in text and "q_proj, k_proj, v_proj" in text and "rejected candidates" in text
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "v_proj.weight" in page


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "/nonexistent/model"], "does not exist"),
    (["inspect", __file__], "neither a Hugging Face model directory"),
])
def test_bad_model_path_is_a_usage_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_graph_suffix_and_no_command(tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tiny_dir), "--graph", "out.png"])
    assert e.value.code == 2
    assert main([]) == 2


@pytest.mark.parametrize("cmd, flags", [
    ("inspect", ["--json", "--graph", "MODEL", "--plan"]),
    ("quantize", ["--bits", "--group-size", "--out", "--calib", "--samples", "--seq-len", "--format", "--device",
                  "--eval", "--overwrite", "--symmetric", "--scale-form", "--clip", "--propagate", "--method",
                  "--compute-dtype", "--clip-qk", "--clip-grid", "--clip-rounds", "minmax", "--guard-samples"]),
    ("eval", ["--text", "--bits", "--group-size", "--methods", "--json", "--max-windows", "--plot", "--compute-dtype"]),
    ("bench", ["--prompt-len", "--new-tokens", "--repeats", "--device", "--json", "--bits"]),
])
def test_help_documents_every_flag(cmd, flags, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text


@pytest.mark.parametrize("flag, expect", [("float32", None), ("bfloat16", "bfloat16"), ("auto", "auto")])
def test_compute_dtype_sets_calibration_and_search_precision(flag, expect):
    from awqfx.app.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["quantize", "--out", "x", "--compute-dtype", flag])
    cfg = _config_from_args(args)
    assert (cfg.runtime.calib_dtype, cfg.runtime.search_dtype) == (expect, expect)
    assert cfg.clip.skip_qk and not _config_from_args(build_parser().parse_args(["quantize", "--out", "x", "--clip-qk"])).clip.skip_qk
    c2 = _config_from_args(build_parser().parse_args(["quantize", "--out", "x", "--clip", "sym", "--clip-grid", "40",
                                                      "--clip-rounds", "0"]))
    assert (c2.clip.mode, c2.clip.grid, c2.clip.rounds) == ("sym", 40, 0)
    assert _config_from_args(build_parser().parse_args(["quantize", "--out", "x", "--clip", "none"])).clip is None


QUICK = ["--samples", "4", "--seq-len", "16", "--quiet", "--n-grid", "4"]


def test_quantize_end_to_end_and_load(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_dir), "--out", str(out), "--group-size", "32", "--eval", "-", "--eval-windows", "2"] + QUICK)
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("scale groups              9 found", "quantized weights", "perplexity before", "perplexity after",
                   "time: search", "peak memory", "size after"):
        assert needle in text
    model = load_quantized(out)
    ids = token_ids()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert (out / "awq_plan" / "plan.json").is_file() and (out / "tokenizer.json").is_file()
    # --out exists now: refused with a usage error unless --overwrite
    assert main(["quantize", str(tiny_dir), "--out", str(out)] + QUICK) == 2
    assert "--overwrite" in capsys.readouterr().err



def test_guard_is_reported_by_quantize_and_by_inspect_plan(tiny_dir, tmp_path, capsys):
    """``--guard-samples 4`` holds 4 of the 12 calibration sequences back: the summary counts the
    checked and the unscaled groups, and ``inspect --plan`` lists every searched group with its
    gains, as the saved plan records them."""
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--out", str(out), "--group-size", "32", "--guard-samples", "4",
                 "--samples", "12", "--seq-len", "16", "--quiet", "--n-grid", "4"]) == 0
    summary = capsys.readouterr().out
    plan = AWQPlan.load(out / PLAN_SUBDIR)
    assert plan.metadata["guard_sample"] == {"input_ids": [4, 16]}
    rows = plan.group_gains()
    checked = [r for r in rows if r["held_gain"] is not None]
    rejected = [r["name"] for r in checked if r["rejected"]]
    assert checked and all((r["held_gain"] <= 0) == bool(r["rejected"]) for r in checked)
    assert f"{len(checked)} scaled groups checked on 4 held-back sequences" in summary
    assert (f"{len(rejected)} left unscaled" if rejected else "none left unscaled") in summary
    assert main(["inspect", "--plan", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"{len(rows)} searched scale groups" in table and "gain (held out)" in table
    for r in rows:
        line = next(ln for ln in table.splitlines() if ln.startswith(r["name"] + " "))
        assert line.split()[1] == r["choice"].split()[0] and (("kept s = 1" in line) == bool(r["rejected"]))
    assert main(["inspect", "--plan", str(out / PLAN_SUBDIR), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"groups": rows, "guard_samples": 4}
    assert main(["inspect", "--plan", str(tmp_path)]) == 2
    assert "no plan.json" in capsys.readouterr().err
    assert main(["inspect", str(tiny_dir), "--plan", str(out)]) == 2
    assert main(["quantize", str(tiny_dir), "--out", str(tmp_path / "bad"), "--guard-samples", "-1"] + QUICK) == 2
    assert "guard_samples" in capsys.readouterr().err

@pytest.mark.parametrize("arch", ["gemma2", "granite", "cohere", "olmo2", "starcoder2"])
def test_quantize_post_processed_logits_end_to_end(arch, tmp_path):
    """Softcapped / scaled logits (gemma2, granite, cohere; tied heads on gemma2, cohere, starcoder2):
    the head stays unquantized, the pack step succeeds, and the saved model computes the plan's logits."""
    src, out, calib = tmp_path / "src", tmp_path / "q", tmp_path / "calib.txt"
    model = save_model_dir(src, arch)
    calib.write_text("To be, or not to be, that is the question. " * 8)  # 4 x 16 tokens, no bundled plays
    assert main(["quantize", str(src), "--out", str(out), "--group-size", "32", "--calib", str(calib),
                 "--clip-grid", "4", "--clip-rounds", "0"] + QUICK) == 0
    plan = AWQPlan.load(out / PLAN_SUBDIR)
    head = model.get_output_embeddings().weight
    assert plan.weights and all(get_param(model, w) is not head for w in plan.weights)
    loaded = load_quantized(out, backend="dequant")
    ids = token_ids()
    with torch.no_grad():
        got, want, fp = loaded(ids).logits, apply_plan(model, plan)(ids).logits, model(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, fp, atol=1e-4)  # the weights really were quantized


def test_quantize_captures_a_static_only_model_at_the_calibration_shape(tiny_dir, tmp_path, monkeypatch):
    export = torch.export.export

    def static_only(*args, dynamic_shapes=None, **kwargs):
        if dynamic_shapes is not None:
            raise RuntimeError("simulated: the model specialises its input shape")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", static_only)
    with pytest.warns(UserWarning, match=r"LlamaForCausalLM could not be exported .*static in batch = 4 and "
                                         r"sequence length = 16"):
        rc = main(["quantize", str(tiny_dir), "--out", str(tmp_path / "q"), "--group-size", "32"] + QUICK)
    assert rc == 0  # QUICK calibrates on 4 x 16 tokens; a graph captured at the default [2, 8] cannot run them


def test_quantize_refuses_bad_input_before_work(tiny_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_dir), "--out", str(tmp_path / "a"), "--bits", "9"] + QUICK) == 2
    assert "bits" in capsys.readouterr().err
    assert main(["quantize", str(tiny_dir), "--out", str(tmp_path / "b"), "--group-size", "0"] + QUICK) == 2
    capsys.readouterr()
    # hidden 64 is not a multiple of 48: AutoAWQ cannot store it, refused before calibration
    assert main(["quantize", str(tiny_dir), "--out", str(tmp_path / "c"), "--group-size", "48", "--format", "autoawq"] + QUICK) == 2
    assert "--format autoawq cannot hold this model" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["quantize", str(tiny_dir), "--out", str(tmp_path / "d"), "--calib", "/nonexistent"] + QUICK) == 2


@pytest.mark.parametrize("arch, overrides, flags, needles", [
    # tiny llama: hidden 64, so group size 128 is larger than every layer's inputs
    ("llama", {}, ["--group-size", "128"], ["model.layers.0.mlp.down_proj.weight", "group_size 128 is larger than in_features 96"]),
    ("llama", {}, ["--bits", "3", "--group-size", "32", "--format", "autoawq"],
     ["layer model.layers.0.self_attn.q_proj.weight", "4-bit weights only, got bits=3"]),
    # intermediate 68: gate/up have 68 outputs (not a multiple of 8), down_proj 68 inputs (ragged with 32)
    ("llama", {"intermediate_size": 68}, ["--group-size", "32", "--format", "autoawq"],
     ["layer model.layers.0.mlp.gate_proj.weight", "out_features % 8 == 0", "got out_features=68",
      "layer model.layers.1.mlp.down_proj.weight", "ragged last group"]),
    ("llama", {}, ["--group-size", "48", "--format", "compressed-tensors"],
     ["layer model.layers.0.self_attn.q_proj.weight", "layer model.layers.1.self_attn.o_proj.weight",
      "ragged last group", "--group-size 32"]),
    ("gpt2", {}, ["--group-size", "32", "--format", "compressed-tensors"],
     ["layer transformer.h.0.mlp.c_fc.weight", "Conv1D", "nn.Linear"]),
    ("falcon", {}, ["--group-size", "32", "--format", "autoawq"],
     ["layer transformer.h.0.mlp.dense_4h_to_h.weight", "AWQ scale node"]),
    ("mixtral", {}, ["--group-size", "32", "--format", "autoawq"],
     ["layer model.layers.0.mlp.experts.down_proj (shape [4, 64, 96])", "3-D fused MoE expert weight"]),
], ids=["group-larger-than-inputs", "autoawq-bits", "autoawq-out8-and-ragged", "ct-ragged", "conv1d",
        "activation-scale", "moe-3d"])
def test_quantize_refuses_what_the_format_cannot_hold_before_calibration(
        arch, overrides, flags, needles, tmp_path, capsys, no_calibration):
    model_dir = tmp_path / "model"
    save_model_dir(model_dir, arch, **overrides)
    capsys.readouterr()
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out)] + flags + QUICK) == 2
    messages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("awqfx: ")]
    assert len(messages) == 1 and messages[0].startswith("awqfx: error: ")  # one paragraph, a usage error
    for needle in needles:
        assert needle in messages[0]
    assert not out.exists()


def test_quantize_autoawq_and_compressed_tensors_formats(tiny_dir, tmp_path):
    import json

    for fmt, method in (("autoawq", "awq"), ("compressed-tensors", "rtn")):
        out = tmp_path / fmt
        assert main(["quantize", str(tiny_dir), "--out", str(out), "--group-size", "32", "--format", fmt,
                     "--method", method] + QUICK) == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == ("awq" if fmt == "autoawq" else "compressed-tensors")


def test_eval_table_json_and_plot(tiny_dir, tmp_path, capsys, monkeypatch):
    import json

    import awqfx.app.jobs

    calls = []
    real = awqfx.app.jobs.calibrate
    monkeypatch.setattr(awqfx.app.jobs, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", str(tiny_dir), "--bits", "3,4", "--group-size", "32", "--max-windows", "2",
               "--json", str(js), "--plot", str(png)] + QUICK)
    assert rc == 0
    res = json.loads(js.read_text())
    assert [(r["method"], r["bits"]) for r in res["rows"]] == [("fp", 32), ("rtn", 3), ("awq", 3), ("rtn", 4), ("awq", 4)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RTN gap recovered" in capsys.readouterr().out
    assert len(calls) == 1  # one calibration serves every bit width
    assert main(["eval", str(tiny_dir), "--methods", "fp,hqq"]) == 2


def test_bench_prints_table(tiny_dir, tmp_path, capsys):
    import json

    js = tmp_path / "b.json"
    assert main(["bench", str(tiny_dir), "--group-size", "64", "--prompt-lens", "8,16", "--batches", "1,2",
                 "--new-tokens", "2", "--repeats", "1", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    names = [r["model"] for r in res["rows"]]
    assert names == ["fp32", "bf16", "int4 packed (bf16 rest)", "int4 packed (fp32 rest)"]
    for packed in res["rows"][2:]:
        assert packed["quantized_layers_vs_bf16"] < 0.35
        assert set(packed["kernels"].values()) == {"int4 kernel"}  # the tests pin the kernel choice
    assert all(set(r["prefill_tok_s"]) == {"8", "16"} and set(r["decode_tok_s"]) == {"1", "2"} for r in res["rows"])
    assert all(min(r["prefill_tok_s"].values()) > 0 and min(r["decode_tok_s"].values()) > 0 for r in res["rows"])
    out = capsys.readouterr().out
    assert "prefill 16" in out and "decode b2" in out and "kernels: int4 64x64g64: int4 kernel" in out
    with pytest.raises(SystemExit, match="2"):
        main(["bench", str(tiny_dir), "--prompt-lens", "8,0"])
    assert "expected positive integers separated by commas, got '8,0'" in capsys.readouterr().err


def test_bench_act_bits_measures_the_int8_packed_model(tiny_dir, tmp_path, capsys):
    import json

    js = tmp_path / "b.json"
    assert main(["bench", str(tiny_dir), "--act-bits", "8", "--prompt-lens", "8", "--batches", "1",
                 "--new-tokens", "2", "--repeats", "1", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert (res["bits"], res["group_size"], res["act_bits"], res["act_granularity"]) == (8, -1, 8, "per-token")
    assert [r["model"] for r in res["rows"]][2:] == ["w8a8 packed (bf16 rest)", "w8a8 packed (fp32 rest)"]
    for packed in res["rows"][2:]:
        # int8 codes [out, in] + one fp32 scale per row, against 2 bytes per weight in bf16
        assert 0.5 < packed["quantized_layers_vs_bf16"] < 0.55
        assert set(packed["kernels"].values()) == {"torch._int_mm"}  # the tests pin the kernel choice
        assert min(packed["prefill_tok_s"].values()) > 0
    assert main(["bench", str(tiny_dir), "--act-granularity", "per-tensor"]) == 2
    assert "--act-granularity needs --act-bits" in capsys.readouterr().err
    assert main(["bench", str(tiny_dir), "--act-bits", "9"]) == 2
    assert "activation bits (--act-bits) must be an integer from 4 to 8, got 9" in capsys.readouterr().err


def test_seq_len_beyond_the_models_positions_is_refused_before_work(tiny_dir, tmp_path, capsys, no_calibration):
    """A --seq-len the model cannot attend over would only grow until the OS kills the run: exit 2 first."""
    args = ["--samples", "2", "--seq-len", "1000", "--quiet"]
    assert main(["quantize", str(tiny_dir), "--out", str(tmp_path / "q")] + args) == 2
    err = capsys.readouterr().err
    assert "--seq-len 1000 is longer than LlamaForCausalLM's 128 positions" in err and not (tmp_path / "q").exists()
    assert main(["eval", str(tiny_dir), "--bits", "4", "--group-size", "32"] + args) == 2
    assert "use --seq-len 128 or less" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "awqfx", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "quantize" in out.stdout and "inspect" in out.stdout


def test_calib_flag_takes_a_name_or_a_path(tiny_dir, tmp_path, capsys, monkeypatch):
    """--calib mix|plays|PATH (default: the mix); the summary says which source calibrated."""
    from tiny_models import calib_ids

    import awqfx.app.assets
    from awqfx.app.cli import build_parser

    assert build_parser().parse_args(["quantize", "--out", "x"]).calib is None  # -> "mix"
    for value in ("mix", "plays", "some/file.txt"):
        assert build_parser().parse_args(["quantize", "--out", "x", "--calib", value]).calib == value
        assert build_parser().parse_args(["eval", "--calib", value]).calib == value
    monkeypatch.chdir(tmp_path)
    for cmd in (["quantize", str(tiny_dir), "--out", str(tmp_path / "q")], ["eval", str(tiny_dir)]):
        assert main(cmd + ["--calib", "wikitext"] + QUICK) == 2
        err = capsys.readouterr().err
        assert "--calib 'wikitext' is neither a named source (mix, plays) nor an existing text file" in err
    sources = []
    monkeypatch.setattr(awqfx.app.assets, "calibration_samples",
                        lambda tok, n, seq, source=None: sources.append(source) or calib_ids(n, seq))
    report = tmp_path / "report.json"
    assert main(["quantize", str(tiny_dir), "--out", str(tmp_path / "q"), "--group-size", "32", "--calib", "plays",
                 "--report", str(report)] + QUICK) == 0
    assert sources == ["plays"]
    assert json.loads(report.read_text())["facts"]["calibration"] == "4 x 16 tokens from plays (the calibration plays)"
    assert awqfx.app.assets.calibration_source_label(None).startswith("mix (calibration plays + Python docs")


def test_eval_text_names_and_calib_check(tiny_dir, capsys, monkeypatch):
    import awqfx.app.assets
    import awqfx.app.cli

    texts = []

    def stop(model, text, *a, **k):
        texts.append(text)
        raise RuntimeError("stop here")

    monkeypatch.setattr(awqfx.app.cli, "compare_methods", stop)
    assert main(["eval", str(tiny_dir), "--text", "plays"]) == 1 and main(["eval", str(tiny_dir)]) == 1
    assert texts == [awqfx.app.assets.eval_text()] * 2
    assert main(["eval", str(tiny_dir), "--text", "wiki"]) == 2
    assert "--text 'wiki' is neither a named text (plays, prose, licenses) nor a file" in capsys.readouterr().err


def test_quantize_refuses_a_scale_the_module_tree_cannot_hold_before_calibrating(tmp_path, capsys, monkeypatch):
    """gpt-oss's down_proj scale sits inside its experts module (tests/test_api.py); the CLI packs the
    module tree, so it says so before calibrating and writes nothing, and --drop-unfoldable goes through."""
    src = tmp_path / "gpt_oss"
    save_model_dir(src, "gpt_oss")
    calls = []
    monkeypatch.setattr("awqfx.app.jobs.calibrate", lambda *a, **k: calls.append(a))
    assert main(["quantize", str(src), "--out", str(tmp_path / "q"), "--group-size", "32"] + QUICK) == 1
    assert calls == [] and not (tmp_path / "q").exists()
    assert "inside module 'model.layers.0.mlp.experts', whose input feeds" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["quantize", str(src), "--out", str(tmp_path / "d"), "--group-size", "32", "--drop-unfoldable",
                 "--format", "awqfx"] + QUICK) == 0
