"""bitsandbytes export / import: the same bytes transformers+bitsandbytes save, loadable, exact round trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lowbitpack
from lowbitpack.artifact import Artifact
from lowbitpack.errors import InputError, OptionError, OutputExistsError
from lowbitpack.export.bnb import bnb_quantization_config, export_bnb, int8_dequantize, int8_rowwise
from lowbitpack.importers.bnb import import_bnb
from lowbitpack.modeling import load_dequantized_model

from .conftest import make_tiny_llama

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _assert_same_checkpoint(ours: Path, ref: Path) -> None:
    a, b = _read_all(ours), _read_all(ref)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((ref / "config.json").read_text())
    assert ca["quantization_config"] == cb["quantization_config"]


def _to_float32_reference_path(model) -> None:
    """bitsandbytes' plain path (dequantize to f32 + matmul) instead of its bf16 CPU kernel, and f32 for the
    other weights (transformers keeps them in the checkpoint dtype and refuses `.float()` on quantized models)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            module.compute_dtype = torch.float32
    for p in model.parameters():
        if not isinstance(p, bnb.nn.Params4bit) and p.is_floating_point():
            p.data = p.data.float()


def _save_with_transformers(src: Path, out: Path, mode: str) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if mode == "nf4":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu", dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # In-features multiples of 64: bitsandbytes' AVX-512 CPU dequantizer mis-indexes absmax otherwise (odd
    # shapes are covered byte for byte in test_nf4.py). gate/up: 384 blocks = 1.5 nested blocks.
    return make_tiny_llama(tmp_path_factory.mktemp("bnb") / "tiny", hidden=128, inter=192, layers=2, vocab=128)


@pytest.fixture(scope="module")
def ref_nf4(tiny, tmp_path_factory) -> Path:
    return _save_with_transformers(tiny, tmp_path_factory.mktemp("ref") / "nf4", "nf4")


@pytest.fixture(scope="module")
def ref_int8(tiny, tmp_path_factory) -> Path:
    return _save_with_transformers(tiny, tmp_path_factory.mktemp("ref") / "int8", "int8")


@pytest.fixture(scope="module")
def art_nf4(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "nf4"
    lowbitpack.quantize(tiny, out, "nf4", progress=False)
    return out


def test_quantization_config_is_what_transformers_writes():
    from transformers import BitsAndBytesConfig
    ref4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16).to_dict()
    assert bnb_quantization_config("nf4", "bfloat16", True) == ref4
    assert bnb_quantization_config("int8") == BitsAndBytesConfig(load_in_8bit=True).to_dict()


def test_nf4_export_of_artifact_equals_transformers_save(art_nf4, ref_nf4, tmp_path):
    """Codes of an nf4 artifact are reused as they are, and they are the bytes bitsandbytes itself writes."""
    rep = export_bnb(art_nf4, tmp_path / "out", mode="nf4", force=False, progress=False)
    assert rep["reused_codes"] == 14 and rep["requantized"] == 0 and rep["exact"]
    _assert_same_checkpoint(tmp_path / "out", ref_nf4)
    assert (tmp_path / "out" / "lowbitpack_export.json").is_file()


def test_nf4_export_of_dense_checkpoint_equals_transformers_save(tiny, ref_nf4, tmp_path):
    rep = export_bnb(tiny, tmp_path / "out", mode="nf4", force=False, progress=False)
    assert rep["input"] == "checkpoint" and rep["requantized"] == 14
    _assert_same_checkpoint(tmp_path / "out", ref_nf4)


def test_int8_export_equals_transformers_save(tiny, ref_int8, tmp_path):
    export_bnb(tiny, tmp_path / "out", mode="int8", force=False, progress=False)
    _assert_same_checkpoint(tmp_path / "out", ref_int8)


def test_nf4_export_loads_and_computes_like_the_dequantized_model(art_nf4, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight
    out = tmp_path / "out"
    export_bnb(art_nf4, out, mode="nf4", force=False, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    art = Artifact.open(art_nf4)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for name, module in layers:  # before any forward: bnb's own dequantization equals ours exactly
        assert torch.equal(dequantize_bnb_weight(module.weight), art.dense(f"{name}.weight")), name
    _to_float32_reference_path(model)
    ref = load_dequantized_model(art_nf4, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_import_nf4_keeps_bytes_and_round_trips(ref_nf4, art_nf4, tmp_path):
    import bitsandbytes.functional as F
    manifest = import_bnb(ref_nf4, tmp_path / "imp", progress=False)
    assert manifest["quantization"]["scheme"] == "nf4" and manifest["summary"]["params_quantized"] > 0
    imp = Artifact.open(tmp_path / "imp", verify=True)
    ours = Artifact.open(art_nf4)
    ref = _read_all(ref_nf4)
    for name, rec in imp.tensors.items():
        if rec["scheme"] == "none":
            assert torch.equal(imp.dense(name), ref[name])
            continue
        assert rec["layout"] == "nf4-bnb-v1" and rec["params"]["imported_from"] == "bitsandbytes"
        assert torch.equal(imp.dense(name), ours.dense(name))  # same codes as quantizing the source ourselves
        qs = F.QuantState.from_dict({k[len(name) + 1:]: v for k, v in ref.items() if k.startswith(name + ".")},
                                    device=torch.device("cpu"))
        assert torch.equal(imp.dense(name), F.dequantize_4bit(ref[name], qs))
    # artifact -> bnb gives back the very same checkpoint
    export_bnb(tmp_path / "imp", tmp_path / "again", mode="nf4", force=False, progress=False)
    _assert_same_checkpoint(tmp_path / "again", ref_nf4)


def test_import_int8_keeps_codes_and_round_trips(ref_int8, tmp_path):
    import_bnb(ref_int8, tmp_path / "imp", progress=False)
    imp = Artifact.open(tmp_path / "imp", verify=True)
    ref = _read_all(ref_int8)
    n_q = 0
    for name, rec in imp.tensors.items():
        if rec["scheme"] == "none":
            continue
        n_q += 1
        module = name[: -len(".weight")]
        expected = int8_dequantize(ref[name], ref[f"{module}.SCB"])
        got = imp.dense(name, torch.float32)
        # same codes and row scales; CB·(SCB/127) vs (CB·SCB)/127 differ by float rounding only
        assert torch.allclose(got, expected, rtol=2e-7, atol=0), name
    assert n_q == 14
    export_bnb(tmp_path / "imp", tmp_path / "again", mode="int8", force=False, progress=False)
    _assert_same_checkpoint(tmp_path / "again", ref_int8)


def test_int8_export_of_nf4_artifact_loads(art_nf4, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "int8"
    rep = export_bnb(art_nf4, out, mode="int8", force=False, progress=False)
    assert rep["requantized"] == 14
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    art = Artifact.open(art_nf4)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            cb, scb = int8_rowwise(art.dense(f"{name}.weight"))
            assert torch.equal(module.weight.data, cb) and torch.equal(module.weight.SCB, scb)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(10).unsqueeze(0)).logits).all()


def test_partial_artifact_lists_unquantized_linears(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    lowbitpack.quantize(tiny, tmp_path / "art", "nf4", modules=r"q_proj\.weight$", progress=False)
    rep = export_bnb(tmp_path / "art", tmp_path / "out", mode="nf4", force=False, progress=False)
    skip = rep["quantization_config"]["llm_int8_skip_modules"]
    assert "lm_head" in skip and "model.layers.0.self_attn.k_proj" in skip and len(skip) == 13
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    assert isinstance(model.model.layers[1].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(model.model.layers[1].self_attn.k_proj) is torch.nn.Linear


def test_errors(tiny, art_nf4, tmp_path):
    with pytest.raises(OptionError):
        export_bnb(art_nf4, tmp_path / "x", mode="fp8", force=False, progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        export_bnb(art_nf4, tmp_path / "exists", mode="nf4", force=False, progress=False)
    with pytest.raises(InputError, match="bitsandbytes"):
        import_bnb(tiny, tmp_path / "imp", progress=False)
    assert not (tmp_path / "imp").exists() and not list(tmp_path.glob(".imp*"))


@pytest.mark.slow
def test_smollm2_export_logits_and_import(smollm2, tmp_path):
    """Real model end to end (prints the figures): nf4 artifact -> bnb -> transformers+bitsandbytes logits vs our
    dequantized model; the import gives the artifact back; int8 from the dense model vs its dequantized int8 values."""
    from transformers import AutoModelForCausalLM
    art = tmp_path / "art"
    lowbitpack.quantize(smollm2, art, "nf4", progress=False)
    rep = export_bnb(art, tmp_path / "bnb", mode="nf4", force=False, progress=False)
    assert rep["exact"] and rep["reused_codes"] == 210
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", device_map="cpu")
    with torch.no_grad():   # bitsandbytes' default CPU path: bf16 kernel, bf16 absmax
        default_diff = (model(ids).logits.float() - load_dequantized_model(art, torch.bfloat16)(ids).logits.float())
    # a forward repacks the weights for bnb's CPU kernel: take a fresh model for the f32 path
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", device_map="cpu")
    _to_float32_reference_path(model)
    with torch.no_grad():
        diff = (model(ids).logits - load_dequantized_model(art, dtype=torch.float32)(ids).logits).abs().max().item()
    print(f"\nSmolLM2 nf4 -> bnb: max abs logit diff vs dequantized model: f32 path {diff:.3g}, "
          f"bnb default CPU path (bf16) {default_diff.abs().max().item():.3g}")
    assert diff < 1e-3
    import_bnb(tmp_path / "bnb", tmp_path / "imp", progress=False)
    a, b = Artifact.open(art), Artifact.open(tmp_path / "imp")
    for name in a.tensors:
        assert torch.equal(a.dense(name), b.dense(name)), name
    export_bnb(smollm2, tmp_path / "int8", mode="int8", force=False, progress=False)
    import_bnb(tmp_path / "int8", tmp_path / "imp8", progress=False)
    model8 = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        lo8 = model8(ids).logits.float()
        ref8 = load_dequantized_model(tmp_path / "imp8", dtype=torch.float32)(ids).logits
    diff8 = (lo8 - ref8).abs().max().item()
    agree = (lo8.argmax(-1) == ref8.argmax(-1)).float().mean().item()
    print(f"SmolLM2 int8 -> bnb: max abs logit diff vs dequantized int8 weights {diff8:.3g} "
          f"(LLM.int8 also quantizes activations), top-1 agreement {agree:.3f}")
    assert torch.isfinite(lo8).all() and agree > 0.5
