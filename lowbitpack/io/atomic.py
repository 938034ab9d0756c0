"""Outputs appear whole or not at all: write into a temp sibling, fsync, rename at the end."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator

from ..errors import OutputExistsError, OutputWriteError

# errno values that mean "the output cannot be written here", as opposed to a bug or an unreadable input.
_WRITE_ERRNOS = {errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _write_error(e: BaseException, out: Path) -> OutputWriteError | None:
    """A one-line OutputWriteError for a failed write (OSError, or safetensors' wrapped I/O error), else None."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        reason = e.strerror or str(e)
    elif type(e).__name__ == "SafetensorError" and "os error" in str(e):
        reason = str(e).split("I/O error:")[-1].strip()
    else:
        return None
    return OutputWriteError(f"cannot write the output ({reason})", out,
                            "check free disk space, write permission and file size limits (ulimit -f)")


def _host_tag() -> str:
    """8 hex chars naming this machine, so that a sweep never touches temp dirs of a process on another host
    (a shared network file system): its pid means nothing here."""
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_name(out: Path, suffix: str = "partial") -> Path:
    """`.NAME.<host>-<pid>-<random>.<suffix>` next to `out`: hidden, never mistaken for the output, and owned
    by this process (host + pid) so that a later run can tell a crashed writer's leftovers from a live one's."""
    return out.parent / f".{out.name}.{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.{suffix}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can judge: keep
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True
    return True


def sweep_stale(out: str | Path) -> list[Path]:
    """Remove temp siblings of `out` (`.NAME.<host>-<pid>-<random>.partial|.old`) left by a writer on this host
    whose process no longer exists (SIGKILL, power cut, OOM killer). Entries of live processes, of other
    hosts, and names in any other form (e.g. older lowbitpack releases) are left alone. Returns what was removed."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}\.(?:partial|old)$")
    host = _host_tag()
    removed: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or m.group(1) != host:
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # not ours to remove after all (permissions): leave it
        removed.append(entry)
    return removed


def check_output(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError("output already exists", out, "choose another path or pass --force to replace it")
    return out


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp directory next to `out`; on success it replaces `out` by rename, on error it is removed.

    Temp names start with `.` and end with `.partial` so that a crash leaves nothing that looks complete; they
    carry the writer's host and pid, and stale ones of dead writers on this host are swept first (`sweep_stale`).
    """
    out = check_output(out, force)
    sweep_stale(out)
    tmp = temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise (_write_error(e, out) or e) from None
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if out.exists():
            if not force:
                raise OutputExistsError("output appeared while we were writing", out, "re-run with --force")
            trash = temp_name(out, "old")
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
        else:
            try:
                os.rename(tmp, out)
            except OSError as e:  # a concurrent run renamed its output into place after our check
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise OutputExistsError("output appeared while we were writing (another run?)", out,
                                        "re-run with --force to replace it") from None
        _fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        werr = _write_error(e, out)
        if werr is not None:
            raise werr from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
