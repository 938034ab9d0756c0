"""Safetensors streaming, atomic outputs and hashing: the only place that touches files of tensors."""
