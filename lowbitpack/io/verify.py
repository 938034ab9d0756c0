"""Checking a directory's files against the {name: {sha256, bytes}} table its record carries (merge outputs,
exports); artifacts and bundles have their own readers but report the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError, IntegrityError
from .hashing import sha256_file


def _bad_name(name: Any, nested: bool) -> bool:
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name:
        return True
    if not nested and "/" in name:
        return True
    return any(part in ("", ".", "..") or part.startswith(".") for part in name.split("/"))


def check_recorded_files(root: Path, files: dict[str, Any], record: Path, *, record_name: str, rerun: str,
                         nested: bool = False) -> int:
    """Every recorded file exists inside `root` (no symlinks, no `..`), has the recorded size when one is given,
    and the recorded sha256. Raises InputError for a malformed table, IntegrityError for a bad file.
    `record_name` ("export record") and `rerun` ("re-run the merge") word the one-line errors."""
    real_root = root.resolve()
    for name, info in files.items():
        if _bad_name(name, nested) or not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise InputError(f"malformed file record {name!r}", record, rerun)
        f = root / name
        if f.is_symlink() or not f.is_file() or real_root not in f.resolve().parents:
            raise IntegrityError("missing (or a symbolic link)", f, f"restore the file or {rerun}")
        if isinstance(info.get("bytes"), int) and f.stat().st_size != info["bytes"]:
            raise IntegrityError(f"size {f.stat().st_size} differs from the {record_name} ({info['bytes']})", f,
                                 f"the file was truncated or modified; {rerun}")
        if sha256_file(f) != info["sha256"]:
            raise IntegrityError(f"sha256 differs from the {record_name}", f,
                                 f"the file was modified or corrupted; {rerun}")
    return len(files)
