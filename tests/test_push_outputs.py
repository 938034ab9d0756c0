"""push on real lowbitpack outputs (artifact, adapter bundle, PLR-16 merge, PLR-8 merge, compressed-tensors export):
`push --dry-run` lists exactly the files (names and sizes) that a real push then commits to the local Hub test
server (tests/hub_server.py), and the committed README.md parses with huggingface_hub's ModelCard with the
metadata the Hub reads (base_model, base_model_relation, library_name, tags with scheme and bits).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import lowbitpack
from lowbitpack.cli import main
from tests.hub_server import HubServer
from tests.test_bundle import peft_adapter
from tests.test_train import tiny_source

TOKEN = "hf_pushOutputsToken0123456789abc"
BASE = "acme/tiny-llama"

# kind -> (base_model_relation, library_name, tags that must be present)
EXPECT = {
    "artifact": ("quantized", "lowbitpack", {"lowbitpack", "int4", "4-bit"}),
    "bundle": ("adapter", "peft", {"lowbitpack", "peft", "lora", "int4", "4-bit"}),
    "merge16": ("merge", "transformers", {"lowbitpack", "plr", "restore-16"}),
    "merge8": ("quantized", "lowbitpack", {"lowbitpack", "plr", "restore-8", "int8", "8-bit", "peft"}),
    "export-ct": ("quantized", "transformers", {"lowbitpack", "compressed-tensors", "int4", "4-bit"}),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("push-outputs")
    src = tiny_source(base)
    (src / "lowbitpack_source.json").write_text(json.dumps({"model_id": BASE, "revision": "r1",
                                                            "license": "apache-2.0"}))
    art = base / "art"
    lowbitpack.api.quantize(src, art, "int4", group_size=32, progress=False)
    adapter = peft_adapter(src, base / "adapter")
    lowbitpack.api.bundle(adapter, art, base / "bundle")
    lowbitpack.api.merge(base / "bundle", base / "merge16", restore=16, progress=False)
    lowbitpack.api.merge(base / "bundle", base / "merge8", restore=8, progress=False)
    lowbitpack.api.export(art, base / "export-ct", "compressed-tensors", progress=False)
    return {"artifact": art, "bundle": base / "bundle", "merge16": base / "merge16", "merge8": base / "merge8",
            "export-ct": base / "export-ct"}


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # a local server cannot speak Xet: LFS path
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with HubServer(required_token=TOKEN) as server:
        yield server


def _cli(*args) -> dict:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output[-3000:]
    assert TOKEN not in r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("kind", list(EXPECT))
def test_dry_run_lists_exactly_what_push_uploads_and_the_card_parses(outputs, hub, kind):
    from huggingface_hub import ModelCard

    path, repo = outputs[kind], f"alice/{kind}"
    dry = _cli("push", path, repo, "--dry-run", "--json", "--endpoint", hub.url, "--token", TOKEN)
    assert hub.state.requests == []  # the dry run contacted nobody
    card_dry = lowbitpack.api.push(path, repo, dry_run=True)["card"]
    real = _cli("push", path, repo, "--json", "--endpoint", hub.url, "--token", TOKEN)
    remote = hub.state.files(repo)
    listed = {f["path"]: f["bytes"] for f in dry["files"]}
    assert listed == {name: len(data) for name, data in remote.items()}  # same names, same sizes
    assert {f["path"]: f["bytes"] for f in real["files"]} == listed and real["bytes"] == dry["bytes"]
    assert hub.state.commit_count(repo) == 1
    local = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    for name, data in remote.items():
        if name != "README.md" or real["card_source"] != "generated":
            assert data == local[name], name
    card_text = remote["README.md"].decode("utf-8")
    assert card_text == card_dry  # the dry run showed the card that was committed

    card = ModelCard(card_text)  # raises on metadata huggingface_hub cannot parse
    meta = card.data.to_dict()
    relation, library, tags = EXPECT[kind]
    assert meta["base_model"] == BASE
    assert meta["base_model_relation"] == relation
    assert meta["library_name"] == library
    assert tags <= set(meta["tags"]), meta["tags"]
    assert meta.get("license") == "apache-2.0"
    assert card.text.lstrip().startswith(f"# {kind}")
    assert hub.state.validated_yaml == [card_text]  # huggingface_hub sent the card for validation on commit
