"""Safetensors shards written as tensors arrive, with the index Hugging Face loaders read.

:class:`ShardWriter` buffers tensors and writes a shard whenever the buffer reaches
``max_shard_bytes`` (the block-by-block mode adds one block at a time, so at most one shard's
worth of output is ever in memory). :meth:`ShardWriter.finish` names the files as
``save_pretrained`` does: one file is ``model.safetensors``; several are
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` mapping every tensor
to its file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch

__all__ = ["ShardWriter", "INDEX_NAME", "WEIGHTS_NAME", "DEFAULT_SHARD_BYTES"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


class ShardWriter:
    """Write tensors into safetensors shards under ``directory`` (which must exist)."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = int(max_shard_bytes)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue ``tensors`` (CPU, contiguous, no shared storage); writes a shard when the buffer is full."""
        for name, t in tensors.items():
            if name in self._buffer or any(name in keys for _, keys in self._files):
                raise ValueError(f"tensor {name!r} was already written")
            nbytes = t.numel() * t.element_size()
            if self._buffer and self._buffered + nbytes > self.max_shard_bytes:
                self.flush()
            self._buffer[name] = t
            self._buffered += nbytes
            self.total_bytes += nbytes

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet written."""
        return self._buffered

    def flush(self) -> None:
        """Write the buffered tensors as the next shard."""
        if not self._buffer:
            return
        path = self.directory / f".shard-{len(self._files):05d}.safetensors"
        # called through the module so the write can be intercepted (tests simulate a full disk)
        safetensors.torch.save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffered = 0

    def finish(self) -> list[Path]:
        """Write what is left, give the shards their final names and write the index; returns the files."""
        self.flush()
        n = len(self._files)
        if n == 0:
            raise ValueError("no tensors were written")
        names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        out = []
        weight_map = {}
        for (path, keys), name in zip(self._files, names):
            final = self.directory / name
            os.replace(path, final)
            out.append(final)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return out
