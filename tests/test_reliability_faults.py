"""Fault injection: SIGKILL at chosen points of quantize / merge / export, write failures (file size limit,
disk full, read-only target) and concurrent runs on one target. Each leaves the target absent or complete (it
verifies), removes its `.NAME.*.partial` temp dir when it can (not after SIGKILL: nothing runs then), prints one
line, and a re-run succeeds.

Recorded in docs/RELIABILITY.md through `@pytest.mark.reliability` (tests/reliability_plugin.py).
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import lowbitpack
from lowbitpack.artifact import Artifact
from lowbitpack.cli import main
from lowbitpack.io.checkpoint import validate_safetensors_file
from tests.test_bundle import peft_adapter
from tests.test_train import text_file, tiny_packed

ROOT = Path(__file__).resolve().parents[1]
# one thread per subprocess: the machine is shared and the models are tiny
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------------------------- helpers
def one_line_error(stderr: str) -> str:
    """The CLI's error contract: exactly one `error: ...` line, no traceback. Returns that line."""
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert len(lines[0]) < 500, lines[0]
    return lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    """Temp entries a run on `parent/name` left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def cli(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def kill_at(target: str, k: int, body: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter where the k-th call of `target` ("module:attr" or "module:Class.attr")
    SIGKILLs the process, as a power cut or the OOM killer would."""
    mod, attr = target.split(":")
    owner, _, name = attr.rpartition(".")
    code = (
        "import importlib, os, signal\n"
        f"mod = importlib.import_module({mod!r})\n"
        f"owner = getattr(mod, {owner!r}) if {owner!r} else mod\n"
        f"orig = getattr(owner, {name!r})\n"
        "calls = [0]\n"
        "def killer(*a, **kw):\n"
        "    calls[0] += 1\n"
        f"    if calls[0] == {k}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(*a, **kw)\n"
        f"setattr(owner, {name!r}, killer)\n"
        "import lowbitpack\n"
        + body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=SUB_ENV,
                          timeout=300)


def complete_or_absent(out: Path, kind: str) -> bool:
    """True if `out` exists (then it must verify), False if absent. Never half-written."""
    if not out.exists():
        return False
    if kind in ("artifact", "merge"):
        assert lowbitpack.api.verify(out)["ok"]
    else:  # an hf export: manifest present, every shard structurally whole and listed in the report
        rep = json.loads((out / "lowbitpack_export.json").read_text())["report"]
        for shard in rep["shards"]:
            validate_safetensors_file(out / shard)
    return True


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """(source, packed int4 artifact, bundle) of the tiny Llama, built once per session (tests copy before editing)."""
    base = tmp_path_factory.mktemp("world")
    src, packed = tiny_packed(base)
    adapter = peft_adapter(src, base / "adapter")
    lowbitpack.api.bundle(adapter, packed, base / "bundle")
    return src, packed, base / "bundle"


# ---------------------------------------------------------------------------------------------- SIGKILL
QUANTIZE_KILLS = [
    ("lowbitpack.artifact:ArtifactWriter.add_quantized", 1, "first quantized tensor"),
    ("lowbitpack.io.atomic:os.rename", 1, "just before the temp dir is renamed into place"),
    ("lowbitpack.io.atomic:_fsync_dir", 2, "just after the rename (output complete)"),
]


@pytest.mark.parametrize("target,k,when", QUANTIZE_KILLS, ids=[w for _, _, w in QUANTIZE_KILLS])
@pytest.mark.reliability(kind="fault", command="quantize", what="SIGKILL at {when}")
def test_quantize_sigkill(world, tmp_path, target, k, when):
    src, _, _ = world
    out = tmp_path / "q"
    p = kill_at(target, k, f"lowbitpack.quantize({str(src)!r}, {str(out)!r}, 'int4', group_size=32, "
                           "progress=False, max_shard_size=20000)\n", tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    existed = complete_or_absent(out, "artifact")
    assert existed == (when.startswith("just after")), when
    lowbitpack.quantize(src, out, "int4", group_size=32, progress=False, max_shard_size=20000, force=existed)
    assert Artifact.open(out, verify=True).manifest["quantization"]["scheme"] == "int4"


MERGE_KILLS = [
    ("lowbitpack.restore:_merge_manifest", 1, "all shards written, manifest not yet"),
    ("lowbitpack.io.atomic:_fsync_dir", 2, "just after the rename (output complete)"),
]


@pytest.mark.parametrize("target,k,when", MERGE_KILLS, ids=[w for _, _, w in MERGE_KILLS])
@pytest.mark.reliability(kind="fault", command="merge", what="SIGKILL at {when}")
def test_merge_sigkill(world, tmp_path, target, k, when):
    _, _, bundle = world
    out = tmp_path / "m"
    p = kill_at(target, k, f"lowbitpack.api.merge({str(bundle)!r}, {str(out)!r}, restore=16, progress=False)\n",
                tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    existed = complete_or_absent(out, "merge")
    assert existed == (when.startswith("just after")), when
    lowbitpack.api.merge(bundle, out, restore=16, progress=False, force=existed)
    assert lowbitpack.api.verify(out)["kind"] == "merge"


EXPORT_KILLS = [
    ("lowbitpack.io.writer:ShardWriter.add", 3, "third tensor of the hf export"),
    ("lowbitpack.export.hf:write_export_manifest", 1, "shards written, export manifest not yet"),
]


@pytest.mark.parametrize("target,k,when", EXPORT_KILLS, ids=[w for _, _, w in EXPORT_KILLS])
@pytest.mark.reliability(kind="fault", command="export", what="SIGKILL at {when}")
def test_export_sigkill(world, tmp_path, target, k, when):
    _, packed, _ = world
    out = tmp_path / "e"
    p = kill_at(target, k, f"lowbitpack.api.export({str(packed)!r}, {str(out)!r}, 'hf', progress=False)\n",
                tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not complete_or_absent(out, "export")
    res = lowbitpack.api.export(packed, out, "hf", progress=False)
    assert complete_or_absent(out, "export") and res["dequantized"] > 0


# ---------------------------------------------------------------------------------------------- write errors
@pytest.mark.reliability(kind="fault", command="quantize", what="file size limit (RLIMIT_FSIZE 20 kB) while writing")
def test_quantize_file_size_limit(world, tmp_path):
    src, _, _ = world

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    p = subprocess.run([sys.executable, "-m", "lowbitpack.cli", "quantize", str(src), "-o", str(tmp_path / "q"),
                        "--scheme", "int4", "--no-progress"], preexec_fn=limit, capture_output=True, text=True,
                       env=SUB_ENV, cwd=tmp_path, timeout=300)
    assert p.returncode == 2
    line = one_line_error(p.stderr)
    assert "cannot write the output" in line and "File too large" in line and str(tmp_path / "q") in line
    assert not (tmp_path / "q").exists() and leftovers(tmp_path, "q") == []


@pytest.mark.reliability(kind="fault", command="quantize", what="unwritable target (directory on read-only /sys)")
def test_quantize_unwritable_target(world, tmp_path):
    src, _, _ = world
    # root ignores permission bits, so use a filesystem nobody may write: sysfs refuses mkdir with EPERM
    if os.access("/sys", os.W_OK) and not Path("/sys/class").is_dir():
        pytest.skip("no read-only sysfs here")
    out = Path("/sys/lowbitpack-reliability/q")
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--scheme", "int4", "--no-progress"])
    assert r.exit_code == 2, r.output
    line = one_line_error(r.stderr)
    assert "cannot write the output" in line and str(out) in line
    assert not out.parent.exists()


def _disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


DISK_FULL = ["quantize", "train", "bundle", "merge", "export"]


@pytest.mark.parametrize("command", DISK_FULL)
@pytest.mark.reliability(kind="fault", command="{command}", what="disk full (ENOSPC) when flushing the output")
def test_disk_full_at_flush(world, tmp_path, monkeypatch, command):
    src, packed, bundle = world
    out = tmp_path / "o"
    args = {
        "quantize": ["quantize", src, "-o", out, "--scheme", "int4", "--no-progress"],
        "train": ["train", packed, "-o", out, "--data", text_file(tmp_path), "--max-steps", "1", "--batch-size", "1",
                  "--seq-len", "16", "--r", "2", "--no-progress"],
        "bundle": ["bundle", bundle, "--base", packed, "-o", out],
        "merge": ["merge", bundle, "--restore", "16", "-o", out, "--no-progress"],
        "export": ["export", packed, "--format", "hf", "-o", out, "--no-progress"],
    }[command]
    monkeypatch.setattr(os, "fsync", _disk_full)  # atomic_dir fsyncs every file before the rename
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    line = one_line_error(r.stderr)
    assert "No space left on device" in line and str(out) in line
    assert not out.exists() and leftovers(tmp_path, "o") == []
    monkeypatch.undo()
    assert cli(args).exit_code == 0


# ---------------------------------------------------------------------------------------------- concurrency
@pytest.mark.reliability(kind="fault", command="quantize",
                         what="a second run finishes the same target while the first is writing")
def test_concurrent_runs_one_wins(world, tmp_path, monkeypatch):
    """Deterministic interleaving: the second run completes inside the first one's final step."""
    src, _, _ = world
    out = tmp_path / "q"
    from lowbitpack.artifact import ArtifactWriter
    orig = ArtifactWriter.finish
    state = {"inner": None}

    def finish_after_competitor(self, *a, **kw):
        if state["inner"] is None:
            state["inner"] = "running"
            monkeypatch.setattr(ArtifactWriter, "finish", orig)
            state["inner"] = lowbitpack.quantize(src, out, "int4", group_size=32, progress=False)
        return orig(self, *a, **kw)

    monkeypatch.setattr(ArtifactWriter, "finish", finish_after_competitor)
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--scheme", "int4", "--no-progress"])
    assert r.exit_code == 2
    assert "appeared while we were writing" in one_line_error(r.stderr)
    assert lowbitpack.api.verify(out)["ok"] and leftovers(tmp_path, "q") == []
    assert Artifact.open(out).manifest["quantization"]["group_size"] == 32  # the winner's, untouched


@pytest.mark.reliability(kind="fault", command="quantize", what="two CLI processes race on the same target")
def test_two_processes_race(world, tmp_path):
    src, _, _ = world
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "lowbitpack.cli", "quantize", str(src), "-o", str(out), "--scheme", "int4",
           "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUB_ENV,
                              cwd=tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "already exists" in one_line_error(loser) or "appeared while we were writing" in loser
    assert lowbitpack.api.verify(out)["ok"] and leftovers(tmp_path, "q") == []


# ---------------------------------------------------------------------------------------------- stale temp dirs
SWEEP_KILLS = [
    ("quantize", "lowbitpack.artifact:ArtifactWriter.add_quantized", 2,
     "lowbitpack.quantize({src!r}, {out!r}, 'int4', group_size=32, progress=False)\n"),
    ("export", "lowbitpack.io.writer:ShardWriter.add", 3,
     "lowbitpack.api.export({packed!r}, {out!r}, 'hf', progress=False)\n"),
    ("merge", "lowbitpack.restore:_merge_manifest", 1,
     "lowbitpack.api.merge({bundle!r}, {out!r}, restore=16, progress=False)\n"),
]


@pytest.mark.parametrize("command,target,k,body", SWEEP_KILLS, ids=[c[0] for c in SWEEP_KILLS])
@pytest.mark.reliability(kind="fault", command="{command}",
                         what="SIGKILL leaves a .partial temp dir: the next run to the target sweeps it")
def test_next_run_sweeps_stale_temp_dirs_of_dead_writers(world, tmp_path, command, target, k, body):
    from lowbitpack.io.atomic import temp_name

    src, packed, bundle = world
    out = tmp_path / "o"
    p = kill_at(target, k, body.format(src=str(src), packed=str(packed), bundle=str(bundle), out=str(out)), tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    stale = leftovers(tmp_path, "o")
    assert len(stale) == 1 and stale[0].endswith(".partial") and not out.exists(), stale
    # entries the sweep must leave alone: a live writer (this test's parent process), another host, an old name
    live = temp_name(out).with_name(temp_name(out).name.replace(f"-{os.getpid()}-", f"-{os.getppid()}-"))
    other_host = tmp_path / f".o.00000000-{2**22 + 12345}-abcdef01.partial"
    old_style = tmp_path / ".o.abcdef01.partial"
    for d in (live, other_host, old_style):
        d.mkdir()
    if command == "quantize":
        lowbitpack.quantize(src, out, "int4", group_size=32, progress=False)
    elif command == "export":
        lowbitpack.api.export(packed, out, "hf", progress=False)
    else:
        lowbitpack.api.merge(bundle, out, restore=16, progress=False)
    assert lowbitpack.api.verify(out)["ok"]
    assert leftovers(tmp_path, "o") == sorted(d.name for d in (live, other_host, old_style))  # the dead one is gone


def test_sweep_keeps_unrelated_and_live_entries(tmp_path):
    """Only `.NAME.<this host>-<dead pid>-<8 hex>.partial|.old` siblings of the target go."""
    from lowbitpack.io.atomic import sweep_stale, temp_name

    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that existed and is now dead
    mine = temp_name(out)
    dead = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{proc.pid}-"))
    dead_old = dead.with_suffix(".old")
    keep = [mine, tmp_path / ".other.partial", tmp_path / f".o2{dead.name[2:]}", tmp_path / "o.partial"]
    for d in [dead, dead_old, *keep]:
        d.mkdir()
    removed = sweep_stale(out)
    assert sorted(removed) == sorted([dead, dead_old])
    assert all(d.exists() for d in keep) and not dead.exists() and not dead_old.exists()
