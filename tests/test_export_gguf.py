"""GGUF export: llama.cpp conventions (names, q/k permutation, metadata, tokenizer), load-back with
transformers' GGUF loader and gguf.GGUFReader, exact Q4_1/Q4_0/Q8_0 blocks from intg codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lowbitpack import api  # noqa: E402
from lowbitpack.artifact import Artifact, ArtifactWriter  # noqa: E402
from lowbitpack.errors import InputError, OptionError  # noqa: E402
from lowbitpack.export.gguf import (export_gguf, infer_pre_tokenizer, permute_rows,  # noqa: E402
                                    tokenizer_vocab)
from lowbitpack.io.hashing import sha256_tensor  # noqa: E402
from lowbitpack.layouts.intg import pack_intg  # noqa: E402
from lowbitpack.modeling import load_dequantized_model  # noqa: E402
from lowbitpack.qtensor import QuantizedTensor  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402

SAMPLE = "In the beginning God created the heaven and the earth. 12345 <|im_start|>user\nHi!<|im_end|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 512


def _write_tiny_tokenizer(dst: Path) -> None:
    """A byte-level BPE tokenizer (~500 tokens) trained on a few sentences: GGUF readers parse its vocabulary in
    milliseconds, where SmolLM2's 49k tokens + 49k merges take seconds per read (the real one is tested once)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - 8, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [SAMPLE, "And God said, Let there be light: and there was light.", "The quick brown fox jumps over "
              "the lazy dog 0123456789 times.", "And the evening and the morning were the first day."] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}))


def _tiny(tmp_path: Path, smollm2: Path | None = None, hidden: int = 64, inter: int = 96, name: str = "tiny") -> Path:
    """A random Llama (untied head, GQA 4/2) with a small byte-level BPE tokenizer; vocab 512 (a few ids unused)."""
    src = make_tiny_llama(tmp_path / name, hidden=hidden, inter=inter, vocab=TINY_VOCAB, seed=1)
    _write_tiny_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def _load_gguf(out: Path, file: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out, gguf_file=file, dtype=torch.float32).eval()


def _ids(path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer
    return torch.tensor([AutoTokenizer.from_pretrained(path)(SAMPLE).input_ids])


def _field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return f.parts[f.data[0]][0]


def test_permute_matches_llama_cpp_and_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    # llama.cpp: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
    expect = w.reshape(3, 2, 2, 5).swapaxes(1, 2).reshape(12, 5)
    assert np.array_equal(permute_rows(w, 3, 3), expect)
    assert torch.equal(permute_rows(torch.from_numpy(w), 3, 3), torch.from_numpy(expect))
    proc = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 3})
    k = np.random.default_rng(0).standard_normal((12, 7)).astype(np.float32)  # kv heads 3, head_dim 4
    back = proc.process(permute_rows(k, 6, 3), "blk.0.attn_k.weight").weights
    assert np.array_equal(back, k)


def test_pre_tokenizer_inference():
    assert infer_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smol = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}
    assert infer_pre_tokenizer(smol) == "smollm"
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    llama3 = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]}},
        {"type": "ByteLevel", "use_regex": False}]}}
    assert infer_pre_tokenizer(llama3) == "llama-bpe"
    assert infer_pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}}) is None


def test_tokenizer_vocab_types_and_padding(tmp_path):
    tj = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
          "added_tokens": [{"id": 3, "content": "<|x|>", "special": True}, {"id": 4, "content": "<think>",
                                                                            "special": False}]}
    tokens, types = tokenizer_vocab(tj, 6, tmp_path)
    assert tokens == ["a", "b", "ab", "<|x|>", "<think>", "[PAD5]"]
    T = gguf.TokenType
    assert types == [T.NORMAL, T.NORMAL, T.NORMAL, T.CONTROL, T.CONTROL, T.UNUSED]  # <think> looks special
    tj["added_tokens"][1]["content"] = "hello world"
    assert tokenizer_vocab(tj, 6, tmp_path)[1][4] == T.USER_DEFINED
    with pytest.raises(InputError):
        tokenizer_vocab(tj, 4, tmp_path)  # id 4 does not fit vocab_size 4
    with pytest.raises(OptionError):
        tokenizer_vocab({"model": {"type": "Unigram"}}, 4, tmp_path)


@pytest.mark.parametrize("gtype", ["f16", "q8_0", "q4_0", "q4_1"])
def test_gguf_from_checkpoint_loads_and_matches(tmp_path, smollm2, gtype):
    """A plain HF checkpoint -> GGUF: reader metadata, transformers load-back, logits error ordered by type."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _tiny(tmp_path, smollm2)
    res = export_gguf(src, tmp_path / "out", gguf_type=gtype, progress=False)
    path = tmp_path / "out" / res["file"]
    assert res["file"].endswith(f"-{gtype.upper()}.gguf") and path.is_file()
    reader = gguf.GGUFReader(str(path))
    cfg = json.loads((src / "config.json").read_text())
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == cfg["num_hidden_layers"]
    assert _field(reader, "llama.embedding_length") == cfg["hidden_size"]
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.feed_forward_length") == cfg["intermediate_size"]
    assert _field(reader, "llama.rope.dimension_count") == cfg["hidden_size"] // 4
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1 and _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == TINY_VOCAB
    n_merges = len(json.loads((src / "tokenizer.json").read_text())["model"]["merges"])
    assert len(reader.fields["tokenizer.ggml.merges"].data) == n_merges > 100
    types = reader.fields["tokenizer.ggml.token_type"]
    assert int(types.parts[types.data[0]][0]) == gguf.TokenType.CONTROL  # <|endoftext|>
    expect_ft = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}[gtype]
    assert _field(reader, "general.file_type") == expect_ft
    by_name = {t.name: t for t in reader.tensors}
    assert "output.weight" in by_name  # untied model keeps its head
    assert by_name["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    q = by_name["blk.0.attn_q.weight"]
    assert q.tensor_type.name == gtype.upper() and list(q.shape) == [64, 64]  # GGUF lists ne0 (in) first
    if gtype.startswith("q4"):
        assert by_name["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    # the reader's q is the source q with llama.cpp's row permutation
    src_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    got_q = gguf.quants.dequantize(q.data, q.tensor_type).reshape(64, 64)
    want_q = permute_rows(src_model.model.layers[0].self_attn.q_proj.weight.detach().numpy(), 4, 4)
    assert np.abs(got_q - want_q).max() == pytest.approx(res["errors"][f"{gtype.upper()}/"
                                                                      f"{'float' if gtype == 'f16' else 'requantized'}"]
                                                         ["max_abs_error"], abs=1e-3)
    model = _load_gguf(tmp_path / "out", res["file"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=res["file"])
    ids = _ids(src)
    assert tok(SAMPLE).input_ids == ids[0].tolist()
    with torch.no_grad():
        a, b = model(ids).logits, src_model(ids).logits
    rel = float((a - b).abs().max() / b.abs().max())
    bound = {"f16": 2e-3, "q8_0": 2e-2, "q4_0": 0.35, "q4_1": 0.35}[gtype]
    assert rel < bound, rel
    manifest = json.loads((tmp_path / "out" / "lowbitpack_export.json").read_text())
    assert manifest["target"] == "gguf" and manifest["input"]["kind"] == "checkpoint"


def _int_artifact(tmp_path: Path, src: Path, scheme: str, group: int) -> Path:
    out = tmp_path / f"art-{scheme}-{group}"
    api.quantize(src, out, scheme, group_size=group, progress=False)
    return out


def test_exact_q4_1_from_int4_g32(tmp_path, smollm2):
    """int4 g32 codes become Q4_1 blocks directly: d = s, m = -s*z (one fp16 rounding of m), no re-quantization."""
    src = _tiny(tmp_path, smollm2)
    art_path = _int_artifact(tmp_path, src, "int4", 32)
    res = export_gguf(art_path, tmp_path / "out", gguf_type="q4_1", embed_type="f16", exact_from_intg=True,
                      progress=False)
    art = Artifact.open(art_path)
    n_quant = sum(art.is_quantized(n) for n in art.tensors)
    assert res["exact_intg_tensors"] == n_quant == res["types"]["Q4_1/direct"]
    reader = gguf.GGUFReader(str(tmp_path / "out" / res["file"]))
    by_name = {t.name: t for t in reader.tensors}
    worst = 0.0
    for name in art.tensors:
        if not art.is_quantized(name):
            continue
        layer = name.split(".")[2]
        kind = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.split(".")[-2]]
        t = by_name[f"blk.{layer}.{kind}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        ref = art.dense(name, torch.float32).numpy()
        if kind == "attn_q":
            ref = permute_rows(ref, 4, 4)
        if kind == "attn_k":
            ref = permute_rows(ref, 4, 2)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        qt = art.quantized_tensor(name)
        # the only error: m = -s*z rounded to fp16, i.e. at most half an fp16 ulp of |s*z|
        bound = float((qt.tensors["scale"].float() * qt.tensors["zero"].float()).abs().max()) * 2.0**-11
        diff = float(np.abs(got - ref).max())
        assert diff <= bound + 1e-12
        worst = max(worst, diff)
    assert worst == pytest.approx(res["errors"]["Q4_1/direct"]["max_abs_error"])
    # requantizing the same codes instead is worse
    res2 = export_gguf(art_path, tmp_path / "out2", gguf_type="q4_1", exact_from_intg=False, progress=False)
    assert res2["exact_intg_tensors"] == 0
    assert res2["errors"]["Q4_1/requantized"]["max_abs_error"] > worst
    # and the file loads: logits match our dequantized model closely
    model = _load_gguf(tmp_path / "out", res["file"])
    ref_model = load_dequantized_model(art_path, dtype=torch.float32)
    ids = _ids(src)
    with torch.no_grad():
        a, b = model(ids).logits, ref_model(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < 2e-3  # fp16 m rounding + F16 embeddings


def _synthetic_artifact(path: Path, src: Path, make) -> Path:
    """An artifact whose quantized tensors come from `make(name, weight) -> QuantizedTensor`; others kept."""
    from lowbitpack.io.checkpoint import SourceCheckpoint

    ckpt = SourceCheckpoint.open(src)
    path.mkdir(parents=True)
    w = ArtifactWriter(path, {"model_id": "local/tiny", "revision": None}, {"scheme": "test"})
    for shard in ckpt.shards:
        for name, t in ckpt.iter_shard(shard):
            if name.endswith("proj.weight"):
                w.add_quantized(name, make(name, t), sha256_tensor(t))
            else:
                w.add_kept(name, t, sha256_tensor(t))
    w.copy_sidecars(src)
    w.finish()
    return path


def test_exact_q4_1_from_float_offsets_is_bit_exact(tmp_path, smollm2):
    """QA-LoRA layout (w = s*q + m, fp16 s and m, G=32): Q4_1 stores exactly d=s, m=m -> zero error."""
    src = _tiny(tmp_path, smollm2)
    gen = torch.Generator().manual_seed(0)

    def make(name, t):
        out_f, in_f = t.shape
        codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
        scale = (torch.rand(out_f, in_f // 32, generator=gen) * 0.01 + 1e-3).half()
        offset = (torch.randn(out_f, in_f // 32, generator=gen) * 0.02).half()
        return QuantizedTensor("qalora", "intg-v1", 4, 32, (out_f, in_f), t.dtype,
                               {"qweight": pack_intg(codes, 4), "scale": scale, "offset": offset})

    art = _synthetic_artifact(tmp_path / "art", src, make)
    res = export_gguf(art, tmp_path / "out", gguf_type="q4_1", exact_from_intg=True, progress=False)
    assert res["errors"]["Q4_1/direct"]["max_abs_error"] == 0.0
    # Q4_0 cannot hold offsets: --exact refuses with a clear message
    with pytest.raises(OptionError, match="offsets need Q4_1"):
        export_gguf(art, tmp_path / "out0", gguf_type="q4_0", exact_from_intg=True, progress=False)


def test_exact_symmetric_q4_0_and_q8_0(tmp_path, smollm2):
    """Symmetric codes (zero == 2^(b-1)) map to Q4_0 (4-bit) / Q8_0 (8-bit) blocks with zero error."""
    src = _tiny(tmp_path, smollm2)
    gen = torch.Generator().manual_seed(1)

    def maker(bits):
        def make(name, t):
            out_f, in_f = t.shape
            codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
            scale = (torch.rand(out_f, -(-in_f // 64), generator=gen) * 0.01 + 1e-3).half()  # in=96: short group
            zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.uint8)
            return QuantizedTensor(f"int{bits}", "intg-v1", bits, 64, (out_f, in_f), t.dtype,
                                   {"qweight": pack_intg(codes, bits), "scale": scale, "zero": zero})
        return make

    for bits, gtype in ((4, "q4_0"), (8, "q8_0")):
        art = _synthetic_artifact(tmp_path / f"art{bits}", src, maker(bits))
        res = export_gguf(art, tmp_path / f"out{bits}", gguf_type=gtype, exact_from_intg=True, progress=False)
        assert res["errors"][f"{gtype.upper()}/direct"]["max_abs_error"] == 0.0
        assert res["exact_intg_tensors"] == 14


def test_exact_refused_when_groups_do_not_cover_blocks(tmp_path, smollm2):
    src = _tiny(tmp_path, smollm2)
    art = _int_artifact(tmp_path, src, "int4", 48)  # 48 is not a multiple of 32
    with pytest.raises(OptionError, match="32-blocks"):
        export_gguf(art, tmp_path / "out", gguf_type="q4_1", exact_from_intg=True, progress=False)
    res = export_gguf(art, tmp_path / "out", gguf_type="q4_1", progress=False)  # auto: re-quantizes
    assert res["exact_intg_tensors"] == 0 and res["types"]["Q4_1/requantized"] == 14


def test_odd_shapes_fall_back_to_f16(tmp_path, smollm2):
    """Rows not a multiple of 32 cannot be Q-blocks: F16, reported; the file still loads."""
    src = _tiny(tmp_path, smollm2, hidden=80, inter=144, name="odd")
    res = export_gguf(src, tmp_path / "out", gguf_type="q4_1", progress=False)
    assert res["fallbacks"] and all("F16" in v for v in res["fallbacks"].values())
    assert "model.layers.0.mlp.down_proj.weight" in res["fallbacks"]  # in = 144
    model = _load_gguf(tmp_path / "out", res["file"])
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = _ids(src)
    with torch.no_grad():
        rel = float((model(ids).logits - ref(ids).logits).abs().max() / ref(ids).logits.abs().max())
    assert rel < 0.35


def test_refusals(tmp_path, smollm2):
    src = _tiny(tmp_path, smollm2)
    with pytest.raises(OptionError, match="unsupported GGUF type"):
        export_gguf(src, tmp_path / "o1", gguf_type="q5_k", progress=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OptionError, match="rope scaling"):
        export_gguf(src, tmp_path / "o2", progress=False)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OptionError, match="model_type"):
        export_gguf(src, tmp_path / "o3", progress=False)
    assert not (tmp_path / "o3").exists()  # nothing half-written


def test_real_model_f16_from_checkpoint_is_exact(tmp_path, smollm2):
    """SmolLM2-135M (tied embeddings, GQA 9/3 heads, 49k BPE vocab) -> F16 GGUF: transformers loads it with the
    same tokenizer and bit-identical logits (bf16 weights are exact in fp16). Q8_0/Q4_x are covered on the tiny
    model above; their real-model errors are in the export report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf.reader import read_gguf_metadata

    res = api.export(smollm2, tmp_path / "out", "gguf", gguf_type="f16", progress=False)
    assert res["errors"]["F16/float"]["max_abs_error"] == 0.0
    meta, names = read_gguf_metadata(str(tmp_path / "out" / res["file"]))
    assert "output.weight" not in names and "token_embd.weight" in names  # tied
    assert meta["llama.attention.head_count_kv"] == 3 and meta["llama.block_count"] == 30
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["general.file_type"] == 1
    model = _load_gguf(tmp_path / "out", res["file"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=res["file"])
    src_tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok(SAMPLE).input_ids == src_tok(SAMPLE).input_ids
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = torch.tensor([src_tok(SAMPLE).input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
