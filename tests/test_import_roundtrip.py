"""A repo that publishes only a quantized model: `lowbitpack import` → bundle an adapter → `merge --restore 16`
→ a plain HF checkpoint that AutoModelForCausalLM loads, whose logits match the quantized original (run by its own
library, with the adapter applied by PEFT). Once for a bitsandbytes NF4 checkpoint saved by transformers +
bitsandbytes, once for a pack-quantized checkpoint written by compressed-tensors.

The 16-bit "original" of an imported artifact is its `hf` export in the model dtype: the importers record the
sha256 of each dequantized weight in that dtype, so `merge` checks the original against the artifact the adapter
was bundled with, exactly as for a model quantized by lowbitpack.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lowbitpack.artifact import Artifact
from lowbitpack.cli import main
from tests.conftest import make_tiny_llama
from tests.test_bundle import peft_adapter

TARGETS = ("q_proj", "v_proj", "down_proj")


def run(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output[-3000:]
    return r.stdout


def plr16_from_quantized(ckpt: Path, work: Path, dtype: str, fmt: str) -> tuple[Path, Path, Path]:
    """import → hf export (the 16-bit original) → random PEFT adapter on it → bundle → merge --restore 16.
    Returns (artifact, adapter, merged)."""
    art, dense, adapter, bundle, merged = (work / n for n in ("art", "dense", "adapter", "bundle", "m16"))
    m = json.loads(run("import", ckpt, "-o", art, "--json", "--no-progress"))
    assert m["quantization"]["imported_from"] == fmt and m["summary"]["params_quantized"] > 0
    assert Artifact.open(art, verify=True)
    run("export", art, "--format", "hf", "--dtype", dtype, "-o", dense, "--no-progress")
    peft_adapter(dense, adapter, r=4, alpha=8, targets=TARGETS, seed=1)
    run("bundle", adapter, "--base", art, "-o", bundle)
    run("merge", bundle, "--restore", "16", "--original", dense, "--dtype", "fp32", "-o", merged, "--no-progress")
    assert json.loads(run("verify", merged, "--json"))["ok"]
    return art, adapter, merged


def lora_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """{base weight name: B @ A · alpha/r} from the PEFT files."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for k, a in sd.items():
        if k.endswith("lora_A.weight"):
            b = sd[k.replace("lora_A", "lora_B")]
            name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[name] = (b.float() @ a.float()) * scale
    return out


def check_merged_weights(merged: Path, art: Path, adapter: Path) -> int:
    """Every merged weight = the artifact's dequantized weight (+ ΔW where the adapter applies), f32 rounding only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    sd = model.state_dict()
    a = Artifact.open(art)
    deltas = lora_delta(adapter)
    assert deltas and set(deltas) <= set(a.tensors) and all(a.is_quantized(n) for n in deltas)
    for name in a.tensors:
        expect = a.dense(name).float() + deltas.get(name, 0)
        assert torch.allclose(sd[name], expect, rtol=1e-6, atol=1e-7), name
    return len(deltas)


IDS = torch.tensor([[3, 77, 5, 120, 18, 64, 9, 101, 25, 1, 42, 99]])


@torch.no_grad()
def logits_diff(reference, merged: Path) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ref = reference(IDS).logits.float()
    got = ours(IDS).logits.float()
    return float((got - ref).abs().max()), float(ref.abs().max())


def test_bnb_nf4_checkpoint_import_restore16_hf_loads_and_matches(tmp_path):
    """bitsandbytes NF4 (double quant, saved by transformers) → … → merged model; reference: the bnb checkpoint
    loaded by transformers + bitsandbytes (fp32 compute) with the same adapter through PEFT."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from transformers import BitsAndBytesConfig

    from tests.test_export_bnb import _to_float32_reference_path

    # in-features multiples of 64 (bitsandbytes' CPU dequantizer, see test_export_bnb.py). An fp32 model: its
    # quant_state dtype is fp32, so bitsandbytes' dequantized weights are the fp32 ones the hf export writes (with
    # a bf16 model they are bf16-rounded, and bnb's fp32 compute path differs from them by ~2e-3 in the logits).
    tiny = make_tiny_llama(tmp_path / "tiny", hidden=128, inter=192, layers=2, vocab=128, dtype=torch.float32)
    bnb_ckpt = tmp_path / "bnb"
    AutoModelForCausalLM.from_pretrained(
        tiny, device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    ).save_pretrained(bnb_ckpt)
    assert json.loads((bnb_ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    art, adapter, merged = plr16_from_quantized(bnb_ckpt, tmp_path, "fp32", "bitsandbytes")
    check_merged_weights(merged, art, adapter)

    base = AutoModelForCausalLM.from_pretrained(bnb_ckpt, device_map="cpu")
    _to_float32_reference_path(base)
    ref = PeftModel.from_pretrained(base, str(adapter)).eval()
    diff, scale = logits_diff(ref, merged)
    print(f"\nbnb nf4 -> import -> restore 16: max abs logit diff vs bnb+PEFT {diff:.3g} (max |logit| {scale:.3g})")
    assert diff < 1e-4, diff


def test_compressed_tensors_checkpoint_import_restore16_hf_loads_and_matches(tmp_path):
    """pack-quantized 4-bit asymmetric (written by compressed-tensors' ModelCompressor) → … → merged model;
    reference: transformers' compressed-tensors loader (dequantize=True) with the same adapter through PEFT."""
    pytest.importorskip("compressed_tensors")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from tests.test_export_ct import _compressed_tensors_checkpoint

    ckpt, _ = _compressed_tensors_checkpoint(tmp_path, symmetric=False)
    art, adapter, merged = plr16_from_quantized(ckpt, tmp_path, "fp32", "compressed-tensors")
    check_merged_weights(merged, art, adapter)

    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))
    ref = PeftModel.from_pretrained(base, str(adapter)).eval()
    diff, scale = logits_diff(ref, merged)
    print(f"\ncompressed-tensors -> import -> restore 16: max abs logit diff vs compressed-tensors+PEFT {diff:.3g} "
          f"(max |logit| {scale:.3g})")
    assert diff < 1e-4, diff


def test_import_cli_refuses_unquantized_and_writes_nothing(tmp_path):
    tiny = make_tiny_llama(tmp_path / "tiny")
    r = CliRunner().invoke(main, ["import", str(tiny), "-o", str(tmp_path / "art")])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "quant_method" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art*"))
