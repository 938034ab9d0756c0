"""Checking a directory's files against the {name: {sha256, bytes}} table its record carries (merge outputs,
exports); artifacts and bundles have their own readers but report the same way."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FormatVersionError, InputError, IntegrityError
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


def verify_recorded_dir(root: Path, record_file: str, fmt: str, max_version: int, *, record_name: str,
                        producer: str, rerun: str, nested: bool = False) -> tuple[dict[str, Any], int]:
    """Read `root/record_file` (a JSON record of format `fmt` carrying a `files` table) and check every file it
    lists; returns (record, files checked). One-line InputError / FormatVersionError / IntegrityError otherwise.
    `producer` is the command that writes such directories, `rerun` the fix for a damaged one."""
    mpath = root / record_file
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no {record_file} here", root, f"pass a directory written by `{producer}`") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{record_name} is not valid JSON ({e.__class__.__name__})", mpath,
                         f"the output is damaged; {rerun}") from None
    version = m.get("format_version") if isinstance(m, dict) else None
    if not isinstance(m, dict) or m.get("format") != fmt or not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"not a {fmt} {record_name.split()[-1]}", mpath,
                         f"pass a directory written by `{producer}`")
    if version > max_version:
        raise FormatVersionError(f"format_version {version} is newer than this lowbitpack reads ({max_version})",
                                 mpath, "upgrade lowbitpack: pip install -U lowbitpack")
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise InputError(f"{record_name} lists no file hashes (written by an older lowbitpack)", mpath,
                         f"{rerun} to get a verifiable output")
    return m, check_recorded_files(root, files, mpath, record_name=record_name, rerun=rerun, nested=nested)
