"""lowbitpack: packed low-bit checkpoints, adapters that know their base, Post-LoRA Restoration."""
from .version import __version__
from .api import bundle, default_model, export, import_checkpoint, inspect, merge, push, quantize, train

__all__ = ["__version__", "bundle", "default_model", "export", "import_checkpoint", "inspect", "merge", "push",
           "quantize", "train"]
