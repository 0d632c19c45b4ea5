"""The command line: exit codes, one-paragraph errors, inspect output (text, JSON, graph)."""
from __future__ import annotations

import json

import pytest

from awqfx.cli import main
from tiny_models import build


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    build("llama").save_pretrained(path)
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


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--json", "--graph", "MODEL"):
        assert flag in text
