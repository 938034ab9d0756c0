"""push: one atomic commit against a local Hub server (tests/hub_server.py), LFS for large files, a model
card with the right metadata, dry-run uploads nothing, the token never appears in output."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lowbitpack import api
from lowbitpack.cli import main
from lowbitpack.errors import InputError, OptionError
from lowbitpack.hub import HubError, build_card, describe
from tests.conftest import make_tiny_llama
from tests.hub_server import HubServer

TOKEN = "hf_lowbitpackTestToken0123456789"


@pytest.fixture
def hub(monkeypatch):
    # A local server cannot speak Xet: huggingface_hub then takes the LFS path (batch + PUT + lfsFile).
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with HubServer(required_token=TOKEN) as server:
        yield server


def _card_meta(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


@pytest.fixture
def ct_export(tmp_path) -> Path:
    src = make_tiny_llama(tmp_path / "src")
    (src / "lowbitpack_source.json").write_text(json.dumps({"model_id": "acme/tiny-llama", "revision": "abc123",
                                                            "license": "apache-2.0"}))
    api.quantize(src, tmp_path / "art", "int4", group_size=32, progress=False)
    api.export(tmp_path / "art", tmp_path / "ct", "compressed-tensors", progress=False)
    return tmp_path / "ct"


def test_push_is_one_commit_with_identical_bytes(hub, ct_export, capsys):
    res = api.push(ct_export, "alice/tiny-ct", token=TOKEN, endpoint=hub.url)
    state = hub.state
    assert state.commit_count("alice/tiny-ct") == 1
    files = state.files("alice/tiny-ct")
    local = {p.name: p.read_bytes() for p in ct_export.iterdir() if p.is_file()}
    assert set(files) == set(local) | {"README.md"}
    for name, data in local.items():
        assert files[name] == data, name
    # the safetensors went through LFS (batch + PUT), the rest inline in the NDJSON commit
    methods = [m for m, _ in state.requests]
    assert methods.count("PUT") == 1 and ("POST", "/alice/tiny-ct.git/info/lfs/objects/batch") in state.requests
    assert sum(1 for r in state.requests if r[1].startswith("/api/models/alice/tiny-ct/commit/")) == 1
    assert files["README.md"].decode() == res["card"]
    assert res["commit_oid"] in res["commit_url"] and res["revision"] == "main"
    # the card: YAML metadata the Hub understands
    meta = _card_meta(res["card"])
    assert meta["base_model"] == "acme/tiny-llama" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert {"lowbitpack", "compressed-tensors", "int4", "4-bit"} <= set(meta["tags"])
    assert "CompressedTensorsConfig" in res["card"] and "| base model | acme/tiny-llama @ abc123 |" in res["card"]
    assert state.validated_yaml == [res["card"]]
    # the token was sent as a header, and appears nowhere else
    assert f"Bearer {TOKEN}" in state.auth_headers
    out = capsys.readouterr()
    assert TOKEN not in json.dumps(res) and TOKEN not in out.out + out.err


def test_dry_run_uploads_nothing(hub, ct_export):
    r = CliRunner().invoke(main, ["push", str(ct_export), "alice/tiny-ct", "--dry-run", "--endpoint", hub.url,
                                  "--token", TOKEN])
    assert r.exit_code == 0, r.output
    assert hub.state.requests == []
    assert "model.safetensors" in r.output and "base_model: acme/tiny-llama" in r.output
    assert TOKEN not in r.output


def test_revision_branch_existing_readme_and_second_push(hub, ct_export):
    (ct_export / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    api.push(ct_export, "alice/tiny-ct", token=TOKEN, endpoint=hub.url)
    res = api.push(ct_export, "alice/tiny-ct", token=TOKEN, endpoint=hub.url, revision="v2",
                   commit_message="second")
    assert res["card_source"] == "existing README.md"
    repo = hub.state.repos["alice/tiny-ct"]
    assert set(repo.branches) == {"main", "v2"}
    assert hub.state.files("alice/tiny-ct", "v2")["README.md"] == b"---\nlicense: mit\n---\n# mine\n"
    assert hub.state.commits[repo.branches["v2"]].message == "second"
    # the client can read what it pushed back through resolve/
    from huggingface_hub import hf_hub_download
    got = hf_hub_download("alice/tiny-ct", "config.json", revision="v2", endpoint=hub.url, token=TOKEN,
                          cache_dir=str(ct_export.parent / "hf-cache"))
    assert Path(got).read_bytes() == (ct_export / "config.json").read_bytes()


def test_bad_token_is_one_line_without_the_token(hub, ct_export):
    wrong = "hf_wrongWrongWrongWrong123456"
    with pytest.raises(HubError) as e:
        api.push(ct_export, "alice/x", token=wrong, endpoint=hub.url)
    msg = str(e.value)
    assert "401" in msg and wrong not in msg and "\n" not in msg and "token" in msg
    r = CliRunner().invoke(main, ["push", str(ct_export), "alice/x", "--endpoint", hub.url, "--token", wrong])
    assert r.exit_code == 2 and wrong not in r.output and r.output.startswith("error:")


def test_input_errors(tmp_path):
    with pytest.raises(InputError):
        api.push(tmp_path / "missing", "alice/x", dry_run=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        api.push(tmp_path / "empty", "alice/x", dry_run=True)
    with pytest.raises(OptionError, match="repo id"):
        api.push(tmp_path / "empty", "not a repo id", dry_run=True)


def test_card_kinds(tmp_path):
    """adapter bundle -> peft/adapter, artifact -> lowbitpack/quantized, merge -> merge, GGUF export -> gguf tag."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                            "base_model_name_or_path": "acme/base-7b"}))
    (bundle / "lowbitpack_bundle.json").write_text(json.dumps({"format": "lowbitpack-bundle", "base": {
        "source": {"model_id": "acme/base-7b"}, "quantization": {"scheme": "nf4", "bits": 4}}}))
    meta = _card_meta(build_card(bundle, "alice/adapter"))
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert meta["base_model"] == "acme/base-7b" and {"nf4", "4-bit", "lora"} <= set(meta["tags"])
    assert "PeftModel.from_pretrained" in build_card(bundle, "alice/adapter")

    merged = tmp_path / "merged"
    make_tiny_llama(merged)
    # the shape restore.py writes: restore / original / trained_on / bundle
    merge_manifest = {"format": "lowbitpack-merge", "format_version": 1,
                      "producer": {"name": "lowbitpack", "version": "0.1.0"},
                      "bundle": {"id": "ab" * 32, "adapter_type": "lora"},
                      "trained_on": {"scheme": "nf4", "bits": 4, "model_id": "acme/base-7b"},
                      "restore": {"bits": 16, "scheme": "none", "fold": False, "merged": True, "format": "hf"},
                      "original": {"model_id": "acme/base-7b", "revision": "r1"}}
    (merged / "lowbitpack_merge.json").write_text(json.dumps(merge_manifest))
    (merged / "README.md").write_text("---\nbase_model: acme/base-7b\ntags:\n- lowbitpack\n- plr\n---\n# PLR\n")
    d = describe(merged)
    assert d.kind == "merge" and d.relation == "merge" and d.base_model == "acme/base-7b"
    res = api.push(merged, "alice/plr16", dry_run=True)  # lowbitpack's own README is replaced by the full card
    assert res["card_source"] == "generated" and "| restore | PLR-16 (none), adapter merged |" in res["card"]
    assert _card_meta(res["card"])["base_model_relation"] == "merge"
    assert api.push(merged, "alice/plr16", dry_run=True, card="keep")["card_source"] == "existing README.md"
    # restored to 4 bits with the adapter kept beside the base: a quantized base, peft files included
    merge_manifest["restore"] = {"bits": 4, "scheme": "nf4", "fold": False, "merged": False, "format": "bnb"}
    (merged / "lowbitpack_merge.json").write_text(json.dumps(merge_manifest))
    (merged / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    d = describe(merged)
    assert d.relation == "quantized" and {"plr", "restore-4", "peft", "nf4"} <= set(d.tags)
    (merged / "adapter_config.json").unlink()
    merge_manifest["restore"] = {"bits": 16, "scheme": "none", "fold": False, "merged": True, "format": "hf"}
    (merged / "lowbitpack_merge.json").write_text(json.dumps(merge_manifest))

    src = make_tiny_llama(tmp_path / "src")
    (src / "lowbitpack_source.json").write_text(json.dumps({"model_id": "acme/tiny"}))
    api.quantize(src, tmp_path / "art", "int4", group_size=32, progress=False)
    meta = _card_meta(build_card(tmp_path / "art", "alice/packed"))
    assert meta["library_name"] == "lowbitpack" and meta["base_model_relation"] == "quantized"
    assert "license" not in meta  # unknown: the body says so instead of guessing
    assert "License: not recorded" in build_card(tmp_path / "art", "alice/packed")
    assert "apache-2.0" in build_card(tmp_path / "art", "alice/packed", license="apache-2.0")

    # an hf export of a merged checkpoint is a merge, with provenance from the merge manifest
    api.export(merged, tmp_path / "merged-hf", "hf", progress=False)
    d = describe(tmp_path / "merged-hf")
    assert d.kind == "merge" and d.target == "hf" and d.relation == "merge" and d.base_model == "acme/base-7b"


def test_cli_push_json(hub, ct_export):
    r = CliRunner().invoke(main, ["push", str(ct_export), "bob/tiny", "--endpoint", hub.url, "--token", TOKEN,
                                  "--private", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert "card" not in res and res["repo_id"] == "bob/tiny" and hub.state.repos["bob/tiny"].private
    assert TOKEN not in r.output
