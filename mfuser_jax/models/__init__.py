"""Flax NNX modules, one model per file; attribute names mirror the PyTorch originals."""
