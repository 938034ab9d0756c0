"""Build transformers models from artifacts (dequantized dense weights) without writing a checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from .artifact import Artifact


def load_dequantized_model(artifact: str | Path | Artifact, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu"):
    """A transformers model whose weights are the artifact's dequantized tensors."""
    from transformers import AutoConfig

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    config = AutoConfig.from_pretrained(art.path)
    model = _skeleton(config, dtype)
    state = {name: t.to(dtype) for name, t in art.iter_dense(dtype)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _is_tied(model, m)]
    if missing or unexpected:
        raise ValueError(f"artifact does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(device).eval()


def _skeleton(config, dtype: torch.dtype):
    """Model from config without random initialisation (all weights are overwritten right after)."""
    from transformers import AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _is_tied(model, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)
