"""Typed errors. Every message names the file involved and what to do next; the CLI prints it on one line."""
from __future__ import annotations

from pathlib import Path


class LowbitpackError(Exception):
    """Base error: `str(err)` is the one-line message shown to users."""

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.hint = hint
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(message)
        if hint:
            parts.append(f" ({hint})")
        super().__init__("".join(parts).replace("\n", " "))


class InputError(LowbitpackError):
    """A file or directory given to us is missing, malformed or of the wrong kind."""


class FormatVersionError(InputError):
    """An artifact or bundle written by a newer format version than this release reads."""


class IntegrityError(InputError):
    """A hash recorded in a manifest does not match the bytes on disk."""


class OptionError(LowbitpackError):
    """An option value is invalid or options contradict each other."""


class OutputExistsError(LowbitpackError):
    """The output path exists and --force was not given."""


class BaseMismatchError(LowbitpackError):
    """An adapter is applied to a base other than the one it was trained on."""


class OutputWriteError(LowbitpackError):
    """Writing the output failed (disk full, file size limit, read-only or forbidden target); nothing was kept."""
