"""Regenerate the golden bundle (only when a NEW bundle format version is introduced; v1 is frozen).

    python formats/golden/make_golden_bundle.py

A LoRA adapter (r=2, alpha=4, deterministic weights) on the two linear weights of the golden source, bundled
against `artifact-v1-int4`. Machine-dependent fields (dates, absolute paths) are replaced by fixed values.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "bundle-v1-lora"
MODULES = {"model.layers.0.self_attn.q_proj": (5, 33), "model.layers.0.mlp.up_proj": (7, 45)}
R, ALPHA = 2, 4


def golden_adapter(path: Path) -> Path:
    tensors = {}
    for i, (module, (out_f, in_f)) in enumerate(MODULES.items()):
        a = (torch.arange(R * in_f, dtype=torch.float32).reshape(R, in_f) % 7 - 3) / 50 + i / 100
        b = (torch.arange(out_f * R, dtype=torch.float32).reshape(out_f, R) % 5 - 2) / 20
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "lowbitpack/golden",
              "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "target_modules": ["q_proj", "up_proj"],
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "init_lora_weights": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def main() -> None:
    import lowbitpack
    with tempfile.TemporaryDirectory() as tmp:
        adapter = golden_adapter(Path(tmp) / "adapter")
        if OUT.exists():
            shutil.rmtree(OUT)
        lowbitpack.api.bundle(adapter, HERE / "artifact-v1-int4", OUT)
    mpath = OUT / "lowbitpack_bundle.json"
    m = json.loads(mpath.read_text())
    m["created_utc"] = "2026-11-24T00:00:00Z"
    m["adapter"]["source_path"] = "golden-adapter"
    m["base"]["artifact"]["path"] = "formats/golden/artifact-v1-int4"
    m["base"]["source_path"] = "formats/golden/source"
    mpath.write_text(json.dumps(m, indent=1) + "\n")


if __name__ == "__main__":
    main()
