"""Importers: checkpoints quantized by other tools -> lowbitpack artifacts with the same codes."""
