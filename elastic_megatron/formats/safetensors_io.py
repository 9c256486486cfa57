"""Streaming safetensors: read one tensor at a time from a (sharded) HF checkpoint, write shards as we go.

Neither side ever holds the whole model: the reader memory-maps the files (safetensors reads
lazily) and copies out only the tensor asked for; the writer flushes a shard file as soon as it
holds `max_shard_bytes`, like `save_pretrained`'s `max_shard_size`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ConfigError


class HFReader:
    """Tensors of a HF checkpoint by key: `model.safetensors` or shards listed in
    `model.safetensors.index.json`. Keys may be stored as `backbone.*` or `model.*` (both are read)."""

    def __init__(self, hf_dir: str | Path, tied_embeddings: bool = False):
        self.dir, self.tied = Path(hf_dir), tied_embeddings
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").exists():
            weight_map = None
        else:
            raise FileNotFoundError(f"'{hf_dir}' has no model.safetensors or model.safetensors.index.json "
                                    "(PyTorch .bin checkpoints: re-save them with save_pretrained(safe_serialization=True))")
        self._handles: dict[str, object] = {}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        # one spelling: the file's `model.` prefix (transformers' in-memory name) read as `backbone.`
        self.where = {self._canonical(k): (f, k) for k, f in weight_map.items()}

    @staticmethod
    def _canonical(key: str) -> str:
        return "backbone." + key[len("model."):] if key.startswith("model.") else key

    def _open(self, file: str):
        if file not in self._handles:
            path = self.dir / file
            if not path.exists():
                raise FileNotFoundError(f"'{path}' is listed in the index but missing")
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except SafetensorError as exc:
                raise ConfigError(f"'{path}' is not a readable safetensors file ({exc})") from None
        return self._handles[file]

    def keys(self) -> set[str]:
        return set(self.where)

    def _locate(self, key: str) -> tuple[str, str]:
        if key == "lm_head.weight" and key not in self.where and self.tied:
            key = "backbone.embeddings.weight"  # tied: the output layer starts as a copy of the input one
        if key not in self.where:
            raise ConfigError(f"'{self.dir}' has no tensor '{key}'; is this a NemotronH checkpoint of the "
                              "config.json beside it?")
        return self.where[key]

    def get(self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [lo, hi) / columns [lo, hi) of it: a TP rank then touches (and
        holds) little more than its own shard of the file."""
        file, stored = self._locate(key)
        try:
            if rows is None and cols is None:
                return self._open(file).get_tensor(stored)
            part = self._open(file).get_slice(stored)
            if cols is not None:
                return part[:, cols[0]:cols[1]]
            return part[rows[0]:rows[1]]
        except SafetensorError as exc:
            raise ConfigError(f"'{self.dir / file}': cannot read '{stored}' ({exc}); the file may be truncated") from None

    def shape(self, key: str) -> list[int]:
        file, stored = self._locate(key)
        return list(self._open(file).get_slice(stored).get_shape())


class ShardedWriter:
    """`add` tensors; shards are written when full; `close` names them model-0000i-of-0000N and
    writes the index (or a single model.safetensors)."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.dir, self.max = Path(out_dir), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.weight_map, self.total = 0, [], {}, 0

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[key] = t.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        name = f"part-{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(self.dir / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.files:
            self._flush()
        n, names = len(self.files), []
        for i, (tmp, keys) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp, self.dir / final)
            names.append(final)
            self.weight_map.update({k: final for k in keys})
        if n > 1:
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))
        return names
