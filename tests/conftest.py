"""Shared fixtures: tiny synthetic HF checkpoints (fast) and the real default model (cached)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest_plugins = ["tests.reliability_plugin"]


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA tests run on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_tiny_llama(path: Path, hidden: int = 64, inter: int = 160, layers: int = 2, vocab: int = 256,
                    dtype: torch.dtype = torch.bfloat16, shards: int = 1, seed: int = 0) -> Path:
    """A real (random) LlamaForCausalLM checkpoint, small enough for unit tests, optionally sharded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        model.save_pretrained(path)
        return path
    cfg.dtype = dtype
    cfg.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny_llama(tmp_path / "tiny")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    pytest.importorskip("gguf")
    from lowbitpack.models import default_model_path
    try:
        return default_model_path()
    except Exception as e:  # package missing on this machine
        pytest.skip(f"default model unavailable: {e}")
