"""Realistic NF4 data for bench/gemv_exp.cu: a bf16 weight of standard normals quantized like bitsandbytes
(`lowbitpack.schemes.nf4`, blocksize 64, double quant with nested blocksize 256), written as raw files that
`GEMV_EXP_DATA=DIR build/gemv_exp/gemv_exp ROWS COLS ...` loads instead of its random codes (bench/kernels.py times
the same kind of weight).

    python bench/gemv_exp_data.py 14336 4096 build/gemv_data/14336x4096
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbitpack.schemes.nf4 import NF4  # noqa: E402


def main() -> None:
    rows, cols, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    qt = NF4(blocksize=64, nested_blocksize=256, double_quant=True).quantize(w)
    out.mkdir(parents=True, exist_ok=True)
    t = qt.tensors
    files = {"packed.bin": t["qweight"].to(torch.uint8), "code.bin": t["absmax"].to(torch.uint8),
             "nabs.bin": t["nested_absmax"].float(), "nmap.bin": t["nested_quant_map"].float(),
             "qm.bin": t["quant_map"].float()}
    for name, x in files.items():
        (out / name).write_bytes(x.contiguous().numpy().tobytes())
    (out / "offset.txt").write_text(repr(qt.params["offset"]))
    print(f"wrote {out}: " + ", ".join(f"{k} {v.numel()}" for k, v in files.items()))


if __name__ == "__main__":
    main()
