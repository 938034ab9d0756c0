"""Regenerate the golden artifacts (only when a NEW format version is introduced; v1 goldens are frozen).

    python formats/golden/make_golden.py

Source: a deterministic tiny checkpoint (two linear weights with awkward shapes + a norm) so that the goldens
exercise groups that do not divide the input dim and rows whose bit stream ends mid-byte.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent


def golden_source(path: Path) -> Path:
    g = torch.Generator().manual_seed(1234)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": (torch.randn(7, 45, generator=g) * 0.05).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": (torch.randn(5, 33, generator=g) * 0.1).to(torch.float16),
        "model.norm.weight": torch.ones(45, dtype=torch.bfloat16),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "golden", "_name_or_path": "lowbitpack/golden"}))
    return path


def main() -> None:
    import lowbitpack
    src = golden_source(HERE / "source")
    for scheme, group in (("int4", 16), ("int3", 16), ("int2", 32), ("int8", 128)):
        out = HERE / f"artifact-v1-{scheme}"
        if out.exists():
            shutil.rmtree(out)
        lowbitpack.quantize(src, out, scheme, group_size=group, progress=False)
        m = json.loads((out / "lowbitpack.json").read_text())
        # Make the goldens independent of where and when they were generated.
        m["source"]["path"] = "formats/golden/source"
        m["created_utc"] = "2026-11-24T00:00:00Z"
        m.pop("timing", None)
        (out / "lowbitpack.json").write_text(json.dumps(m, indent=1))


if __name__ == "__main__":
    main()
