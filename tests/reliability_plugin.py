"""pytest plugin: record every test marked `@pytest.mark.reliability(kind=..., what=..., command=...)` with its
outcome, so that scripts/reliability_report.py can render docs/RELIABILITY.md from a real run.

kind: "fault" (an injected failure: SIGKILL, write error, concurrent writer), "bad_input" (a malformed input that
must be refused with a one-line error and no output), "hub" (a Hub server failure during push) or "integrity"
(a corrupted file that `verify` must detect). Records go to the JSON file named by LOWBITPACK_RELIABILITY_JSON;
without that variable the plugin does nothing.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

ENV = "LOWBITPACK_RELIABILITY_JSON"
KINDS = ("fault", "bad_input", "hub", "integrity")
_records: dict[str, dict[str, Any]] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated here so the plugin works on its own.
    config.addinivalue_line("markers", "reliability(kind, what, command): a fault-injection or bad-input test "
                                       "recorded in docs/RELIABILITY.md")


def _marker_fields(item: pytest.Item) -> dict[str, Any] | None:
    m = item.get_closest_marker("reliability")
    if m is None:
        return None
    kw = dict(m.kwargs)
    kind = kw.get("kind")
    if kind not in KINDS:
        raise pytest.UsageError(f"{item.nodeid}: reliability kind must be one of {KINDS}, got {kind!r}")
    what = str(kw.get("what", item.name))
    command = str(kw.get("command", "-"))
    # parametrized tests: one row per parameter set, the id says which
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "{" in command:
        command = command.format(**{k: v for k, v in callspec.params.items()})
    if callspec is not None and "{" in what:
        what = what.format(**{k: v for k, v in callspec.params.items()})
    elif callspec is not None and "{" not in str(kw.get("command", "")):
        what = f"{what} [{callspec.id}]"
    return {"kind": kind, "what": what, "command": command}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if not os.environ.get(ENV):
        return
    fields = _marker_fields(item)
    if fields is None:
        return
    rep = outcome.get_result()
    rec = _records.setdefault(item.nodeid, {"nodeid": item.nodeid, **fields, "outcome": "passed",
                                            "seconds": 0.0, "message": ""})
    rec["seconds"] = round(rec["seconds"] + rep.duration, 3)
    if rep.skipped and rec["outcome"] == "passed":
        rec["outcome"] = "skipped"
        rec["message"] = str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    elif rep.failed:
        rec["outcome"] = "failed" if rep.when == "call" else "error"
        rec["message"] = (rep.longreprtext or "").strip().splitlines()[-1][:300] if rep.longreprtext else ""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    out = {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "exitstatus": int(exitstatus),
           "records": sorted(_records.values(), key=lambda r: (r["kind"], r["command"], r["nodeid"]))}
    Path(target).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
