"""The adapter-type interface: what bundle validation and merge need from each adapter type."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

PREFIX = "base_model.model."  # PEFT's prefix of saved adapter keys (adapter name already stripped)


class AdapterKind(ABC):
    """One adapter type (lora, qalora, qwha, ...). Stateless; every method gets what it needs."""

    name: str

    @abstractmethod
    def check_config(self, config: dict[str, Any], where: Path) -> None:
        """Refuse configurations this type cannot merge (one-line InputError naming `where`)."""

    @abstractmethod
    def group_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                      where: Path) -> dict[str, dict[str, torch.Tensor]]:
        """{module name: {role: tensor}} from the saved keys; unknown or malformed keys are refused."""

    # The bundle model card's last line about using the adapter elsewhere (README.md).
    card_use_note = ("The adapter is a standard PEFT adapter: `PeftModel.from_pretrained(model, BUNDLE)` works on the "
                     "original model.")

    def card_summary(self, config: dict[str, Any], n_modules: int) -> str:
        """The bundle model card's "adapter" row (default: LoRA's r / alpha / rslora)."""
        return (f"r={config.get('r')}, alpha={config.get('lora_alpha')}, rslora={bool(config.get('use_rslora'))}, "
                f"{n_modules} modules")

    def extra_files(self, adapter_dir: Path) -> tuple[str, ...]:
        """Files of the adapter dir a bundle must carry besides the PEFT config and weights (default: none)."""
        return ()

    def write_unmerged(self, bundle_dir: Path, out_dir: Path, modules: dict[str, dict[str, torch.Tensor]],
                       config: dict[str, Any]) -> None:
        """Write the adapter that goes beside an unmerged restored base (default: the bundled files unchanged)."""
        import shutil
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(bundle_dir / name, out_dir / name)

    def integer_tensor(self, key: str) -> bool:
        """Whether the saved tensor `key` may hold integers (index or count buffers); default: none may."""
        return False

    def base_tensor(self, module: str) -> str:
        """The base checkpoint tensor that `module`'s ΔW is added to."""
        return module + ".weight"

    @abstractmethod
    def check_shapes(self, module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...],
                     config: dict[str, Any], where: Path) -> None:
        """Refuse adapter tensors that do not fit a base tensor of `base_shape`."""

    @abstractmethod
    def delta_weight(self, module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...],
                     config: dict[str, Any]) -> torch.Tensor:
        """ΔW in float32, laid out like the base tensor (shape `base_shape`)."""

    def describe_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config fields recorded in a bundle manifest (the full adapter_config.json travels too)."""
        return dict(config)

    def check_base_record(self, module: str, record: dict[str, Any], config: dict[str, Any], where: Path) -> None:
        """Refuse a packed base tensor (artifact manifest record) this adapter cannot have been trained on or
        cannot merge into (e.g. QA-LoRA pooling groups vs quantization groups); default: any base is fine."""
