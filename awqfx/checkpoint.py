"""Read a Hugging Face checkpoint directory tensor by tensor (``safe_open``), never the whole model.

The block-by-block mode reads only the tensors of the block it works on. :class:`Checkpoint`
indexes the directory's safetensors files (``model.safetensors``, or the shards listed by
``model.safetensors.index.json``) from their headers and checks them against the parameters
the model needs before any work: a missing shard, a tensor missing from every shard or one of
the wrong shape is refused with a message naming it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

__all__ = ["Checkpoint", "CheckpointError"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or does not match the model's parameters."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class Checkpoint:
    """The tensors of a checkpoint directory: name -> (file, shape, dtype), read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        for file in self._files():
            try:
                with safetensors.safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        s = f.get_slice(key)
                        self.entries[key] = TensorEntry(file, tuple(int(d) for d in s.get_shape()),
                                                        _DTYPES.get(s.get_dtype(), torch.float32))
            except Exception as err:  # SafetensorError, OSError: a truncated or corrupt shard
                raise CheckpointError(f"{file} is corrupt or truncated and cannot be read: {err}") from err

    def _files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map): {err}") from err
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{self.path}: the shards {', '.join(missing)} listed in {INDEX_NAME} are "
                                      "missing; download the complete checkpoint")
            return files
        single = self.path / SINGLE_NAME
        if single.is_file():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if found:
            return found
        raise CheckpointError(f"{self.path} holds no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); the "
                              "block-by-block mode reads safetensors checkpoints only")

    def check(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse unless every name in ``expected`` is present with that shape."""
        missing = [n for n in expected if n not in self.entries]
        wrong = [f"{n} is {list(self.entries[n].shape)}, the model needs {list(s)}"
                 for n, s in expected.items() if n in self.entries and self.entries[n].shape != tuple(s)]
        if missing or wrong:
            shown = [f"missing {n}" for n in missing[:5]] + wrong[:5]
            more = len(missing) + len(wrong) - len(shown)
            raise CheckpointError(
                f"{self.path} does not match the model's parameters: " + "; ".join(shown)
                + (f"; ... and {more} more" if more > 0 else "")
                + ". The checkpoint is incomplete, or its tensor names differ from the model's (some architectures "
                "are renamed or fused on load): quantize it without --sequential")

    def dtype(self) -> torch.dtype | None:
        """The floating dtype most of the checkpoint's bytes are stored in (None: no float tensor)."""
        sizes: dict[torch.dtype, int] = {}
        for e in self.entries.values():
            if e.dtype.is_floating_point:
                sizes[e.dtype] = sizes.get(e.dtype, 0) + torch.Size(e.shape).numel()
        return max(sizes, key=sizes.__getitem__) if sizes else None

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        names = self.entries if names is None else names
        return sum(torch.Size(self.entries[n].shape).numel() * self.entries[n].dtype.itemsize for n in names)

    def load(self, names: Iterable[str], device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names``, on ``device``, floating ones cast to ``dtype`` (when given)."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.entries[n].file, []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safetensors.safe_open(str(file), framework="pt", device=str(device)) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[k] = t
        return out
