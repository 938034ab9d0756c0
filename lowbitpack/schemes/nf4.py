"""NF4 (QLoRA) with double quantization, byte-identical to bitsandbytes' CPU quantizer.

`bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=True, quant_type="nf4")` does, on CPU:
  1. (default torch backend) per block of `blocksize` flattened elements, in f32: absmax = max|x|;
     full blocks: s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1); the short last block uses x / absmax instead
     and stores the clamped absmax; code = bucketize(s, midpoints of the NF4 table) (a tie goes to the lower
     code); an odd element count is padded with 0.0; pairs are packed high nibble first.
  2. offset = absmax.mean(); (absmax - offset) is quantized in blocks of 256 by the native CPU library
     (`quantize_cpu_impl`, a 65536-entry lookup table over [-1, 1]) against the 8-bit dynamic map.
Both steps are reproduced here in plain torch (`quantize_4bit_reference`, `quantize_blockwise_dynamic`);
`quantize_4bit` is the fast path: it replaces the binary search by one table lookup on the high bits of
the f32 value, and settles the few elements whose table bucket straddles a midpoint with the exact search.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ..layouts.nf4 import (LAYOUT, NESTED_BLOCKSIZE, NF4_ZERO_CODE, dynamic_map, nf4_code, pack_nibbles)
from ..qtensor import QuantizedTensor
from .base import Scheme

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
_KEY_SHIFT = 12          # table key = f32 bits >> 12: 2**20 one-byte entries, ~0.1% of lookups ambiguous
_AMBIGUOUS = 255
# Elements per step of the fast path: big enough that torch's per-op thread start-up is amortised (on 2 cores
# 1M beat 256K by ~20%), small enough that the temporaries (~18 MB) do not grow with the tensor.
_CHUNK_ELEMENTS = 1 << 20


def nf4_midpoints(device: torch.device | str | None = None) -> torch.Tensor:
    """Decision boundaries between consecutive NF4 codes, computed in f32 as bitsandbytes does."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


def quantize_4bit_reference(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed NF4 codes uint8 [(n+1)//2] and f32 absmax [n_blocks]: bitsandbytes' default-backend arithmetic."""
    bounds = nf4_midpoints(weight.device)
    a = weight.reshape(-1).float()
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    blocks = a[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().max(dim=-1)[0] if full else a.new_zeros(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    codes = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return pack_nibbles(codes, NF4_ZERO_CODE), absmax


@functools.lru_cache(maxsize=8)
def _code_table(device: str) -> torch.Tensor:
    """uint8 [2**(32-shift)]: NF4 code of every f32 whose bits >> shift equal the (wrapped) index, or 255
    where the bucket holds a midpoint. Codes are monotone in the value and a bucket is an interval of
    values, so a bucket is unambiguous exactly when its two end values get the same code."""
    size = 1 << (32 - _KEY_SHIFT)
    keys = torch.arange(size, dtype=torch.int64)
    keys = torch.where(keys >= size // 2, keys - size, keys)  # torch.take wraps negative keys the same way
    lo_bits = (keys << _KEY_SHIFT).to(torch.int32)
    hi_bits = ((keys << _KEY_SHIFT) + ((1 << _KEY_SHIFT) - 1)).to(torch.int32)
    bounds = nf4_midpoints()
    lo = torch.bucketize(lo_bits.view(torch.float32), bounds)
    hi = torch.bucketize(hi_bits.view(torch.float32), bounds)
    table = torch.where(lo == hi, lo, torch.full_like(lo, _AMBIGUOUS)).to(torch.uint8)
    return table.to(device)


class _ChunkCoder:
    """Reusable buffers of the fast path; `run(b0, b1)` codes blocks [b0, b1)."""

    def __init__(self, blocks: torch.Tensor, absmax_out: torch.Tensor, packed_out: torch.Tensor, rows: int):
        device = blocks.device
        self.blocks, self.absmax_out, self.packed_out = blocks, absmax_out, packed_out
        self.bs = blocks.shape[1]
        self.table = _code_table(str(device))
        self.bounds = nf4_midpoints(device)
        self.byte_offsets = torch.arange(8, device=device)
        self.s_buf = torch.empty(rows, self.bs, dtype=torch.float32, device=device)
        self.k32_buf = torch.empty(rows * self.bs, dtype=torch.int32, device=device)
        self.k64_buf = torch.empty(rows * self.bs, dtype=torch.int64, device=device)

    def run(self, b0: int, b1: int) -> None:
        bs, m = self.bs, b1 - b0
        s = self.s_buf[:m]
        s.copy_(self.blocks[b0:b1])
        am = s.abs().amax(dim=1)
        self.absmax_out[b0:b1] = am
        s.mul_((1.0 / am.clamp(min=1e-38)).unsqueeze(1))  # same ops as bnb: reciprocal, then multiply
        # No clamp to [-1, 1]: rounding can push |s| past 1 by an ulp only, and codes 0 / 15 cover that.
        flat = s.view(-1)
        k32 = self.k32_buf[: m * bs]
        torch.bitwise_right_shift(flat.view(torch.int32), _KEY_SHIFT, out=k32)
        k64 = self.k64_buf[: m * bs]
        k64.copy_(k32)
        codes = torch.take(self.table, k64)
        if int(codes.max()) == _AMBIGUOUS:
            # Rare (~0.1%): find the flagged bytes 8 at a time (codes < 16 have a zero high nibble).
            words = (codes >> 4).view(torch.int64).nonzero().squeeze(1)
            pos = (words.unsqueeze(1) * 8 + self.byte_offsets).reshape(-1)
            pos = pos[codes[pos] == _AMBIGUOUS]
            codes[pos] = torch.bucketize(flat[pos], self.bounds).to(torch.uint8)
        pairs = codes.view(torch.int16)  # little-endian: the even element's code is the low byte
        self.packed_out[b0 * bs // 2: b1 * bs // 2].copy_((pairs << 4) | (pairs >> 8))  # int16 -> low byte


def _codes_full_blocks(blocks: torch.Tensor, absmax_out: torch.Tensor, packed_out: torch.Tensor) -> None:
    """Fast path for whole blocks [nb, B] (any float dtype): fills absmax_out [nb] and packed_out [nb*B/2],
    one chunk of `_CHUNK_ELEMENTS` at a time (bounded temporaries; torch spreads each op over its threads)."""
    nb, bs = blocks.shape
    step = max(1, _CHUNK_ELEMENTS // bs)
    coder = _ChunkCoder(blocks, absmax_out, packed_out, min(step, nb))
    for b0 in range(0, nb, step):
        coder.run(b0, min(nb, b0 + step))


def quantize_4bit(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `quantize_4bit_reference` (and bitsandbytes), several times faster."""
    a = weight.reshape(-1)
    if not a.dtype.is_floating_point:
        raise ValueError(f"NF4 needs a floating-point weight, got {a.dtype}")
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    nb_full = full // blocksize
    absmax = torch.empty(nb_full + (1 if rem else 0), dtype=torch.float32, device=a.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=a.device)
    if full:
        _codes_full_blocks(a[:full].view(nb_full, blocksize), absmax[:nb_full], packed[: full // 2])
    if rem:
        # The short last block divides instead of multiplying by the reciprocal, as bitsandbytes does.
        tail_packed, tail_absmax = quantize_4bit_reference(a[full:], blocksize)
        absmax[nb_full:] = tail_absmax
        packed[full // 2:] = tail_packed
    return packed, absmax


@functools.lru_cache(maxsize=4)
def _dynamic_lut(code_key: tuple[float, ...], device: str) -> torch.Tensor:
    """bitsandbytes' `build_quantize_lut`: index i in [0, 65535] -> code index nearest to -1 + 2i/65535."""
    code = torch.tensor(code_key, dtype=torch.float32)
    mid = (code[:-1] + code[1:]) * 0.5
    two_i = 2.0 * torch.arange(65536, dtype=torch.float32)
    val = two_i / torch.full_like(two_i, 65535.0) - 1.0  # true division, as in the C source
    return torch.searchsorted(mid, val).to(torch.uint8).to(device)  # number of midpoints below val


def quantize_blockwise_dynamic(a: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a flat f32 tensor exactly as bitsandbytes' native CPU library does it.

    Per block: absmax = max|a|; idx = trunc(fma((clamp(a * (1/absmax), -1, 1) + 1) * 0.5, 65535, 0.5)) & 0xFFFF;
    code = lut[idx]; a block with absmax 0 gets code 0. The fused multiply-add rounds once: computing it in
    f64 is exact here (a 24-bit by 16-bit product plus 0.5 fits in 53 bits whenever it can matter).
    """
    a = a.reshape(-1).float()
    n = a.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    blocks = torch.nn.functional.pad(a, (0, pad)).view(nb, blocksize)  # zero padding leaves max|a| as is
    absmax = blocks.abs().amax(dim=1).clamp_min(0.0)
    inv = 1.0 / absmax
    v = torch.clamp(blocks * inv.unsqueeze(1), -1.0, 1.0)
    half = (v + 1.0) * 0.5
    t = (half.double() * 65535.0 + 0.5).float()
    idx = t.to(torch.int32) & 0xFFFF
    lut = _dynamic_lut(tuple(code.float().cpu().tolist()), str(a.device))
    q = lut[idx.long()]
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].contiguous(), absmax


class NF4(Scheme):
    """`nf4`: QLoRA NormalFloat-4, blocks of `blocksize` along the flattened weight, absmax double-quantized."""

    name = "nf4"

    def __init__(self, blocksize: int = 64, nested_blocksize: int = NESTED_BLOCKSIZE, double_quant: bool = True):
        if blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"NF4 blocksize must be one of {VALID_BLOCKSIZES} (bitsandbytes' choices), got {blocksize}")
        if nested_blocksize < 1:
            raise ValueError(f"nested blocksize must be positive, got {nested_blocksize}")
        self.blocksize = blocksize
        self.nested_blocksize = nested_blocksize
        self.double_quant = double_quant

    def quantize(self, weight: torch.Tensor, **calib: Any) -> QuantizedTensor:
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"NF4 quantizes float32/float16/bfloat16 weights, got {weight.dtype}")
        if weight.numel() == 0:
            raise ValueError("NF4 cannot quantize an empty tensor")
        packed, absmax = quantize_4bit(weight.detach(), self.blocksize)
        tensors: dict[str, torch.Tensor] = {"qweight": packed}
        params: dict[str, Any] = {"quant_type": "nf4", "blocksize": self.blocksize, "double_quant": self.double_quant}
        if self.double_quant:
            offset = absmax.mean()  # the same op as bitsandbytes, so the same f32 rounding
            nested_map = dynamic_map().to(absmax.device)
            codes, nested_absmax = quantize_blockwise_dynamic(absmax - offset, nested_map, self.nested_blocksize)
            tensors.update({"absmax": codes, "nested_absmax": nested_absmax, "nested_quant_map": nested_map})
            params.update({"nested_blocksize": self.nested_blocksize, "offset": float(offset.item())})
        else:
            tensors["absmax"] = absmax
        tensors["quant_map"] = nf4_code(weight.device)
        return QuantizedTensor(scheme=self.name, layout=LAYOUT, bits=4, group_size=self.blocksize,
                               shape=tuple(weight.shape), dtype=weight.dtype, tensors=tensors, params=params)

    def config(self) -> dict[str, Any]:
        return {"scheme": self.name, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "nested_blocksize": self.nested_blocksize}
