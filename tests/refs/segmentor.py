"""What the original segmentors save (devinxzhang/MFuser MFuser_CLIP, MFuser_EVA_CLIP,
MFuser_SIGLIP): fake releases at a config's (tiny) sizes with random values, assembled from
the restatements of the original modules (tests/refs: the CLIP and EVA towers, the MVFuser,
ContextDecoder and tqdm head; HF's SigLIP towers, HF DINOv2 renamed to the official names)
with the prefixes the segmentors give them, plus the parts only the segmentor and the fused
backbone own (adapter_proj1/2/3, fpn1/fpn2 with their BatchNorm, contexts, gamma, EVA's
unused random_text) and identity_head.conv_seg. Each module is saved as mmcv's
save_checkpoint saves it (every buffer, persistent or not: ``mmcv_state_dict``) unless a
``saver`` says otherwise. The keys are never derived from the JAX model."""

import numpy as np
import torch
import torch.nn as tnn
import transformers

from mfuser_jax.towers.dinov2.convert import hf_to_official
from tests.refs.backbone import t_fpn1, t_fpn2
from tests.refs.clip import TText, TVisual
from tests.refs.decoder import THead, torch_cfg
from tests.refs.eva02 import TEVA, TTextTransformer
from tests.refs.mvfuser import TorchMVFuser
from tests.refs.text_enhancer import TorchContextDecoder


def mmcv_state_dict(module, prefix=""):
    """What mmcv 1.5.1's save_checkpoint writes for ``module`` (runner/checkpoint.py
    get_state_dict / _save_to_state_dict): every parameter and every buffer that is not
    None, ``persistent=False`` ones included, recursively; torch's state_dict() leaves the
    non-persistent buffers out."""
    out = {}
    for name, value in [*module._parameters.items(), *module._buffers.items()]:
        if value is not None:
            out[prefix + name] = value.detach().numpy().copy()
    for name, child in module._modules.items():
        if child is not None:
            out.update(mmcv_state_dict(child, f"{prefix}{name}."))
    return out


def torch_state_dict(module, prefix=""):
    """torch's own ``module.state_dict()`` (persistent buffers only), as numpy."""
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# The buffers each original registers with persistent=False, which mmcv's saver writes into
# every release while torch's state_dict() leaves them out; read off the original code
# (devinxzhang/MFuser: every register_buffer of the modules each segmentor builds).
# CLIP: models/backbones/clip/models.py keeps its text mask as a plain attribute (not
# saved); EVA02: eva_clip/transformer.py TextTransformer's causal mask (its rotary tables,
# rope.py, are persistent); SigLIP: siglip/modeling_siglip.py SiglipVisionEmbeddings and
# SiglipTextEmbeddings. DINOv2 (dino_v2.py, dino_layers/), the MVFusers (adapter_module.py
# with mamba_ssm's RMSNormGated), the FPN (BatchNorm: persistent statistics), the
# ContextDecoder and the tqdm head with its pixel decoder register none.
NON_PERSISTENT = {
    "clip": set(),
    "eva02": {"text_encoder.attn_mask"},
    "siglip": {"backbone.embeddings.position_ids", "text_encoder.embeddings.position_ids"},
}


def _prefixed(saver, prefix, module):
    return saver(module, prefix)


def shared_parts(m, vlm_width, text_dim, fpn_seed=0, saver=mmcv_state_dict):
    """What every variant's checkpoint has besides the VLM towers: DINOv2, MVFusers, FPN,
    ContextDecoder, tqdm head, contexts, gamma, identity_head.conv_seg; ``saver`` writes
    each module's keys (mmcv's, as the releases are saved, or torch's state_dict)."""
    c, d, mv, cd, dec = m[m.vlm], m.dinov2, m.mvfuser, m.context_decoder, m.decoder
    layers, dd = c.layers, d.embed_dim
    sd = {}
    hf = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=dd, num_hidden_layers=layers, num_attention_heads=d.num_heads,
        intermediate_size=int(d.mlp_ratio * dd), image_size=m.image_size,
        patch_size=m.patch_size, layerscale_value=d.init_values))
    sd.update({f"backbone.dinov2.{k}": np.asarray(v)
               for k, v in hf_to_official(saver(hf)).items()})
    sd.update(_prefixed(saver, "backbone.adapter.", tnn.Sequential(
        *[TorchMVFuser(vlm_width, mv.d_state, mv.d_conv, mv.expand) for _ in range(layers)])))
    fpn = vlm_width + dd
    fpn1 = t_fpn1(fpn)
    with torch.no_grad():  # trained statistics, not the 0/1 defaults
        fpn1[1].running_mean.normal_(0.0, 0.5)
        fpn1[1].running_var.uniform_(0.5, 2.0)
        fpn1[1].weight.uniform_(0.5, 1.5)
        fpn1[1].num_batches_tracked.fill_(20000)
    sd.update(_prefixed(saver, "backbone.fpn1.", fpn1))
    sd.update(_prefixed(saver, "backbone.fpn2.", t_fpn2(fpn)))
    sd.update(_prefixed(saver, "context_decoder.", TorchContextDecoder(
        cd.width, cd.heads, cd.layers, text_dim, cd.dropout)))
    head_cfg = dict(
        in_channels=(fpn,) * 4, feat_channels=dec.feat_channels,
        out_channels=dec.feat_channels, num_classes=m.num_classes, num_queries=m.num_classes,
        text_dim=text_dim, num_groups=min(32, dec.feat_channels),
        pixel_decoder_layers=dec.pixel_decoder_layers, pixel_decoder_heads=dec.num_heads,
        num_points=dec.deform_points, pixel_decoder_ffn_channels=dec.pixel_ffn,
        num_decoder_layers=dec.decoder_layers, decoder_heads=dec.num_heads,
        decoder_ffn_channels=dec.ffn)
    sd.update(_prefixed(saver, "decode_head.", THead(torch_cfg(head_cfg))))
    rng = np.random.default_rng(fpn_seed)
    sd["contexts"] = rng.normal(size=(1, c.n_ctx, c.text_width)).astype(np.float32)
    sd["gamma"] = rng.normal(size=(text_dim,)).astype(np.float32)
    sd["identity_head.conv_seg.weight"] = rng.normal(size=(1, 1, 1, 1)).astype(np.float32)
    sd["identity_head.conv_seg.bias"] = np.zeros((1,), np.float32)
    return sd


def clip_state_dict(m, seed=0, saver=mmcv_state_dict):
    """The state dict MFuser_CLIP(config m) saves, at m's (tiny) sizes, random values."""
    torch.manual_seed(seed)
    c, d = m.clip, m.dinov2
    w, dd, layers = c.width, d.embed_dim, c.layers
    sd = shared_parts(m, w, c.output_dim, seed, saver)
    # backbone: the CLIP image tower at the top level (CLIPVisionTransformer) and the
    # three projections only this variant has
    sd.update(_prefixed(saver, "backbone.", TVisual(m.image_size, m.patch_size, w, layers,
                                                    c.heads, c.output_dim)))
    sd.update(_prefixed(saver, "backbone.adapter_proj1.",
                        tnn.Sequential(*[tnn.Linear(dd, w) for _ in range(layers)])))
    sd.update(_prefixed(saver, "backbone.adapter_proj2.",
                        tnn.Sequential(*[tnn.Linear(w, dd) for _ in range(layers)])))
    sd.update(_prefixed(saver, "backbone.adapter_proj3.", tnn.Linear(dd, w)))
    sd.update(_prefixed(saver, "text_encoder.", TText(c.token_length + c.n_ctx, c.vocab_size,
                                                      c.text_width, c.text_layers,
                                                      c.text_heads, c.output_dim)))
    return sd


def eva02_state_dict(m, seed=0, saver=mmcv_state_dict):
    """The state dict MFuser_EVA_CLIP saves (tiny sizes, random values); ``saver``: mmcv's,
    as releases are saved, or torch's state_dict."""
    torch.manual_seed(seed)
    c = m.eva02
    sd = shared_parts(m, c.width, c.output_dim, seed, saver)
    # The EVA tower at the backbone's top level, its rope buffers (one shared module,
    # saved once per block too) included.
    sd.update(_prefixed(saver, "backbone.", TEVA(
        img=m.image_size, patch=m.patch_size, dim=c.width, heads=c.heads, depth=c.layers,
        ratio=c.mlp_ratio, out=c.output_dim)))
    n = c.token_length + c.n_ctx
    text = TTextTransformer(n, vocab=c.vocab_size, width=c.text_width, heads=c.text_heads,
                            layers=c.text_layers, out=c.output_dim)
    # eva_clip/transformer.py TextTransformer.__init__: the causal mask as a buffer
    text.register_buffer("attn_mask", torch.full((n, n), float("-inf")).triu_(1),
                         persistent=False)
    sd.update(_prefixed(saver, "text_encoder.", text))
    # MFuser_EVA_CLIP.__init__: nn.Parameter(torch.randn(num_classes, 768)), never read.
    sd["random_text"] = np.random.default_rng(seed).normal(size=(m.num_classes, 768)).astype(
        np.float32)
    return sd


def _hf_tower(model):
    return getattr(model, "vision_model", getattr(model, "text_model", model))  # transformers 4


def siglip_state_dict(m, seed=0, saver=mmcv_state_dict):
    """The state dict MFuser_SIGLIP saves (tiny sizes, random values): HF SigLIP towers,
    whose embeddings register position_ids as the original's do (persistent=False)."""
    torch.manual_seed(seed)
    c, dd = m.siglip, m.dinov2.embed_dim
    sd = shared_parts(m, c.width, c.output_dim, seed, saver)
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=m.image_size, patch_size=m.patch_size, hidden_size=c.width,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.layers,
        num_attention_heads=c.heads))
    sd.update(_prefixed(saver, "backbone.", _hf_tower(vision)))
    text = transformers.SiglipTextModel(transformers.SiglipTextConfig(
        vocab_size=c.vocab_size, max_position_embeddings=c.token_length + c.n_ctx,
        hidden_size=c.text_width, intermediate_size=c.text_intermediate_size,
        num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads))
    sd.update(_prefixed(saver, "text_encoder.", _hf_tower(text)))
    # SiglipVisionTransformer.__init__ builds the CLIP variant's projections; forward never
    # calls them, but they are in the checkpoint.
    sd.update(_prefixed(saver, "backbone.adapter_proj1.",
                        tnn.Sequential(*[tnn.Linear(dd, c.width) for _ in range(c.layers)])))
    sd.update(_prefixed(saver, "backbone.adapter_proj2.",
                        tnn.Sequential(*[tnn.Linear(c.width, dd) for _ in range(c.layers)])))
    sd.update(_prefixed(saver, "backbone.adapter_proj3.", tnn.Linear(dd, c.width)))
    return sd
