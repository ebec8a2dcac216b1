"""MFuser composed from the towers: the fused backbone, MVFuser, MTEnhancer, the tqdm head, the losses, the model built from a config."""
