"""compressed-tensors pack-quantized: packing identical to compressed-tensors' own, exports that its
decompression and transformers load, the importer (exact codes), and clear refusals / error reports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

from lowbitpack import api  # noqa: E402
from lowbitpack.artifact import Artifact, ArtifactWriter  # noqa: E402
from lowbitpack.errors import InputError, OptionError  # noqa: E402
from lowbitpack.export.compressed_tensors import (dequantize_ct, export_compressed_tensors,  # noqa: E402
                                                  pack_int32, pack_zero_points, plan_group_sizes, unpack_int32,
                                                  unpack_zero_points)
from lowbitpack.importers.compressed_tensors import import_compressed_tensors  # noqa: E402
from lowbitpack.io.hashing import sha256_tensor  # noqa: E402
from lowbitpack.layouts.intg import pack_intg  # noqa: E402
from lowbitpack.modeling import load_dequantized_model  # noqa: E402
from lowbitpack.qtensor import QuantizedTensor  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402

LAYERS_0_3 = r"model\.layers\.[0-3]\..*proj\.weight$"


def shared_smol_int4(tmp_path_factory, smollm2: Path) -> Path:
    """SmolLM2 int4 g128, layers 0-3 quantized (in=576 is not a multiple of 128), made once per test session and
    shared by test_export_hf / test_export_ct (same path under the session's base temp dir)."""
    out = tmp_path_factory.getbasetemp() / "shared-smollm2-int4-g128-l0-3"
    if not (out / "lowbitpack.json").is_file():
        api.quantize(smollm2, out, "int4", group_size=128, modules=LAYERS_0_3, force=out.exists(), progress=False)
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(3, 1), (5, 31), (4, 33), (2, 100), (7, 129)])
def test_packing_matches_compressed_tensors(bits, shape):
    """Our uint8 bit stream re-chunked into int32 words == compressed-tensors' pack_to_int32 (dense, any b)."""
    gen = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    ours = pack_int32(codes, bits)
    theirs = pack_to_int32(signed, bits)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(theirs, bits, shape[1]), codes)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape)), signed)
    zp = codes.t().contiguous()  # zero points [out, G] are packed along dim 0
    assert torch.equal(pack_zero_points(zp, bits), pack_to_int32(signed.t().contiguous(), bits, packed_dim=0))
    assert torch.equal(unpack_zero_points(pack_zero_points(zp, bits), bits, zp.shape[0]), zp)


def test_plan_group_sizes_unifies_to_one_exact_group():
    recs = {"a": {"shape": [8, 576], "group_size": 128, "bits": 4}, "b": {"shape": [8, 1536], "group_size": 128,
                                                                          "bits": 4},
            "c": {"shape": [8, 100], "group_size": 200, "bits": 4}, "d": {"shape": [8, 96], "group_size": 48,
                                                                          "bits": 3}}
    plan = plan_group_sizes(recs)
    assert plan["a"] == 64 and plan["b"] == 64      # gcd(128, 576) = 64, and 64 | 128: one group size
    assert plan["c"] == 100                           # one group per row: channel-wise
    assert plan["d"] == 48


@pytest.fixture(scope="module")
def smol_int4(tmp_path_factory, smollm2) -> Path:
    """SmolLM2 int4 g128 (in=576 is not a multiple of 128), layers 0-3 quantized to keep the test fast."""
    return shared_smol_int4(tmp_path_factory, smollm2)


def _dequantized_reference(art: Artifact, source: Path):
    """= load_dequantized_model(art, float32), built faster: the source model with the dequantized weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    dense = {n: art.dense(n, torch.float32) for n in art.tensors if art.is_quantized(n)}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected
    return model


def test_real_model_export_loads_in_transformers(tmp_path, smol_int4, smollm2):
    """SmolLM2 int4 -> pack-quantized; transformers' compressed-tensors loader (dequantize=True) gives our weights
    up to fp16 rounding (it multiplies in the scale dtype) and the same logits."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    res = export_compressed_tensors(smol_int4, tmp_path / "ct", progress=False)
    assert res["exact"] and res["max_abs_error"] == 0.0 and res["vllm_compatible"]
    # in=576 needs G=gcd(128, 576)=64; down_proj (in=1536) joins at 64 so that one config group covers all 28
    assert res["regrouped"] == {"128->64": 28}
    assert list(res["config_groups"].values()) == [{"modules": 28, "bits": 4, "symmetric": False,
                                                    "strategy": "group", "group_size": 64}]
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    parsed = QuantizationConfig.model_validate(qcfg)  # compressed-tensors accepts what we wrote
    assert parsed.format == "pack-quantized" and "lm_head" in parsed.ignore
    assert "model.layers.5.mlp.down_proj" in parsed.ignore  # not quantized in the artifact
    assert not any(k.startswith("lowbitpack") for k in cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    art = Artifact.open(smol_int4)
    ref = _dequantized_reference(art, smollm2)
    sd, rsd = model.state_dict(), ref.state_dict()
    for name in art.tensors:
        w, r = sd[name].float(), rsd[name]
        if art.is_quantized(name):
            # s*(q - z) computed in fp16: at most half an fp16 ulp away from our float32 product
            assert torch.all((w - r).abs() <= r.abs() * 2.0**-11 + 2.0**-25), name
        else:
            assert torch.equal(w, r), name
    ids = torch.tensor([[1, 504, 3458, 314, 3102, 28, 253, 1380, 30, 216, 33, 34]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < 2e-3


def test_fp32_scales_make_decompression_bit_exact(tmp_path, smol_int4):
    res = export_compressed_tensors(smol_int4, tmp_path / "ct", scale_dtype="float32", progress=False)
    assert res["exact"] and res["scale_dtype"] == "float32"
    parsed = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())
                                               ["quantization_config"])
    scheme = next(iter(parsed.config_groups.values()))
    art = Artifact.open(smol_int4)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        for name in [n for n in art.tensors if art.is_quantized(n)][:7]:
            m = name[: -len(".weight")]
            sd = {k: f.get_tensor(f"{m}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                       "weight_shape")}
            w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            assert torch.equal(w, art.dense(name, torch.float32)), name


def _tiny(tmp_path: Path, hidden: int = 64, inter: int = 96) -> Path:
    return make_tiny_llama(tmp_path / f"tiny{hidden}", hidden=hidden, inter=inter, seed=3)


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int3", 16), ("int8", 1000), ("int2", 48)])
def test_export_import_roundtrip_is_bit_exact(tmp_path, scheme, group):
    """artifact -> compressed-tensors -> artifact gives back the same codes, scales and zeros (odd shapes too)."""
    src = _tiny(tmp_path, hidden=80, inter=144)  # 80 % 16 == 0, 144 % 32 != 0, 80 % 48 != 0
    art_path = tmp_path / "art"
    api.quantize(src, art_path, scheme, group_size=group, progress=False)
    res = export_compressed_tensors(art_path, tmp_path / "ct", progress=False)
    bits = int(scheme[3:])
    assert res["exact"] and res["vllm_compatible"] == (bits in (4, 8))
    if bits == 3:
        assert any("3-bit" in n for n in res["notes"])
    # compressed-tensors' own decompression reproduces our reference (fp32 arithmetic on fp16 scales is exact)
    parsed = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())
                                               ["quantization_config"])
    art = Artifact.open(art_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in [n for n in art.tensors if art.is_quantized(n)]:
            m = name[: -len(".weight")]
            sd = {k: f.get_tensor(f"{m}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                       "weight_shape") if f"{m}.{k}" in keys}
            sd["weight_scale"] = sd["weight_scale"].float()
            scheme_ct = next(g for g in parsed.config_groups.values()
                             if "Linear" in g.targets or m in g.targets)
            w = PackedQuantizationCompressor.decompress(sd, scheme_ct)["weight"]
            assert torch.equal(w, art.dense(name, torch.float32)), name
            assert torch.equal(dequantize_ct(sd, bits, scheme_ct.weights.group_size), w)
    back = tmp_path / "back"
    summary = import_compressed_tensors(tmp_path / "ct", back, progress=False)
    assert summary["quantized"] == sum(art.is_quantized(n) for n in art.tensors)
    art2 = Artifact.open(back)
    for name in art.tensors:
        if art.is_quantized(name):
            a, b = art.quantized_tensor(name), art2.quantized_tensor(name)
            assert torch.equal(a.tensors["qweight"], b.tensors["qweight"]), name
            assert torch.equal(art.dense(name, torch.float32), art2.dense(name, torch.float32)), name
            if a.group_size == b.group_size:  # regrouped tensors come back with the finer (equivalent) groups
                assert torch.equal(a.tensors["scale"], b.tensors["scale"]) and torch.equal(a.tensors["zero"],
                                                                                         b.tensors["zero"])
        else:
            assert torch.equal(art.dense(name), art2.dense(name)), name
    assert not json.loads((back / "config.json").read_text()).get("quantization_config")


def _compressed_tensors_checkpoint(tmp_path: Path, symmetric: bool, strategy: str = "group") -> tuple[Path, dict]:
    """A checkpoint written by compressed-tensors itself (ModelCompressor), from a tiny Llama."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, apply_quantization_config
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                            ignore=["lm_head"])
    apply_quantization_config(model, qc)
    for _, m in model.named_modules():
        if hasattr(m, "weight_scale"):
            w = m.weight.data
            g = w.reshape(w.shape[0], -1, 32 if strategy == "group" else w.shape[1])
            if symmetric:
                s = g.abs().amax(-1) / 7
            else:
                mn, mx = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
                s = (mx - mn) / 15
                m.weight_zero_point.data = (torch.round(-mn / s) - 8).to(m.weight_zero_point.dtype)
            m.weight_scale.data = s.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
    # reference: compressed-tensors' own fake-quantized weights
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    expect = {}
    for name, m in model.named_modules():
        if hasattr(m, "weight_scale"):
            expect[name + ".weight"] = fake_quantize(m.weight.data, m.weight_scale, getattr(m, "weight_zero_point",
                                                                                          None), args).float()
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    comp.compress_model(model)
    out = tmp_path / f"ct-{symmetric}-{strategy}"
    model.save_pretrained(out)
    comp.update_config(out)
    return out, expect


@pytest.mark.parametrize("symmetric,strategy", [(False, "group"), (True, "group"), (True, "channel")])
def test_import_checkpoint_written_by_compressed_tensors(tmp_path, symmetric, strategy):
    ckpt, expect = _compressed_tensors_checkpoint(tmp_path, symmetric, strategy)
    import_compressed_tensors(ckpt, tmp_path / "art", progress=False)
    art = Artifact.open(tmp_path / "art")
    assert set(expect) == {n for n in art.tensors if art.is_quantized(n)}
    for name, w in expect.items():
        assert torch.allclose(art.dense(name, torch.float32), w, rtol=0, atol=1e-6), name
        rec = art.tensors[name]
        assert rec["layout"] == "intg-v1" and rec["params"]["imported_from"] == "compressed-tensors"
    # and back out: the export reproduces compressed-tensors' packed tensors bit for bit
    export_compressed_tensors(tmp_path / "art", tmp_path / "again", progress=False)
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as g:
        for k in f.keys():
            if k.endswith(("weight_packed", "weight_zero_point")):
                assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k


def _synthetic(path: Path, src: Path, make) -> Path:
    from lowbitpack.io.checkpoint import SourceCheckpoint

    ckpt = SourceCheckpoint.open(src)
    path.mkdir(parents=True)
    w = ArtifactWriter(path, {"model_id": "local/tiny"}, {"scheme": "test"})
    for shard in ckpt.shards:
        for name, t in ckpt.iter_shard(shard):
            if name.endswith("proj.weight"):
                w.add_quantized(name, make(name, t), sha256_tensor(t))
            else:
                w.add_kept(name, t, sha256_tensor(t))
    w.copy_sidecars(src)
    w.finish()
    return path


def test_float_offsets_are_rounded_and_reported_or_refused(tmp_path):
    """QA-LoRA offsets (w = s*q + m) have no integer zero point: the error is measured, --strict refuses."""
    src = _tiny(tmp_path)
    gen = torch.Generator().manual_seed(5)
    expected_err = [0.0]

    def make(name, t):
        out_f, in_f = t.shape
        codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
        s = (torch.rand(out_f, in_f // 32, generator=gen) * 0.01 + 1e-3).half()
        m = (-(torch.rand(out_f, in_f // 32, generator=gen) * 15) * s.float()).half()  # non-integer m/s
        z = torch.clamp(torch.round(-m.float() / s.float()), 0, 15)
        expected_err[0] = max(expected_err[0], float((s.float() * z + m.float()).abs().max()))
        return QuantizedTensor("qalora", "intg-v1", 4, 32, (out_f, in_f), t.dtype,
                               {"qweight": pack_intg(codes, 4), "scale": s, "offset": m})

    art = _synthetic(tmp_path / "art", src, make)
    res = export_compressed_tensors(art, tmp_path / "ct", progress=False)
    assert not res["exact"] and res["max_abs_error"] == pytest.approx(expected_err[0], rel=1e-6)
    assert res["max_abs_error"] > 0 and any("inexact" in n for n in res["notes"])
    with pytest.raises(OptionError, match="float offsets"):
        export_compressed_tensors(art, tmp_path / "ct2", strict=True, progress=False)
    assert not (tmp_path / "ct2").exists()


def test_symmetric_codes_load_with_transformers_default_path(tmp_path):
    """All zeros == 2^(b-1): written symmetric (no zero points), which transformers' compressed loader takes."""
    from transformers import AutoModelForCausalLM

    src = _tiny(tmp_path)
    gen = torch.Generator().manual_seed(7)

    def make(name, t):
        out_f, in_f = t.shape
        codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
        s = (torch.rand(out_f, in_f // 32, generator=gen) * 0.01 + 1e-3).half()
        return QuantizedTensor("int4", "intg-v1", 4, 32, (out_f, in_f), t.dtype,
                               {"qweight": pack_intg(codes, 4), "scale": s, "zero": torch.full_like(s, 8,
                                                                                                   dtype=torch.uint8)})

    art = _synthetic(tmp_path / "art", src, make)
    res = export_compressed_tensors(art, tmp_path / "ct", scale_dtype="float32", progress=False)
    assert list(res["config_groups"].values())[0]["symmetric"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ref = load_dequantized_model(art, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 100, 3, 7]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits  # first forward decompresses
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_refusals(tmp_path):
    src = _tiny(tmp_path)
    with pytest.raises(InputError, match="needs a lowbitpack artifact"):
        export_compressed_tensors(src, tmp_path / "x", progress=False)
    gen = torch.Generator().manual_seed(9)

    def act_order(name, t):
        out_f, in_f = t.shape
        codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
        s = torch.ones(out_f, in_f // 32).half()
        g_idx = torch.randperm(in_f, generator=gen).to(torch.int32) // 32
        return QuantizedTensor("gptq4", "intg-v1", 4, 32, (out_f, in_f), t.dtype,
                               {"qweight": pack_intg(codes, 4), "scale": s,
                                "zero": torch.full_like(s, 8, dtype=torch.uint8), "g_idx": g_idx})

    art = _synthetic(tmp_path / "ao", src, act_order)
    with pytest.raises(OptionError, match="act-order"):
        export_compressed_tensors(art, tmp_path / "y", progress=False)

    def nf4(name, t):
        return QuantizedTensor("nf4", "nf4-bnb-v1", 4, 64, tuple(t.shape), t.dtype, {"weight": torch.zeros(4,
                                                                                                         dtype=torch.uint8)})

    art = _synthetic(tmp_path / "nf4", src, nf4)
    with pytest.raises(OptionError, match="bnb-nf4"):
        export_compressed_tensors(art, tmp_path / "z", progress=False)
    with pytest.raises(InputError, match="compressed-tensors quantization_config"):
        import_compressed_tensors(src, tmp_path / "w", progress=False)


def test_cli_export_compressed_tensors(tmp_path):
    from click.testing import CliRunner

    from lowbitpack.cli import main

    src = _tiny(tmp_path)
    api.quantize(src, tmp_path / "art", "int4", group_size=32, progress=False)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "art"), "--format", "compressed-tensors", "-o",
                                  str(tmp_path / "ct"), "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["exact"] is True
    r = CliRunner().invoke(main, ["export", str(tmp_path / "art"), "--format", "compressed-tensors", "-o",
                                  str(tmp_path / "ct"), "--no-progress"])
    assert r.exit_code == 2 and "already exists" in r.output and "Traceback" not in r.output


def test_importer_reads_legacy_padded_packing():
    """Releases before dense packing stored floor(32/b) codes per int32 word (3-bit: 10 per word, 2 bits unused)."""
    from lowbitpack.importers.compressed_tensors import dense_packing, unpack_weight_codes
    from lowbitpack.layouts.bitpack import pack_bits

    gen = torch.Generator().manual_seed(11)

    def legacy_pack(codes):
        n = codes.shape[1]
        words = torch.zeros(codes.shape[0], -(-n // 10), dtype=torch.int64)
        for j in range(n):
            words[:, j // 10] |= codes[:, j].to(torch.int64) << (3 * (j % 10))
        return words.to(torch.int32)

    for n in (64, 25):  # 64: widths differ (6 dense vs 7 legacy words); 25: both 3 words, the version decides
        codes = torch.randint(0, 8, (3, n), generator=gen, dtype=torch.uint8)
        assert torch.equal(unpack_weight_codes(legacy_pack(codes), 3, n, Path("."), dense=(n == 64)),
                           pack_bits(codes, 3))
        assert torch.equal(unpack_weight_codes(pack_int32(codes, 3), 3, n, Path(".")), pack_bits(codes, 3))
    assert dense_packing("0.20.0") and dense_packing("1.2") and dense_packing(None)
    assert not dense_packing("0.12.2")
    with pytest.raises(InputError, match="words per row"):
        unpack_weight_codes(torch.zeros(3, 9, dtype=torch.int32), 3, 25, Path("."))
