"""Outputs appear whole or not at all: write into a temp sibling, fsync, rename at the end."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
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

    Temp names start with `.` and end with `.partial` so that a crash leaves nothing that looks complete.
    """
    out = check_output(out, force)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
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
            trash = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
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
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
