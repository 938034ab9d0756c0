"""Bad inputs through the CLI: each is refused with one `error:` line naming the file, a nonzero exit and nothing
written (no output, no temp dir). Plus integrity: `lowbitpack verify` on artifacts, bundles and merge outputs
detects a flipped byte in any file they record.

Every case is recorded in docs/RELIABILITY.md through `@pytest.mark.reliability`.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lowbitpack
from lowbitpack.cli import main
from tests.test_reliability_faults import leftovers, one_line_error, world  # noqa: F401 - session fixture
from tests.test_train import text_file

Q = "model.layers.0.self_attn.q_proj.weight"
TRAIN_ARGS = ["--max-steps", "1", "--batch-size", "1", "--seq-len", "16", "--r", "2", "--no-progress"]


# ---------------------------------------------------------------------------------------------- builders
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_tensors(d: Path, file: str, fn: Callable[[dict], None]) -> None:
    sd = load_file(str(d / file))
    fn(sd)
    save_file(sd, str(d / file), metadata={"format": "pt"})


def _set(name: str, value: float):
    def fn(sd):
        t = sd[name].clone()
        t.view(-1)[3] = value
        sd[name] = t
    return fn


def _header(raw: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def _rewrite_header(f: Path, edit: Callable[[dict], None]) -> None:
    raw = f.read_bytes()
    n, h = _header(raw)
    edit(h)
    hb = json.dumps(h, separators=(",", ":")).encode()
    assert len(hb) <= n
    f.write_bytes(raw[:8] + hb.ljust(n) + raw[8 + n:])


def _edit_json(f: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads(f.read_text())
    edit(m)
    f.write_text(json.dumps(m))


def src_case(fn: Callable[[Path], None]):
    """A broken copy of the tiny source checkpoint -> `quantize` args."""
    def build(w, tmp: Path):
        s = _copy(w[0], tmp / "src")
        fn(s)
        return ["quantize", s, "-o", tmp / "out", "--scheme", "int4", "--no-progress"]
    return build


def artifact_case(command: str, fn: Callable[[Path], None]):
    """A broken copy of the packed artifact -> `train` / `export` / `bundle` args."""
    def build(w, tmp: Path):
        a = _copy(w[1], tmp / "art")
        fn(a)
        if command == "train":
            return ["train", a, "-o", tmp / "out", "--data", text_file(tmp), *TRAIN_ARGS]
        if command == "export":
            return ["export", a, "--format", "hf", "-o", tmp / "out", "--no-progress"]
        return ["bundle", _adapter(w, tmp), "--base", a, "-o", tmp / "out"]
    return build


def _adapter(w, tmp: Path) -> Path:
    ad = tmp / "adapter"
    ad.mkdir(exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (ad / f).exists():
            shutil.copyfile(w[2] / f, ad / f)
    return ad


def adapter_case(fn: Callable[[Path], None]):
    """A broken copy of the PEFT adapter -> `bundle` args."""
    def build(w, tmp: Path):
        ad = _adapter(w, tmp)
        fn(ad)
        return ["bundle", ad, "--base", w[1], "-o", tmp / "out"]
    return build


def bundle_case(fn: Callable[[Path], None]):
    """A tampered copy of the bundle -> `merge --restore 16` args."""
    def build(w, tmp: Path):
        b = _copy(w[2], tmp / "bundle")
        fn(b)
        return ["merge", b, "--restore", "16", "-o", tmp / "out", "--no-progress"]
    return build


def data_case(command: str, content: bytes, name: str = "data.txt"):
    """Bad training / calibration text."""
    def build(w, tmp: Path):
        f = tmp / name
        f.write_bytes(content)
        if command == "train":
            return ["train", w[1], "-o", tmp / "out", "--data", f, *TRAIN_ARGS]
        return ["quantize", w[0], "-o", tmp / "out", "--scheme", "gptq4", "--calib", f, "--calib-samples", "2",
                "--calib-seqlen", "16", "--no-progress"]
    return build


def _truncate(f: Path, keep: int):
    f.write_bytes(f.read_bytes()[:keep])


NON_UTF8 = "caf\xe9 cr\xe8me".encode("latin-1") * 200 + b"\xff\xfe\n"
ST = "model.safetensors"
AW = "adapter_model.safetensors"
AC = "adapter_config.json"
BM = "lowbitpack_bundle.json"
AM = "lowbitpack.json"

BAD_INPUTS = [
    # --- source checkpoints (quantize)
    ("quantize", "truncated safetensors (last 100 bytes cut)", src_case(lambda s: _truncate(s / ST, (s / ST).stat().st_size - 100))),
    ("quantize", "safetensors shorter than its 8-byte header length", src_case(lambda s: (s / ST).write_bytes(b"\x01\x02"))),
    ("quantize", "garbage bytes named model.safetensors", src_case(lambda s: (s / ST).write_bytes(os.urandom(4096)))),
    ("quantize", "header bomb (header length 2**40)", src_case(lambda s: (s / ST).write_bytes(struct.pack("<Q", 2**40) + b"{}" * 64))),
    ("quantize", "header is JSON but not an object", src_case(lambda s: (s / ST).write_bytes(struct.pack("<Q", 2) + b"[]"))),
    ("quantize", "tensor data offsets past the end of the file", src_case(lambda s: _rewrite_header(
        s / ST, lambda h: h[Q].__setitem__("data_offsets", [0, 10**9])))),
    ("quantize", "unknown dtype in the safetensors header", src_case(lambda s: _rewrite_header(
        s / ST, lambda h: h[Q].__setitem__("dtype", "Q7")))),
    ("quantize", "NaN in a weight", src_case(lambda s: _edit_tensors(s, ST, _set(Q, float("nan"))))),
    ("quantize", "Inf in a weight", src_case(lambda s: _edit_tensors(s, ST, _set("model.layers.1.mlp.up_proj.weight", float("inf"))))),
    ("quantize", "config.json is not JSON", src_case(lambda s: (s / "config.json").write_text("{model_type: llama"))),
    ("quantize", "config.json missing", src_case(lambda s: (s / "config.json").unlink())),
    ("quantize", "only pickled weights (pytorch_model.bin)", src_case(lambda s: (s / ST).rename(s / "pytorch_model.bin"))),
    ("quantize", "index names a shard outside the model dir (../)", src_case(lambda s: (s / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {Q: "../model.safetensors"}})))),
    ("quantize", "index names a missing shard", src_case(lambda s: (s / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {Q: "model-00002-of-00002.safetensors"}})))),
    ("quantize", "index.json is not JSON", src_case(lambda s: (s / "model.safetensors.index.json").write_bytes(b"\xff\x00"))),
    ("quantize", "non-UTF-8 calibration text", data_case("quantize", NON_UTF8)),
    # --- training data and bases (train)
    ("train", "non-UTF-8 training text", data_case("train", NON_UTF8)),
    ("train", "empty training text", data_case("train", b"")),
    ("train", "JSONL without a 'text' field", data_case("train", b'{"txt": "a"}\n{"txt": "b"}\n', "d.jsonl")),
    ("train", "JSONL line that is not JSON", data_case("train", b'{"text": "a"}\n{oops\n', "d.jsonl")),
    ("train", "artifact config.json missing model_type", artifact_case("train", lambda a: (a / "config.json").write_text("{}"))),
    ("train", "artifact manifest from a future format_version", artifact_case("train", lambda a: _edit_json(
        a / AM, lambda m: m.__setitem__("format_version", 99)))),
    ("train", "artifact manifest is not JSON", artifact_case("train", lambda a: (a / AM).write_text("{"))),
    # --- artifacts (export, bundle)
    ("export", "artifact shard with a flipped byte (sha256 differs)", artifact_case("export", lambda a: _flip(a / "packed.safetensors"))),
    ("export", "artifact manifest names a shard outside it (../)", artifact_case("export", lambda a: _edit_json(
        a / AM, lambda m: m.__setitem__("shards", {"../packed.safetensors": {"sha256": "0" * 64, "bytes": 1}})))),
    ("export", "artifact shard missing", artifact_case("export", lambda a: (a / "packed.safetensors").unlink())),
    ("export", "artifact manifest with a wrong tensor dtype", artifact_case("export", lambda a: _edit_json(
        a / AM, lambda m: m["tensors"][Q].__setitem__("dtype", "complex32")))),
    ("bundle", "artifact manifest with an edited shard hash", artifact_case("bundle", lambda a: _edit_json(
        a / AM, lambda m: m["shards"]["packed.safetensors"].__setitem__("sha256", "0" * 64)))),
    # --- adapters (bundle)
    ("bundle", "adapter with a wrong lora_A shape", adapter_case(lambda ad: _edit_tensors(ad, AW, _reshape_first_a))),
    ("bundle", "adapter with an unknown tensor key", adapter_case(lambda ad: _edit_tensors(
        ad, AW, lambda sd: sd.__setitem__("extra.weight", torch.zeros(2))))),
    ("bundle", "adapter with NaN weights", adapter_case(lambda ad: _edit_tensors(ad, AW, _nan_first))),
    ("bundle", "adapter_config.json is not JSON", adapter_case(lambda ad: (ad / AC).write_text("nope"))),
    ("bundle", "adapter_config.json with an unknown peft_type", adapter_case(lambda ad: _edit_json(
        ad / AC, lambda c: c.__setitem__("peft_type", "MYSTERY")))),
    ("bundle", "adapter weights are a symlink", adapter_case(lambda ad: _make_symlink(ad / AW))),
    ("bundle", "adapter targets modules the base lacks", adapter_case(lambda ad: _edit_tensors(ad, AW, _rename_module))),
    # --- bundles (merge)
    ("merge", "bundle manifest from a future format_version", bundle_case(lambda b: _edit_json(
        b / BM, lambda m: m.__setitem__("format_version", 2)))),
    ("merge", "bundle manifest with an edited file hash", bundle_case(lambda b: _edit_json(
        b / BM, lambda m: m["files"][AW].__setitem__("sha256", "f" * 64)))),
    ("merge", "bundle adapter file modified (flipped byte)", bundle_case(lambda b: _flip(b / AW))),
    ("merge", "bundle manifest lists a '..' path", bundle_case(lambda b: _edit_json(
        b / BM, lambda m: m["files"].__setitem__("../secret", {"sha256": "0" * 64, "bytes": 1})))),
    ("merge", "bundle file replaced by a symlink (same bytes)", bundle_case(lambda b: _make_symlink(b / AW))),
    ("merge", "bundle manifest is not UTF-8", bundle_case(lambda b: (b / BM).write_bytes(b"\xff\xfe{}"))),
    ("merge", "bundle manifest missing", bundle_case(lambda b: (b / BM).unlink())),
    # --- verify
    ("verify", "directory without any lowbitpack manifest", lambda w, tmp: ["verify", _copy(w[0], tmp / "plain")]),
]


def _flip(f: Path, at: int = -5) -> None:
    b = bytearray(f.read_bytes())
    b[at] ^= 0xFF
    f.write_bytes(bytes(b))


def _make_symlink(f: Path) -> None:
    real = f.parent.parent / (f.name + ".real")
    shutil.move(f, real)
    f.symlink_to(real)


def _reshape_first_a(sd: dict) -> None:
    k = next(k for k in sorted(sd) if "lora_A" in k)
    sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] + 3, dtype=sd[k].dtype)


def _nan_first(sd: dict) -> None:
    k = next(k for k in sorted(sd) if "lora_B" in k)
    t = sd[k].clone()
    t.view(-1)[0] = float("nan")
    sd[k] = t


def _rename_module(sd: dict) -> None:
    for k in [k for k in sd if "layers.0." in k]:
        sd[k.replace("layers.0.", "layers.7.")] = sd.pop(k)


@pytest.mark.parametrize("command,what,build", BAD_INPUTS, ids=[f"{c}-{w}" for c, w, _ in BAD_INPUTS])
@pytest.mark.reliability(kind="bad_input", command="{command}", what="{what}")
def test_bad_input_is_refused(world, tmp_path, command, what, build):  # noqa: F811
    args = [str(a) for a in build(world, tmp_path)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, (r.exit_code, r.output[-1500:])  # 2 = a typed LowbitpackError, not a crash
    line = one_line_error(r.stderr)
    assert str(tmp_path) in line or "/" in line, line  # names the file involved
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


@pytest.mark.reliability(kind="bad_input", command="quantize", what="integer-typed linear weight (kept dense)")
def test_integer_weight_is_kept_not_quantized(world, tmp_path):  # noqa: F811
    s = _copy(world[0], tmp_path / "src")
    _edit_tensors(s, ST, lambda sd: sd.__setitem__(Q, sd[Q].to(torch.int32)))
    r = CliRunner().invoke(main, ["quantize", str(s), "-o", str(tmp_path / "q"), "--scheme", "int4", "--no-progress"])
    assert r.exit_code == 0, r.output
    art = lowbitpack.artifact.Artifact.open(tmp_path / "q", verify=True)
    assert art.tensors[Q]["scheme"] == "none" and art.tensors[Q]["dtype"] == "int32"
    assert torch.equal(art.dense(Q), load_file(str(s / ST))[Q])


# ---------------------------------------------------------------------------------------------- integrity
@pytest.fixture(scope="module")
def verified_outputs(world, tmp_path_factory):  # noqa: F811
    """A merge output (restore 16) and a PLR-8 merge output in our format, besides the artifact and bundle."""
    base = tmp_path_factory.mktemp("verify")
    lowbitpack.api.merge(world[2], base / "m16", restore=16, progress=False)
    lowbitpack.api.merge(world[2], base / "plr8", restore=8, progress=False)
    outs = {"artifact": world[1], "bundle": world[2], "merge": base / "m16", "merge-plr8": base / "plr8"}
    # exports: every target records the sha256 of what it wrote in lowbitpack_export.json
    for fmt in ("hf", "compressed-tensors", "bnb-nf4"):
        lowbitpack.api.export(world[1], base / f"export-{fmt}", fmt, progress=False)
        outs[f"export-{fmt}"] = base / f"export-{fmt}"
    from tests.test_export_gguf import _tiny as gguf_tiny  # a byte-level BPE tokenizer, which GGUF needs
    g32 = base / "int4-g32"
    lowbitpack.api.quantize(gguf_tiny(base), g32, "int4", group_size=32, progress=False)
    for fmt in ("gguf", "gptq"):  # GPTQ kernels take groups of 2^k only
        lowbitpack.api.export(g32, base / f"export-{fmt}", fmt, progress=False)
        outs[f"export-{fmt}"] = base / f"export-{fmt}"
    return outs


def _recorded_files(kind: str, d: Path) -> list[str]:
    if kind == "artifact":
        m = json.loads((d / AM).read_text())
        return sorted(m["shards"]) + sorted(m["files"])
    if kind == "bundle":
        return sorted(json.loads((d / BM).read_text())["files"])
    if kind == "export":
        return sorted(json.loads((d / "lowbitpack_export.json").read_text())["files"])
    return sorted(json.loads((d / "lowbitpack_merge.json").read_text())["files"])


@pytest.mark.parametrize("kind", ["artifact", "bundle", "merge", "merge-plr8", "export-hf", "export-compressed-tensors",
                                  "export-bnb-nf4", "export-gguf", "export-gptq"])
@pytest.mark.reliability(kind="integrity", command="verify", what="a flipped byte in each recorded file of a {kind}")
def test_verify_detects_a_flipped_byte_in_every_file(verified_outputs, tmp_path, kind):
    d = verified_outputs[kind]
    r = CliRunner().invoke(main, ["verify", str(d), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ok"] and res["kind"] == kind.split("-")[0]
    files = _recorded_files(kind.split("-")[0], d)
    assert res["files_checked"] == len(files) or kind == "artifact"
    assert any(f.endswith((".safetensors", ".gguf")) for f in files)
    for name in files:
        bad = _copy(d, tmp_path / f"bad-{name}")
        size = (bad / name).stat().st_size
        _flip(bad / name, at=size // 2)  # middle of the file: tensor data for shards
        r = CliRunner().invoke(main, ["verify", str(bad)])
        assert r.exit_code == 2, (name, r.output)
        line = one_line_error(r.stderr)
        assert name in line or "sha256" in line, line
        shutil.rmtree(bad)


EXPORT_RECORD_EDITS = [
    ("record without file hashes (older lowbitpack)", lambda m: m.pop("files"), "no file hashes"),
    ("record listing a '..' path", lambda m: m["files"].update({"../outside.json": {"sha256": "0" * 64}}),
     "malformed file record"),
    ("record listing a missing file", lambda m: m["files"].update({"gone.safetensors": {"sha256": "0" * 64}}),
     "missing"),
    ("record of a newer format_version", lambda m: m.update(format_version=2), "newer"),
]


@pytest.mark.parametrize("what,edit,msg", EXPORT_RECORD_EDITS, ids=[e[0] for e in EXPORT_RECORD_EDITS])
@pytest.mark.reliability(kind="bad_input", command="verify", what="export: {what}")
def test_verify_export_refuses_bad_records(verified_outputs, tmp_path, what, edit, msg):
    d = _copy(verified_outputs["export-hf"], tmp_path / "e")
    m = json.loads((d / "lowbitpack_export.json").read_text())
    edit(m)
    (d / "lowbitpack_export.json").write_text(json.dumps(m))
    r = CliRunner().invoke(main, ["verify", str(d)])
    assert r.exit_code == 2, r.output
    line = one_line_error(r.stderr)
    assert msg in line and str(d) in line, line


@pytest.mark.reliability(kind="integrity", command="verify", what="export: a truncated shard")
def test_verify_export_detects_truncation(verified_outputs, tmp_path):
    d = _copy(verified_outputs["export-hf"], tmp_path / "e")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    r = CliRunner().invoke(main, ["verify", str(d)])
    assert r.exit_code == 2 and "model.safetensors" in one_line_error(r.stderr)
