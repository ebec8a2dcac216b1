"""Building blocks shared by the towers and the heads: PyTorch-default initialisers, the one attention core, stacked layers run by lax.scan."""
