"""Run one NF4 GEMV configuration a few times, for Nsight Compute (`ncu`) to profile.

    ncu --kernel-name regex:gemv --launch-skip 3 --launch-count 1 --section WarpStateStats \
        python bench/profile_gemv.py --shape 14336x4096 --variant w16g4pf2/mode=2

VARIANT is LOWBITPACK_NF4_SK[/key=value...] as in bench/kernels.py --nf4-variants (cuda/nf4_gemv.cu: on,
off = the generic kernel, tile8, w16g4pf2, ...; /mode=1 or /mode=2 for the compute-only / loads-only builds).
Weights are random NF4 codes with double-quantized absmax (bitsandbytes' default layout, blocksize 64).
"""
from __future__ import annotations

import argparse
import os

import torch

from kernels import nf4_variant_env  # bench/kernels.py, beside this script
from lowbitpack.kernels import cuda_ext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="14336x4096")
    ap.add_argument("--variant", default="")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    if args.variant:
        os.environ.update(nf4_variant_env(args.variant))
    rows, cols = (int(v) for v in args.shape.split("x"))
    ext = cuda_ext.load()
    g = torch.Generator(device="cuda").manual_seed(0)
    n_blocks = rows * cols // 64
    packed = torch.randint(0, 256, (rows * cols // 2,), device="cuda", dtype=torch.uint8, generator=g)
    qmap = torch.linspace(-1, 1, 16, device="cuda")
    code = torch.randint(0, 256, (n_blocks,), device="cuda", dtype=torch.uint8, generator=g)
    nmap = torch.sort(torch.randn(256, device="cuda", generator=g))[0]
    nabs = torch.rand((n_blocks + 255) // 256, device="cuda", generator=g) * 0.05 + 0.01
    x = torch.randn(args.m, cols, device="cuda", generator=g).to(torch.bfloat16)
    for _ in range(args.calls):
        y = ext.nf4_gemv(x, packed, qmap, None, code, nmap, nabs, 0.01, 64, 256, rows, cols)
    torch.cuda.synchronize()
    print(args.shape, args.variant or "default", ext.last_nf4_gemv(), float(y.float().norm()))


if __name__ == "__main__":
    main()
