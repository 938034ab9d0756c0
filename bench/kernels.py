"""Kernel benchmark: lowbitpack CUDA kernels vs bitsandbytes and cuBLAS, side by side in one process.

    python bench/kernels.py --out bench/results/kernels-<gpu>.json

Measures, on weights [out, in] for the shapes below:
  * device-to-device copy bandwidth (bytes read + written), the ceiling for dequantization;
  * NF4 dequantize to bf16: ours vs bitsandbytes.functional.dequantize_4bit (checked bit-identical);
  * 1-token (and 8-token) GEMV y = x @ W^T in bf16: ours fused NF4 / INT4 / INT3 / INT2 (g128) vs
    bitsandbytes.matmul_4bit (NF4) vs cuBLAS bf16 (torch.matmul on the dense weight);
  * intg dequantize to bf16.
Timing: CUDA events around a batch of calls, median over repetitions, after warm-up; each call reads a
different copy of the weight (rotating through enough copies to exceed L2), so L2 hits do not flatter
small shapes. Each op is timed replaying a CUDA graph of the batch ("graph", kernel time without Python
launch overhead) and eagerly ("eager", what a Python decode loop pays).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbitpack.kernels import cuda_ext  # noqa: E402
from lowbitpack.layouts.intg import pack_intg  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (32768, 16384)]  # (out, in)
GROUP = 128


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_op(fn: Callable[[int], object], n_copies: int, inner: int, reps: int) -> dict[str, float]:
    """Median µs per call, graph replay and eager. fn(i) runs the op on weight copy i % n_copies."""
    res: dict[str, float] = {}
    for _ in range(3):
        for i in range(n_copies):
            fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    # eager
    ts = []
    for r in range(reps):
        start.record()
        for i in range(inner):
            fn(i)
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) * 1e3 / inner)
    res["eager_us"] = statistics.median(ts)

    # graph
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(min(inner, n_copies)):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(inner):
                fn(i)
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for r in range(reps):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end) * 1e3 / inner)
        res["graph_us"] = statistics.median(ts)
        res["graph_spread"] = (max(ts) - min(ts)) / res["graph_us"]
        del g
    except Exception as e:  # some libraries cannot be captured
        res["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    return res


def nf4_variant_env(variant: str) -> dict[str, str]:
    """VARIANT[/key=value...] -> LOWBITPACK_NF4_SK=VARIANT, LOWBITPACK_NF4_SK_<KEY>=value (cuda/nf4_gemv.cu:
    e.g. w16g4pf2/xsmem=0, w16g4pf2/mode=1, tile8, on, off)."""
    name, *opts = variant.split("/")
    env = {"LOWBITPACK_NF4_SK": name}
    env.update({f"LOWBITPACK_NF4_SK_{k.upper()}": val for k, _, val in (o.partition("=") for o in opts)})
    return env


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, math.ceil(4 * l2 / max(nbytes, 1)))


def copy_bandwidth(reps: int) -> dict[str, float]:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    t = time_op(lambda i: b.copy_(a), 1, 10, reps)
    t["gbps_graph"] = 2 * n / (t["graph_us"] * 1e-6) / 1e9
    t["gbps_eager"] = 2 * n / (t["eager_us"] * 1e-6) / 1e9
    del a, b
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--shapes", default="", help="e.g. 4096x4096,14336x4096 (default: the four standard ones)")
    ap.add_argument("--ms", default="1,8", help="GEMV batch sizes (rows of x)")
    ap.add_argument("--warps", default="", help="also time our GEMVs with LOWBITPACK_GEMV_WARPS forced to each of "
                                                 "these (e.g. 4,8,16); methods get a -w<N> suffix")
    ap.add_argument("--nf4-variants", default="", help="also time the NF4 GEMV with LOWBITPACK_NF4_SK set to each "
                    "VARIANT[/key=value...] (e.g. w24g4pf1,w16g4pf2/xsmem=0,off; off = the generic kernel)")
    ap.add_argument("--no-dequant", action="store_true", help="skip the dequantization timings")
    ap.add_argument("--no-baselines", action="store_true", help="skip cuBLAS and bitsandbytes GEMV timings")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    warps_variants = [""] + [w for w in args.warps.split(",") if w]
    nf4_variants = [v for v in args.nf4_variants.split(",") if v]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES

    ext = cuda_ext.load()
    if ext is None:
        raise SystemExit(f"CUDA extension unavailable: {cuda_ext.status()['reason']}")
    try:
        import bitsandbytes as bnb
        F = bnb.functional
    except Exception as e:  # still useful without it
        bnb, F = None, None
        print(f"bitsandbytes unavailable: {e}")

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    gpu = torch.cuda.get_device_name(0)
    report: dict = {
        "gpu": gpu, "gpu_slug": slug(gpu), "sm_count": props.multi_processor_count, "l2_bytes": l2,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "bitsandbytes": getattr(bnb, "__version__", None), "python": platform.python_version(),
        "command": " ".join(sys.argv), "gemv_warps_policy": "auto (cuda/gemv_core.cuh gemv_warps)", "reps": args.reps, "inner": args.inner, "group_size": GROUP,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [], "checks": [],
    }
    copy = copy_bandwidth(args.reps)
    report["copy"] = copy
    # The ceiling: the faster of the two copy measurements (a graph replays the copies as memcpy nodes,
    # which ran slower than eager launches on the H100 here).
    copy_gbps = max(copy["gbps_graph"], copy["gbps_eager"])
    report["copy_gbps_ceiling"] = copy_gbps
    print(f"{gpu}: device copy {copy_gbps:.0f} GB/s (graph), {copy['gbps_eager']:.0f} GB/s (eager)")

    rows_out = report["results"]

    def record(op, shape, method, t, nbytes, m=None, **extra):
        entry = {"op": op, "shape": list(shape), "method": method, "m": m, "bytes": nbytes, **t, **extra}
        if "graph_us" in t:
            entry["gbps"] = nbytes / (t["graph_us"] * 1e-6) / 1e9
            entry["frac_of_copy"] = entry["gbps"] / copy_gbps
        rows_out.append(entry)
        g_us = t.get("graph_us", float("nan"))
        print(f"{op:10s} {str(shape):16s} m={m if m else '-':<2} {method:22s} graph {g_us:9.2f} us "
              f"eager {t['eager_us']:9.2f} us  {entry.get('gbps', float('nan')):7.0f} GB/s", flush=True)
        return entry

    gen = torch.Generator(device="cuda").manual_seed(0)
    for (out_f, in_f) in shapes:
        shape = (out_f, in_f)
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen)
        dense_bytes = w.numel() * 2
        # A captured graph keeps every call's output alive: bound the dequant batch to ~4 GB of outputs.
        deq_inner = max(3, min(args.inner, int(4e9 // dense_bytes)))

        # ---------------- NF4 via bitsandbytes' own quantizer (our layout stores its bytes verbatim)
        nf4_copies = []
        if F is not None:
            packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            nf4_bytes = packed.numel() + qs.absmax.numel() + qs.state2.absmax.numel() * 4
            n_c = copies_for(nf4_bytes, l2)
            for _ in range(n_c):
                p2 = packed.clone()
                qs2 = F.QuantState(absmax=qs.absmax.clone(), shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                                   quant_type=qs.quant_type, dtype=qs.dtype, offset=qs.offset, state2=qs.state2)
                nf4_copies.append((p2, qs2))
            off = float(qs.offset)

            def ours_nf4_args(i):
                p2, q2 = nf4_copies[i % n_c]
                return (p2.reshape(-1), q2.code, None, q2.absmax, q2.state2.code, q2.state2.absmax, off,
                        q2.blocksize, q2.state2.blocksize, out_f, in_f)

            # correctness: ours vs bitsandbytes, bit for bit
            ref = F.dequantize_4bit(packed, qs)
            mine = ext.nf4_dequant(*ours_nf4_args(0), torch.bfloat16)
            same = bool(torch.equal(ref.view(torch.int16), mine.view(torch.int16)))
            report["checks"].append({"check": "nf4 dequant == bitsandbytes", "shape": list(shape), "ok": same})
            print(f"nf4 dequant bit-identical to bitsandbytes at {shape}: {same}")
            del ref, mine
            out_bytes = nf4_bytes + dense_bytes
            if not args.no_dequant:
                t = time_op(lambda i: ext.nf4_dequant(*ours_nf4_args(i), torch.bfloat16), n_c, deq_inner, args.reps)
                record("dequant", shape, "ours-nf4", t, out_bytes)
                t = time_op(lambda i: F.dequantize_4bit(*nf4_copies[i % n_c]), n_c, deq_inner, args.reps)
                record("dequant", shape, "bnb-nf4", t, out_bytes)

        # ---------------- intg (RTN-like random codes, fp16 scales, uint8 zeros, g128)
        intg = {}
        for bits in (4, 3, 2):
            n_groups = math.ceil(in_f / GROUP)
            codes = torch.randint(0, 1 << bits, (out_f, in_f), device="cuda", dtype=torch.uint8, generator=gen)
            qweight = pack_intg(codes, bits)
            del codes
            scale = (torch.rand(out_f, n_groups, device="cuda", generator=gen) * 0.01 + 1e-3).half()
            zero = torch.randint(0, 1 << bits, (out_f, n_groups), device="cuda", dtype=torch.uint8, generator=gen)
            nbytes = qweight.numel() + scale.numel() * 2 + zero.numel()
            n_c = copies_for(nbytes, l2)
            intg[bits] = ([(qweight.clone(), scale.clone(), zero.clone()) for _ in range(n_c)], nbytes)
            del qweight, scale, zero
            cp, _ = intg[bits]

            def deq(i, cp=cp, bits=bits, n_c=n_c):
                q, s, z = cp[i % n_c]
                return ext.intg_dequant(q, s, z, None, None, out_f, in_f, bits, GROUP, torch.bfloat16)
            if not args.no_dequant:
                t = time_op(deq, n_c, deq_inner, args.reps)
                record("dequant", shape, f"ours-int{bits}", t, nbytes + dense_bytes)

        # ---------------- LowRA: rows of width 1, 2, 4 in equal shares (about 2.3 bits a weight), fp16 codebooks
        row_bits = torch.tensor([1, 2, 4], device="cuda", dtype=torch.uint8)[
            torch.randint(0, 3, (out_f,), device="cuda", generator=gen)]
        counts = [int((row_bits == b).sum()) for b in (1, 2, 4)]
        lowra_codes = [pack_intg(torch.randint(0, 1 << b, (n, in_f), device="cuda", dtype=torch.uint8, generator=gen), b)
                       for b, n in zip((1, 2, 4), counts)]
        lowra_books = [torch.randn(n, 1 << b, device="cuda", generator=gen).half() for b, n in zip((1, 2, 4), counts)]
        lowra_maps = [torch.nonzero(row_bits == b).flatten().to(torch.int32) for b in (1, 2, 4)]
        lowra_bytes = sum(c.numel() for c in lowra_codes) + sum(c.numel() * 2 for c in lowra_books) + out_f
        n_lc = copies_for(lowra_bytes, l2)
        lowra = [([c.clone() for c in lowra_codes], lowra_books, lowra_maps) for _ in range(n_lc)]
        if not args.no_dequant:
            t = time_op(lambda i: ext.lowra_dequant(*lowra[i % n_lc], out_f, in_f, torch.bfloat16), n_lc, deq_inner,
                        args.reps)
            record("dequant", shape, "ours-lowra", t, lowra_bytes + dense_bytes)

        # ---------------- GEMV
        n_dense = copies_for(dense_bytes, l2)
        dense = [w] + [w.clone() for _ in range(n_dense - 1)]
        for m, wv in [(m, wv) for m in ms for wv in warps_variants]:
            if wv:
                os.environ["LOWBITPACK_GEMV_WARPS"] = wv
            else:
                os.environ.pop("LOWBITPACK_GEMV_WARPS", None)
            sfx = f"-w{wv}" if wv else ""
            x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16, generator=gen)
            res = {}
            if not args.no_baselines and not wv:
                t = time_op(lambda i: torch.matmul(x, dense[i % n_dense].t()), n_dense, args.inner, args.reps)
                res["cublas"] = record("gemv", shape, "cublas-bf16", t, dense_bytes + x.numel() * 2, m)
            if F is not None:
                n_c = len(nf4_copies)
                if not args.no_baselines and not wv:
                    t = time_op(lambda i: bnb.matmul_4bit(x, nf4_copies[i % n_c][0].t(),
                                                          quant_state=nf4_copies[i % n_c][1]),
                                n_c, args.inner, args.reps)
                    res["bnb"] = record("gemv", shape, "bnb-nf4", t, nf4_bytes, m)
                t = time_op(lambda i: ext.nf4_gemv(x, *ours_nf4_args(i)), n_c, args.inner, args.reps)
                res["ours_nf4"] = record("gemv", shape, "ours-nf4" + sfx, t, nf4_bytes, m,
                                         kernel=ext.last_nf4_gemv())
                for v in ([] if wv else nf4_variants):
                    env = nf4_variant_env(v)
                    os.environ.update(env)
                    t = time_op(lambda i: ext.nf4_gemv(x, *ours_nf4_args(i)), n_c, args.inner, args.reps)
                    res[f"ours_nf4_{v}"] = record("gemv", shape, f"ours-nf4-{v}", t, nf4_bytes, m,
                                                  kernel=ext.last_nf4_gemv())
                    for k in env:
                        os.environ.pop(k)
                # accuracy against float64 products: with bnb's bf16-dequantized W (what dequantize + matmul
                # computes) and with the exact fp32 weights quant_map[q] * absmax
                wd = F.dequantize_4bit(*nf4_copies[0])
                w32 = ext.nf4_dequant(*ours_nf4_args(0), torch.float32)
                y_ours = ext.nf4_gemv(x, *ours_nf4_args(0)).double()
                y_bnb = bnb.matmul_4bit(x, nf4_copies[0][0].t(), quant_state=nf4_copies[0][1]).double()
                y_dense = torch.matmul(x, wd.t()).double()
                check = {"check": "gemv rel err vs fp64", "shape": list(shape), "m": m, "warps": wv or "auto"}
                for wname, wref in (("bf16_W", wd), ("fp32_W", w32)):
                    yref = x.double() @ wref.double().t()
                    for name, yv in (("ours_nf4", y_ours), ("bnb_nf4", y_bnb), ("dense_bf16", y_dense)):
                        check[f"{name}_vs_{wname}"] = float((yv - yref).norm() / yref.norm())
                report["checks"].append(check)
                del wd, w32
            for bits in (4, 3, 2):
                cp, nbytes = intg[bits]
                n_c = len(cp)

                def gv(i, cp=cp, bits=bits, n_c=n_c, x=x):
                    q, s, z = cp[i % n_c]
                    return ext.intg_gemv(x, q, s, z, None, None, out_f, in_f, bits, GROUP)
                t = time_op(gv, n_c, args.inner, args.reps)
                res[f"int{bits}"] = record("gemv", shape, f"ours-int{bits}" + sfx, t, nbytes, m)
            t = time_op(lambda i: ext.lowra_gemv(x, *lowra[i % n_lc], out_f, in_f), n_lc, args.inner, args.reps)
            res["lowra"] = record("gemv", shape, "ours-lowra" + sfx, t, lowra_bytes, m)
            cub = res["cublas"].get("graph_us") if "cublas" in res else None
            for k, v in res.items():
                if k != "cublas" and cub and v.get("graph_us"):
                    v["speedup_vs_cublas"] = cub / v["graph_us"]
            if "bnb" in res and res["bnb"].get("graph_us") and res["ours_nf4"].get("graph_us"):
                res["ours_nf4"]["speedup_vs_bnb"] = res["bnb"]["graph_us"] / res["ours_nf4"]["graph_us"]
        os.environ.pop("LOWBITPACK_GEMV_WARPS", None)
        del dense, nf4_copies, intg, w, lowra
        torch.cuda.empty_cache()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))

    # summary table (the device reply carries the tail of the output)
    print(f"\n== {gpu}, copy {copy_gbps:.0f} GB/s; graph-replay µs per call (eager in parentheses)")
    for e in rows_out:
        extra = ""
        if "frac_of_copy" in e and e["op"] == "dequant":
            extra = f" {100 * e['frac_of_copy']:.0f}% of copy"
        if "speedup_vs_cublas" in e:
            extra += f" x{e['speedup_vs_cublas']:.2f} vs cuBLAS"
        if "speedup_vs_bnb" in e:
            extra += f" x{e['speedup_vs_bnb']:.2f} vs bnb"
        print(f"{e['op']:7s} {e['shape'][0]:>5}x{e['shape'][1]:<5} m={e['m'] or '-':<2} {e['method']:12s} "
              f"{e.get('graph_us', float('nan')):8.2f} ({e['eager_us']:8.2f}){extra}")
    for c in report["checks"]:
        print(c)


if __name__ == "__main__":
    main()
