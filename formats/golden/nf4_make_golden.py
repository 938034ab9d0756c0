"""Regenerate formats/golden/nf4_golden.safetensors (frozen for layout nf4-bnb-v1; only for a new layout).

    .venv/bin/python formats/golden/nf4_make_golden.py

The expected bytes come from bitsandbytes itself (quantize_4bit(..., compress_statistics=True, quant_type="nf4")
and dequantize_4bit on CPU); the script refuses to write unless lowbitpack's NF4 gives the same bytes.
Cases (each `<case>.<key>`): `input`, `qweight` (flat packed bytes), `absmax` (uint8 codes), `nested_absmax`,
`quant_map`, `nested_quant_map`, `offset` (0-dim f32), `dequant` (f32, bitsandbytes' dequantize_4bit).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "nf4_golden.safetensors"
BLOCKSIZE = 64


def golden_inputs() -> dict[str, torch.Tensor]:
    """Awkward shapes (odd numel, partial 64- and 256-blocks, < 1 block), zero blocks and exact midpoint ties."""
    g = torch.Generator().manual_seed(20261124)
    big = torch.randn(129, 131, generator=g) * 0.03          # 16899 elements: 265 blocks, 2 nested blocks
    big.view(-1)[64 * 3: 64 * 4] = 0.0                        # an all-zero block
    big.view(-1)[-3:] = 0.0                                   # a partial last block
    code = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
    mid = (code[:-1] + code[1:]) / 2
    ties = torch.cat([torch.tensor([1.0]), mid, torch.nextafter(mid, torch.full_like(mid, 2.0)),
                      torch.nextafter(mid, torch.full_like(mid, -2.0))])
    small = torch.zeros(65)
    small[: ties.numel()] = ties                              # absmax 1.0: x * (1/absmax) = x exactly
    small[ties.numel(): 64] = torch.linspace(-0.9, 0.9, 64 - ties.numel())
    small[64] = -0.25                                         # the one-element remainder block
    tiny = torch.randn(3, 7, generator=g)                     # 21 elements: less than one block, odd
    return {"bf16_129x131": big.to(torch.bfloat16), "f32_5x13": small.reshape(5, 13),
            "f16_3x7": tiny.to(torch.float16)}


def main() -> None:
    import bitsandbytes.functional as F

    from lowbitpack.schemes.nf4 import NF4

    out: dict[str, torch.Tensor] = {}
    for case, w in golden_inputs().items():
        packed, st = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        qt = NF4(BLOCKSIZE).quantize(w)
        expected = {"qweight": packed.reshape(-1), "absmax": st.absmax, "nested_absmax": st.state2.absmax,
                    "quant_map": st.code, "nested_quant_map": st.state2.code,
                    "offset": st.offset.reshape(()).float()}
        for key, t in expected.items():
            ours = torch.tensor(qt.params["offset"], dtype=torch.float32) if key == "offset" else qt.tensors[key]
            if not torch.equal(ours, t):
                raise SystemExit(f"{case}.{key}: lowbitpack differs from bitsandbytes; not writing goldens")
        out.update({f"{case}.{k}": v.contiguous() for k, v in expected.items()})
        out[f"{case}.input"] = w.contiguous()
        out[f"{case}.dequant"] = F.dequantize_4bit(packed, st).float().contiguous()
    save_file(out, str(GOLDEN), metadata={"format": "pt", "layout": "nf4-bnb-v1", "blocksize": str(BLOCKSIZE)})
    print(f"wrote {GOLDEN} ({len(out)} tensors)")


if __name__ == "__main__":
    main()
