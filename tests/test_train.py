"""LowBitLinear, PEFT LoRA on packed bases, load_packed_model and `lowbitpack train` (tiny models only)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lowbitpack
from lowbitpack.errors import InputError, OptionError, OutputExistsError
from lowbitpack.io.hashing import sha256_file
from lowbitpack.kernels import dequantize
from lowbitpack.lowbit_linear import (LowBitLinear, attach_adapter, load_packed_model, lora_layer_class,
                                      lowbit_modules, register_lowbit_lora)
from lowbitpack.schemes import make_scheme
from tests.conftest import make_tiny_llama

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep.\n") * 40


def make_byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer (matches the tiny Llama's vocab) saved as tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))


def tiny_source(tmp_path: Path, **kw) -> Path:
    src = make_tiny_llama(tmp_path / "src", **kw)
    make_byte_tokenizer(src)
    return src


def tiny_packed(tmp_path: Path, scheme: str = "int4", group_size: int | None = 24, **kw) -> tuple[Path, Path]:
    """(source, packed artifact) of the tiny Llama; group 24 does not divide hidden 64 or 160."""
    src = tiny_source(tmp_path, **kw)
    out = tmp_path / f"packed-{scheme}"
    lowbitpack.quantize(src, out, scheme, group_size=group_size, progress=False)
    return src, out


def text_file(tmp_path: Path, text: str = TEXT) -> Path:
    f = tmp_path / "data.txt"
    f.write_text(text, encoding="utf-8")
    return f


# ---------------------------------------------------------------------------------------------- LowBitLinear
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int3", 16), ("int2", 64), ("int8", 128), ("nf4", 64)])
@pytest.mark.parametrize("cache", [False, True])
def test_lowbit_linear_matches_dense_forward_and_backward(scheme, group, cache):
    torch.manual_seed(0)
    w = torch.randn(37, 75) * 0.1  # odd out, in not a multiple of the group or of 32
    bias = torch.randn(37)
    qt = make_scheme(scheme, group_size=group).quantize(w)
    layer = LowBitLinear(qt, bias)
    layer.cache_dense(cache)
    dense = dequantize(qt, torch.float32)
    x = torch.randn(3, 5, 75, requires_grad=True)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(ref_x, dense, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())
    assert (layer.in_features, layer.out_features) == (75, 37)
    torch.testing.assert_close(layer.weight, dense)
    with torch.no_grad():  # inference path (no autograd function)
        torch.testing.assert_close(layer(x), ref.detach(), rtol=1e-5, atol=1e-5)


def test_lowbit_linear_bf16_input_gives_bf16_output():
    qt = make_scheme("int4", group_size=32).quantize(torch.randn(16, 40))
    layer = LowBitLinear(qt)
    y = layer(torch.randn(2, 40, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_peft_wraps_lowbit_linear_and_trains_only_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = LowBitLinear(make_scheme("int4", group_size=16).quantize(torch.randn(24, 40)))
            self.other = torch.nn.Linear(24, 8)

        def forward(self, x):
            return self.other(self.q_proj(x))

    model = Block()
    x = torch.randn(4, 40)
    before = model(x).detach()
    cfg = register_lowbit_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    peft_model = get_peft_model(model, cfg)
    layer = peft_model.base_model.model.q_proj
    assert isinstance(layer, lora_layer_class())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        inner = model.q_proj.base_layer(x) + x @ a.t() @ b.t() * 2.0
        torch.testing.assert_close(peft_model(x), model.other(inner))
    assert not torch.allclose(peft_model(x), before)  # random B: the adapter changes the output
    peft_model(x).sum().backward()
    assert a.grad is not None and b.grad is not None


def test_peft_refuses_dora_on_lowbit_linear():
    from peft import LoraConfig, get_peft_model

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = LowBitLinear(make_scheme("int4", group_size=16).quantize(torch.randn(8, 16)))
            self.norm = torch.nn.LayerNorm(8)  # PEFT looks up the device of the first parameter

    cfg = register_lowbit_lora(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        get_peft_model(M(), cfg)


# ---------------------------------------------------------------------------------------------- load_packed_model
@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_load_packed_model_matches_dequantized_model_without_dense_weights(tmp_path, scheme):
    from lowbitpack.modeling import load_dequantized_model

    _, packed = tiny_packed(tmp_path, scheme, group_size=24 if scheme == "int4" else 64)
    model = load_packed_model(packed, torch.float32)
    ref = load_dequantized_model(packed, torch.float32)
    art_q = [n for n, r in json.loads((packed / "lowbitpack.json").read_text())["tensors"].items()
             if r["scheme"] != "none"]
    mods = lowbit_modules(model)
    assert sorted(f"{n}.weight" for n in mods) == sorted(art_q) and len(mods) == 14
    # no dense copy of a quantized weight exists as a parameter or buffer
    float_names = {n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()}
    assert not float_names & set(art_q)
    assert not any(p.device.type == "meta" for p in model.parameters())
    x = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_load_packed_model_keeps_linear_biases_of_qwen2(tmp_path):
    """Qwen2 has q/k/v biases: they ride inside LowBitLinear and must not be reported missing."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lowbitpack.modeling import load_dequantized_model

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    src = tmp_path / "qwen2"
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()          # random init leaves biases at zero: make them matter
    model.save_pretrained(src)
    packed = tmp_path / "packed"
    lowbitpack.api.quantize(src, packed, "int4", group_size=32, progress=False)
    loaded = load_packed_model(packed, torch.float32)
    mods = lowbit_modules(loaded)
    assert sum(m.bias is not None for m in mods.values()) == 6        # q/k/v of 2 layers
    ref = load_dequantized_model(packed, torch.float32)
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_load_packed_model_refuses_non_artifact(tmp_path):
    src = tiny_source(tmp_path)
    with pytest.raises(InputError, match="not a lowbitpack artifact"):
        load_packed_model(src)


# ---------------------------------------------------------------------------------------------- train
def _train(packed: Path, out: Path, data: Path, **kw) -> dict:
    opts = dict(data=data, max_steps=8, batch_size=2, seq_len=32, r=4, alpha=8, lr=5e-3, progress=False,
                dtype="fp32")
    opts.update(kw)
    return lowbitpack.api.train(packed, out, **opts)


def test_train_writes_a_peft_adapter_that_loads_on_the_original(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src, packed = tiny_packed(tmp_path)
    data = text_file(tmp_path)
    rec = _train(packed, tmp_path / "adapter", data)
    out = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "lowbitpack_training.json",
            "train_log.jsonl"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in tensors.items())  # it learnt
    # training record
    on_disk = json.loads((out / "lowbitpack_training.json").read_text())
    assert on_disk == json.loads(json.dumps(rec))
    assert rec["data"]["file_sha256"] == sha256_file(data)
    assert rec["base"]["manifest_sha256"] == sha256_file(packed / "lowbitpack.json")
    assert rec["base"]["scheme"] == "int4" and rec["result"]["steps"] == 8
    assert rec["result"]["packed_linears"] == 14
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 9))
    assert rec["result"]["last_loss"] == pytest.approx(log[-1]["loss"], abs=1e-5)
    assert sum(e["loss"] for e in log[-3:]) / 3 < log[0]["loss"]  # lr 5e-3 on repeated text: loss goes down
    # PEFT loads it onto the ORIGINAL (dense nn.Linear) model and it changes the output
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        plain = base(input_ids=x).logits
        adapted = PeftModel.from_pretrained(base, str(out))(input_ids=x).logits
    assert not torch.allclose(plain, adapted)
    # and onto the packed base through attach_adapter
    packed_model = attach_adapter(load_packed_model(packed), out)
    with torch.no_grad():
        assert torch.isfinite(packed_model(input_ids=x).logits).all()


def test_training_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    _, packed = tiny_packed(tmp_path)
    data = text_file(tmp_path)
    _train(packed, tmp_path / "a", data, max_steps=3)
    _train(packed, tmp_path / "b", data, max_steps=3)
    _train(packed, tmp_path / "c", data, max_steps=3, seed=7)
    a, b, c = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_train_option_and_input_errors(tmp_path):
    _, packed = tiny_packed(tmp_path)
    data = text_file(tmp_path)
    with pytest.raises(OptionError, match="target-modules"):
        _train(packed, tmp_path / "x", data, target_modules=("no_such_proj",))
    with pytest.raises(InputError, match="no such file"):
        _train(packed, tmp_path / "x", tmp_path / "missing.txt")
    with pytest.raises(OptionError, match="--r"):
        _train(packed, tmp_path / "x", data, r=0)
    with pytest.raises(InputError, match="fewer than"):
        _train(packed, tmp_path / "x", text_file(tmp_path, "short"), seq_len=64)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        _train(packed, tmp_path / "exists", data)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_train_cli(tmp_path):
    from lowbitpack.cli import main

    _, packed = tiny_packed(tmp_path)
    data = text_file(tmp_path)
    res = CliRunner().invoke(main, ["train", str(packed), "-o", str(tmp_path / "ad"), "--data", str(data),
                                    "--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--r", "2",
                                    "--target-modules", "q_proj,v_proj", "--dtype", "fp32", "--no-progress",
                                    "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["result"]["steps"] == 2 and rec["hparams"]["target_modules"] == ["q_proj", "v_proj"]
    res = CliRunner().invoke(main, ["train", str(packed), "-o", str(tmp_path / "ad2"), "--data",
                                    str(tmp_path / "nope.txt"), "--no-progress"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "no such file" in res.output


def test_train_on_a_full_precision_checkpoint_is_plain_lora(tmp_path):
    """The 16-bit LoRA baseline: same flow, dense nn.Linear base, base record of kind checkpoint."""
    src = tiny_source(tmp_path)
    rec = _train(src, tmp_path / "ad16", text_file(tmp_path), max_steps=2)
    assert rec["base"]["kind"] == "checkpoint" and rec["base"]["scheme"] == "none"
    assert rec["result"]["packed_linears"] == 0 and rec["result"]["steps"] == 2
    assert (tmp_path / "ad16" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- GPU (device machine)
@pytest.mark.cuda
@pytest.mark.parametrize("scheme,group", [("int4", 128), ("int3", 64), ("nf4", 64)])
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_lowbit_linear_on_cuda_matches_the_cpu_reference(scheme, group, rows):
    """Whatever path runs on the GPU (fused GEMV, CUDA dequant, or the torch reference), forward and backward
    agree with the float32 reference computed on the CPU."""
    torch.manual_seed(0)
    qt = make_scheme(scheme, group_size=group).quantize(torch.randn(384, 320) * 0.05)
    dense = dequantize(qt, torch.float32)
    layer = LowBitLinear(qt).cuda()
    x = torch.randn(rows, 320, dtype=torch.bfloat16)
    xg = x.cuda().requires_grad_(True)
    y = layer(xg)
    ref = x.float() @ dense.t()
    assert y.dtype == torch.bfloat16 and y.is_cuda
    torch.testing.assert_close(y.float().cpu(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn(rows, 384, dtype=torch.bfloat16)
    y.backward(g.cuda())
    torch.testing.assert_close(xg.grad.float().cpu(), g.float() @ dense, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x.cuda()).float().cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_train_on_cuda_and_adapter_loads_on_cpu_original(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src, packed = tiny_packed(tmp_path)
    rec = _train(packed, tmp_path / "ad", text_file(tmp_path), device="cuda", dtype=None, max_steps=4)
    assert rec["hparams"]["device"] == "cuda" and rec["hparams"]["compute_dtype"] == "bfloat16"
    assert rec["hparams"]["cache_dense"] is False
    assert all(torch.isfinite(torch.tensor(rec["result"][k])) for k in ("first_loss", "final_loss"))
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        out = PeftModel.from_pretrained(base, str(tmp_path / "ad"))(input_ids=torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(out).all()


def test_dtype_casts_keep_packed_tensors_exact():
    """model.half()/.to(bf16) change the compute dtype, never the packed scales (fp16 -> bf16 would be lossy)."""
    qt = make_scheme("int4", group_size=32).quantize(torch.randn(16, 40))
    layer = LowBitLinear(qt, torch.randn(16), compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in qt.tensors.items()}
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    for k, v in before.items():
        t = getattr(layer, "packed_" + k)
        assert t.dtype == v.dtype and torch.equal(t, v)
    layer.float()
    torch.testing.assert_close(layer.weight, dequantize(qt, torch.float32))
