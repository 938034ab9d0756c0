"""lowbitpack: packed low-bit checkpoints, adapters that know their base, Post-LoRA Restoration."""
from .version import __version__
from .api import default_model, inspect, quantize

__all__ = ["__version__", "default_model", "inspect", "quantize"]
