"""GPTQ checkpoints: export (export/gptq.py), import (importers/gptq.py), and loading by GPTQModel/transformers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import lowbitpack
from lowbitpack.artifact import Artifact, ArtifactWriter
from lowbitpack.errors import InputError, OptionError
from lowbitpack.export.gptq import (dequantize_gptq, export_gptq, loaded_weights_max_diff, pack_gptq_qweight,
                                    pack_gptq_qzeros, unpack_gptq_qweight, unpack_gptq_qzeros)
from lowbitpack.importers.gptq import import_gptq
from lowbitpack.layouts.bitpack import pack_bits
from lowbitpack.layouts.intg import LAYOUT
from lowbitpack.qtensor import QuantizedTensor
from safetensors import safe_open
from tests.conftest import make_tiny_llama
from tests.test_gptq import _CALIB_TEXT, _byte_tokenizer


# --- GPTQ's packing, written out the way GPTQModel's `pack_original` loops do it (independent of ours) ----------

def gptqmodel_pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [in, out] -> int32 [in*bits/32, out] (in a multiple of 32)."""
    c = codes.astype(np.uint64)
    rows = c.shape[0] * bits // 32
    q = np.zeros((rows, c.shape[1]), dtype=np.uint64)
    if bits in (2, 4, 8):
        pf = 32 // bits
        for r in range(rows):
            for j in range(pf):
                q[r] |= c[r * pf + j] << np.uint64(bits * j)
    else:
        i = r = 0
        while r < rows:
            for j in range(i, i + 10):
                q[r] |= c[j] << np.uint64(3 * (j - i))
            i += 10
            q[r] |= c[i] << np.uint64(30)
            r += 1
            q[r] |= (c[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(i, i + 10):
                q[r] |= c[j] << np.uint64(3 * (j - i) + 1)
            i += 10
            q[r] |= c[i] << np.uint64(31)
            r += 1
            q[r] |= (c[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(i, i + 10):
                q[r] |= c[j] << np.uint64(3 * (j - i) + 2)
            i += 10
            r += 1
    return (q & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_is_gptqmodels_packing(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 96), generator=g, dtype=torch.uint8)  # [out, in]
    ours = pack_gptq_qweight(pack_bits(codes, bits), bits, 96)
    ref = gptqmodel_pack_rows(codes.t().numpy(), bits)
    assert ours.dtype == torch.int32 and ours.shape == (96 * bits // 32, 5)
    assert np.array_equal(ours.numpy(), ref)
    assert torch.equal(unpack_gptq_qweight(ours, bits, 96), pack_bits(codes, bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qzeros_v1_v2(bits):
    maxq = (1 << bits) - 1
    g = torch.Generator().manual_seed(10 + bits)
    zero = torch.randint(0, maxq + 1, (64, 3), generator=g, dtype=torch.uint8)  # [out, G]
    zero[:5, 0] = 0      # the case v1 cannot store field by field
    zero[5:9, 1] = maxq
    v2 = pack_gptq_qzeros(zero, bits, "v2")
    assert np.array_equal(v2.numpy(), gptqmodel_pack_rows(zero.numpy(), bits).T)
    v1 = pack_gptq_qzeros(zero, bits, "v1")
    for version, packed in (("v1", v1), ("v2", v2)):
        assert packed.shape == (3, 64 * bits // 32)
        assert torch.equal(unpack_gptq_qzeros(packed, bits, 64, version), zero)
    # GPTQModel turns v1 into v2 by adding a 1 to every field of each word (3-bit: field by field modulo 8)
    if bits == 3:
        fields = ((zero.t().to(torch.int32) - 1) & 7).to(torch.uint8)
        assert np.array_equal(v1.numpy(), gptqmodel_pack_rows(fields.t().numpy(), 3).T)
    else:
        ones = sum(1 << (bits * j) for j in range(32 // bits))
        assert np.array_equal(((v1.numpy().view(np.uint32).astype(np.uint64) + ones) & 0xFFFFFFFF)
                              .astype(np.uint32), v2.numpy().view(np.uint32))
    # where no zero point is 0, v1 is plainly z - 1 in every field (what legacy decoders assume)
    z = zero.clone()
    z[z == 0] = 1
    fields = ((z.t().to(torch.int32) - 1) & maxq).to(torch.uint8)
    assert np.array_equal(pack_gptq_qzeros(z, bits, "v1").numpy(), gptqmodel_pack_rows(fields.t().numpy(), bits).T)


# --- export / import round trips -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    base = tmp_path_factory.mktemp("gptq_src")
    path = make_tiny_llama(base / "llama", hidden=64, inter=96, layers=2, vocab=256)
    _byte_tokenizer(path)
    (base / "calib.txt").write_text(_CALIB_TEXT)
    return path, base / "calib.txt"


def _act_order_artifact(tiny_src, tmp_path_factory, scheme: str):
    path, calib = tiny_src
    out = tmp_path_factory.mktemp(f"{scheme}_art") / scheme
    lowbitpack.quantize(path, out, scheme, group_size=32, calib=calib, calib_samples=8, calib_seqlen=32,
                        act_order=True, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def gptq_act_order_artifact(tiny_src, tmp_path_factory):
    return _act_order_artifact(tiny_src, tmp_path_factory, "gptq4")


def _assert_same_artifact(a_path, b_path):
    a, b = Artifact.open(a_path), Artifact.open(b_path)
    assert set(a.tensors) == set(b.tensors)
    for name, rec in a.tensors.items():
        if rec["scheme"] == "none":
            assert torch.equal(a.dense(name), b.dense(name)), name
            continue
        qa, qb = a.quantized_tensor(name), b.quantized_tensor(name)
        assert set(qa.tensors) == set(qb.tensors) and qa.group_size == qb.group_size and qa.bits == qb.bits, name
        for key in qa.tensors:
            assert torch.equal(qa.tensors[key], qb.tensors[key]), (name, key)
        assert torch.equal(a.dense(name, torch.float32), b.dense(name, torch.float32))


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("scheme", ["int2", "int3", "int4", "int8"])
def test_rtn_export_import_roundtrip(tmp_path, tiny_src, scheme, version):
    path, _ = tiny_src
    art = tmp_path / "art"
    lowbitpack.quantize(path, art, scheme, group_size=32, progress=False)
    rep = export_gptq(art, tmp_path / "gptq", progress=False, version=version)
    assert rep["exact"] and rep["max_abs_error"] == 0 and rep["quantized_modules"] == 14
    qcfg = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == int(scheme[3:]) and qcfg["group_size"] == 32
    assert qcfg["sym"] is False and qcfg["desc_act"] is False
    assert qcfg["checkpoint_format"] == {"v1": "gptq", "v2": "gptq_v2"}[version]
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert cfg["quantization_config"] == qcfg
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # kept tensors stay as they were
    assert "model.layers.0.mlp.down_proj.weight" not in names and "model.layers.0.mlp.down_proj.g_idx" in names
    # the exported tensors decode to the artifact's weights exactly
    a = Artifact.open(art)
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        m = "model.layers.1.self_attn.o_proj"
        t = {k: f.get_tensor(f"{m}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert torch.equal(dequantize_gptq(t, int(scheme[3:]), 64, version), a.dense(f"{m}.weight", torch.float32))
    import_gptq(tmp_path / "gptq", tmp_path / "back", progress=False)
    _assert_same_artifact(art, tmp_path / "back")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_gptq_act_order_roundtrip(tmp_path, gptq_act_order_artifact, version):
    rep = export_gptq(gptq_act_order_artifact, tmp_path / "gptq", progress=False, version=version)
    assert rep["desc_act"] is True and rep["exact"]
    qcfg = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert qcfg["desc_act"] is True and qcfg["damp_percent"] == 0.01
    man = import_gptq(tmp_path / "gptq", tmp_path / "back", progress=False)
    assert man["quantization"]["scheme"] == "gptq4" and man["quantization"]["imported_from"] == f"gptq-{version}"
    _assert_same_artifact(gptq_act_order_artifact, tmp_path / "back")


def _write_artifact(path, tensors: dict[str, QuantizedTensor | torch.Tensor], config: dict):
    """A minimal artifact written with the real writer (for layouts the schemes do not produce here)."""
    path.mkdir()
    w = ArtifactWriter(path, {"model_id": "synthetic"}, {"scheme": "synthetic", "group_size": 32})
    for name, t in tensors.items():
        if isinstance(t, QuantizedTensor):
            w.add_quantized(name, t, "0" * 64)
        else:
            w.add_kept(name, t, "0" * 64)
    (path / "config.json").write_text(json.dumps(config))
    w.finish()
    return path


def _qt(out_f, in_f, bits, g, **over):
    gen = torch.Generator().manual_seed(out_f * in_f + bits)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
    n_g = -(-in_f // g)
    t = {"qweight": pack_bits(codes, bits), "scale": (torch.rand(out_f, n_g, generator=gen) / 10 + 0.01).half(),
         "zero": torch.randint(0, 1 << bits, (out_f, n_g), generator=gen, dtype=torch.uint8)}
    t.update(over)
    return QuantizedTensor(scheme=f"int{bits}", layout=LAYOUT, bits=bits, group_size=g, shape=(out_f, in_f),
                           dtype=torch.bfloat16, tensors=t)


def test_zero_point_zero_and_offsets(tmp_path):
    q = _qt(64, 64, 4, 32)
    q.tensors["zero"][:3] = 0
    off = _qt(64, 64, 4, 32)
    off.tensors["offset"] = -off.tensors.pop("zero").float() * off.tensors["scale"].float() + 0.0007
    art = _write_artifact(tmp_path / "a", {"model.layers.0.mlp.up_proj.weight": q,
                                           "model.layers.0.mlp.down_proj.weight": off,
                                           "model.norm.weight": torch.ones(64)}, {"model_type": "llama"})
    rep = export_gptq(art, tmp_path / "v1", progress=False)
    assert rep["zero_point_zero_groups"] >= 6 and any("zero point 0" in n for n in rep["notes"])
    assert not rep["exact"] and list(rep["inexact_tensors"]) == ["model.layers.0.mlp.down_proj.weight"]
    assert 0.0006 < rep["max_abs_error"] < 0.0008  # the offset's fractional part, rounded away
    import_gptq(tmp_path / "v1", tmp_path / "back", progress=False)
    b = Artifact.open(tmp_path / "back")
    assert torch.equal(b.quantized_tensor("model.layers.0.mlp.up_proj.weight").tensors["zero"], q.tensors["zero"])


def test_ragged_groups_exported_exactly_with_a_note(tmp_path):
    # in=80 with G=32: a short last group. GPTQ's g_idx expresses it exactly; GPTQModel's CPU int4 ATen kernel
    # does not take it, which the report says.
    q = _qt(64, 80, 4, 32)
    art = _write_artifact(tmp_path / "a", {"model.layers.0.mlp.down_proj.weight": q}, {"model_type": "llama"})
    rep = export_gptq(art, tmp_path / "g", progress=False, version="v2")
    assert rep["exact"] and any("not divisible by the group size" in n for n in rep["notes"])
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(f"model.layers.0.mlp.down_proj.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert t["scales"].shape == (3, 64) and t["g_idx"].tolist() == [j // 32 for j in range(80)]
    assert torch.equal(dequantize_gptq(t, 4, 80, "v2"), Artifact.open(art).dense("model.layers.0.mlp.down_proj.weight",
                                                                                 torch.float32))
    rep = export_gptq(_write_artifact(tmp_path / "b", {"model.layers.0.mlp.down_proj.weight": _qt(64, 96, 4, 32)},
                                      {"model_type": "llama"}), tmp_path / "g2", progress=False, version="v2")
    assert not any("not divisible" in n for n in rep["notes"])


def test_export_refusals(tmp_path):
    cfg = {"model_type": "llama"}
    a = _write_artifact(tmp_path / "g48", {"model.layers.0.mlp.up_proj.weight": _qt(64, 96, 4, 48)}, cfg)
    with pytest.raises(OptionError, match="group size 48"):
        export_gptq(a, tmp_path / "o1", progress=False)
    b = _write_artifact(tmp_path / "odd3", {"model.layers.0.mlp.up_proj.weight": _qt(64, 200, 3, 32)}, cfg)
    with pytest.raises(OptionError, match="divisible by 32"):
        export_gptq(b, tmp_path / "o2", progress=False)
    c = _write_artifact(tmp_path / "emb", {"model.embed_tokens.weight": _qt(64, 64, 4, 32)}, cfg)
    with pytest.raises(OptionError, match="outside the decoder layers"):
        export_gptq(c, tmp_path / "o3", progress=False)
    with pytest.raises(OptionError, match="version"):
        export_gptq(c, tmp_path / "o4", progress=False, version="v3")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_mixed_bits_and_partial_modules(tmp_path):
    cfg = {"model_type": "llama"}
    t = {"model.layers.0.self_attn.q_proj.weight": _qt(64, 64, 4, 32),
         "model.layers.0.mlp.down_proj.weight": _qt(64, 96, 8, 32),
         "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64).bfloat16()}
    art = _write_artifact(tmp_path / "a", t, cfg)
    export_gptq(art, tmp_path / "g", progress=False)
    qcfg = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert qcfg["dynamic"]["-:^model\\.layers\\.0\\.mlp\\.up_proj$"] == {}
    assert list(qcfg["dynamic"].values()).count({"bits": 8}) + list(qcfg["dynamic"].values()).count({"bits": 4}) == 1
    assert sorted(qcfg["modules_in_block_to_quantize"][0]) == ["mlp.down_proj", "self_attn.q_proj"]
    import_gptq(tmp_path / "g", tmp_path / "back", progress=False)
    _assert_same_artifact(art, tmp_path / "back")


def test_import_refusals(tmp_path, tiny_src):
    path, _ = tiny_src
    with pytest.raises(InputError, match="quantize_config"):
        import_gptq(path, tmp_path / "x", progress=False)
    lowbitpack.quantize(path, tmp_path / "art", "int4", group_size=32, progress=False)
    export_gptq(tmp_path / "art", tmp_path / "g", progress=False)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "marlin"
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="marlin"):
        import_gptq(tmp_path / "g", tmp_path / "y", progress=False)


# --- other libraries load the export ----------------------------------------------------------------------------

def _gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel needs it on 2-core machines
    pytest.importorskip("optimum")
    return pytest.importorskip("gptqmodel")


def _loaded_weights_equal(model, art) -> float:
    """Max |W_loaded - W_ours| with the loader's own dequantization run in float32."""
    worst, checked = loaded_weights_max_diff(model, art)
    assert checked == 14
    return worst


@pytest.fixture(scope="module")
def gptq3_act_order_artifact(tiny_src, tmp_path_factory):
    return _act_order_artifact(tiny_src, tmp_path_factory, "gptq3")


def _load_export(loader: str, path):
    """The export as the other library loads it (CPU): GPTQModel directly, or transformers (+optimum)."""
    gm = _gptqmodel()
    if loader == "gptqmodel":
        return gm.GPTQModel.load(str(path), device="cpu", backend=gm.BACKEND.TORCH, dtype=torch.float16).model
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu")


# GPTQModel.load refuses sym=False v1 checkpoints unless GPTQModel produced them (see the export's notes),
# so GPTQModel is checked on v2 and transformers on both.
@pytest.mark.parametrize("loader,version,bits", [("transformers", "v1", 4), ("gptqmodel", "v2", 4),
                                                 ("gptqmodel", "v2", 3), ("transformers", "v1", 3),
                                                 ("transformers", "v2", 3)])
def test_export_loads_with_our_weights_and_logits(tmp_path, request, loader, version, bits):
    from lowbitpack.modeling import load_dequantized_model
    art = request.getfixturevalue("gptq_act_order_artifact" if bits == 4 else "gptq3_act_order_artifact")
    rep = export_gptq(art, tmp_path / "g", progress=False, version=version)
    assert rep["desc_act"] and rep["bits"] == bits
    assert any("GPTQModel.load refuses" in n for n in rep["notes"]) == (version == "v1")
    model = _load_export(loader, tmp_path / "g")
    # the loader's own dequantization (in f32) gives exactly our weights ...
    assert _loaded_weights_equal(model, Artifact.open(art)) == 0.0
    ids = torch.tensor([[1, 50, 200, 30, 7, 99, 123, 17]])
    with torch.no_grad():
        got = model(ids).logits.float()
        ref = load_dequantized_model(art)(ids).logits
    # ... and its fp16 forward the logits of our f32 dequantized model up to fp16 rounding
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_partially_quantized_export_loads(tmp_path, tiny_src):
    # Only the MLP quantized: attention linears stay dense, via `modules_in_block_to_quantize` (optimum /
    # transformers) and `dynamic` negatives (GPTQModel).
    gm = _gptqmodel()
    from transformers import AutoModelForCausalLM
    from lowbitpack.modeling import load_dequantized_model
    path, _ = tiny_src
    art = tmp_path / "art"
    lowbitpack.quantize(path, art, "int4", group_size=32, modules=r"mlp\.\w+_proj\.weight$", progress=False)
    ids = torch.tensor([[1, 50, 200, 30, 7, 99, 123, 17]])
    with torch.no_grad():
        ref = load_dequantized_model(art)(ids).logits
    export_gptq(art, tmp_path / "v1", progress=False, version="v1")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "v1", dtype=torch.float16, device_map="cpu")
    assert isinstance(m.model.layers[0].self_attn.q_proj, torch.nn.Linear) and hasattr(m.model.layers[0].mlp.up_proj, "qweight")
    with torch.no_grad():
        assert (m(ids).logits.float() - ref).abs().max() < 0.02 * ref.abs().max()
    export_gptq(art, tmp_path / "v2", progress=False, version="v2")
    g = gm.GPTQModel.load(str(tmp_path / "v2"), device="cpu", backend=gm.BACKEND.TORCH, dtype=torch.float16)
    assert isinstance(g.model.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    with torch.no_grad():
        assert (g.model(ids).logits.float() - ref).abs().max() < 0.02 * ref.abs().max()


def _all_tensors(d) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# Every bit width, both checkpoint formats, with and without act-order; the first two run in CI, the rest are
# slow (GPTQModel quantizes for 2-10 s each on 2 cores).
_GPTQMODEL_CASES = [
    (3, False, "gptq"), (4, True, "gptq_v2"),
    pytest.param(4, True, "gptq", marks=pytest.mark.slow), pytest.param(2, True, "gptq_v2", marks=pytest.mark.slow),
    pytest.param(2, False, "gptq", marks=pytest.mark.slow), pytest.param(8, False, "gptq_v2", marks=pytest.mark.slow),
    pytest.param(8, True, "gptq", marks=pytest.mark.slow), pytest.param(3, True, "gptq_v2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("bits,desc_act,fmt", _GPTQMODEL_CASES)
def test_import_gptqmodel_quantized(tmp_path, tiny_src, bits, desc_act, fmt):
    """A checkpoint GPTQModel quantized and saved: import keeps its codes, export writes its tensors back
    byte for byte (import -> export round trip), and transformers loads the same weights we decode."""
    gm = _gptqmodel()
    from transformers import AutoModelForCausalLM
    path, calib = tiny_src
    qc = gm.QuantizeConfig(bits=bits, group_size=32, desc_act=desc_act, sym=False, format=fmt)
    model = gm.GPTQModel.load(str(path), qc, device="cpu")
    model.quantize(calib.read_text().split("\n\n")[:32], batch_size=4, backend=gm.BACKEND.TORCH)
    model.save(str(tmp_path / "gq"))
    saved_cfg = json.loads((tmp_path / "gq" / "config.json").read_text())["quantization_config"]
    assert saved_cfg["checkpoint_format"] == fmt and saved_cfg["bits"] == bits and saved_cfg["desc_act"] == desc_act
    man = import_gptq(tmp_path / "gq", tmp_path / "art", progress=False)
    version = {"gptq": "v1", "gptq_v2": "v2"}[saved_cfg.get("checkpoint_format", "gptq")]
    assert man["quantization"]["imported_from"] == f"gptq-{version}"
    art = Artifact.open(tmp_path / "art", verify=True)
    q = [r for r in art.tensors.values() if r["scheme"] != "none"]
    assert len(q) == 14 and {r["bits"] for r in q} == {bits}
    assert sum("g_idx" in r["stored"] for r in q) == (14 if desc_act else 0)

    rep = export_gptq(tmp_path / "art", tmp_path / "back", progress=False, version=version)
    assert rep["exact"] and rep["desc_act"] == desc_act and rep["bits"] == bits
    theirs, ours = _all_tensors(tmp_path / "gq"), _all_tensors(tmp_path / "back")
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        assert t.dtype == ours[name].dtype and t.shape == ours[name].shape, name
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == ours[name].contiguous().view(torch.uint8).numpy().tobytes(), name
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format"):
        assert back_cfg[key] == saved_cfg.get(key, back_cfg[key]), key

    assert back_cfg["meta"]["quantizer"][0].startswith("gptqmodel:")  # who produced the codes is kept

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gq", dtype=torch.float16, device_map="cpu")
    assert _loaded_weights_equal(loaded, art) == 0.0
    if version == "v1":  # the re-export names gptqmodel as the codes' producer, so GPTQModel.load takes it
        assert _loaded_weights_equal(_load_export("gptqmodel", tmp_path / "back"), art) == 0.0
