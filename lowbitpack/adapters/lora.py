"""Plain LoRA (PEFT `peft_type: LORA`): ΔW = B @ A · scaling, scaling = α / r (α / √r with rsLoRA).

Saved keys (PEFT strips the adapter name): `base_model.model.<module>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]. With `fan_in_fan_out` (GPT-2 style Conv1D) the base is stored [in, out] and ΔW is
transposed to match. Per-module rank and alpha follow `rank_pattern` / `alpha_pattern` exactly as PEFT
resolves them. Variants that change more than ΔW (DoRA, trained biases, modules_to_save, PiSSA/LoftQ
initialisations that rewrite the base) are refused with a message saying why.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .base import PREFIX, AdapterKind

_ROLES = {"lora_A.weight": "A", "lora_B.weight": "B"}
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for p in patterns or {}:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def rank_and_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    rk = pattern_key(config.get("rank_pattern") or {}, module)
    ak = pattern_key(config.get("alpha_pattern") or {}, module)
    r = int((config.get("rank_pattern") or {})[rk]) if rk else int(config.get("r", 8))
    alpha = float((config.get("alpha_pattern") or {})[ak]) if ak else float(config.get("lora_alpha", 8))
    return r, alpha


def lora_scaling(config: dict[str, Any], module: str) -> float:
    """α / r, or α / √r with `use_rslora` (PEFT's LoraLayer.update_layer)."""
    r, alpha = rank_and_alpha(config, module)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """(B @ A) · scaling in float32, transposed for fan_in_fan_out layers."""
    delta = (b.float() @ a.float()) * scaling
    return delta.t().contiguous() if fan_in_fan_out else delta


class LoraKind(AdapterKind):
    name = "lora"
    roles = _ROLES

    def check_config(self, config: dict[str, Any], where: Path) -> None:
        if config.get("use_dora"):
            raise InputError("DoRA adapters are not supported (the magnitude vector rescales W + ΔW)", where,
                             "train a plain LoRA (use_dora=False), or merge with PEFT's merge_and_unload")
        bias = config.get("bias") or "none"
        if bias != "none":
            raise InputError(f"bias={bias!r} adapters train base biases, which merge does not apply", where,
                             "train with bias='none'")
        if config.get("lora_bias"):
            raise InputError("lora_bias=True adapters are not supported", where, "train with lora_bias=False")
        if config.get("modules_to_save"):
            raise InputError(f"modules_to_save={config['modules_to_save']!r} is not supported yet", where,
                             "train without modules_to_save (LoRA on the projections only)")
        for key in ("trainable_token_indices", "layer_replication", "target_parameters"):
            if config.get(key):
                raise InputError(f"{key} adapters are not supported", where, f"train without {key}")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            raise InputError(f"init_lora_weights={init!r} rewrites the base weights, so ΔW alone does not "
                             "restore", where, "convert it to a plain LoRA with PEFT "
                             "(save_pretrained(path_initial_model_for_weight_conversion=...)) first")

    def group_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                      where: Path) -> dict[str, dict[str, torch.Tensor]]:
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            rest = key[len(PREFIX):]
            for suffix, role in self.roles.items():
                if rest.endswith("." + suffix):
                    module = rest[: -len(suffix) - 1]
                    modules.setdefault(module, {})[role] = t
                    break
            else:
                hint = ("LoRA on embeddings is not supported" if ".lora_embedding_" in key
                        else "DoRA is not supported" if "lora_magnitude_vector" in key
                        else "only lora_A/lora_B weights are expected")
                raise InputError(f"unexpected tensor key {key!r}", where, hint)
        for module, parts in modules.items():
            if set(parts) != set(self.roles.values()):
                raise InputError(f"module {module} has {sorted(parts)} but needs both A and B", where,
                                 "the adapter file is incomplete; re-save it")
            a, b = parts["A"], parts["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise InputError(f"module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                                 "[r, in] and [out, r]", where, "the adapter file is malformed")
            r, _ = rank_and_alpha(config, module)
            if a.shape[0] != r:
                raise InputError(f"module {module}: rank {a.shape[0]} in the weights but r={r} in the config",
                                 where, "the adapter's config and weights do not belong together")
        return modules

    def check_shapes(self, module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...],
                     config: dict[str, Any], where: Path) -> None:
        out_f, in_f = parts["B"].shape[0], parts["A"].shape[1]
        expected = (in_f, out_f) if config.get("fan_in_fan_out") else (out_f, in_f)
        if tuple(base_shape) != expected:
            raise InputError(f"module {module}: adapter needs a base weight of shape {list(expected)}, the base "
                             f"has {list(base_shape)}", where, "the adapter was trained on a different model")

    def delta_weight(self, module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...],
                     config: dict[str, Any]) -> torch.Tensor:
        delta = lora_delta(parts["A"], parts["B"], lora_scaling(config, module), bool(config.get("fan_in_fan_out")))
        assert tuple(delta.shape) == tuple(base_shape), (module, delta.shape, base_shape)
        return delta

    def describe_config(self, config: dict[str, Any]) -> dict[str, Any]:
        keys = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out", "bias",
                "lora_dropout", "rank_pattern", "alpha_pattern", "base_model_name_or_path", "task_type")
        return {k: config.get(k) for k in keys if k in config}


KIND = LoraKind()
