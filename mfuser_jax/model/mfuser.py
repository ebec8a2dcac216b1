"""MFuser: fused DINOv2 + VLM backbone, CoOp text, MTEnhancer, tqdm head.

Ported from devinxzhang/MFuser models/segmentors/mfuser_clip.py, mfuser_eva_clip.py and
mfuser_siglip.py (MFuser_CLIP, MFuser_EVA_CLIP, MFuser_SIGLIP), which differ only in the
towers (``config.vlm``: "clip", "eva02", "siglip"; see ``model/backbone.py``), the
tokenizer, and how the score map becomes logits (cosine / 0.07; SigLIP: cosine *
exp(logit_scale) + logit_bias). Those differences come from the VLM's spec
(``mfuser_jax.towers``); this class never branches on the name. Attribute names follow the
originals (backbone, text_encoder, context_decoder, contexts, gamma, decode_head), so a
released checkpoint's keys map by rule. The model protocol the trainer relies on:

* ``loss(images, labels, key) -> (total, parts)``: train-mode forward and every loss term.
* ``predict(images, class_names=None) -> (B, H, W, K)`` semantic scores at input size.
* ``trainable_filter`` / ``no_decay_filter``: nnx filters over parameters.
* ``pretrained_filter``: the frozen encoder parameters ``load_pretrained`` fills.
* ``load_pretrained(path)``: the frozen encoders from scripts/convert_weights.py output.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.model import losses
from mfuser_jax.model.config import ModelConfig
from mfuser_jax.model.backbone import normalize_for_clip
from mfuser_jax.nn.layers import set_attn_implementation
from mfuser_jax.model.mask_decoder import TqdmHead, semantic_inference
from mfuser_jax.model.text_enhancer import ContextDecoder
from mfuser_jax.model.pretrained import load_pretrained_encoders
from mfuser_jax.model.variants import (
    build_towers,
    no_decay_filter_for,
    pretrained_filter,
    tower_config,
    trainable_filter,
    vfm_config,
    vlm_spec,
)
from mfuser_jax.ops.resize import resize

__all__ = ["MFuser"]


def _trunc_normal(key, shape):
    # torch.nn.init.trunc_normal_ defaults: std 1, cut at [-2, 2] (absolute, not in stds).
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def _l2_normalize(x, axis=-1, eps=1e-12):
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)  # F.normalize semantics


class MFuser(nnx.Module):
    trainable_filter = staticmethod(trainable_filter)
    pretrained_filter = staticmethod(pretrained_filter)

    def __init__(self, config: ModelConfig | Mapping, *, rngs: nnx.Rngs):
        # config.model as a ConfigDict or dict (a config file's, W/config.json's) is read
        # as the typed, frozen ModelConfig: a misspelt or missing field fails here by name.
        config = ModelConfig.from_mapping(config)
        self.config = config
        c = tower_config(config)
        self.vlm = config.vlm
        self.no_decay_filter = no_decay_filter_for(self.vlm)
        # score map -> (logits, temperature) of the score-map loss, as the VLM's original does
        self._score_logits = vlm_spec(config).build.score_logits
        dtype = jnp.dtype(config.dtype)
        self.dtype = dtype
        self.class_names = tuple(config.class_names)
        self.num_classes = int(config.num_classes)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")
        self.tau = float(config.loss.temperature)
        self.token_length = int(c.token_length)
        self.backbone, self.text_encoder, self._tokenize = build_towers(config, dtype, rngs)
        cd = config.context_decoder
        self.context_decoder = ContextDecoder(
            cd.width, cd.heads, cd.layers, c.output_dim, cd.dropout,
            scan_backend=config.mvfuser.scan_backend, dtype=dtype, rngs=rngs,
        )
        self.contexts = nnx.Param(_trunc_normal(rngs.params(), (1, c.n_ctx, c.text_width)))
        # The reference initialises gamma to 1e-4 and then overwrites it with trunc_normal_.
        self.gamma = nnx.Param(_trunc_normal(rngs.params(), (c.output_dim,)))
        fpn_dim = c.width + vfm_config(config).embed_dim
        self.decode_head = TqdmHead.from_config(
            config.decoder, in_channels=(fpn_dim,) * 4, num_classes=self.num_classes,
            text_dim=c.output_dim, remat=bool(config.remat), dtype=dtype, rngs=rngs,
        )
        self.texts = self._tokenize(list(self.class_names))
        lc = config.loss
        self.loss_config = losses.Mask2FormerLossConfig(
            num_points=int(lc.num_points), oversample_ratio=float(lc.oversample),
            importance_sample_ratio=float(lc.importance), no_object_weight=float(lc.no_object_weight),
            loss_cls_weight=float(lc.cls), loss_mask_weight=float(lc.mask),
            loss_dice_weight=float(lc.dice),
            cls_norm_images=int(lc.cls_norm_images),
        )
        self.score_map_weight = float(lc.score_map)
        self.set_layer_execution(scan=bool(config.scan_layers))
        # One path for every attention, towers and heads (layers.dot_product_attention).
        set_attn_implementation(self, config.attn_implementation)

    def set_layer_execution(self, *, remat: bool | None = None, scan: bool | None = None):
        """How the stacked layers run (read at trace time): ``remat`` recomputes each layer
        in the backward pass; ``scan`` False unrolls them (every layer compiled separately).
        Applies to the fused backbone and both decoders."""
        for module in (self.backbone, self.decode_head, self.decode_head.pixel_decoder):
            if remat is not None:
                module.remat = bool(remat)
            if scan is not None:
                module.scan = bool(scan)

    # ------------------------------------------------------------------ forward
    def text_embeddings(self, texts=None) -> jax.Array:
        """(1, K, output_dim): class names through the frozen text tower with the contexts."""
        texts = self.texts if texts is None else texts
        return self.text_encoder(jnp.asarray(texts), self.contexts[...])

    def forward(self, images: jax.Array, texts=None, *, key: jax.Array | None = None):
        """uint8/float NHWC pixels -> (cls list, mask list, score map (B, h, w, K)).
        ``key``: the backbone's drop-path and fuser-dropout randomness (train mode)."""
        return self.decode(*self.backbone(normalize_for_clip(images), key=key), texts)

    def decode(self, features, global_embedding, pixel_embeddings, texts=None):
        """Everything after the backbone: text queries enhanced by the visual context, the
        score map and the tqdm head's predictions."""
        b, gh, gw, e = pixel_embeddings.shape
        text = self.text_embeddings(texts)  # shared by the batch: one pass, then broadcast
        text = jnp.broadcast_to(text, (b,) + text.shape[1:])
        visual_context = jnp.concatenate(
            [global_embedding, pixel_embeddings.reshape(b, gh * gw, e)], axis=1)
        text = text + self.gamma[...] * self.context_decoder(text, visual_context)
        score_map = jnp.einsum(
            "bhwc,bkc->bhwk", _l2_normalize(pixel_embeddings), _l2_normalize(text))
        all_cls, all_masks = self.decode_head(features, text)
        return all_cls, all_masks, score_map

    def loss(self, images: jax.Array, labels: jax.Array, key: jax.Array):
        """Train-mode losses. ``key`` drives dropout, drop path and point sampling."""
        dropout_key, point_key, backbone_key = jax.random.split(key, 3)
        nnx.reseed(self, dropout=dropout_key)
        self.train()
        outputs = self.forward(images, key=backbone_key)
        return self.loss_of_outputs(outputs, labels, point_key)

    def loss_of_outputs(self, outputs, labels: jax.Array, point_key: jax.Array):
        """(total, parts) of forward()'s outputs: deep-supervised Mask2Former losses on
        points drawn from ``point_key``, and the score-map loss."""
        all_cls, all_masks, score_map = outputs
        parts = {
            f"decode.{k}": v
            for k, v in losses.mask2former_loss(
                all_cls, all_masks, labels, point_key, self.loss_config).items()
        }
        logits, temperature = self._score_logits(self.backbone, score_map, self.tau)
        parts["scr_map.loss_seg"] = self.score_map_weight * losses.score_map_loss(
            logits, labels, temperature=temperature)
        total = sum(parts.values())
        return total, parts

    def predict(self, images: jax.Array, class_names: Sequence[str] | None = None) -> jax.Array:
        """Semantic scores (B, H, W, K) at the input resolution (eval mode).

        ``class_names`` swaps names into the text queries: a known name keeps its trained
        query slot, a new name takes a free slot (queries are tied to slots by training), and
        the output channels follow ``class_names``. Free slots keep the trained names so the
        decoder sees the full query set it was trained with.
        """
        self.eval()
        texts, channels = None, None
        if class_names is not None:
            texts, channels = self._query_texts(class_names)
        all_cls, all_masks, _ = self.forward(images, texts)
        seg = semantic_inference(all_cls[-1], all_masks[-1])  # (B, h, w, K)
        seg = resize(seg, images.shape[1:3], axes=(1, 2))
        return seg if channels is None else seg[..., jnp.asarray(channels)]

    def _query_texts(self, class_names):
        names = [n.strip() for n in class_names]
        if not names or len(names) > self.num_classes:
            raise ValueError(f"give 1 to {self.num_classes} class names, got {len(names)}")
        slots = list(self.class_names)
        free = [i for i, n in enumerate(slots) if n not in names]
        channels = []
        for name in names:
            if name in self.class_names:
                channels.append(self.class_names.index(name))
            else:
                slot = free.pop(0)
                slots[slot] = name
                channels.append(slot)
        return self._tokenize(slots), channels

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, path: str) -> None:
        """Copy the frozen encoders written by scripts/convert_weights.py into the model."""
        load_pretrained_encoders(self, os.fspath(path))
