"""QA-LoRA: the `qalora` scheme (float offsets), PEFT's pooled-LoRA convention on LowBitLinear, the exact fold of
ΔW into the offsets (merge --restore b --fold), group checks, and the exports' rounding reports."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import lowbitpack
from lowbitpack.adapters.qalora import (fold_incompatibility, fold_into_offsets, group_constants, pooled_forward,
                                        qalora_delta, qalora_layer_class)
from lowbitpack.artifact import Artifact
from lowbitpack.errors import InputError, OptionError
from lowbitpack.kernels import dequantize
from lowbitpack.layouts.intg import dequantize_intg, unpack_intg
from lowbitpack.lowbit_linear import LowBitLinear, attach_adapter, load_packed_model
from lowbitpack.schemes import make_scheme
from lowbitpack.schemes.qalora import integer_zero_rounding
from tests.test_train import text_file, tiny_source

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------------------------------------- helpers
def write_qalora_adapter(src: Path, out: Path, group: int, r: int = 4, alpha: float = 8, seed: int = 0,
                         b_scale: float = 0.05, targets=TARGETS) -> Path:
    """A PEFT adapter dir as PEFT's QA-LoRA (GPTQ layers) saves it, with random nonzero A and B."""
    from peft import LoraConfig

    LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_qalora=True, qalora_group_size=group,
               task_type="CAUSAL_LM").save_pretrained(str(out))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            module = name[: -len(".weight")]
            if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in targets:
                continue
            out_f, in_f = f.get_slice(name).get_shape()
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f // group, generator=gen) / 4
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * b_scale
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------- scheme
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", [((37, 75), 32), ((16, 64), 16), ((5, 20), 32)])
def test_scheme_min_max_groups_with_float_offsets(bits, shape, group):
    torch.manual_seed(bits)
    w = torch.randn(*shape) * 0.05 + 0.01
    qt = make_scheme("qalora", bits=bits, group_size=group).quantize(w)
    out_f, in_f = shape
    g = min(group, in_f)
    n_groups = math.ceil(in_f / g)
    assert qt.scheme == "qalora" and qt.layout == "intg-v1" and qt.group_size == g
    assert set(qt.tensors) == {"qweight", "scale", "offset"}
    assert qt.tensors["scale"].dtype == torch.float16 and qt.tensors["offset"].dtype == torch.float32
    assert tuple(qt.tensors["offset"].shape) == (out_f, n_groups)
    # the offset is each group's minimum (float32), and the minimum decodes exactly
    g_idx = torch.arange(in_f) // g
    mins = torch.stack([w[:, g_idx == k].min(1).values for k in range(n_groups)], 1)
    torch.testing.assert_close(qt.tensors["offset"], mins, rtol=0, atol=0)
    deq = dequantize(qt, torch.float32)
    s = qt.tensors["scale"].float()[:, g_idx]
    assert bool(((deq - w).abs() <= s / 2 * (1 + 1e-3) + 1e-7).all())  # round to nearest within the range
    codes = unpack_intg(qt.tensors["qweight"], bits, in_f)
    assert int(codes.max()) <= (1 << bits) - 1
    # storage: b bits + fp16 scale + fp32 offset per group
    expected = (out_f * math.ceil(in_f * bits / 8) * 8 + out_f * n_groups * 48) / (out_f * in_f)
    assert qt.bits_per_weight() == pytest.approx(expected)


def test_scheme_constant_group_is_exact_and_options_are_checked():
    w = torch.full((3, 64), 0.125)
    w[:, 32:] = torch.linspace(-1, 1, 32)
    qt = make_scheme("qalora", bits=2, group_size=32).quantize(w)
    deq = dequantize(qt, torch.float32)
    assert torch.equal(deq[:, :32], w[:, :32])
    with pytest.raises(ValueError, match="qalora supports"):
        make_scheme("qalora", bits=5)
    from lowbitpack.schemes.qalora import QALoRAGroups
    with pytest.raises(ValueError, match="positive"):
        QALoRAGroups(4, group_size=0)


# ---------------------------------------------------------------------------------------------- PEFT convention
def test_lowbit_qalora_layer_is_peft_pooled_lora_and_equals_dense_delta():
    """Our layer runs PEFT's QALoraLinearVariant; its adapter term equals x @ ΔWᵀ with ΔW expanded per group."""
    from peft import LoraConfig

    torch.manual_seed(0)
    in_f, out_f, group, r = 96, 24, 32, 3
    base = LowBitLinear(make_scheme("qalora", bits=4, group_size=group).quantize(torch.randn(out_f, in_f) * 0.1))
    cfg = LoraConfig(r=r, lora_alpha=6, target_modules=["x"], use_qalora=True, qalora_group_size=group)
    layer = qalora_layer_class()(base, "default", config=cfg, r=r, lora_alpha=6)
    assert tuple(layer.lora_A["default"].weight.shape) == (r, in_f // group)  # PEFT: A is [r, in / G]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(2, 5, in_f)
    with torch.no_grad():
        term = layer(x) - base(x)
    torch.testing.assert_close(term, pooled_forward(x, a, b, 2.0, group), rtol=1e-5, atol=1e-5)
    delta = qalora_delta(a, b, 2.0, group)
    torch.testing.assert_close(term, x @ delta.t(), rtol=1e-5, atol=1e-5)
    # ΔW is constant over each group and c = (B A)·s·(in/G)/G
    c = group_constants(a, b, 2.0, group)
    torch.testing.assert_close(delta[:, :group], c[:, :1].expand(out_f, group))
    torch.testing.assert_close(c, (b @ a) * 2.0 * (in_f // group) / group)


def test_layer_needs_whole_groups_but_runs_on_any_base():
    """The pooled forward runs on any packed base (a PLR-restored int4/NF4 base, say); only in % G matters."""
    from peft import LoraConfig

    cls = qalora_layer_class()
    base = LowBitLinear(make_scheme("qalora", bits=4, group_size=32).quantize(torch.randn(8, 64)))
    cfg = LoraConfig(r=2, target_modules=["x"], use_qalora=True, qalora_group_size=48)
    with pytest.raises(ValueError, match="in_features 64 is not divisible by qalora_group_size 48"):
        cls(base, "default", config=cfg, r=2, lora_alpha=2)
    nf4 = LowBitLinear(make_scheme("nf4", group_size=64).quantize(torch.randn(8, 64)))
    cfg = LoraConfig(r=2, target_modules=["x"], use_qalora=True, qalora_group_size=16)
    layer = cls(nf4, "default", config=cfg, r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 64)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nf4(x) + x @ qalora_delta(a, b, 1.0, 16).t(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- fold math
@pytest.mark.parametrize("scheme,qgroup,pool", [("qalora", 16, 16), ("qalora", 16, 32), ("int4", 32, 32),
                                                ("int2", 16, 64)])
def test_fold_into_offsets_is_exact_and_keeps_codes(scheme, qgroup, pool):
    torch.manual_seed(1)
    out_f, in_f = 12, 128
    bits = 2 if scheme == "int2" else 4
    qt = make_scheme(scheme, bits=bits, group_size=qgroup).quantize(torch.randn(out_f, in_f) * 0.05)
    a, b = torch.randn(3, in_f // pool), torch.randn(out_f, 3) * 0.01
    c = group_constants(a, b, 1.5, pool)
    folded = fold_into_offsets(qt, c, pool)
    assert torch.equal(folded.tensors["qweight"], qt.tensors["qweight"])
    assert torch.equal(folded.tensors["scale"], qt.tensors["scale"])
    assert "zero" not in folded.tensors and folded.tensors["offset"].dtype == torch.float32
    got = dequantize_intg(folded.tensors, (out_f, in_f), bits, qgroup)
    want = dequantize_intg(qt.tensors, (out_f, in_f), bits, qgroup) + qalora_delta(a, b, 1.5, pool)
    assert float((got - want).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(want.abs().max())


def test_fold_refuses_misaligned_groups():
    qt = make_scheme("qalora", bits=4, group_size=32).quantize(torch.randn(4, 96))
    with pytest.raises(ValueError, match="does not divide"):
        fold_into_offsets(qt, torch.zeros(4, 6), 16)
    assert "act-order" in fold_incompatibility("intg-v1", 32, 96, 32, has_act_order=True)
    assert "not divisible" in fold_incompatibility("intg-v1", 32, 100, 32)
    assert fold_incompatibility("intg-v1", 32, 96, 96) is None  # pooling group a multiple of the base group


def test_integer_zero_rounding_measures_the_gptq_zero_point_error():
    torch.manual_seed(2)
    qt = make_scheme("qalora", bits=4, group_size=32).quantize(torch.randn(16, 64) * 0.05)
    rep = integer_zero_rounding(qt, reference_norm=1.0)
    s, m = qt.tensors["scale"].float(), qt.tensors["offset"].float()
    z = torch.round(-m / s).clamp(0, 15)
    assert rep["max_abs_error"] == pytest.approx(float((s * z + m).abs().max()), rel=1e-5)
    assert 0 < rep["max_abs_error"] <= float(s.max()) / 2 + 1e-7  # half a step at most when z is in range
    assert rep["clamped_groups"] == 0 and rep["groups"] == 32 and rep["rel_frobenius"] > 0
    # an integer zero point (RTN int4) converts back without error
    qi = make_scheme("int4", group_size=32).quantize(torch.randn(16, 64))
    assert integer_zero_rounding(qi)["max_abs_error"] == 0.0


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("qalora")
    return {"tmp": tmp, "src": tiny_source(tmp), "data": text_file(tmp)}


@pytest.mark.parametrize("bits", [4, 2])
def test_train_bundle_fold_equals_base_plus_adapter(tiny, bits):
    """`train --adapter qalora` on a qalora base, bundle, `merge --restore b --fold`: the merged b-bit model gives
    the logits of base + adapter up to float rounding, with the training base's codes and scales."""
    from lowbitpack.cli import main

    tmp, src = tiny["tmp"] / f"b{bits}", tiny["src"]
    packed = tmp / "packed"
    lowbitpack.quantize(src, packed, "qalora", bits=bits, group_size=16, progress=False)
    runner = CliRunner()
    res = runner.invoke(main, ["train", str(packed), "-o", str(tmp / "adapter"), "--adapter", "qalora",
                               "--data", str(tiny["data"]), "--r", "4", "--alpha", "8", "--max-steps", "3",
                               "--batch-size", "2", "--seq-len", "32", "--lr", "0.02", "--dtype", "fp32",
                               "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_qalora"] is True and cfg["qalora_group_size"] == 16 and cfg["peft_type"] == "LORA"
    with safe_open(str(tmp / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert tuple(a.shape) == (4, 64 // 16)
    m = lowbitpack.api.bundle(tmp / "adapter", packed, tmp / "bundle")
    assert m["adapter"]["type"] == "qalora" and m["adapter"]["config"]["qalora_group_size"] == 16
    res = runner.invoke(main, ["merge", str(tmp / "bundle"), "--restore", str(bits), "--fold", "-o",
                               str(tmp / "merged"), "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)["restore"]
    fold = rep["qalora_fold"]
    assert rep["scheme"] == "qalora" and rep["merged"] and fold["exact"] and fold["same_base_as_training"] is True
    assert fold["fold_max_abs_error"] < 1e-6

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    base_logits = logits(load_packed_model(packed), ids)
    adapted = logits(attach_adapter(load_packed_model(packed), tmp / "adapter"), ids)
    merged = logits(load_packed_model(tmp / "merged"), ids)
    effect = float((adapted - base_logits).abs().max())
    diff = float((merged - adapted).abs().max())
    assert effect > 1e-2                      # the adapter changes the outputs ...
    assert diff < 1e-4 * max(1.0, float(adapted.abs().max()))  # ... and the k-bit fold reproduces them
    # same codes and scales as the training base, offsets moved only where adapted
    art_p, art_m = Artifact.open(packed), Artifact.open(tmp / "merged")
    assert art_m.manifest["source"]["merged_bundle"] == m["bundle_id"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        qp, qm = art_p.quantized_tensor(name), art_m.quantized_tensor(name)
        assert torch.equal(qp.tensors["qweight"], qm.tensors["qweight"])
        assert torch.equal(qp.tensors["scale"], qm.tensors["scale"])
        assert torch.equal(qp.tensors["offset"], qm.tensors["offset"]) == ("mlp" in name)

    # --restore 16 (PLR): W + ΔW expanded per group, the pooled adapter on the original gives the same logits
    lowbitpack.api.merge(tmp / "bundle", tmp / "plr16", restore=16, dtype="fp32", progress=False)
    from transformers import AutoModelForCausalLM
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    plr = AutoModelForCausalLM.from_pretrained(tmp / "plr16", dtype=torch.float32).eval()
    on_orig = logits(attach_adapter(orig, tmp / "adapter"), ids)
    torch.testing.assert_close(logits(plr, ids), on_orig, rtol=1e-4, atol=1e-4)


def test_training_refuses_groups_that_do_not_divide_in_features(tiny):
    tmp = tiny["tmp"] / "g48"
    packed = tmp / "packed"
    lowbitpack.quantize(tiny["src"], packed, "qalora", bits=4, group_size=48, progress=False)  # 64 = 48 + 16
    assert Artifact.open(packed).quantized_tensor("model.layers.0.self_attn.q_proj.weight").tensors["offset"].shape[1] == 2
    with pytest.raises(OptionError, match="in_features 64 is not divisible by qalora_group_size 48"):
        lowbitpack.api.train(packed, tmp / "ad", data=tiny["data"], adapter="qalora", max_steps=1, progress=False)
    packed_nf4 = tmp / "nf4"
    lowbitpack.quantize(tiny["src"], packed_nf4, "nf4", progress=False)
    with pytest.raises(OptionError, match="no per-group offsets"):
        lowbitpack.api.train(packed_nf4, tmp / "ad", data=tiny["data"], adapter="qalora", qalora_group_size=64,
                             max_steps=1, progress=False)


def test_adapter_from_elsewhere_group_mismatch_refused_and_multiple_accepted(tiny):
    tmp, src = tiny["tmp"] / "elsewhere", tiny["src"]
    packed = tmp / "packed32"
    lowbitpack.quantize(src, packed, "qalora", bits=4, group_size=32, progress=False)
    small = write_qalora_adapter(src, tmp / "ad16", group=16)
    with pytest.raises(InputError, match=r"quantization group 32 does not divide the adapter's pooling group 16"):
        lowbitpack.api.bundle(small, packed, tmp / "bundle16")
    # wrong A width for the config's group: refused by the shape check
    bad = write_qalora_adapter(src, tmp / "bad", group=16)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["qalora_group_size"] = 32
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"expected lora_A \[r, 2\]"):
        lowbitpack.api.bundle(bad, packed, tmp / "bundle_bad")
    # pooling over 64 = 2 base groups of 32: exact too
    big = write_qalora_adapter(src, tmp / "ad64", group=64)
    lowbitpack.api.bundle(big, packed, tmp / "bundle64")
    m = lowbitpack.api.merge(tmp / "bundle64", tmp / "merged64", restore=4, fold=True, progress=False)
    fold = m["restore"]["qalora_fold"]
    assert fold["scheme"]["group_size"] == 64  # restored at the adapter's group ...
    assert fold["same_base_as_training"] is False  # ... which is not the G=32 training base: said so
    m = lowbitpack.api.merge(tmp / "bundle64", tmp / "merged64b", restore=4, fold=True, group_size=32,
                             progress=False)
    assert m["restore"]["qalora_fold"]["same_base_as_training"] is True
    with pytest.raises(OptionError, match="does not divide the adapter's qalora_group_size 64"):
        lowbitpack.api.merge(tmp / "bundle64", tmp / "merged_bad", restore=4, fold=True, group_size=48,
                             progress=False)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    adapted = logits(attach_adapter(load_packed_model(packed), big), ids)
    merged = logits(load_packed_model(tmp / "merged64b"), ids)
    assert float((merged - adapted).abs().max()) < 1e-4


def test_gptq_export_reports_offset_rounding(tiny):
    tmp, src = tiny["tmp"] / "gptq", tiny["src"]
    packed = tmp / "packed"
    lowbitpack.quantize(src, packed, "qalora", bits=4, group_size=32, progress=False)
    ad = write_qalora_adapter(src, tmp / "ad", group=32, b_scale=0.02)
    lowbitpack.api.bundle(ad, packed, tmp / "bundle")
    m = lowbitpack.api.merge(tmp / "bundle", tmp / "out", restore=4, fold=True, format="gptq", progress=False)
    exp = m["restore"]["qalora_fold"]["export"]
    rounding = exp["integer_zero_rounding"]
    n_quant = sum(1 for r in Artifact.open(packed).tensors.values() if r["scheme"] != "none")
    assert rounding["summary"]["tensors"] == n_quant == len(rounding["tensors"])
    adapted = [v for v in rounding["tensors"].values() if "error_vs_adapter" in v]
    assert len(adapted) == 2 * 4 and all(v["error_vs_adapter"] > 0 for v in adapted)
    assert rounding["summary"]["rel_frobenius_mean"] > 0
    # our figure is the exporter's own decoded error (GPTQ dequantization vs the folded artifact)
    assert exp["exporter"]["exact"] is False
    assert rounding["summary"]["max_abs_error"] == pytest.approx(exp["exporter"]["max_abs_error"], rel=1e-5)
    assert (tmp / "out" / "quantize_config.json").is_file()
    saved = json.loads((tmp / "out" / "lowbitpack_merge.json").read_text())
    assert saved["restore"]["qalora_fold"]["export"]["integer_zero_rounding"]["summary"] == rounding["summary"]


def test_gguf_q4_1_export_of_the_fold_is_exact_up_to_fp16(tmp_path):
    gguf = pytest.importorskip("gguf")
    from lowbitpack.export.gguf import permute_rows
    from tests.test_export_gguf import _tiny

    src = _tiny(tmp_path)  # hidden 64, intermediate 96: whole 32-blocks
    packed = tmp_path / "packed"
    lowbitpack.quantize(src, packed, "qalora", bits=4, group_size=32, progress=False)
    ad = write_qalora_adapter(src, tmp_path / "ad", group=32)
    lowbitpack.api.bundle(ad, packed, tmp_path / "bundle")
    m = lowbitpack.api.merge(tmp_path / "bundle", tmp_path / "out", restore=4, fold=True, format="gguf",
                             progress=False)
    exp = m["restore"]["qalora_fold"]["export"]
    assert exp["options"] == {"gguf_type": "q4_1"}
    n_quant = sum(1 for r in Artifact.open(packed).tensors.values() if r["scheme"] != "none")
    assert exp["exporter"]["exact_intg_tensors"] == n_quant
    # independent check with gguf's reader: d = s exactly, m' = m + c rounded once to fp16
    folded = tmp_path / "folded"
    lowbitpack.api.merge(tmp_path / "bundle", folded, restore=4, fold=True, progress=False)
    art = Artifact.open(folded)
    reader = gguf.GGUFReader(str(tmp_path / "out" / exp["exporter"]["file"]))
    by_name = {t.name: t for t in reader.tensors}
    for layer, kind, hf in ((0, "attn_v", "v_proj"), (1, "attn_q", "q_proj")):
        name = f"model.layers.{layer}.self_attn.{hf}.weight"
        t = by_name[f"blk.{layer}.{kind}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        ref = art.dense(name, torch.float32)
        if hf == "q_proj":
            ref = permute_rows(ref, 4, 4)
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(ref.shape)).copy())
        bound = float(art.quantized_tensor(name).tensors["offset"].abs().max()) * 2.0**-11
        diff = float((got - ref).abs().max())
        assert 0 < diff <= bound + 1e-9


def test_unfolded_restore_with_qalora_scheme_keeps_adapter_beside(tiny):
    """PLR-2 without --fold: the original quantized with `--scheme qalora` at 2 bits, the adapter beside it runs."""
    tmp, src = tiny["tmp"] / "beside", tiny["src"]
    packed = tmp / "packed"
    lowbitpack.quantize(src, packed, "qalora", bits=4, group_size=32, progress=False)
    ad = write_qalora_adapter(src, tmp / "ad", group=32)
    lowbitpack.api.bundle(ad, packed, tmp / "bundle")
    m = lowbitpack.api.merge(tmp / "bundle", tmp / "plr2", restore=2, scheme="qalora", group_size=32, progress=False)
    assert m["restore"]["merged"] is False and "qalora_fold" not in m["restore"]
    art = Artifact.open(tmp / "plr2")
    assert art.manifest["quantization"]["bits"] == 2
    model = attach_adapter(load_packed_model(tmp / "plr2"), tmp / "plr2")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(logits(model, ids)).all()
