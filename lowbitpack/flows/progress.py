"""Rich progress bars shared by long operations (tensors, bytes, ETA); silent when disabled."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class _Null:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _Null]:
    if not enabled:
        yield _Null()
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  DownloadColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as p:
        yield p
