"""MFuser's changes to HF SigLIP (devinxzhang/MFuser models/backbones/siglip/
modeling_siglip.py) restated in torch over HF's modules: the attention-pooling head that
also runs every token through the probe's attention."""


def pooling_head(head, x):
    """(pooled, per-token) outputs of MFuser's SiglipMultiheadAttentionPoolingHead for HF's
    ``head`` on tokens ``x`` (batch, tokens, width): the probe branch and a per-token branch
    through the same attention, layernorm and MLP."""
    probe = head.probe.repeat(x.shape[0], 1, 1)
    g = head.attention(probe, x, x)[0]
    g = g + head.mlp(head.layernorm(g))
    loc = head.attention(x, x, x)[0]
    loc = loc + head.mlp(head.layernorm(loc))
    return g, loc
