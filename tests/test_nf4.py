"""NF4 with double quantization: byte-identical to bitsandbytes' CPU quantizer, exact dequantization, goldens."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbitpack.kernels import dequantize
from lowbitpack.layouts.nf4 import (LAYOUT, NF4_CODE_VALUES, decode_absmax, dequantize_nf4, dynamic_map,
                                    pack_nibbles, unpack_nibbles)
from lowbitpack.schemes import make_scheme
from lowbitpack.schemes.nf4 import (NF4, nf4_midpoints, quantize_4bit, quantize_4bit_reference,
                                    quantize_blockwise_dynamic)

GOLDEN = Path(__file__).resolve().parents[1] / "formats" / "golden" / "nf4_golden.safetensors"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# numel: odd, < one block, not divisible by 64 nor 256, several nested blocks, exactly one block
SHAPES = [(1, 1), (3, 7), (63,), (65,), (5, 13), (64, 64), (129, 131), (96, 257), (2, 3, 45)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(shape[0] if len(shape) > 1 else 1, generator=g) * 0.2 + 0.01
    w = torch.randn(shape, generator=g) * rows.reshape(-1, *([1] * (len(shape) - 1)))
    return w.to(dtype)


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _assert_same_as_bnb(w: torch.Tensor, blocksize: int = 64) -> None:
    F = _bnb()
    packed, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    qt = NF4(blocksize).quantize(w)
    t = qt.tensors
    assert torch.equal(t["qweight"], packed.reshape(-1))
    assert torch.equal(t["absmax"], st.absmax)
    assert torch.equal(t["nested_absmax"], st.state2.absmax)
    assert torch.equal(t["quant_map"], st.code)
    assert torch.equal(t["nested_quant_map"], st.state2.code)
    assert qt.params["offset"] == st.offset.item()
    assert qt.params["blocksize"] == st.blocksize and qt.params["nested_blocksize"] == st.state2.blocksize


def test_code_tables():
    code = torch.tensor(NF4_CODE_VALUES)
    assert code.numel() == 16 and torch.all(code[1:] > code[:-1]) and code[7] == 0 and code[0] == -1
    dyn = dynamic_map()
    assert dyn.shape == (256,) and dyn.dtype == torch.float32 and torch.all(dyn[1:] >= dyn[:-1])
    assert dyn.max() == 1.0 and (dyn == 0).any()


def test_code_tables_match_bitsandbytes():
    F = _bnb()
    assert torch.equal(dynamic_map(), F.create_dynamic_map())
    assert torch.equal(torch.tensor(NF4_CODE_VALUES), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("n", [1, 2, 7, 64, 99])
def test_nibble_packing_high_nibble_first(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = pack_nibbles(codes, pad_code=7)
    assert packed.numel() == (n + 1) // 2
    assert int(packed[0]) >> 4 == int(codes[0])  # even element in the high nibble
    if n > 1:
        assert int(packed[0]) & 0xF == int(codes[1])
    if n % 2:
        assert int(packed[-1]) & 0xF == 7      # bitsandbytes pads with the code of 0.0
    assert torch.equal(unpack_nibbles(packed, n), codes)
    with pytest.raises(ValueError):
        unpack_nibbles(packed, n + 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_fast_path_equals_reference(dtype, blocksize):
    """The table-lookup path against the plain bucketize port, on random weights and on exact midpoint ties."""
    for shape in SHAPES:
        w = _weight(shape, dtype)
        p1, a1 = quantize_4bit(w, blocksize)
        p2, a2 = quantize_4bit_reference(w, blocksize)
        assert torch.equal(p1, p2) and torch.equal(a1, a2), shape
    mid = nf4_midpoints()
    ties = torch.cat([mid, torch.nextafter(mid, torch.full_like(mid, 2.0)),
                      torch.nextafter(mid, torch.full_like(mid, -2.0)), torch.tensor([1.0, -1.0, 0.0, -0.0])])
    x = ties.repeat(50)[: 64 * 11].reshape(11, 64)
    x[:, 0] = 1.0  # absmax 1 in every block: the scaled value is the value itself
    p1, a1 = quantize_4bit(x, 64)
    p2, a2 = quantize_4bit_reference(x, 64)
    assert torch.equal(p1, p2) and torch.equal(a1, a2)


def test_fast_path_across_chunks(monkeypatch):
    """Many chunks and a short last chunk (the chunk size is lowered so that a small tensor spans 13 chunks)."""
    import lowbitpack.schemes.nf4 as nf4_scheme
    monkeypatch.setattr(nf4_scheme, "_CHUNK_ELEMENTS", 64 * 9)
    w = _weight((61, 123), torch.bfloat16, seed=9)   # 117 whole blocks + a partial one
    p1, a1 = quantize_4bit(w, 64)
    p2, a2 = quantize_4bit_reference(w, 64)
    assert torch.equal(p1, p2) and torch.equal(a1, a2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_vs_bitsandbytes(dtype, shape):
    _assert_same_as_bnb(_weight(shape, dtype, seed=len(shape) * 100 + shape[0]))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_bit_exact_vs_bitsandbytes_blocksizes(blocksize):
    _assert_same_as_bnb(_weight((33, 200), torch.bfloat16, seed=blocksize), blocksize)


def test_bit_exact_degenerate_inputs():
    _assert_same_as_bnb(torch.zeros(40, 64, dtype=torch.bfloat16))           # every absmax 0
    _assert_same_as_bnb(torch.full((40, 64), 0.5, dtype=torch.float16))      # absmax - offset = 0 everywhere
    w = _weight((300, 64), torch.float32)
    w[100:120] = 0
    _assert_same_as_bnb(w)


def test_nested_quantization_vs_bitsandbytes():
    """The 8-bit LUT quantizer of bnb's native CPU library, including values on LUT bucket edges."""
    F = _bnb()
    code = dynamic_map()
    g = torch.Generator().manual_seed(3)
    k = torch.randint(1, 65535, (5000,), generator=g).double()
    edge = (2 * (k - 0.5) / 65535 - 1).float()
    up = torch.nextafter(edge, torch.full_like(edge, 2.0))
    down = torch.nextafter(edge, torch.full_like(edge, -2.0))
    for a in (torch.cat([edge, up, down]), torch.randn(1000, generator=g) * 1e-3, torch.zeros(300),
              torch.cat([torch.zeros(256), torch.randn(77, generator=g)])):
        a = a.clone()
        a[::256] = a.abs().max() if a.abs().max() > 0 else 0.0
        q, st = F.quantize_blockwise(a, code=code, blocksize=256)
        q2, am2 = quantize_blockwise_dynamic(a, code, 256)
        assert torch.equal(q, q2) and torch.equal(st.absmax, am2)


@pytest.mark.parametrize(("dtype", "shape"), [(d, s) for d in DTYPES for s in [(64, 128), (576, 64)]]
                         + [(torch.bfloat16, (129, 131)), (torch.float16, (5,))], ids=str)
def test_dequantize_equals_bitsandbytes(dtype, shape):
    """bnb's native CPU kernel (even last dim) is right when the last dim is a multiple of the blocksize; odd last
    dims take its torch path. (Its AVX-512 kernel mis-indexes absmax for e.g. [96, 96] at blocksize 64.)"""
    F = _bnb()
    w = _weight(shape, dtype, seed=7)
    packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    qt = NF4().quantize(w)
    ours = dequantize_nf4(qt.tensors, qt.shape, qt.params, dtype)
    assert ours.shape == w.shape and ours.dtype == dtype
    assert torch.equal(ours, F.dequantize_4bit(packed, st))
    assert torch.equal(dequantize(qt), ours)                  # dispatch: default dtype = the original dtype
    assert torch.equal(dequantize(qt, torch.float32).to(dtype), ours)


def test_dequantize_formula_and_absmax():
    w = _weight((40, 96), torch.float32, seed=11)
    qt = NF4().quantize(w)
    assert qt.layout == LAYOUT and qt.bits == 4 and qt.group_size == 64 and qt.shape == (40, 96)
    absmax = decode_absmax(qt.tensors, qt.params)
    true_absmax = w.reshape(-1, 64).abs().amax(1)
    # 8-bit dynamic map: the widest gap near +-1 is 0.9/64, so half of it bounds the error per nested block
    assert (absmax - true_absmax).abs().max() <= 0.0071 * (true_absmax - qt.params["offset"]).abs().max()
    codes = unpack_nibbles(qt.tensors["qweight"], w.numel()).long()
    expected = (torch.tensor(NF4_CODE_VALUES)[codes].view(-1, 64) * absmax.view(-1, 1)).reshape(40, 96)
    assert torch.equal(dequantize(qt, torch.float32), expected)
    err = (dequantize(qt, torch.float32) - w).abs().max()
    assert err <= 0.2 * w.abs().max()  # NF4: largest code gap is ~0.3 of absmax


def test_without_double_quant_matches_bitsandbytes():
    F = _bnb()
    w = _weight((37, 70), torch.bfloat16, seed=5)
    packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    qt = NF4(double_quant=False).quantize(w)
    assert qt.params["double_quant"] is False and set(qt.tensors) == {"qweight", "absmax", "quant_map"}
    assert torch.equal(qt.tensors["qweight"], packed.reshape(-1)) and torch.equal(qt.tensors["absmax"], st.absmax)
    assert torch.equal(dequantize(qt), F.dequantize_4bit(packed, st))


def test_scheme_options_and_errors():
    s = make_scheme("nf4", group_size=128)
    assert isinstance(s, NF4) and s.blocksize == 128 and s.config()["blocksize"] == 128
    with pytest.raises(ValueError, match="blocksize"):
        NF4(blocksize=48)
    with pytest.raises(ValueError, match="float"):
        NF4().quantize(torch.ones(4, 64, dtype=torch.int32))


def test_golden_file():
    """Frozen bytes written by bitsandbytes (formats/golden/nf4_make_golden.py): no bitsandbytes needed here."""
    with safe_open(str(GOLDEN), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    cases = sorted({k.split(".")[0] for k in stored})
    assert len(cases) == 3
    for case in cases:
        g = {k.split(".", 1)[1]: v for k, v in stored.items() if k.startswith(case + ".")}
        qt = NF4(64).quantize(g["input"])
        for key in ("qweight", "absmax", "nested_absmax", "quant_map", "nested_quant_map"):
            assert torch.equal(qt.tensors[key], g[key]), (case, key)
        assert qt.params["offset"] == float(g["offset"])
        assert torch.equal(dequantize(qt).float(), g["dequant"]), case  # bnb decodes to the input dtype


def test_real_model_weights_bit_exact(smollm2):
    F = _bnb()
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        names = [n for n in f.keys() if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
        assert len(names) == 7
        for name in names:
            w = f.get_tensor(name)
            _assert_same_as_bnb(w)
            packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(dequantize(NF4().quantize(w)), F.dequantize_4bit(packed, st))
