"""`merge --restore`: restore-16 equals PEFT's merge_and_unload, PLR-j outputs load and run, and every refusal."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbitpack
from lowbitpack.artifact import Artifact
from lowbitpack.errors import BaseMismatchError, InputError, IntegrityError, OptionError
from lowbitpack.io.hashing import sha256_file
from lowbitpack.lowbit_linear import attach_adapter, load_packed_model
from lowbitpack.restore import BaseMismatchWarning
from tests.test_bundle import peft_adapter
from tests.test_train import tiny_packed, tiny_source

IDS = torch.tensor([[5, 77, 3, 200, 18, 64, 9, 130, 250, 1, 42, 99]])


def bundle_for(tmp_path: Path, shards: int = 1, **adapter_cfg) -> tuple[Path, Path, Path]:
    """(original, packed int4 artifact, bundle) of the tiny Llama with a random PEFT adapter."""
    src, packed = tiny_packed(tmp_path, shards=shards)
    adapter = peft_adapter(src, tmp_path / "adapter", **adapter_cfg)
    lowbitpack.api.bundle(adapter, packed, tmp_path / "bundle")
    return src, packed, tmp_path / "bundle"


def peft_merged_state(src: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(src)  # its own dtype (bf16)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_within_one_bf16_ulp(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.float(), b.float()
    ulp = torch.maximum(a.abs(), b.abs()) * 2.0**-7 + 1e-30
    assert ((a - b).abs() <= ulp).all(), (a - b).abs().max()


# ---------------------------------------------------------------------------------------------- restore 16
@pytest.mark.parametrize("adapter_cfg", [{}, {"use_rslora": True, "alpha_pattern": {"v_proj": 32},
                                              "targets": ("q_proj", "v_proj", "o_proj")}],
                         ids=["lora", "rslora+alpha_pattern"])
def test_restore16_equals_peft_merge_and_unload(tmp_path, adapter_cfg):
    src, _, bundle = bundle_for(tmp_path, **adapter_cfg)
    m = lowbitpack.api.merge(bundle, tmp_path / "m16", restore=16, progress=False)
    out = tmp_path / "m16"
    assert m["restore"] == {"bits": 16, "scheme": "none", "fallback": None, "fold": False, "merged": True,
                            "format": "hf", "dtype": None}
    assert m["original"]["mismatched"] == [] and m["errors"] is None
    ours, original = read_dir(out), read_dir(src)
    theirs = peft_merged_state(src, tmp_path / "adapter")
    adapter = load_file(str(bundle / "adapter_model.safetensors"))
    cfg = json.loads((bundle / "adapter_config.json").read_text())
    assert set(ours) == set(original)
    changed = 0
    for name, t in ours.items():
        assert t.dtype == original[name].dtype == torch.bfloat16
        module = name[: -len(".weight")]
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in adapter:
            a, b = adapter[a_key], adapter[a_key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            alpha = cfg["alpha_pattern"].get(module.rsplit(".", 1)[1], cfg["lora_alpha"])
            s = alpha / (r ** 0.5 if cfg["use_rslora"] else r)
            expected = (original[name].float() + (b @ a) * s).to(torch.bfloat16)  # one rounding, from the spec
            assert torch.equal(t, expected), name
            assert_within_one_bf16_ulp(t, theirs[name])
            assert not torch.equal(t, original[name])
            changed += 1
        else:
            assert torch.equal(t, original[name]), name
    assert changed == (6 if adapter_cfg else 4)  # targets x 2 layers


def test_restore16_loads_in_plain_transformers_without_lowbitpack(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src, _, bundle = bundle_for(tmp_path)
    lowbitpack.api.merge(bundle, tmp_path / "m16", restore=16, progress=False)
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm16')!r}, dtype=torch.float32)\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad(): logits = m(input_ids=ids).logits\n"
        "assert 'lowbitpack' not in sys.modules\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()(input_ids=IDS).logits
    # both hold bf16-rounded W + ΔW (PEFT merged in float32 from the bf16 original here)
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()


def test_restore16_streams_sharded_originals_and_casts_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    src, _, bundle = bundle_for(tmp_path, shards=3)
    lowbitpack.api.merge(bundle, tmp_path / "m", restore=16, dtype="fp32", progress=False)
    out = tmp_path / "m"
    src_index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert out_index == src_index and len(set(out_index.values())) == 3
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in read_dir(out).values())
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_restore16_with_fan_in_fan_out_gpt2(tmp_path):
    """Conv1D bases are stored [in, out]: ΔW is transposed (PEFT's fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(src)
    adapter = peft_adapter(src, tmp_path / "adapter", targets=("c_attn",), fan_in_fan_out=True)
    lowbitpack.api.bundle(adapter, src, tmp_path / "bundle")
    lowbitpack.api.merge(tmp_path / "bundle", tmp_path / "m", restore=16, progress=False)
    ours = read_dir(tmp_path / "m")
    theirs = peft_merged_state(src, adapter)
    name = "transformer.h.0.attn.c_attn.weight"
    assert ours[name].shape == (32, 96)
    torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[name], read_dir(src)[name])


# ---------------------------------------------------------------------------------------------- PLR-j
@pytest.mark.parametrize("bits", [8, 4])
def test_plr_j_outputs_load_and_run(tmp_path, bits):
    src, packed, bundle = bundle_for(tmp_path)
    m = lowbitpack.api.merge(bundle, tmp_path / f"plr{bits}", restore=bits, progress=False)
    out = tmp_path / f"plr{bits}"
    assert m["restore"]["scheme"] == f"int{bits}" and not m["restore"]["merged"]
    assert m["trained_on"]["scheme"] == "int4" and m["trained_on"]["artifact_manifest_sha256"] == \
        sha256_file(packed / "lowbitpack.json")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert sha256_file(out / name) == sha256_file(bundle / name)
    art = Artifact.open(out, verify=True)
    assert art.manifest["quantization"]["scheme"] == f"int{bits}"
    assert art.manifest["source"]["path"] == str(src.resolve())
    err = m["errors"]
    assert err["what"] == "base_error" and 0 < err["mean"] < (0.02 if bits == 8 else 0.2)
    # PLR-j runs (packed base + adapter) and approximates the restore-16 model, closer at 8 bits
    lowbitpack.api.merge(bundle, tmp_path / "m16", restore=16, dtype="fp32", progress=False)
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")(input_ids=IDS).logits
        plr = attach_adapter(load_packed_model(out, torch.float32), out)(input_ids=IDS).logits
    rel = float((plr - ref).norm() / ref.norm())
    assert rel < (0.02 if bits == 8 else 0.25), rel


def test_fold_reports_error_and_merges_into_the_quantized_base(tmp_path):
    src, _, bundle = bundle_for(tmp_path)
    m = lowbitpack.api.merge(bundle, tmp_path / "f8", restore=8, fold=True, progress=False)
    out = tmp_path / "f8"
    assert m["restore"]["merged"] and m["restore"]["fold"]
    assert not (out / "adapter_model.safetensors").exists()
    art = Artifact.open(out, verify=True)
    assert art.manifest["source"]["merged_bundle"] == m["bundle"]["id"]
    assert art.manifest["source"]["path"] == str(src.resolve())
    err = m["errors"]
    assert err["what"] == "fold_error" and 0 < err["max"] < 0.02
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        w = f.get_tensor(name).float()
    adapter = load_file(str(bundle / "adapter_model.safetensors"))
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    target = w + (b @ a) * 2.0
    rel = float((art.dense(name, torch.float32) - target).norm() / target.norm())
    assert rel == pytest.approx(err["tensors"][name]["rel_error"], rel=1e-5)


def test_restore_3_and_2_use_gptq_or_fall_back_to_rtn_with_a_warning(tmp_path, monkeypatch):
    import lowbitpack.restore as restore

    _, _, bundle = bundle_for(tmp_path)
    monkeypatch.setattr(restore, "gptq_available", lambda: False)
    with pytest.warns(UserWarning, match="fell back to RTN int2"):
        m = lowbitpack.api.merge(bundle, tmp_path / "r2", restore=2, progress=False)
    assert m["restore"]["scheme"] == "int2" and "gptq2" in m["restore"]["fallback"]
    assert "Note:" in (tmp_path / "r2" / "README.md").read_text()
    with pytest.raises(OptionError, match="needs GPTQ"):
        lowbitpack.api.merge(bundle, tmp_path / "x", restore=3, scheme="gptq3", progress=False)
    m = lowbitpack.api.merge(bundle, tmp_path / "r3", restore=3, scheme="int3", group_size=32, progress=False)
    assert m["restore"]["scheme"] == "int3" and m["restore"]["fallback"] is None
    assert Artifact.open(tmp_path / "r3").manifest["quantization"]["group_size"] == 32


# ---------------------------------------------------------------------------------------------- safety
def test_base_mismatch_is_refused_unless_allowed(tmp_path):
    src, _, bundle = bundle_for(tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    for restore in (16, 8):
        with pytest.raises(BaseMismatchError, match="differ from the base.*--allow-base-mismatch"):
            lowbitpack.api.merge(bundle, tmp_path / f"m{restore}", restore=restore, progress=False)
        assert not (tmp_path / f"m{restore}").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    with pytest.warns(BaseMismatchWarning, match="merging anyway"):
        m = lowbitpack.api.merge(bundle, tmp_path / "m", restore=16, allow_base_mismatch=True, progress=False)
    assert m["original"]["mismatched"] == [name] and m["original"]["allow_base_mismatch"]


def test_corrupt_bundle_and_wrong_originals_give_one_line_errors_and_no_output(tmp_path):
    src, packed, bundle = bundle_for(tmp_path)
    other = tiny_source(tmp_path / "other", hidden=96)
    with pytest.raises(InputError, match="shape"):
        lowbitpack.api.merge(bundle, tmp_path / "o", restore=16, original=other, progress=False)
    with pytest.raises(InputError, match="packed lowbitpack artifact"):
        lowbitpack.api.merge(bundle, tmp_path / "o", restore=16, original=packed, progress=False)
    data = bytearray((bundle / "adapter_model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (bundle / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch of adapter_model.safetensors") as e:
        lowbitpack.api.merge(bundle, tmp_path / "o", restore=16, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_missing_original_asks_for_original(tmp_path):
    src, _, bundle = bundle_for(tmp_path)
    m = json.loads((bundle / "lowbitpack_bundle.json").read_text())
    m["base"]["source_path"] = str(tmp_path / "gone")
    (bundle / "lowbitpack_bundle.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="--original"):
        lowbitpack.api.merge(bundle, tmp_path / "o", restore=16, progress=False)
    lowbitpack.api.merge(bundle, tmp_path / "o", restore=16, original=src, progress=False)


@pytest.mark.parametrize("kw,msg", [
    ({"restore": 16, "fold": True}, "--fold applies to"),
    ({"restore": 16, "scheme": "int8"}, "--scheme applies to"),
    ({"restore": 5}, "--restore must be one of"),
    ({"restore": 8, "scheme": "int4"}, "4-bit but --restore is 8"),
    ({"restore": 8, "fmt": "tflite"}, "unknown --format"),
    ({"restore": 16, "fmt": "ours"}, "--format ours needs"),
    ({"restore": 16, "dtype": "fp8"}, "unsupported --dtype"),
])
def test_option_errors(tmp_path, kw, msg):
    from lowbitpack.restore import merge_bundle
    with pytest.raises(OptionError, match=msg):
        merge_bundle(tmp_path / "nobundle", tmp_path / "o", progress=False, **kw)


def test_other_formats_go_through_the_exporters(tmp_path, monkeypatch):
    from lowbitpack.export import EXPORTERS

    calls = []

    def fake_export(path, out, force=False, progress=True):
        calls.append(Path(path))
        out = Path(out)
        out.mkdir()
        (out / "model.gguf").write_bytes(b"GGUF")
        (out / "lowbitpack_export.json").write_text("{}")
        return {"format": "gguf"}

    monkeypatch.setitem(EXPORTERS, "gguf", fake_export)
    _, _, bundle = bundle_for(tmp_path)
    m = lowbitpack.api.merge(bundle, tmp_path / "g16", restore=16, format="gguf", progress=False)
    assert calls[-1].name == ".merged" and m["restore"]["format"] == "gguf"
    assert sorted(p.name for p in (tmp_path / "g16").iterdir()) == \
        ["README.md", "lowbitpack_export.json", "lowbitpack_merge.json", "model.gguf"]
    lowbitpack.api.merge(bundle, tmp_path / "g8", restore=8, format="gguf", progress=False)
    assert calls[-1].name == ".artifact"
    assert {"model.gguf", "adapter_config.json", "adapter_model.safetensors"} <= \
        {p.name for p in (tmp_path / "g8").iterdir()}
    assert not (tmp_path / "g8" / "lowbitpack.json").exists()


def test_merge_cli(tmp_path):
    from lowbitpack.cli import main

    _, _, bundle = bundle_for(tmp_path)
    res = CliRunner().invoke(main, ["merge", str(bundle), "--restore", "16", "-o", str(tmp_path / "m"),
                                    "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["restore"]["bits"] == 16
    res = CliRunner().invoke(main, ["merge", str(bundle), "--restore", "8", "-o", str(tmp_path / "m8"),
                                    "--fold", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "fold_error mean" in res.output
    res = CliRunner().invoke(main, ["merge", str(bundle), "--restore", "16", "-o", str(tmp_path / "m")])
    assert res.exit_code == 2 and "already exists" in res.output


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_restore16_on_smollm2_matches_peft(smollm2, tmp_path):
    """SmolLM2-135M: a random r=8 adapter on q/v, bundled against the original, merged; the adapted tensors
    equal PEFT's merge_and_unload within one bf16 ulp and the rest is byte-identical."""
    adapter = peft_adapter(smollm2, tmp_path / "adapter", r=8, alpha=16)
    lowbitpack.api.bundle(adapter, smollm2, tmp_path / "bundle", trained_on="int4")
    m = lowbitpack.api.merge(tmp_path / "bundle", tmp_path / "m16", restore=16, progress=False)
    assert m["original"]["verified_tensors"] == 60
    ours, original = read_dir(tmp_path / "m16"), read_dir(smollm2)
    theirs = peft_merged_state(smollm2, adapter)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.v_proj.weight"):
        assert_within_one_bf16_ulp(ours[name], theirs[name])
        assert not torch.equal(ours[name], original[name])
    assert torch.equal(ours["model.layers.3.mlp.down_proj.weight"], original["model.layers.3.mlp.down_proj.weight"])
