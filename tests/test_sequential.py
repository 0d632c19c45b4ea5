"""Block-by-block mode: the chain of blocks read from the graph, numerics equal to the whole-graph
mode, the checkpoint checks, atomic output, sharded output, the memory estimate."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build, calib_ids, char_tokenizer, config, save_model_dir, saved_tensors, token_ids

import awqfx
from awqfx.api import calibrate, prepare, search
from awqfx.app import budget, jobs
from awqfx.app.cli import main
from awqfx.checkpoint import CheckpointError
from awqfx.config import AWQConfig, ConfigError
from awqfx.formats import FormatError, load_quantized, load_written, save_quantized
from awqfx.formats.common import build_skeleton
from awqfx.apply import apply_plan
from awqfx.packed_model import packed_modules
from awqfx.plan import AWQPlan
from awqfx.passes.blocks import block_module, split_blocks
from awqfx.passes.discover import discover
from awqfx import sequential
from awqfx.sequential import open_sequential, quantize_sequential

CFG = AWQConfig.of(bits=4, group_size=32, loss_samples=4, batch_size=4, n_grid=5, clip_grid=5, clip_rounds=1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq_llama")
    save_model_dir(path, "llama")
    return path


def _blocks(arch: str):
    gm = awqfx.capture(build_skeleton(config(arch)).eval())
    disc = discover(gm)
    return gm, disc, split_blocks(gm, disc.groups)


def test_blocks_of_llama_are_its_decoder_layers():
    gm, disc, blocks = _blocks("llama")
    assert [b.owner for b in blocks] == ["model.embed_tokens", "model.layers.0", "model.layers.1", ""]
    assert blocks[0].inputs == ["input_ids"] and blocks[-1].params == ["lm_head.weight", "model.norm.weight"]
    # only the residual stream and parameter-free context (sizes, mask, rope cos/sin) cross into layer 1
    crossing = [n for n in gm.graph.nodes if n.name in blocks[2].inputs]
    floats = [n for n in crossing if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()]
    assert len(blocks[2].inputs) == 6 and len(floats) == 3  # cos, sin, residual


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen2_moe", "bloom"])
def test_every_group_lies_in_one_block_and_every_layer_is_cut(arch):
    gm, disc, blocks = _blocks(arch)
    where = {p: b.index for b in blocks for p in b.params}
    for g in disc.groups:
        owners = {where[c.weight] for c in g.consumers} | ({where[g.producer.weight]} if g.producer.weight else set())
        assert len(owners) == 1, g.name
    layers = {b.owner.rsplit(".", 1)[-1] for b in blocks if b.owner.rsplit(".", 1)[-1].isdigit()}
    assert layers == {"0", "1"}, [b.owner for b in blocks]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2_moe"])
def test_chained_blocks_compute_the_model(arch):
    model = build(arch)
    gm = awqfx.capture(model)
    blocks = split_blocks(gm, discover(gm).groups)
    ids = token_ids()
    values = {"input_ids": ids}
    with torch.no_grad():
        for b in blocks:
            values.update(zip(b.outputs, block_module(gm, b)(*(values[n] for n in b.inputs))))
        expected = model(ids).logits
    assert torch.equal(values[blocks[-1].outputs[0]], expected)


def _whole(model, calib, cfg):
    obs = prepare(awqfx.capture(model), cfg)
    calibrate(obs, calib, progress=False)
    return search(obs, cfg, progress=False)


def test_sequential_writes_what_the_whole_graph_mode_writes(llama_dir, tmp_path):
    calib = calib_ids(8, 16)
    plan, records = quantize_sequential(open_sequential(llama_dir), calib, CFG, tmp_path / "seq", progress=False)
    model = build("llama")
    whole = _whole(model, calib, CFG)
    assert sorted(g.name for g in plan.groups) == sorted(g.name for g in whole.groups)
    save_quantized(apply_plan(model, whole, weights="packed"), tmp_path / "whole")
    seq, ref = saved_tensors(tmp_path / "seq"), saved_tensors(tmp_path / "whole")
    assert seq.keys() == ref.keys()
    assert all(torch.equal(seq[k], ref[k]) for k in ref)
    assert [r.weights for r in records] == [0, 7, 7, 0]
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "seq")(token_ids()).logits,
                           load_quantized(tmp_path / "whole")(token_ids()).logits)


def test_a_tied_embedding_is_written_under_the_name_whole_graph_mode_uses(tmp_path):
    """Tied embeddings and head: one tensor, under its first name (``model.embed_tokens.weight``),
    which loaders that re-tie (vLLM skips ``lm_head.weight`` when tied) read."""
    save_model_dir(tmp_path / "src", "llama", tie_word_embeddings=True)
    calib = calib_ids(8, 16)
    quantize_sequential(open_sequential(tmp_path / "src"), calib, CFG, tmp_path / "seq", progress=False)
    model = build("llama", tie_word_embeddings=True)
    save_quantized(apply_plan(model, _whole(model, calib, CFG), weights="packed"), tmp_path / "whole")
    seq, ref = saved_tensors(tmp_path / "seq"), saved_tensors(tmp_path / "whole")
    assert "model.embed_tokens.weight" in seq and "lm_head.weight" not in seq
    assert seq.keys() == ref.keys()
    assert torch.equal(seq["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


@pytest.mark.parametrize("loss_samples, guard", [(2, 0), (6, 0), (2, 3)])
def test_a_loss_sample_that_ends_inside_a_batch_writes_what_the_whole_graph_mode_writes(llama_dir, tmp_path,
                                                                                        loss_samples, guard):
    """The batch size crosses into a layer block as a value of its own; the block reads it from its
    tensors instead, so the search replays a loss sample of 6 rows in chunks of 4 and 2 (of 2 rows,
    one chunk of 2) as the whole graph does; the guard's 3 held-back rows (sequences 2-4 of the
    reordered calibration, across the batch boundary) are the same in both modes, and so are the
    groups it checks and turns down."""
    cfg = CFG.with_(loss_samples=loss_samples, batch_size=4, guard_samples=guard)
    calib = calib_ids(8, 16)
    plan, _ = quantize_sequential(open_sequential(llama_dir), calib, cfg, tmp_path / "seq", progress=False)
    model = build("llama")
    whole = _whole(model, calib, cfg)
    save_quantized(apply_plan(model, whole, weights="packed"), tmp_path / "whole")
    seq, ref = saved_tensors(tmp_path / "seq"), saved_tensors(tmp_path / "whole")
    assert seq.keys() == ref.keys()
    assert all(torch.equal(seq[k], ref[k]) for k in ref)
    assert plan.config["runtime"]["loss_samples"] == loss_samples
    checked = {g.name: g.info.get("guard_rejected", "unchecked") for g in plan.groups}
    assert checked == {g.name: g.info.get("guard_rejected", "unchecked") for g in whole.groups}
    if guard:
        assert sum(v != "unchecked" for v in checked.values()) >= 4


def test_a_format_written_from_the_whole_model_is_refused_block_by_block(llama_dir, tmp_path):
    with pytest.raises(FormatError, match="'gguf' is written from the whole model, not block by block"):
        quantize_sequential(open_sequential(llama_dir), calib_ids(8, 16), CFG, tmp_path / "out", fmt="gguf",
                            progress=False)
    assert not (tmp_path / "out").exists()


def test_search_taking_the_weights_finds_the_same_plan():
    """``take_weights``: the working copy owns the weights (the observed graph keeps meta tensors)
    and the plan is the one found on shared weights."""
    model = build("llama")
    gm = awqfx.capture(model)
    plans = []
    for take in (False, True):
        observed = calibrate(prepare(gm, CFG), calib_ids(8, 16), progress=False)
        plans.append(search(observed, CFG, progress=False, take_weights=take))
        on_meta = {n for n, p in observed.gm.named_parameters() if p.device.type == "meta"}
        assert on_meta == (set(dict(observed.gm.named_parameters())) if take else set())
    assert all(p.device.type == "cpu" for p in gm.parameters())  # the caller's graph is untouched
    shared, taken = plans
    assert [g.name for g in shared.groups] == [g.name for g in taken.groups]
    assert all(torch.equal(a.scale, b.scale) for a, b in zip(shared.groups, taken.groups))
    clipped = [w for w in shared.weights if shared.weights[w].max_val is not None]
    assert clipped and all(taken.weights[w].max_val is not None for w in clipped)
    assert all(torch.equal(shared.weights[w].max_val, taken.weights[w].max_val) for w in clipped)


def test_quant_propagation_feeds_later_blocks_the_quantized_outputs(llama_dir, tmp_path):
    """``propagate="quant"``: the first layer sees the embeddings in both modes and is written as
    the whole-graph mode writes it; the second is calibrated on the first's fake-quantized outputs
    (the whole-graph mode calibrates every layer on the float model), so it is not."""
    calib, cfg = calib_ids(8, 16), CFG.with_(propagate="quant")
    quantize_sequential(open_sequential(llama_dir), calib, cfg, tmp_path / "seq", progress=False)
    model = build("llama")
    save_quantized(apply_plan(model, _whole(model, calib, cfg), weights="packed"), tmp_path / "whole")
    seq, whole = saved_tensors(tmp_path / "seq"), saved_tensors(tmp_path / "whole")
    assert seq.keys() == whole.keys()
    first = [k for k in seq if k.startswith("model.layers.0.")]
    second = [k for k in seq if k.startswith("model.layers.1.") and "qweight" in k]
    assert first and second
    assert all(torch.equal(seq[k], whole[k]) for k in first)
    assert not all(torch.equal(seq[k], whole[k]) for k in second)


@pytest.mark.parametrize("samples, rows", [(None, 8), (7, 7)])  # None: the default 32, capped at the 8 there are
def test_block_refine_trains_each_block_on_the_quantized_stream_as_the_whole_graph_mode_does(llama_dir, tmp_path,
                                                                                               samples, rows):
    """``--refine block`` block by block: each layer learns its rounding on the refine sample
    (``refine_samples`` sequences, the loss sample first) carried through the fake-quantized layers
    before it, beside the float boundary. The whole-graph mode trains on the same streams but from the
    folded graph, whose float bits differ a little; so the two models agree far more closely than
    either does with the unrefined one."""
    calib, cfg = calib_ids(8, 16), CFG.with_(refine="block", refine_iters=20, refine_samples=samples)
    plan, _ = quantize_sequential(open_sequential(llama_dir), calib, cfg, tmp_path / "seq", progress=False)
    assert all(wp.info["refine"] == "block" and wp.info["refine_tokens"] == rows * 16 for wp in plan.weights.values())
    model = build("llama")
    whole = _whole(model, calib, cfg)
    plain = _whole(model, calib, CFG)
    ids = token_ids()
    with torch.no_grad():
        seq = load_quantized(tmp_path / "seq")(ids).logits
        ref = apply_plan(model, whole, weights="fake")(ids).logits
        unrefined = apply_plan(model, plain, weights="fake")(ids).logits
    assert (seq - ref).abs().max() < 0.25 * (ref - unrefined).abs().max()
    # the layers start from the same losses: the second one's input is the first one's quantized output
    starts = {r["block"]: r["loss_start"] for r in plan.metadata["refine_blocks"]}
    want = {r["block"]: r["loss_start"] for r in whole.metadata["refine_blocks"]}
    assert starts.keys() == want.keys() == {"model.layers.0", "model.layers.1"}
    assert all(starts[k] == pytest.approx(want[k], rel=1e-3) for k in want)


def test_a_short_calibration_is_reported_once_not_per_block(llama_dir, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        plan, _ = quantize_sequential(open_sequential(llama_dir), calib_ids(2, 16), CFG, tmp_path / "q",
                                      progress=False)
    said = [r.getMessage() for r in caplog.records if "loss_samples=4 asked for, 2 available" in r.getMessage()]
    assert len(said) == 1
    assert plan.config["runtime"]["loss_samples"] == 2


def test_offload_and_shards_give_the_same_model(llama_dir, tmp_path, monkeypatch):
    calib = calib_ids(8, 16)
    quantize_sequential(open_sequential(llama_dir), calib, CFG, tmp_path / "mem", progress=False)
    monkeypatch.setattr(sequential, "OUTPUT_SHARD_BYTES", 20_000)
    offload = tmp_path / "offload"
    quantize_sequential(open_sequential(llama_dir), calib, CFG, tmp_path / "disk", offload_dir=offload, progress=False)
    assert list(offload.iterdir()) == []  # the boundary files are removed
    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    files_of = {}
    for name, file in index["weight_map"].items():
        files_of.setdefault(".".join(name.split(".")[:3]), set()).add(file)
    assert all(len(f) == 1 for k, f in files_of.items() if k.startswith("model.layers."))  # a block is one shard
    a, b = saved_tensors(tmp_path / "mem"), saved_tensors(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "mem")(token_ids()).logits,
                           load_quantized(tmp_path / "disk")(token_ids()).logits)


def test_bf16_checkpoint_stays_bf16(tmp_path):
    src = tmp_path / "src"
    build("llama").to(torch.bfloat16).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    quantize_sequential(open_sequential(src), calib_ids(8, 16), CFG, tmp_path / "q", progress=False)
    tensors = saved_tensors(tmp_path / "q")
    floats = {k: t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(".scales")}
    assert floats and set(floats.values()) == {torch.bfloat16}, floats
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        assert torch.isfinite(load_quantized(tmp_path / "q")(token_ids()).logits).all()


def test_incomplete_checkpoints_are_refused_before_any_work(llama_dir, tmp_path):
    src = tmp_path / "src"
    model = build("llama")
    model.save_pretrained(src, max_shard_size="100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (src / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}.*missing"):
        open_sequential(src)
    other = tmp_path / "other"
    build("llama", hidden_size=32, intermediate_size=48).save_pretrained(other)
    (other / "config.json").write_text((llama_dir / "config.json").read_text())  # config says 64 wide
    with pytest.raises(CheckpointError, match=r"is \[128, 32\], the model needs \[128, 64\]"):
        open_sequential(other)


def test_failure_leaves_no_output(llama_dir, tmp_path, monkeypatch):
    calls = []

    def failing_search(observed, cfg, progress=True, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return search(observed, cfg, progress=progress, **kw)

    monkeypatch.setattr(sequential, "search", failing_search)
    with pytest.raises(KeyboardInterrupt):
        quantize_sequential(open_sequential(llama_dir), calib_ids(8, 16), CFG, tmp_path / "q", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_memory_estimate_refuses_long_sequences(llama_dir, monkeypatch):
    sm = open_sequential(llama_dir)
    est = budget.estimate_memory(sm.gm, samples=128, seq_len=100_000, batch_size=8, loss_samples=16,
                                 weight_bytes=0, blocks=sm.blocks, block_bytes=[1], outside_bytes=0)
    # 8 x 4 heads x 100k^2 float32 attention scores alone
    assert est.parts["activations"] >= 8 * 4 * 100_000**2 * 4
    small = budget.estimate_memory(sm.gm, samples=8, seq_len=64, batch_size=4, loss_samples=4, weight_bytes=0,
                                   blocks=sm.blocks, block_bytes=[1], outside_bytes=0)
    assert small.total < 2**30 and "refine" not in small.parts
    # --refine block: three streams (float, quantized, float outputs) of its sequences at a block boundary
    hidden = build("llama").config.hidden_size
    refine = [budget.estimate_memory(sm.gm, samples=n, seq_len=64, batch_size=4, loss_samples=4, weight_bytes=0,
                                     blocks=sm.blocks, block_bytes=[1], outside_bytes=0, refine_samples=32).parts["refine"]
              for n in (64, 16)]
    stream = 3 * 64 * hidden * 4  # per sequence: at least the hidden states of three streams
    assert refine[0] >= 32 * stream and refine[1] >= 16 * stream  # 32 sequences, then the 16 there are
    assert refine[0] - refine[1] >= 16 * stream
    with pytest.raises(ConfigError, match="needs about .* GiB .*lower --seq-len"):
        budget.check_fits(est, "cpu", "lower --seq-len")
    budget.check_fits(small, "cpu", "lower --seq-len")


def test_cli_sequential_report(llama_dir, tmp_path, capsys):
    out, report = tmp_path / "q", tmp_path / "r.json"
    assert main(["quantize", str(llama_dir), "--out", str(out), "--sequential", "--group-size", "32", "--samples",
                 "4", "--seq-len", "16", "--n-grid", "4", "--quiet", "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "block by block (asked for)" in text and "time per quantized block" in text
    data = json.loads(report.read_text())
    assert [b["owner"] for b in data["blocks"]] == ["model.embed_tokens", "model.layers.0", "model.layers.1", ""]
    assert data["peak_rss_mb"] > 0
    assert main(["quantize", str(llama_dir), "--out", str(tmp_path / "q2"), "--sequential", "--samples", "2000000",
                 "--seq-len", "120", "--quiet"]) == 2
    assert "needs about" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq_tied_llama")
    save_model_dir(path, "llama", tie_word_embeddings=True)
    return path


EVAL_RUN = {"cfg": CFG, "samples": 8, "seq_len": 16, "eval_file": "-", "eval_windows": 2, "progress": False}


@pytest.fixture(scope="module")
def whole_graph_run(tied_llama_dir, tmp_path_factory):
    """``quantize --mode whole --eval -``: its report (the in-memory packed model's perplexity, which
    does not depend on the format written) and its output directory (the plan)."""
    out = tmp_path_factory.mktemp("whole") / "q"
    return jobs.quantize_model(str(tied_llama_dir), str(out), mode="whole", **EVAL_RUN), out


def _scales_rounded_to_float16(model):
    """``model`` with every packed layer's scales as AutoAWQ stores them (float16)."""
    for m in packed_modules(model).values():
        m.scales = m.scales.half().float()
        m.refresh()
    return model


@pytest.mark.parametrize("fmt", ["autoawq", "compressed-tensors"])
def test_block_mode_eval_of_a_foreign_format_reads_back_the_whole_graph_modes_model(
        tied_llama_dir, whole_graph_run, tmp_path, monkeypatch, fmt):
    """--eval of a block-by-block run loads the output with the format's reader (sharded, tied
    embedding): the perplexity whole-graph mode measures in memory, and the packed model's outputs
    (AutoAWQ stores the scales in float16: the packed model's, rounded so)."""
    monkeypatch.setattr(sequential, "OUTPUT_SHARD_BYTES", 20_000)
    out = tmp_path / "seq"
    rep = jobs.quantize_model(str(tied_llama_dir), str(out), fmt=fmt, mode="sequential", **EVAL_RUN)
    whole_rep, whole_out = whole_graph_run
    assert "block by block" in rep.facts["mode"] and (out / "model.safetensors.index.json").is_file()
    assert float(rep.facts["perplexity after"]) == pytest.approx(float(whole_rep.facts["perplexity after"]), rel=1e-3)

    model = build("llama", tie_word_embeddings=True)
    packed = apply_plan(model, AWQPlan.load(whole_out / "awq_plan"), weights="packed")
    if fmt == "autoawq":
        packed = _scales_rounded_to_float16(packed)
    loaded = load_written(fmt, out, torch.float32)
    assert sorted(packed_modules(loaded)) == sorted(packed_modules(packed))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, packed(token_ids()).logits)


def test_eval_of_a_format_awqfx_cannot_read_is_refused_before_any_work(llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delattr("awqfx.formats.autoawq.load")

    def no_work(*args, **kwargs):
        raise AssertionError("quantized before refusing")

    monkeypatch.setattr(jobs, "_quantize_blocks", no_work)
    out = tmp_path / "q"
    assert main(["quantize", str(llama_dir), "--out", str(out), "--format", "autoawq", "--mode", "sequential",
                 "--eval", "-", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--eval evaluates what --format autoawq wrote, read back from --out" in err
    assert "awqfx cannot read autoawq: drop --eval, or use --mode whole" in err
    assert not out.exists()

