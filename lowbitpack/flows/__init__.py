"""Multi-step operations over whole checkpoints (quantize, merge, export); the API calls these."""
