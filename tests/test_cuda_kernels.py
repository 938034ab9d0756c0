"""CUDA kernels vs the pure-torch references (device machine only; skipped without a GPU).

Dequantization must match the reference bit for bit for every layout, bit width, output dtype and odd
shape. The fused GEMV must match dequantize(W, x.dtype) @ x^T up to fp32 accumulation order (checked
against a float64 product of the reference's rounded weights). Only lowbitpack.kernels / layouts /
qtensor are imported, so this runs wherever torch runs.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from lowbitpack.kernels import cuda_ext, dispatch
from lowbitpack.kernels.gemv import last_gemv_path, lowbit_matmul
from lowbitpack.layouts.intg import LAYOUT as INTG, dequantize_qt as intg_reference, pack_intg
from lowbitpack.qtensor import QuantizedTensor

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def ext():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    e = cuda_ext.load(verbose=False)
    # On a GPU machine a build failure is a failure, not a skip: the fallback would hide it.
    assert e is not None, f"CUDA extension unavailable: {cuda_ext.status()['reason']}"
    return e


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (so -0.0 vs 0.0 or NaN payloads would count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return torch.equal(a.cpu().view(view), b.cpu().view(view))


def make_intg(rows: int, cols: int, bits: int, group: int, *, mode: str = "zero", scale_dtype=torch.float16,
              g_idx: bool = False, seed: int = 0, zero_max: int = 256, scale_exp: tuple[int, int] = (-8, 2)
              ) -> QuantizedTensor:
    """A random intg-v1 tensor on the CPU: codes, scales, zeros/offsets all random (full ranges by default;
    GEMV tests narrow zeros and scales so fp16 outputs stay finite)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = math.ceil(cols / group)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int32).to(torch.uint8)
    # Scales spread over several binades so rounding differences would show.
    scale = (torch.rand(rows, n_groups, generator=g) * 4 + 0.01) * 2.0 ** torch.randint(*scale_exp, (rows, n_groups),
                                                                                         generator=g)
    tensors = {"qweight": pack_intg(codes, bits), "scale": scale.to(scale_dtype)}
    if mode == "zero":
        tensors["zero"] = torch.randint(0, zero_max, (rows, n_groups), generator=g, dtype=torch.int32).to(torch.uint8)
    else:
        tensors["offset"] = (torch.randn(rows, n_groups, generator=g) * 0.3).to(scale_dtype)
    if g_idx:
        tensors["g_idx"] = torch.randint(0, n_groups, (cols,), generator=g, dtype=torch.int32)
    return QuantizedTensor(scheme=f"int{bits}", layout=INTG, bits=bits, group_size=group, shape=(rows, cols),
                           dtype=torch.bfloat16, tensors=tensors)


def to_dev(qt: QuantizedTensor) -> QuantizedTensor:
    return QuantizedTensor(qt.scheme, qt.layout, qt.bits, qt.group_size, qt.shape, qt.dtype,
                           {k: v.to(DEV) for k, v in qt.tensors.items()}, dict(qt.params))


# (rows, cols, group): odd rows, cols not divisible by 8/32/group, group smaller than 8, aligned ones too.
# The fast path (cols % 8 == 0) runs on several blocks with a last partial one (129 x 512, 75 x 1000), a code
# run whose end is not 16-byte aligned (7 x 1000 at 3, 5, 6, 7 bits) and a group that is not a power of two.
SHAPES = [(1, 1, 1), (3, 7, 4), (5, 33, 32), (17, 100, 32), (31, 257, 128), (2, 130, 7), (16, 128, 128),
          (33, 96, 32), (129, 512, 128), (7, 1000, 64), (75, 1000, 40), (9, 240, 24)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,scale_dtype", [("zero", torch.float16), ("zero", torch.float32),
                                              ("offset", torch.float16), ("offset", torch.float32),
                                              ("offset", torch.bfloat16)], ids=str)
def test_intg_dequant_bit_exact(ext, bits, dtype, mode, scale_dtype):
    for i, (rows, cols, group) in enumerate(SHAPES):
        for use_gidx in (False, True):
            qt = make_intg(rows, cols, bits, group, mode=mode, scale_dtype=scale_dtype, g_idx=use_gidx, seed=i)
            ref = intg_reference(qt, dtype)  # CPU, the ground truth
            out = cuda_ext.dequantize_intg(to_dev(qt), dtype)
            assert out is not None
            assert bits_equal(out, ref), f"mismatch at shape {(rows, cols)} group {group} g_idx={use_gidx}"


def test_intg_dispatch_takes_cuda_path():
    qt = make_intg(37, 300, 3, 128, seed=5)
    out = dispatch.dequantize(to_dev(qt), torch.bfloat16)
    assert dispatch.last_path()[INTG] == "cuda"
    assert bits_equal(out, intg_reference(qt, torch.bfloat16))


def test_intg_unaligned_storage_uses_slow_path_correctly():
    # qweight starting one byte into its storage: vector loads are off, results must not change.
    qt = make_intg(40, 256, 4, 32, seed=9)
    q = qt.tensors["qweight"]
    buf = torch.empty(q.numel() + 1, dtype=torch.uint8)
    buf[1:] = q.reshape(-1)
    dq = to_dev(qt)
    dbuf = buf.to(DEV)
    dq.tensors["qweight"] = dbuf[1:].view(q.shape)
    assert dq.tensors["qweight"].data_ptr() % 16 != 0
    assert bits_equal(cuda_ext.dequantize_intg(dq, torch.float16), intg_reference(qt, torch.float16))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    check_gemv(cuda_ext.gemv_intg(x.to(DEV), dq), x, qt)


def nf4_streamk_weights(qt: QuantizedTensor, xdtype: torch.dtype) -> torch.Tensor:
    """The weights the NF4 pair-table GEMVs multiply by: quant_map rounded to x's dtype, times the fp32 absmax
    (absmax is factored out of each 64-column sub-block, cuda/nf4_gemv.cu)."""
    t = dict(qt.tensors)
    t["quant_map"] = t["quant_map"].to(xdtype).float()
    q2 = QuantizedTensor(scheme=qt.scheme, layout=qt.layout, bits=qt.bits, group_size=qt.group_size, shape=qt.shape,
                         dtype=qt.dtype, tensors=t, params=qt.params)
    return dispatch.reference(qt.layout)(q2, torch.float32)


# Half the spacing of the output dtype's subnormals: below its smallest normal, rounding the output is
# off by up to this much, not by eps relative (fp16 outputs under 6e-5 occur when an absmax is near 0).
OUT_SUBNORMAL = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}


def check_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y (device) against float64 x @ W^T: one rounding of the output (half an ulp, taken as a full one, or
    half a subnormal step) plus fp32 accumulation error."""
    ref = x.double() @ w.double().t()
    bound = x.double().abs() @ w.double().abs().t()
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[x.dtype]
    tol = eps * ref.abs() + 2.0**-14 * bound + OUT_SUBNORMAL[x.dtype]
    err = (y.cpu().double() - ref).abs()
    assert torch.isfinite(y.cpu().double()).all()
    assert (err <= tol).all(), f"m={x.shape[0]}: max err {float(err.max())}, worst err/tol {float((err / tol).max())}"


def check_gemv(y: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor) -> None:
    """y (device) against float64 x @ W^T with W = reference dequantization rounded to x's dtype (or, for the
    NF4 pair-table kernels, the weights they multiply by)."""
    assert y is not None and y.dtype == x.dtype and y.shape == (x.shape[0], qt.shape[0])
    if qt.layout == INTG:
        w = intg_reference(qt, x.dtype)
    elif qt.layout == "nf4-bnb-v1" and cuda_ext.load().last_nf4_gemv() != "generic":
        w = nf4_streamk_weights(qt, x.dtype)
    else:
        w = dispatch.reference(qt.layout)(qt, x.dtype)
    check_product(y, x, w)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["zero", "offset"])
def test_intg_gemv(ext, bits, xdtype, mode):
    shapes = SHAPES + [(300, 4096, 128), (64, 1024, 32)]
    for i, (rows, cols, group) in enumerate(shapes):
        for m in (1, 3, 8):
            for use_gidx in (False, True):
                qt = make_intg(rows, cols, bits, group, mode=mode, g_idx=use_gidx, seed=100 + i,
                               zero_max=1 << bits, scale_exp=(-10, -5))
                x = torch.randn(m, cols, generator=torch.Generator().manual_seed(i)).to(xdtype)
                y = cuda_ext.gemv_intg(x.to(DEV), to_dev(qt))
                check_gemv(y, x, qt)


def test_lowbit_matmul_paths():
    qt = make_intg(96, 512, 4, 128, seed=3)
    dq = to_dev(qt)
    x = torch.randn(2, 5, 512, dtype=torch.bfloat16)  # 10 rows: too many for the fused kernel
    y = lowbit_matmul(x.to(DEV), dq)
    assert last_gemv_path()[INTG] == "dequant+matmul:cuda"
    assert y.shape == (2, 5, 96)
    check_gemv(y.reshape(10, 96), x.reshape(10, 512), qt)
    x1 = torch.randn(1, 1, 512, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16)
    y1 = lowbit_matmul(x1.to(DEV), dq, bias.to(DEV))
    assert last_gemv_path()[INTG] == "cuda-fused"
    y1_nobias = lowbit_matmul(x1.to(DEV), dq)
    check_gemv(y1_nobias.reshape(1, 96), x1.reshape(1, 512), qt)
    assert torch.equal(y1, y1_nobias + bias.to(DEV))
    # fp32 activations: no fused kernel, dense path.
    lowbit_matmul(x1.float().to(DEV), dq)
    assert last_gemv_path()[INTG] == "dequant+matmul:cuda"
    # 5-bit has a dequant kernel but no fused GEMV.
    qt5 = make_intg(8, 64, 5, 32, seed=4)
    lowbit_matmul(x1.reshape(1, 512)[:, :64].to(DEV).contiguous(), to_dev(qt5))
    assert last_gemv_path()[INTG] == "dequant+matmul:cuda"


# ------------------------------------------------------------------ nf4-bnb-v1 (kernel level)

NF4_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]


def nf4_formula(packed, qmap, absmax_code, nmap, nabs, offset, blocksize, nbs, rows, cols, dtype):
    """bitsandbytes' NF4 dequantization written out in fp32 torch ops (CPU)."""
    n = rows * cols
    codes = torch.stack([packed.long() >> 4, packed.long() & 15], -1).reshape(-1)[:n]
    blk = torch.arange(n) // blocksize
    am = nmap[absmax_code.long()] * nabs[torch.arange(absmax_code.numel()) // nbs]
    am = am + offset
    return (qmap[codes] * am[blk]).reshape(rows, cols).to(dtype)


def make_nf4(rows, cols, blocksize=64, nbs=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    n_blocks = math.ceil(n / blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.int32).to(torch.uint8)
    qmap = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    absmax_code = torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.int32).to(torch.uint8)
    nmap = torch.sort(torch.randn(256, generator=g))[0]
    nabs = torch.rand(math.ceil(n_blocks / nbs), generator=g) * 0.05 + 0.01
    offset = torch.rand(1, generator=g) * 0.05
    return packed, qmap, absmax_code, nmap, nabs, offset


NF4_SHAPES = [(1, 1), (3, 5), (7, 33), (5, 64), (13, 100), (33, 96), (64, 512), (129, 4096), (3, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_nf4_dequant_kernel_bit_exact(ext, dtype, blocksize):
    for i, (rows, cols) in enumerate(NF4_SHAPES):
        packed, qmap, code, nmap, nabs, offset = make_nf4(rows, cols, blocksize, seed=i)
        ref = nf4_formula(packed, qmap, code, nmap, nabs, offset, blocksize, 256, rows, cols, dtype)
        d = [t.to(DEV) for t in (packed, qmap, code, nmap, nabs, offset)]
        off = float(offset)
        out = ext.nf4_dequant(d[0], d[1], None, d[2], d[3], d[4], off, blocksize, 256, rows, cols, dtype)
        assert bits_equal(out, ref), f"mismatch at {(rows, cols)}"
        # plain fp32 absmax (no double quant)
        am = (nmap[code.long()] * nabs[torch.arange(code.numel()) // 256] + offset).float()
        out2 = ext.nf4_dequant(d[0], d[1], am.to(DEV), None, None, None, 0.0, blocksize, 256, rows, cols, dtype)
        assert bits_equal(out2, ref)


def nf4_gemv_weights(packed, qmap, code, nmap, nabs, offset, blocksize, rows, cols, xdtype, path):
    """W as the kernel that ran (`path`) forms it: the generic core rounds each dequantized weight to x's
    dtype; stream-K multiplies quant_map rounded to x's dtype by the fp32 absmax (exact in float64 here)."""
    if path != "generic":  # the factored kernels of cuda/nf4_gemv.cu
        return nf4_formula(packed, qmap.to(xdtype).double(), code, nmap.double(), nabs.double(), offset.double(),
                           blocksize, 256, rows, cols, torch.float64)
    return nf4_formula(packed, qmap, code, nmap, nabs, offset, blocksize, 256, rows, cols, xdtype)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=str)
def test_nf4_gemv_kernel(ext, xdtype):
    for i, (rows, cols) in enumerate(NF4_SHAPES + [(300, 4096), (17, 14336)]):
        packed, qmap, code, nmap, nabs, offset = make_nf4(rows, cols, 64, seed=50 + i)
        d = [t.to(DEV) for t in (packed, qmap, code, nmap, nabs, offset)]
        for m in (1, 2, 8):
            x = torch.randn(m, cols, generator=torch.Generator().manual_seed(i)).to(xdtype)
            y = ext.nf4_gemv(x.to(DEV), d[0], d[1], None, d[2], d[3], d[4], float(offset), 64, 256, rows, cols)
            path = ext.last_nf4_gemv()
            check_product(y, x, nf4_gemv_weights(packed, qmap, code, nmap, nabs, offset, 64, rows, cols, xdtype, path))


# Shapes for the stream-K NF4 GEMV (cols % 128 == 0): tiles split over many warp groups, whole tiles per
# group (cols = 128: one iteration a tile, the group shrinks to one warp), rows not a multiple of 16, 112
# iterations a tile (14336), and a model-sized one.
NF4_SK_SHAPES = [(300, 4096), (17, 14336), (40000, 128), (5000, 256), (1001, 1024), (4096, 4096), (100, 1536)]


@pytest.mark.parametrize("variant", ["on", "w24g4pf1", "w16g1pf2", "w16g2pf2", "w8g4pf2", "tile4", "tile8",
                                     "ring8s8", "ring16s6", "ring16s6r", "ring16s8r", "ring8s6r2", "ring16s6ra",
                                     "ring8s6r2a", "ring16s6rww", "ring8s6r2w"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_gemv_stream_k(ext, xdtype, blocksize, double_quant, variant, monkeypatch):
    """Forced on, the stream-K kernel (and its one-block-per-tile and ring forms) runs on every whole-iteration
    shape, for every absmax form and tuning variant, computes its documented function, and is deterministic
    (split tiles are summed in group order)."""
    monkeypatch.setenv("LOWBITPACK_NF4_SK", variant)
    for i, (rows, cols) in enumerate(NF4_SK_SHAPES):
        packed, qmap, code, nmap, nabs, offset = make_nf4(rows, cols, blocksize, seed=70 + i)
        d = [t.to(DEV) for t in (packed, qmap, code, nmap, nabs, offset)]
        w = nf4_gemv_weights(packed, qmap, code, nmap, nabs, offset, blocksize, rows, cols, xdtype, "stream-k")
        am = None
        if not double_quant:
            am = (nmap[code.long()] * nabs[torch.arange(code.numel()) // 256] + offset).float()
        for m in (1, 3, 8):
            x = torch.randn(m, cols, generator=torch.Generator().manual_seed(i + m)).to(xdtype)
            if double_quant:
                args = (d[0], d[1], None, d[2], d[3], d[4], float(offset), blocksize, 256, rows, cols)
            else:
                args = (d[0], d[1], am.to(DEV), None, None, None, 0.0, blocksize, 256, rows, cols)
            y = ext.nf4_gemv(x.to(DEV), *args)
            expect = "stream-k"
            if variant.startswith("ring"):  # tensor copies and mbarrier transaction counts: sm_90+; the copy's
                # box (16 rows x 64 bytes a warp iteration + 32) must fit in the weight
                warps, _ = re.fullmatch(r"ring(\d+)s(\d+)r?2?a?w*", variant).groups()
                fits = rows >= 16 and cols // 2 >= 64 * int(warps) + 32
                expect = "pair-ring" if torch.cuda.get_device_capability()[0] >= 9 and fits else "generic"
            elif variant.startswith("tile"):  # one block per tile: its warps must split the tile's iterations
                expect = "pair-tile" if (cols // 128) % int(variant[4:]) == 0 else "generic"
            assert ext.last_nf4_gemv() == expect, (rows, cols)
            if expect == "generic":
                continue
            check_product(y, x, w)
            y2 = ext.nf4_gemv(x.to(DEV), *args)
            assert torch.equal(y.view(torch.int16), y2.view(torch.int16)), "not deterministic"


@pytest.mark.parametrize("pair", [("ring16s6r", "ring16s6ra"), ("ring8s6r2", "ring8s6r2a"), ("ring16s6r", "ring16s8r"),
                                  ("ring16s6r", "ring16s6rww"), ("ring8s6r2", "ring8s6r2w")])
def test_nf4_gemv_ring_absmax_slots_and_pdl_same_bits(ext, pair, monkeypatch):
    """The ring form's tile-absmax slots (`a`: a tile's absmax codes come through shared memory), its absmax warps
    (`w`, `ww`: helper warps compute each stage's fp32 absmax into shared memory), its stage count and its
    programmatic dependent launch (LOWBITPACK_NF4_SK_PDL=0 turns it off) change where bytes come from and when the
    kernel starts, never the sums: all four give the same bits. Rows not a multiple of 16 fall back to per-warp
    absmax fetches (`a`) or clamp their rows (`w`)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the ring form needs sm_90")
    for i, (rows, cols) in enumerate([(4096, 4096), (320, 16384), (1001, 4096), (48, 2048 + 128)]):
        packed, qmap, code, nmap, nabs, offset = make_nf4(rows, cols, 64, seed=90 + i)
        d = [t.to(DEV) for t in (packed, qmap, code, nmap, nabs, offset)]
        for m in (1, 8):
            x = torch.randn(m, cols, generator=torch.Generator().manual_seed(i + m)).to(torch.bfloat16).to(DEV)
            outs = []
            for variant in pair:
                for pdl in ("1", "0"):
                    monkeypatch.setenv("LOWBITPACK_NF4_SK", variant)
                    monkeypatch.setenv("LOWBITPACK_NF4_SK_PDL", pdl)
                    outs.append(ext.nf4_gemv(x, d[0], d[1], None, d[2], d[3], d[4], float(offset), 64, 256, rows,
                                             cols))
                    assert ext.last_nf4_gemv() == "pair-ring"
            for o in outs[1:]:
                assert torch.equal(outs[0].view(torch.int16), o.view(torch.int16)), (rows, cols, m)


def test_nf4_gemv_pdl_waits_for_the_kernel_before(ext, monkeypatch):
    """With programmatic dependent launch the GEMV may start before the kernel before it has finished; it must
    still read the x that kernel writes (and not overwrite what it reads). Back-to-back calls whose x is made by
    the kernel just before, eagerly and replayed from a CUDA graph, equal the same calls made one at a time."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the ring form needs sm_90")
    monkeypatch.delenv("LOWBITPACK_NF4_SK", raising=False)
    rows, cols = 8192, 4096
    packed, qmap, code, nmap, nabs, offset = make_nf4(rows, cols, 64, seed=7)
    d = [t.to(DEV) for t in (packed, qmap, code, nmap, nabs, offset)]
    x0 = torch.randn(1, cols, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEV)

    def chain(x):  # each GEMV's input is written by the kernel just before it
        ys = []
        for k in range(6):
            x = (x * 1.25 + k).contiguous()
            ys.append(ext.nf4_gemv(x, d[0], d[1], None, d[2], d[3], d[4], float(offset), 64, 256, rows, cols))
            x = ys[-1][:, :cols].clone() * 0.01
        return ys

    eager = chain(x0)
    assert ext.last_nf4_gemv() == "pair-ring"
    stepped = []
    x = x0
    for k in range(6):  # one at a time: a synchronize between every kernel
        x = (x * 1.25 + k).contiguous()
        torch.cuda.synchronize()
        stepped.append(ext.nf4_gemv(x, d[0], d[1], None, d[2], d[3], d[4], float(offset), 64, 256, rows, cols))
        torch.cuda.synchronize()
        x = stepped[-1][:, :cols].clone() * 0.01
    for a, b in zip(eager, stepped):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(x0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed = chain(x0)
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(graphed, stepped):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_nf4_gemv_stream_k_policy_and_fallbacks(ext, monkeypatch):
    """The default policy (cuda/nf4_gemv.cu nf4_gemv_plan) for weights of >= 2^24 elements: on sm_90 the ring
    form (ring8s6r2w below 2^25 elements and at 1 token where tiles split evenly over two blocks per SM, else
    ring16s6rww or ring16s6r); before sm_90 one block per tile when the tiles fit
    in two per SM, stream-K for m >= 4 on >= 2^25 elements and any m on >= 2^28, else the generic core. Shapes
    the factored kernels do not cover (cols % 128, blocksize 32), smaller weights and LOWBITPACK_NF4_SK=off
    take the generic kernel."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ring = torch.cuda.get_device_capability()[0] >= 9
    cases = [(40, 1000, 64, "on", 2, "generic"), (40, 4096, 32, "on", 2, "generic"), (300, 4096, 64, "off", 2, "generic"),
             (300, 4096, 64, "", 2, "generic"), (8192, 4096, 64, "", 4, "pair-ring" if ring else "stream-k"),
             (16384, 16384, 64, "", 1, "pair-ring" if ring else "stream-k"),
             (16 * sms, 8192, 64, "", 1, "pair-ring" if ring else "pair-tile"),
             (16 * sms, 16384, 64, "", 4, "pair-ring" if ring else "pair-tile"),
             (16 * (2 * sms + 1), 8192, 64, "", 3, "pair-ring" if ring else "generic")]
    for rows, cols, bs, env, m, path in cases:
        monkeypatch.setenv("LOWBITPACK_NF4_SK", env)
        packed, qmap, code, nmap, nabs, offset = make_nf4(rows, cols, bs, seed=5)
        d = [t.to(DEV) for t in (packed, qmap, code, nmap, nabs, offset)]
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        y = ext.nf4_gemv(x.to(DEV), d[0], d[1], None, d[2], d[3], d[4], float(offset), bs, 256, rows, cols)
        assert ext.last_nf4_gemv() == path, (rows, cols, env, m)
        if path != "generic":
            continue  # checked in test_nf4_gemv_stream_k
        check_product(y, x, nf4_gemv_weights(packed, qmap, code, nmap, nabs, offset, bs, rows, cols, torch.bfloat16,
                                              "generic"))


def test_nf4_matches_bitsandbytes(ext):
    bnb = pytest.importorskip("bitsandbytes")
    F = bnb.functional
    for rows, cols in [(96, 256), (4096, 4096), (33, 1000)]:
        w = torch.randn(rows, cols, device=DEV, dtype=torch.bfloat16)
        packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ref = F.dequantize_4bit(packed, qs)
        out = ext.nf4_dequant(packed.reshape(-1), qs.code, None, qs.absmax, qs.state2.code, qs.state2.absmax,
                              float(qs.offset), qs.blocksize, qs.state2.blocksize, rows, cols,
                              torch.bfloat16)
        assert bits_equal(out, ref), f"differs from bitsandbytes at {(rows, cols)}"


# ------------------------------------------------------------------ nf4-bnb-v1 (through the layout)

def make_nf4_qt(shape, blocksize=64, double_quant=True, seed=0) -> QuantizedTensor:
    from lowbitpack.layouts.nf4 import LAYOUT as NF4, dynamic_map
    n = math.prod(shape)
    packed, qmap, code, _, nabs, offset = make_nf4(1, n, blocksize, seed=seed)
    tensors = {"qweight": packed, "quant_map": qmap}
    params = {"quant_type": "nf4", "blocksize": blocksize, "double_quant": double_quant}
    if double_quant:
        tensors.update(absmax=code, nested_absmax=nabs, nested_quant_map=dynamic_map())
        params.update(nested_blocksize=256, offset=float(offset))
    else:
        tensors["absmax"] = torch.rand(code.numel(), generator=torch.Generator().manual_seed(seed)) + 0.01
    return QuantizedTensor(scheme="nf4", layout=NF4, bits=4, group_size=blocksize, shape=tuple(shape),
                           dtype=torch.bfloat16, tensors=tensors, params=params)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_layout_dequant_bit_exact(ext, dtype, double_quant):
    for i, shape in enumerate([(1, 1), (3, 5), (7, 33), (129, 4096), (3, 1000), (5, 6, 7), (11,)]):
        qt = make_nf4_qt(shape, double_quant=double_quant, seed=i)
        ref = dispatch.reference(qt.layout)(qt, dtype)
        out = dispatch.dequantize(to_dev(qt), dtype)
        assert dispatch.last_path()[qt.layout] == "cuda"
        assert bits_equal(out, ref), f"mismatch at {shape}"


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=str)
def test_nf4_layout_lowbit_matmul(ext, xdtype):
    for i, shape in enumerate([(3, 5), (33, 96), (300, 4096), (17, 1000)]):
        qt = make_nf4_qt(shape, seed=10 + i)
        for m in (1, 8):
            x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(i)).to(xdtype)
            y = lowbit_matmul(x.to(DEV), to_dev(qt))
            assert last_gemv_path()[qt.layout] == "cuda-fused"
            check_gemv(y, x, qt)


# ------------------------------------------------------------------ lowra-v1

def make_lowra(rows: int, cols: int, seed: int = 0, widths=(1, 2, 4)) -> QuantizedTensor:
    from lowbitpack.layouts.lowra import LAYOUT as LOWRA, pack_lowra
    g = torch.Generator().manual_seed(seed)
    choice = torch.tensor(widths)[torch.randint(0, len(widths), (rows,), generator=g)]
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    for r in range(rows):
        codes[r] = torch.randint(0, 1 << int(choice[r]), (cols,), generator=g)
    books = {}
    for b in (1, 2, 4):
        n_b = int((choice == b).sum())
        # codebook values across binades, fp16
        books[b] = (torch.randn(n_b, 1 << b, generator=g) * 2.0 ** torch.randint(-6, 3, (n_b, 1), generator=g)).half()
    tensors = pack_lowra(choice.to(torch.uint8), codes, books)
    return QuantizedTensor(scheme="lowra", layout=LOWRA, bits=float(choice.float().mean()), group_size=None,
                           shape=(rows, cols), dtype=torch.bfloat16, tensors=tensors)


# 130 x 4096 and 300 x 1000: several blocks per width class in the fast path (cols % 8 == 0), partial last ones.
LOWRA_SHAPES = [(1, 1), (3, 7), (17, 100), (40, 128), (33, 257), (130, 4096), (9, 1000), (300, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowra_dequant_bit_exact(ext, dtype):
    for i, (rows, cols) in enumerate(LOWRA_SHAPES):
        for widths in ((1, 2, 4), (4,), (1,), (2, 4)):
            qt = make_lowra(rows, cols, seed=i, widths=widths)
            ref = dispatch.reference(qt.layout)(qt, dtype)
            out = dispatch.dequantize(to_dev(qt), dtype)
            assert dispatch.last_path()[qt.layout] == "cuda"
            assert bits_equal(out, ref), f"mismatch at {(rows, cols)} widths {widths}"


def test_lowra_dequant_unaligned_storage(ext):
    """Codes and codebooks that start one element off their vector alignment (1 byte for codes, 2 for fp16
    codebooks) take the general kernel, with the same bits."""
    qt = make_lowra(50, 256, seed=3)
    dq = to_dev(qt)
    for name in ("codes2", "codes4", "codebook1", "codebook2"):
        v = dq.tensors[name]
        shifted = torch.empty(v.numel() + 1, dtype=v.dtype, device=DEV)[1:].view(v.shape)
        shifted.copy_(v)
        dq.tensors[name] = shifted
    assert dq.tensors["codes4"].data_ptr() % 4 != 0 and dq.tensors["codebook2"].data_ptr() % 8 != 0
    for dtype in DTYPES:
        assert bits_equal(dispatch.dequantize(dq, dtype), dispatch.reference(qt.layout)(qt, dtype))


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=str)
def test_lowra_lowbit_matmul(ext, xdtype):
    for i, (rows, cols) in enumerate(LOWRA_SHAPES + [(300, 4096), (64, 14336)]):
        qt = make_lowra(rows, cols, seed=20 + i)
        dq = to_dev(qt)
        for m in (1, 5, 8):
            x = torch.randn(m, cols, generator=torch.Generator().manual_seed(i)).to(xdtype)
            y = lowbit_matmul(x.to(DEV), dq)
            assert last_gemv_path()[qt.layout] == "cuda-fused"
            check_gemv(y, x, qt)


# ------------------------------------------------------------------ GEMV split-K variants

@pytest.mark.parametrize("warps", ["4", "8"])
def test_gemv_warp_variants(ext, warps, monkeypatch):
    """Every warps-per-block choice (LOWBITPACK_GEMV_WARPS forces it) gives the same function, for each layout,
    on shapes with a tail (cols % 128 != 0) and fewer iterations than warps."""
    monkeypatch.setenv("LOWBITPACK_GEMV_WARPS", warps)
    for i, (rows, cols) in enumerate([(40, 4096), (33, 1000), (17, 96), (300, 2176)]):
        x = torch.randn(3, cols, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
        for bits in (2, 3, 4, 8):
            qt = make_intg(rows, cols, bits, 32 if cols % 32 == 0 else 8, seed=200 + i, zero_max=1 << bits,
                           scale_exp=(-10, -5))
            check_gemv(cuda_ext.gemv_intg(x.to(DEV), to_dev(qt)), x, qt)
        qt = make_nf4_qt((rows, cols), seed=300 + i)
        check_gemv(lowbit_matmul(x.to(DEV), to_dev(qt)), x, qt)
        assert last_gemv_path()[qt.layout] == "cuda-fused"
        qt = make_lowra(rows, cols, seed=400 + i)
        check_gemv(lowbit_matmul(x.to(DEV), to_dev(qt)), x, qt)
        assert last_gemv_path()[qt.layout] == "cuda-fused"
