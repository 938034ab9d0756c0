"""LowRA as the training base of the PLR study (examples/plr_smollm2.py, unchanged): QLoRA on a LowRA 2.0-bit
base, then Post-LoRA Restoration to 16/8/4/3 bits.

    python bench/lowra_plr.py [--steps 100] [--work DIR] [--out bench/results/lowra_plr]

Runs examples/plr_smollm2.py with `--bases lowra` (api.quantize(..., "lowra"): budget 2.0 bits, default
calibration 128 x 512 tokens of the Psalms split); every other option is passed through.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("plr_smollm2", ROOT / "examples" / "plr_smollm2.py")
plr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plr)
plr.BITS.setdefault("lowra", 2)  # the LowRA base is 2.0 bits (api default budget): PLR restores j > 2

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--bases" not in args:
        args = ["--bases", "lowra"] + args
    if "--out" not in args:
        args += ["--out", str(ROOT / "bench" / "results" / "lowra_plr")]
    sys.argv = [sys.argv[0]] + args
    plr.main()
