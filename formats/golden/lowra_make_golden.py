"""Regenerate formats/golden/lowra_golden.safetensors (frozen for layout lowra-v1; only for a new layout).

    .venv/bin/python formats/golden/lowra_make_golden.py

Cases (each `<case>.<key>`): the stored tensors of layout lowra-v1 (`row_bits`, `codes1/2/4`, `codebook1/2/4`) and
`dequant` (float32), the weight decoded by `spec_decode` below — written from formats/artifact-v1.md bit by bit,
independent of lowbitpack.layouts. The script refuses to write unless lowbitpack's reference decoder agrees.
`mixed_7x33` is a real LowRA quantization (scheme lowra, weighted fits, per-tensor allocation) of a seeded
heavy-tailed weight; the others are hand-made edge cases (one width only, empty classes, a 1x1 weight).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "lowra_golden.safetensors"


def spec_decode(stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    out_f, in_f = shape
    row_bits = stored["row_bits"].tolist()
    w = torch.empty(out_f, in_f)
    for b in (1, 2, 4):
        rows = [r for r in range(out_f) if row_bits[r] == b]       # ascending original row order
        codes, book = stored[f"codes{b}"].tolist(), stored[f"codebook{b}"].float()
        for i, r in enumerate(rows):
            for j in range(in_f):
                q = (codes[i][(j * b) // 8] >> ((j * b) % 8)) & ((1 << b) - 1)
                w[r, j] = book[i, q]
    return w


def golden_cases() -> dict[str, tuple[dict[str, torch.Tensor], tuple[int, int]]]:
    from lowbitpack.layouts.lowra import pack_lowra
    from lowbitpack.schemes.lowra import LowRA

    g = torch.Generator().manual_seed(20261124)
    z = torch.randn(7, 33, generator=g)
    chi = torch.randn(7, 33, 3, generator=g).pow(2).sum(-1) / 3
    weight = (z / chi.sqrt() * 0.05).to(torch.bfloat16)
    h = torch.rand(33, generator=g) * 3 + 0.1
    mixed = LowRA(8.0).quantize(weight, act_stats=h)         # 33 inputs: codebooks are costly; 1-4 bits mix
    cases = {"mixed_7x33": (mixed.tensors, (7, 33))}

    def hand(row_bits, in_f):
        row_bits = torch.tensor(row_bits)
        codes = torch.zeros(len(row_bits), in_f, dtype=torch.int64)
        books = {}
        for b in (1, 2, 4):
            rows = (row_bits == b).nonzero().flatten()
            codes[rows] = torch.randint(0, 1 << b, (len(rows), in_f), generator=g)
            books[b] = torch.sort(torch.randn(len(rows), 1 << b, generator=g), dim=1)[0].to(torch.float16)
        return pack_lowra(row_bits, codes, books), (len(row_bits), in_f)

    cases["all4_3x5"] = hand([4, 4, 4], 5)
    cases["no2_4x9"] = hand([1, 4, 1, 4], 9)
    cases["one_1x1"] = hand([1], 1)
    return cases


def main() -> None:
    from lowbitpack.layouts.lowra import dequantize_lowra

    out: dict[str, torch.Tensor] = {}
    for name, (stored, shape) in golden_cases().items():
        expect = spec_decode(stored, shape)
        if not torch.equal(dequantize_lowra(stored, shape, torch.float32), expect):
            raise SystemExit(f"{name}: lowbitpack's decoder disagrees with the spec decoder; not writing")
        out.update({f"{name}.{k}": v.contiguous() for k, v in stored.items()})
        out[f"{name}.dequant"] = expect
    if len(set(out["mixed_7x33.row_bits"].tolist())) < 2:
        raise SystemExit("mixed case did not mix widths; not writing")
    save_file(out, str(GOLDEN), metadata={"layout": "lowra-v1"})
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
