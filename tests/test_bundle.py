"""Bundles (format v1): golden bundle, creation from trained and foreign adapters, and every refusal."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbitpack
from lowbitpack.artifact import Artifact
from lowbitpack.bundle import BUNDLE_MANIFEST, bundle_id, open_bundle
from lowbitpack.errors import FormatVersionError, InputError, IntegrityError, OptionError
from lowbitpack.io.hashing import sha256_file, sha256_tensor
from tests.test_train import text_file, tiny_packed

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "formats" / "golden"
GOLDEN_BUNDLE = GOLDEN / "bundle-v1-lora"
SCHEMA = json.loads((ROOT / "formats" / "bundle-v1.schema.json").read_text())


def peft_adapter(model_dir: Path, out: Path, *, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"),
                 seed: int = 0, **cfg) -> Path:
    """An adapter made by plain PEFT on the original HF model (as if trained elsewhere), with random A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                          init_lora_weights=False, **cfg))
    pm.save_pretrained(str(out), save_embedding_layers=False)
    return out


@pytest.fixture
def packed_and_adapter(tmp_path):
    src, packed = tiny_packed(tmp_path)
    return src, packed, peft_adapter(src, tmp_path / "adapter")


# ---------------------------------------------------------------------------------------------- golden
def test_golden_bundle_reads_and_matches_schema_and_spec():
    b = open_bundle(GOLDEN_BUNDLE)
    jsonschema.validate(b.manifest, SCHEMA)
    assert b.manifest["format_version"] == 1
    assert bundle_id(b.manifest) == b.id
    # base identity: the golden artifact's manifest, byte for byte
    art = Artifact.open(GOLDEN / "artifact-v1-int4")
    assert b.base["artifact"]["manifest_sha256"] == sha256_file(GOLDEN / "artifact-v1-int4" / "lowbitpack.json")
    with safe_open(str(GOLDEN / "source" / "model.safetensors"), "pt") as f:
        for name, rec in b.base["tensors"].items():
            assert rec["sha256"] == art.tensors[name]["sha256"] == sha256_tensor(f.get_tensor(name))
            stored = art._read(list(art.tensors[name]["stored"].values()))
            assert rec["stored_sha256"] == {k: sha256_tensor(stored[v]) for k, v in art.tensors[name]["stored"].items()}
    # ΔW as the spec says: B @ A * alpha / r, straight from the file
    raw = load_file(str(GOLDEN_BUNDLE / "adapter_model.safetensors"))
    for module in b.adapter.modules:
        a = raw[f"base_model.model.{module}.lora_A.weight"]
        bb = raw[f"base_model.model.{module}.lora_B.weight"]
        shape = tuple(b.base["tensors"][module + ".weight"]["shape"])
        torch.testing.assert_close(b.adapter.delta_weight(module, shape), (bb @ a) * (4 / 2))
    card = (GOLDEN_BUNDLE / "README.md").read_text()
    assert card.startswith("---\nbase_model: \"lowbitpack/golden\"\nlibrary_name: peft\n")


def test_golden_bundle_rebuilds_identically(tmp_path):
    """Bundling the same adapter against the same artifact reproduces the golden id and hashes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mgb", GOLDEN / "make_golden_bundle.py")
    mgb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mgb)
    adapter = mgb.golden_adapter(tmp_path / "adapter")
    m = lowbitpack.api.bundle(adapter, GOLDEN / "artifact-v1-int4", tmp_path / "b")
    golden = json.loads((GOLDEN_BUNDLE / BUNDLE_MANIFEST).read_text())
    assert m["bundle_id"] == golden["bundle_id"]
    assert m["base"]["tensors"] == golden["base"]["tensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert m["files"][name] == golden["files"][name]


# ---------------------------------------------------------------------------------------------- creation
def test_bundle_of_a_lowbitpack_trained_adapter(tmp_path):
    src, packed = tiny_packed(tmp_path)
    lowbitpack.api.train(packed, tmp_path / "ad", data=text_file(tmp_path), max_steps=2, batch_size=2, seq_len=16,
                         r=2, alpha=4, progress=False, dtype="fp32")
    m = lowbitpack.api.bundle(tmp_path / "ad", packed, tmp_path / "bundle")
    jsonschema.validate(m, SCHEMA)
    out = tmp_path / "bundle"
    assert {"adapter_config.json", "adapter_model.safetensors", "lowbitpack_training.json", "train_log.jsonl",
            "README.md", BUNDLE_MANIFEST} == {p.name for p in out.iterdir()}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert sha256_file(out / name) == sha256_file(tmp_path / "ad" / name)
    assert m["training"]["result"]["steps"] == 2
    assert m["adapter"]["type"] == "lora" and len(m["adapter"]["modules"]) == 8
    assert m["base"]["scheme"] == "int4" and m["base"]["bits"] == 4 and m["base"]["group_size"] == 24
    art = json.loads((packed / "lowbitpack.json").read_text())
    assert m["base"]["source_path"] == art["source"]["path"]
    assert set(m["base"]["tensors"]) == {f"{mod}.weight" for mod in m["adapter"]["modules"]}
    for name, rec in m["base"]["tensors"].items():
        assert rec["sha256"] == art["tensors"][name]["sha256"]
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    import yaml
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "peft" and "int4" in meta["tags"]
    # the tiny source has no Hub id, only a local directory name: no base_model the Hub would mis-link
    assert "/" not in str(m["base"]["model_id"]) and "base_model" not in meta
    assert open_bundle(out).id == m["bundle_id"]


def test_bundle_accepts_adapters_trained_elsewhere_against_artifact_or_original(packed_and_adapter, tmp_path):
    src, packed, adapter = packed_and_adapter
    m1 = lowbitpack.api.bundle(adapter, packed, tmp_path / "b1")
    assert m1["training"] is None and m1["base"]["kind"] == "artifact"
    m2 = lowbitpack.api.bundle(adapter, src, tmp_path / "b2", trained_on="bnb-nf4")
    jsonschema.validate(m2, SCHEMA)
    assert m2["base"]["kind"] == "checkpoint" and m2["base"]["scheme"] == "bnb-nf4"
    # same original tensors, whichever way the base was named
    assert {n: r["sha256"] for n, r in m1["base"]["tensors"].items()} == \
           {n: r["sha256"] for n, r in m2["base"]["tensors"].items()}
    assert m1["bundle_id"] != m2["bundle_id"]


# ---------------------------------------------------------------------------------------------- refusals
def _rewrite_adapter(adapter: Path, fn) -> None:
    t = load_file(str(adapter / "adapter_model.safetensors"))
    t = fn(t)
    save_file(t, str(adapter / "adapter_model.safetensors"))


def _rewrite_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_bundle_refuses_shape_mismatch(tmp_path):
    src, packed = tiny_packed(tmp_path)
    other = tiny_packed(tmp_path / "other", hidden=96)[0]
    adapter = peft_adapter(other, tmp_path / "adapter")
    with pytest.raises(InputError, match="shape"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bundle_refuses_modules_missing_from_base(packed_and_adapter, tmp_path):
    _, packed, adapter = packed_and_adapter
    _rewrite_adapter(adapter, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    with pytest.raises(InputError, match="does not have"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")


@pytest.mark.parametrize("key,msg", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", "unexpected tensor key"),
    ("model.layers.0.self_attn.q_proj.lora_A.weight", "PEFT keys start with"),
    ("base_model.model.model..layers.0.q_proj.lora_A.weight", "malformed"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embeddings"),
])
def test_bundle_refuses_unknown_or_malformed_keys(packed_and_adapter, tmp_path, key, msg):
    _, packed, adapter = packed_and_adapter
    _rewrite_adapter(adapter, lambda t: {**t, key: torch.zeros(4, 64)})
    with pytest.raises(InputError, match=msg):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")


def test_bundle_refuses_half_modules_and_rank_mismatch(packed_and_adapter, tmp_path):
    _, packed, adapter = packed_and_adapter
    backup = (adapter / "adapter_model.safetensors").read_bytes()
    _rewrite_adapter(adapter, lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k})
    with pytest.raises(InputError, match="needs both A and B"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")
    (adapter / "adapter_model.safetensors").write_bytes(backup)
    _rewrite_config(adapter, r=8)
    with pytest.raises(InputError, match="rank 4 in the weights but r=8"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")


@pytest.mark.parametrize("changes,msg", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa"}, "rewrites the base"),
    ({"peft_type": "IA3"}, "unsupported adapter type"),
])
def test_bundle_refuses_unmergeable_configs(packed_and_adapter, tmp_path, changes, msg):
    _, packed, adapter = packed_and_adapter
    _rewrite_config(adapter, **changes)
    with pytest.raises(InputError, match=msg):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")


def test_bundle_refuses_types_this_build_lacks(packed_and_adapter, tmp_path, monkeypatch):
    from lowbitpack import adapters

    _, packed, adapter = packed_and_adapter
    _rewrite_config(adapter, peft_type="QWHA")
    monkeypatch.setitem(adapters.ADAPTER_TYPES, "qwha", "qwha_missing_module")
    adapters._KINDS.pop("qwha", None)
    with pytest.raises(OptionError, match="not supported by this lowbitpack build"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")


def test_bundle_refuses_symlinks_pickles_and_garbage(packed_and_adapter, tmp_path):
    _, packed, adapter = packed_and_adapter
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(adapter / "adapter_model.safetensors", real)
    os.symlink(real, adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match="symbolic link"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InputError, match="never unpickles"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="corrupt safetensors header"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bundle_refuses_non_finite_weights(packed_and_adapter, tmp_path):
    _, packed, adapter = packed_and_adapter
    _rewrite_adapter(adapter, lambda t: {k: (v * float("nan") if "q_proj.lora_B" in k else v) for k, v in t.items()})
    with pytest.raises(InputError, match="NaN"):
        lowbitpack.api.bundle(adapter, packed, tmp_path / "b")


def _copy_golden(tmp_path: Path) -> Path:
    dst = tmp_path / "g"
    shutil.copytree(GOLDEN_BUNDLE, dst)
    return dst


def _edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / BUNDLE_MANIFEST).read_text())
    fn(m)
    (path / BUNDLE_MANIFEST).write_text(json.dumps(m))


def test_open_bundle_refuses_future_versions_tampering_and_escapes(tmp_path):
    g = _copy_golden(tmp_path)
    _edit_manifest(g, lambda m: m.update(format_version=2))
    with pytest.raises(FormatVersionError, match="newer than this lowbitpack reads.*upgrade"):
        open_bundle(g)
    g = _copy_golden(tmp_path / "2")
    data = bytearray((g / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (g / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        open_bundle(g)
    g = _copy_golden(tmp_path / "3")
    _edit_manifest(g, lambda m: m["files"].update({"../evil": {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(InputError, match="outside the bundle"):
        open_bundle(g)
    g = _copy_golden(tmp_path / "4")
    _edit_manifest(g, lambda m: m["adapter"].update(type="mystery"))
    with pytest.raises(InputError, match="unknown adapter type"):
        open_bundle(g)
    g = _copy_golden(tmp_path / "5")
    _edit_manifest(g, lambda m: m["base"]["tensors"]["model.layers.0.self_attn.q_proj.weight"].update(shape=[6, 33]))
    with pytest.raises(InputError, match="shape"):
        open_bundle(g)
    g = _copy_golden(tmp_path / "6")
    (g / "README.md").unlink()
    os.symlink(GOLDEN_BUNDLE / "README.md", g / "README.md")
    with pytest.raises(InputError, match="symbolic link"):
        open_bundle(g)
    with pytest.raises(InputError, match="not a lowbitpack bundle"):
        open_bundle(GOLDEN / "artifact-v1-int4")


def test_bundle_cli(packed_and_adapter, tmp_path):
    from lowbitpack.cli import main

    _, packed, adapter = packed_and_adapter
    res = CliRunner().invoke(main, ["bundle", str(adapter), "--base", str(packed), "-o", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["bundle_id"] == hashlib.sha256(json.dumps({
        "adapter": {k: m["files"][k]["sha256"] for k in ("adapter_config.json", "adapter_model.safetensors")},
        "base": {n: [r["sha256"], r.get("stored_sha256")] for n, r in sorted(m["base"]["tensors"].items())},
        "artifact": m["base"]["artifact"]["manifest_sha256"]}, sort_keys=True).encode()).hexdigest()
    res = CliRunner().invoke(main, ["bundle", str(adapter), "--base", str(tmp_path / "b"), "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "neither a lowbitpack artifact" in res.output
