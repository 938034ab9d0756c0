import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import lowbitpack
from lowbitpack.artifact import MANIFEST, Artifact
from lowbitpack.cli import main
from lowbitpack.errors import FormatVersionError, InputError, OptionError, OutputExistsError
from lowbitpack.io.hashing import sha256_tensor
from tests.conftest import make_tiny_llama


def _source_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("shards", [1, 3])
def test_quantize_int4_artifact_roundtrip(tmp_path, shards):
    src = make_tiny_llama(tmp_path / "src", shards=shards)
    out = tmp_path / "q"
    manifest = lowbitpack.quantize(src, out, "int4", group_size=32, progress=False)
    assert manifest["format_version"] == 1
    art = Artifact.open(out, verify=True)
    orig = _source_tensors(src)
    assert set(art.tensors) == set(orig)
    for name, t in orig.items():
        rec = art.tensors[name]
        assert rec["sha256"] == sha256_tensor(t)
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            assert rec["scheme"] == "int4" and rec["layout"] == "intg-v1" and rec["group_size"] == 32
            err = (art.dense(name, torch.float32) - t.float()).abs().max().item()
            assert 0 < err < 0.5 * t.float().abs().max().item()
        if "norm" in name or "embed" in name or name == "lm_head.weight":
            assert rec["scheme"] == "none"
            assert torch.equal(art.dense(name), t)
    assert (out / "config.json").is_file()
    # no temp directories left next to the output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_modules_regex_and_no_match(tmp_path, tiny_llama):
    lowbitpack.quantize(tiny_llama, tmp_path / "a", "int8", modules=r"mlp\.down_proj\.weight$", progress=False)
    art = Artifact.open(tmp_path / "a")
    assert {n for n in art.tensors if art.is_quantized(n)} == {
        f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
    with pytest.raises(InputError, match="no tensor matches"):
        lowbitpack.quantize(tiny_llama, tmp_path / "b", "int8", modules="nothing_here", progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(OptionError):
        lowbitpack.quantize(tiny_llama, tmp_path / "c", "int8", modules="(", progress=False)


def test_refuses_existing_output_unless_force(tmp_path, tiny_llama):
    out = tmp_path / "q"
    lowbitpack.quantize(tiny_llama, out, "int2", progress=False)
    with pytest.raises(OutputExistsError):
        lowbitpack.quantize(tiny_llama, out, "int2", progress=False)
    lowbitpack.quantize(tiny_llama, out, "int3", force=True, progress=False)
    assert Artifact.open(out).manifest["quantization"]["scheme"] == "int3"


def test_bad_inputs_one_line_errors(tmp_path, tiny_llama):
    runner = CliRunner()
    # not an HF dir
    (tmp_path / "empty").mkdir()
    r = runner.invoke(main, ["quantize", str(tmp_path / "empty"), "-o", str(tmp_path / "o1"), "--scheme", "int4"])
    assert r.exit_code == 2 and "config.json" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    # truncated shard
    bad = make_tiny_llama(tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = runner.invoke(main, ["quantize", str(bad), "-o", str(tmp_path / "o2"), "--scheme", "int4"])
    assert r.exit_code == 2 and "model.safetensors" in r.output and "truncated" in r.output
    assert not (tmp_path / "o2").exists()
    # garbage / header bomb
    f.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    r = runner.invoke(main, ["quantize", str(bad), "-o", str(tmp_path / "o3"), "--scheme", "int4"])
    assert r.exit_code == 2 and "header" in r.output
    # pickled weights only
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "config.json").write_text("{}")
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04")
    r = runner.invoke(main, ["quantize", str(pk), "-o", str(tmp_path / "o4"), "--scheme", "int4"])
    assert r.exit_code == 2 and "never unpickles" in r.output
    # bad option
    r = runner.invoke(main, ["quantize", str(tiny_llama), "-o", str(tmp_path / "o5"), "--group-size", "0"])
    assert r.exit_code == 2 and "group-size" in r.output
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_nan_weights_rejected(tmp_path):
    src = make_tiny_llama(tmp_path / "src")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="NaN"):
        lowbitpack.quantize(src, tmp_path / "q", "int4", progress=False)
    assert not (tmp_path / "q").exists()


def test_manifest_future_version_and_tamper(tmp_path, tiny_llama):
    out = tmp_path / "q"
    lowbitpack.quantize(tiny_llama, out, "int4", progress=False)
    m = json.loads((out / MANIFEST).read_text())
    m["format_version"] = 2
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FormatVersionError, match="upgrade"):
        Artifact.open(out)
    m["format_version"] = 1
    (out / MANIFEST).write_text(json.dumps(m))
    shard = next(out.glob("packed*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256 mismatch"):
        Artifact.open(out, verify=True)


def test_inspect_cli_json(tmp_path, tiny_llama):
    out = tmp_path / "q"
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", str(tiny_llama), "-o", str(out), "--scheme", "int4", "--json",
                             "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert 4.0 < summary["avg_bits_quantized"] < 4.5
    r = runner.invoke(main, ["inspect", str(out), "--json"])
    info = json.loads(r.output)
    assert info["kind"] == "artifact" and info["format_version"] == 1
    assert info["totals"]["compression_ratio"] > 1.0
    r = runner.invoke(main, ["inspect", str(tiny_llama), "--json"])
    assert json.loads(r.output)["kind"] == "source"
    r = runner.invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "int4" in r.output and "compression" in r.output


def test_interrupted_run_leaves_nothing(tmp_path):
    """SIGKILL mid-run: the target is absent, and a re-run succeeds."""
    src = make_tiny_llama(tmp_path / "src", hidden=256, inter=1024, layers=6)
    out = tmp_path / "q"
    code = ("import lowbitpack, os, signal\n"
            "import lowbitpack.artifact as a\n"
            "orig = a.ArtifactWriter.add_quantized\n"
            "n = [0]\n"
            "def kill(self, *args, **kw):\n"
            "    n[0] += 1\n"
            "    if n[0] == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return orig(self, *args, **kw)\n"
            "a.ArtifactWriter.add_quantized = kill\n"
            f"lowbitpack.quantize({str(src)!r}, {str(out)!r}, 'int4', progress=False)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -9
    assert not out.exists()
    lowbitpack.quantize(src, out, "int4", progress=False)
    Artifact.open(out, verify=True)


def test_runs_are_byte_identical(tmp_path, tiny_llama):
    a = lowbitpack.quantize(tiny_llama, tmp_path / "a", "int3", progress=False)
    b = lowbitpack.quantize(tiny_llama, tmp_path / "b", "int3", progress=False)
    assert a["shards"] == b["shards"]
