"""Incremental safetensors shard writer: tensors are flushed to disk once a shard is full."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .hashing import sha256_file


class ShardWriter:
    """Writes `<prefix>-0000i-of-0000N.safetensors` plus `<prefix>.safetensors.index.json` into `directory`."""

    def __init__(self, directory: str | Path, prefix: str = "model", max_shard_bytes: int = 2 * 1024**3,
                 metadata: dict[str, str] | None = None):
        self.dir = Path(directory)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        # safetensors writes metadata keys in hash order: more than one key makes shard bytes
        # (and their sha256) differ from run to run, so keep a single key for reproducible artifacts.
        self.metadata = metadata or {"format": "pt"}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._tmp_files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buf:
            raise ValueError(f"duplicate tensor name {name}")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buf[name] = tensor.detach().contiguous().cpu()
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self._buf:
            return
        f = self.dir / f".{self.prefix}-{len(self._tmp_files):05d}.tmp.safetensors"
        save_file(self._buf, str(f), metadata=self.metadata)
        self._tmp_files.append((f, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self) -> dict[str, dict]:
        """Name shards HF-style, write the index; return {shard file: {sha256, bytes}}."""
        self.flush()
        n = len(self._tmp_files)
        weight_map: dict[str, str] = {}
        shards: dict[str, dict] = {}
        for i, (tmp, names) in enumerate(self._tmp_files):
            final = (f"{self.prefix}.safetensors" if n == 1
                     else f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors")
            tmp.rename(self.dir / final)
            shards[final] = {"sha256": sha256_file(self.dir / final), "bytes": (self.dir / final).stat().st_size}
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return shards
