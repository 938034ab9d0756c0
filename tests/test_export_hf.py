"""hf export: plain bf16/fp16 safetensors that transformers loads without lowbitpack, equal to our
dequantized model; the export registry / api.export dispatch; the CLI command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from lowbitpack import api
from lowbitpack.artifact import Artifact
from lowbitpack.cli import main
from lowbitpack.errors import InputError, OptionError, OutputExistsError
from lowbitpack.export import EXPORT_FORMATS, EXPORTERS
from lowbitpack.export.hf import export_hf
from tests.conftest import make_tiny_llama

LAYERS_0_3 = r"model\.layers\.[0-3]\..*proj\.weight$"


def shared_smol_int4(tmp_path_factory, smollm2: Path) -> Path:
    """SmolLM2 int4 g128, layers 0-3 quantized (in=576 is not a multiple of 128), made once per test session and
    shared by test_export_hf / test_export_ct (same path under the session's base temp dir)."""
    out = tmp_path_factory.getbasetemp() / "shared-smollm2-int4-g128-l0-3"
    if not (out / "lowbitpack.json").is_file():
        api.quantize(smollm2, out, "int4", group_size=128, modules=LAYERS_0_3, force=out.exists(), progress=False)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_real_model_artifact_to_bf16_matches_dequantized(tmp_path, tmp_path_factory, smollm2):
    """SmolLM2 int4 artifact -> bf16 HF dir: transformers loads it alone; every weight equals our reference
    dequantization rounded once to bf16, so logits equal the dequantized model's in bf16 exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art_path = shared_smol_int4(tmp_path_factory, smollm2)
    res = api.export(art_path, tmp_path / "hf", "hf", progress=False)
    assert res["dtype"] == "bfloat16" and res["dequantized"] == 28 and res["shards"] == ["model.safetensors"]
    out = tmp_path / "hf"
    assert not (out / "model.safetensors.index.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg
    assert not any(k.startswith("lowbitpack") for k in cfg)
    assert (out / "tokenizer.json").is_file() and (out / "lowbitpack_export.json").is_file()
    art = Artifact.open(art_path)
    stored = _tensors(out)
    assert set(stored) == set(art.tensors)
    for name in art.tensors:
        assert stored[name].dtype == torch.bfloat16
        assert torch.equal(stored[name], art.dense(name, torch.bfloat16)), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    ref.load_state_dict({n: art.dense(n, torch.bfloat16) for n in art.tensors if art.is_quantized(n)}, strict=False)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("In the beginning God created the heaven and the earth.").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    manifest = json.loads((out / "lowbitpack_export.json").read_text())
    assert manifest["format"] == "lowbitpack-export" and manifest["target"] == "hf"
    assert manifest["input"]["kind"] == "artifact" and manifest["input"]["quantization"]["scheme"] == "int4"
    assert manifest["input"]["source"]["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_merged_checkpoint_to_fp16_sharded(tmp_path):
    """A plain HF dir (what `merge` writes) is re-cast and re-sharded; sidecars and provenance sidecars follow."""
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "merged", shards=2)
    (src / "lowbitpack_merge.json").write_text(json.dumps({"format": "lowbitpack-merge", "restore_bits": 16}))
    res = export_hf(src, tmp_path / "out", dtype="fp16", max_shard_size=200_000, progress=False)
    assert len(res["shards"]) > 1 and res["dequantized"] == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src_t, out_t = _tensors(src), _tensors(out)
    assert set(index["weight_map"]) == set(src_t) == set(out_t)
    for k, v in src_t.items():
        assert out_t[k].dtype == torch.float16 and torch.equal(out_t[k], v.to(torch.float16)), k
    assert (out / "lowbitpack_merge.json").is_file()
    prov = json.loads((out / "lowbitpack_export.json").read_text())["input"]
    assert prov["kind"] == "checkpoint" and "lowbitpack_merge.json" in prov["manifests"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16


def test_output_rules_and_bad_options(tmp_path):
    src = make_tiny_llama(tmp_path / "src")
    export_hf(src, tmp_path / "out", progress=False)
    with pytest.raises(OutputExistsError):
        export_hf(src, tmp_path / "out", progress=False)
    export_hf(src, tmp_path / "out", dtype="fp32", force=True, progress=False)
    assert _tensors(tmp_path / "out")["model.norm.weight"].dtype == torch.float32
    with pytest.raises(OptionError, match="dtype"):
        export_hf(src, tmp_path / "o2", dtype="int4", progress=False)
    with pytest.raises(InputError, match="no such directory"):
        export_hf(tmp_path / "missing", tmp_path / "o3", progress=False)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    assert not list(tmp_path.glob(".*partial"))  # no temp dirs left behind


def test_api_export_dispatch(tmp_path, monkeypatch):
    src = make_tiny_llama(tmp_path / "src")
    assert set(EXPORT_FORMATS) <= set(EXPORTERS)
    with pytest.raises(OptionError, match="unknown export format"):
        api.export(src, tmp_path / "o", "onnx")
    with pytest.raises(OptionError, match="do not apply"):
        api.export(src, tmp_path / "o", "hf", gguf_type="q4_0")
    # a format whose module is not there (yet) gives a clear OptionError, not an ImportError
    import lowbitpack.export as ex
    monkeypatch.setitem(ex._TARGETS, "gptq", ("no_such_module", "export_gptq", {}))
    ex.EXPORTERS.pop("gptq", None)
    with pytest.raises(OptionError, match="not available"):
        api.export(src, tmp_path / "o", "gptq")
    # `merge --format X` calls EXPORTERS[X](path, out, force=..., progress=...)
    res = EXPORTERS["hf"](src, tmp_path / "o", force=False, progress=False)
    assert res["format"] == "hf"


def test_cli_export_hf(tmp_path):
    src = make_tiny_llama(tmp_path / "src")
    api.quantize(src, tmp_path / "art", "int4", group_size=32, progress=False)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "art"), "--format", "hf", "-o", str(tmp_path / "hf"),
                                  "--dtype", "fp16", "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["dtype"] == "float16" and res["dequantized"] == 14
    r = CliRunner().invoke(main, ["export", str(tmp_path / "art"), "--format", "hf", "-o", str(tmp_path / "x"),
                                  "--gguf-type", "q4_0"])
    assert r.exit_code != 0 and "gguf only" in r.output
