"""Incremental safetensors shard writer with bounded memory.

Each tensor's bytes go to a spool file on disk as soon as it is added, so memory holds one tensor, never a
whole output shard (a 2 GiB shard buffered in RAM would break the streaming memory bound). When a shard is
full it is written as header + the spooled bytes, copied in chunks in safetensors' own order: the shard
files are byte-identical to `safetensors.torch.save_file` of the same tensors (tests check this).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .hashing import sha256_file

COPY_CHUNK = 64 * 1024**2


def _safetensors_layout(entries: dict[str, torch.dtype], metadata: dict[str, str]) -> dict:
    """The header safetensors itself writes for these names and dtypes, read off a save of 1-element stand-ins:
    its tensor order (by dtype, then name), dtype names and metadata do not depend on the shapes, so we follow
    the installed version instead of copying its rules. Shapes and offsets are then filled in by the caller."""
    probe = save({n: torch.zeros(1, dtype=dt) for n, dt in entries.items()}, metadata=metadata)
    n = int.from_bytes(probe[:8], "little")
    return json.loads(probe[8:8 + n])


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
        # name -> what `_store` kept (here: dtype, shape, offset in the spool, nbytes) for the shard being filled
        self._buf: dict[str, Any] = {}
        self._buf_bytes = 0
        self._spool = None
        self._tmp_files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def _spool_path(self) -> Path:
        return self.dir / f".{self.prefix}-{len(self._tmp_files):05d}.spool"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buf:
            raise ValueError(f"duplicate tensor name {name}")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buf[name] = self._store(tensor, nbytes)
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self._buf:
            return
        f = self.dir / f".{self.prefix}-{len(self._tmp_files):05d}.tmp.safetensors"
        self._write_shard(f)
        self._tmp_files.append((f, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def _store(self, tensor: torch.Tensor, nbytes: int) -> tuple[torch.dtype, list[int], int, int]:
        """Append the tensor's bytes to this shard's spool; keep only where they are."""
        if self._spool is None:
            self._spool = open(self._spool_path(), "wb")
        t = tensor.detach().contiguous().cpu()
        offset = self._spool.tell()
        if nbytes:
            self._spool.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return t.dtype, list(t.shape), offset, nbytes

    def _write_shard(self, f: Path) -> None:
        """Header + the spooled bytes in safetensors' order, then drop the spool."""
        spool_path = self._spool_path()
        self._spool.close()
        self._spool = None
        header = _safetensors_layout({n: v[0] for n, v in self._buf.items()}, self.metadata)
        order = [k for k in header if k != "__metadata__"]
        start = 0
        for n in order:
            _, shape, _, nbytes = self._buf[n]
            header[n].update(shape=shape, data_offsets=[start, start + nbytes])
            start += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to a multiple of 8
        with open(f, "wb") as out, open(spool_path, "rb") as src:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for n in order:
                _, _, offset, nbytes = self._buf[n]
                src.seek(offset)
                while nbytes:
                    chunk = src.read(min(COPY_CHUNK, nbytes))
                    out.write(chunk)
                    nbytes -= len(chunk)
        os.unlink(spool_path)

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
