"""`push` against a faulty local Hub (tests/hub_server.py extended here): 5xx bursts, slow answers, dropped
connections, 401/403. Safe calls are retried (bounded, with backoff), the remote commit is all-or-nothing, and the
token never appears in stdout, stderr, log records, results or error messages.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner

import lowbitpack.hub as hub_mod
from lowbitpack import api
from lowbitpack.cli import main
from lowbitpack.hub import HubError
from tests.hub_server import _ROUTES, HubServer, _Handler
from tests.test_reliability_faults import one_line_error, world  # noqa: F401 - session fixture

TOKEN = "hf_reliabilityToken0123456789abcdef"
REPO = "alice/tiny"
_REAL_SLEEP = time.sleep  # tests shorten huggingface_hub's backoff sleeps (a global patch)


class _FaultyHandler(_Handler):
    """Before a route runs, pop the next planned fault for it: an HTTP status, "drop" (read the request, close
    the socket without answering), "stall" (read the request, never answer) or ("slow", seconds)."""

    def _route(self, method: str) -> None:
        import re
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(self.path).path)
        fn = next((f for pat, m, f in _ROUTES if m == method and re.fullmatch(pat, path)), None)
        plan = self.server.faults.get(fn) if fn else None
        fault = plan.pop(0) if plan else None
        if fault is not None:
            self.server.injected[fn].append(fault)
        if isinstance(fault, int):
            self._body()
            with self.state.lock:
                self.state.requests.append((method, path))
            self._send(fault, {"error": f"injected {fault}"})
            return
        if fault == "drop":
            self._body()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "stall":  # read the request, then never answer (until the test's server shuts down)
            self._body()
            with self.state.lock:
                self.state.requests.append((method, path))
            self.server.release.wait(120)
            self.close_connection = True
            return
        if isinstance(fault, tuple) and fault[0] == "slow":
            _REAL_SLEEP(fault[1])
        super()._route(method)


class FaultyHubServer(HubServer):
    def __init__(self, faults: dict[str, list] | None = None, **kw):
        super().__init__(**kw)
        self.RequestHandlerClass = _FaultyHandler
        self.faults: dict[str, list] = {k: list(v) for k, v in (faults or {}).items()}
        self.injected: dict[str, list] = defaultdict(list)
        self.release = threading.Event()  # ends "stall" faults

    def __exit__(self, *exc) -> None:
        self.release.set()
        super().__exit__(*exc)


@pytest.fixture
def env(monkeypatch, world, tmp_path_factory):  # noqa: F811
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(hub_mod, "RETRY_BASE_DELAY", 0.01)  # keep the backoff, not the wait
    # huggingface_hub's own LFS backoff sleeps 1 s+; shorten it too
    import huggingface_hub.utils._http as h
    monkeypatch.setattr(h.time, "sleep", lambda s: _REAL_SLEEP(min(s, 0.01)))
    return world[1]  # the packed artifact: safetensors via LFS, JSON inline


def _push_cli(path: Path, url: str, token: str = TOKEN):
    return CliRunner().invoke(main, ["push", str(path), REPO, "--endpoint", url, "--token", token, "--json"])


def _assert_no_token(*texts: str, caplog=None) -> None:
    blob = "\n".join(texts)
    if caplog is not None:
        blob += "\n".join(r.getMessage() + str(r.args) for r in caplog.records)
    assert TOKEN not in blob
    assert TOKEN[3:] not in blob  # not even without the hf_ prefix


def _assert_committed_whole(server: HubServer, art: Path) -> None:
    files = server.state.files(REPO)
    local = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()}
    assert set(files) == set(local) | {"README.md"}
    assert all(files[n] == b for n, b in local.items())


CASES = [
    ("503 twice on the commit", {"commit": [503, 503]}, True),
    ("500 once on create_repo", {"create": [500]}, True),
    ("502 twice on the LFS upload (PUT)", {"lfs_put": [502, 502]}, True),
    ("connection dropped mid LFS upload", {"lfs_put": ["drop"]}, True),
    ("slow commit answer (1.5 s)", {"commit": [("slow", 1.5)]}, True),
    ("500 on every commit attempt (retries exhausted)", {"commit": [500] * 10}, False),
    ("connection dropped on the commit request", {"commit": ["drop"]}, False),
    ("401 on the commit", {"commit": [401]}, False),
    ("403 on create_repo", {"create": [403]}, False),
]


@pytest.mark.parametrize("what,faults,succeeds", CASES, ids=[c[0] for c in CASES])
@pytest.mark.reliability(kind="hub", command="push", what="{what}")
def test_push_under_hub_faults(env, caplog, what, faults, succeeds):
    art = env
    caplog.set_level(logging.DEBUG)
    with FaultyHubServer(faults=faults, required_token=TOKEN) as server:
        r = _push_cli(art, server.url)
        _assert_no_token(r.stdout, r.stderr, caplog=caplog)
        for route in faults:
            assert server.injected[route], f"the fault on {route} never triggered"
        if succeeds:
            assert r.exit_code == 0, r.output[-2000:]
            assert server.state.commit_count(REPO) == 1
            _assert_committed_whole(server, art)
            assert json.loads(r.stdout)["commit_oid"]
            return
        assert r.exit_code == 2, r.output[-2000:]
        line = one_line_error(r.stderr)
        assert REPO in line and "upload failed" in line
        if "401" in what:
            assert "check the token" in line
        if "403" in what:
            assert "write access" in line
        # all-or-nothing: no commit landed, nothing visible on the branch
        assert REPO not in server.state.repos or server.state.commit_count(REPO) == 0
        assert REPO not in server.state.repos or server.state.files(REPO) == {}
        commits = sum(1 for _, p in server.state.requests if "/commit/" in p)
        if what.startswith(("401", "403")) or "dropped" in what:
            assert commits <= 1  # not retried: auth errors and ambiguous drops are final
        # once the Hub behaves, a re-run commits everything in one go
        server.faults.clear()
        r2 = _push_cli(art, server.url)
        assert r2.exit_code == 0, r2.output[-2000:]
        assert server.state.commit_count(REPO) == 1
        _assert_committed_whole(server, art)
        _assert_no_token(r2.stdout, r2.stderr, caplog=caplog)


@pytest.mark.reliability(kind="hub", command="push", what="wrong token (401 everywhere): token kept out of output")
def test_wrong_token_never_echoed(env, caplog, capsys):
    art = env
    caplog.set_level(logging.DEBUG)
    wrong = "hf_wrongTokenABCDEFGH12345678"
    with FaultyHubServer(required_token=TOKEN) as server:
        with pytest.raises(HubError) as ei:
            api.push(art, REPO, token=wrong, endpoint=server.url)
        out = capsys.readouterr()
        blob = str(ei.value) + out.out + out.err + "".join(r.getMessage() for r in caplog.records)
        assert wrong not in blob and wrong[3:] not in blob and TOKEN not in blob
        assert REPO not in server.state.repos


@pytest.mark.reliability(kind="hub", command="push", what="endpoint refuses connections (nothing listening)")
def test_push_to_closed_port(env, caplog):
    art = env
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.perf_counter()
    r = _push_cli(art, f"http://127.0.0.1:{port}")
    assert r.exit_code == 2
    assert "upload failed" in one_line_error(r.stderr)
    assert time.perf_counter() - t0 < 30  # bounded retries
    _assert_no_token(r.stdout, r.stderr, caplog=caplog)


# ---------------------------------------------------------------------------------------------- stalls
STALL_TIMEOUT = 2.0
STALLS = [
    ("Hub stops answering create_repo", {"create": ["stall"]}, False),
    ("Hub stops answering the commit", {"commit": ["stall"]}, False),
    ("Hub stops answering one LFS upload (PUT)", {"lfs_put": ["stall"]}, True),
]


@pytest.mark.parametrize("what,faults,succeeds", STALLS, ids=[c[0] for c in STALLS])
@pytest.mark.reliability(kind="hub", command="push", what="{what} (--timeout 2)")
def test_push_stalled_hub_fails_within_the_bound(env, caplog, what, faults, succeeds):
    """huggingface_hub's client has no timeout of its own: without push's bound these would hang forever."""
    art = env
    with FaultyHubServer(faults=faults, required_token=TOKEN) as server:
        t0 = time.perf_counter()
        r = CliRunner().invoke(main, ["push", str(art), REPO, "--endpoint", server.url, "--token", TOKEN, "--json",
                                      "--timeout", str(STALL_TIMEOUT)])
        elapsed = time.perf_counter() - t0
        _assert_no_token(r.stdout, r.stderr, caplog=caplog)
        for route in faults:
            assert server.injected[route], f"the fault on {route} never triggered"
        if succeeds:  # huggingface_hub retries an LFS transfer after a timeout: the push goes through
            assert r.exit_code == 0, r.output[-2000:]
            assert server.state.commit_count(REPO) == 1
            _assert_committed_whole(server, art)
            assert elapsed < 8 * STALL_TIMEOUT + 10, elapsed
            return
        assert r.exit_code == 2, r.output[-2000:]
        line = one_line_error(r.stderr)
        assert f"no answer from the Hub within {STALL_TIMEOUT:g} s" in line and "--timeout" in line, line
        assert elapsed < 3 * STALL_TIMEOUT + 10, elapsed  # one bounded wait (+ process start), not a hang
        assert REPO not in server.state.repos or server.state.commit_count(REPO) == 0
        server.faults.clear()
        r2 = _push_cli(art, server.url)
        assert r2.exit_code == 0, r2.output[-2000:]
        assert server.state.commit_count(REPO) == 1
        _assert_committed_whole(server, art)


@pytest.mark.reliability(kind="hub", command="push", what="stalled commit, bound from LOWBITPACK_HUB_TIMEOUT")
def test_push_timeout_from_environment(env, monkeypatch):
    art = env
    monkeypatch.setenv(hub_mod.TIMEOUT_ENV, "1.5")
    with FaultyHubServer(faults={"commit": ["stall"]}, required_token=TOKEN) as server:
        t0 = time.perf_counter()
        with pytest.raises(HubError, match="within 1.5 s"):
            api.push(art, REPO, token=TOKEN, endpoint=server.url)
        assert time.perf_counter() - t0 < 15
    monkeypatch.setenv(hub_mod.TIMEOUT_ENV, "soon")
    from lowbitpack.errors import OptionError
    with pytest.raises(OptionError, match=hub_mod.TIMEOUT_ENV):
        api.push(art, REPO, token=TOKEN, endpoint="http://127.0.0.1:9")
    with pytest.raises(OptionError, match="positive"):
        api.push(art, REPO, token=TOKEN, endpoint="http://127.0.0.1:9", timeout=0)


def test_bounded_session_is_restored_after_push(env):
    """push installs its bounded client only for its own duration."""
    from huggingface_hub.utils import _http
    before = _http._GLOBAL_CLIENT_FACTORY
    with FaultyHubServer(required_token=TOKEN) as server:
        api.push(env, REPO, token=TOKEN, endpoint=server.url, timeout=5)
    assert _http._GLOBAL_CLIENT_FACTORY is before
