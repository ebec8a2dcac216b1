"""tqdm head: a Mask2Former decoder whose queries are the (enhanced) class-text embeddings.

Ported from devinxzhang/MFuser mmseg/models/decode_heads/tqdm_head.py (``tqdmHead``:
``forward``, ``forward_head``, ``forward_test``), with mmcv 1.x's DetrTransformerDecoder
for the 9 masked-attention layers. Attribute names mirror the original (pixel_decoder,
transformer_decoder.layers.N.{attentions,ffns,norms}, transformer_decoder.post_norm,
decoder_input_projs, query_embed, text_proj.{0,2}, level_embed, cls_embed,
mask_embed.{0,2,4}), so ``load_torch_state_dict`` maps ``decode_head.*`` keys by rule.

Behaviour kept from the original:
  * An initial prediction from the text queries themselves (before any layer), then one
    after every layer: ``num_layers + 1`` outputs, all supervised.
  * Layer i cross-attends to memory level ``i % 3`` (1/32, 1/16, 1/8, 1/32, ...); its
    attention mask is the previous mask prediction resized (bilinear, align_corners=False,
    no antialias) to that level, masked where sigmoid < 0.5, and a query whose row is fully
    masked attends everywhere instead.
  * Post-norm order cross_attn, norm, self_attn, norm, ffn, norm; queries' positions are
    the learnt ``query_embed``; memories get a sine encoding (keys) and ``level_embed``.

The three levels are padded to one key count (top-left in the largest grid, padding keys
always masked), so all 9 layers are one scanned body whose level is a scan input: one
compiled layer instead of three (a fifth fewer kernels in the full-size train step).
Masked keys get zero attention weight, so the padding changes no result; it costs the
K/V projections of the padded keys (under 0.5% of the model's FLOPs at 512 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax.nn.layers import torch_conv, torch_linear
from mfuser_jax.nn.stack import LayerStack, scan_layers
from mfuser_jax.model.pixel_decoder import (
    DetrTransformerDecoder,
    DetrTransformerDecoderLayer,
    MultiheadAttention,
    TqdmMSDeformAttnPixelDecoder,
    embedding_normal,
    sine_positional_encoding,
)
from mfuser_jax.ops.resize import resize_matrix


__all__ = ["MemoryLevels", "TqdmHead", "pad_levels", "semantic_inference", "unmask_full_rows"]

_F32 = jnp.float32


def unmask_full_rows(attn_mask: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mask2Former's rule: a query whose mask blocks every key may attend to all keys.

    attn_mask: bool (..., Q, S), True = blocked. ``valid`` (S,) bool: the real keys of a
    padded level; padding keys must be blocked in ``attn_mask`` and stay blocked.
    """
    unmasked = attn_mask & ~jnp.all(attn_mask, axis=-1, keepdims=True)
    return unmasked if valid is None else unmasked | ~valid


class MemoryLevels(NamedTuple):
    """The decoder's memory levels padded to one key count S = max_h * max_w: each level's
    (h, w) grid sits top-left in the (max_h, max_w) grid, flattened row-major."""

    memory: jax.Array     # (levels, B, S, C)
    pos: jax.Array        # (levels, 1, S, C) sine encodings of the keys
    valid: jax.Array      # (levels, S) bool, the real keys
    resize_h: jax.Array   # (levels, max_h, H) bilinear rows onto each level, zero-padded
    resize_w: jax.Array   # (levels, max_w, W)


def pad_levels(memories, positions, mask_hw: tuple[int, int]) -> MemoryLevels:
    """Stack NHWC ``memories`` and their (1, h, w, C) ``positions``, padding each to the
    largest grid; the resize matrices map a (H, W) = ``mask_hw`` mask onto each level."""
    max_h = max(m.shape[1] for m in memories)
    max_w = max(m.shape[2] for m in memories)

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, max_h - x.shape[1]), (0, max_w - x.shape[2]), (0, 0)))

    def flat(x):
        return x.reshape(x.shape[0], max_h * max_w, x.shape[-1])

    def padded_rows(n, size, total):  # (total, size): rows past n stay zero
        m = np.zeros((total, size), np.float32)
        m[:n] = resize_matrix(size, n, "bilinear")
        return m

    sizes = [m.shape[1:3] for m in memories]
    valid = np.zeros((len(sizes), max_h, max_w), bool)
    for i, (h, w) in enumerate(sizes):
        valid[i, :h, :w] = True
    return MemoryLevels(
        memory=jnp.stack([flat(pad(m)) for m in memories]),
        pos=jnp.stack([flat(pad(p)) for p in positions]),
        valid=jnp.asarray(valid.reshape(len(sizes), -1)),
        resize_h=jnp.asarray(np.stack([padded_rows(h, mask_hw[0], max_h) for h, _ in sizes])),
        resize_w=jnp.asarray(np.stack([padded_rows(w, mask_hw[1], max_w) for _, w in sizes])),
    )


def semantic_inference(cls_scores: jax.Array, mask_preds: jax.Array) -> jax.Array:
    """Per-class semantic scores, softmax(cls)[..., :-1] x sigmoid(mask), as forward_test.

    cls_scores (B, Q, C+1), mask_preds (B, Q, H, W) -> (B, H, W, C), float32.
    """
    cls = jax.nn.softmax(cls_scores.astype(_F32), axis=-1)[..., :-1]
    masks = jax.nn.sigmoid(mask_preds.astype(_F32))
    return jnp.einsum("bqc,bqhw->bhwc", cls, masks)


class TqdmHead(nnx.Module):
    """Text-query Mask2Former head (decode_head of the MFuser configs).

    ``__call__(features, texts)``: features = 4 NHWC maps (strides 4, 8, 16, 32, each
    ``in_channels[i]`` channels), texts (B, num_queries, text_dim). Returns
    (all_cls_scores, all_mask_preds): lists of ``num_decoder_layers + 1`` arrays,
    (B, Q, num_classes + 1) and (B, Q, H/4, W/4) float32 logits.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (2048, 2048, 2048, 2048),
        feat_channels: int = 256,
        out_channels: int = 256,
        num_classes: int = 19,
        num_queries: int = 19,
        num_transformer_feat_level: int = 3,
        text_dim: int = 768,
        num_groups: int = 32,
        # pixel decoder (tqdmMSDeformAttnPixelDecoder)
        pixel_decoder_layers: int = 6,
        pixel_decoder_heads: int = 8,
        num_points: int = 4,
        pixel_decoder_ffn_channels: int = 2048,
        # transformer decoder (DetrTransformerDecoder)
        num_decoder_layers: int = 9,
        decoder_heads: int = 8,
        decoder_ffn_channels: int = 2048,
        decoder_embed_dims: int | None = None,
        enforce_decoder_input_project: bool = False,
        dropout: float = 0.0,
        *,
        remat: bool = False,
        dtype=_F32,
        rngs: nnx.Rngs,
    ):
        embed = decoder_embed_dims or feat_channels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_transformer_feat_level = num_transformer_feat_level
        self.num_heads = decoder_heads
        self.dtype = dtype
        self.pixel_decoder = TqdmMSDeformAttnPixelDecoder(
            in_channels=in_channels,
            feat_channels=feat_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            num_text_embeds=num_queries,
            num_outs=num_transformer_feat_level,
            num_groups=num_groups,
            num_layers=pixel_decoder_layers,
            num_heads=pixel_decoder_heads,
            num_levels=num_transformer_feat_level,
            num_points=num_points,
            feedforward_channels=pixel_decoder_ffn_channels,
            dropout=dropout,
            remat=remat,
            dtype=dtype,
            rngs=rngs,
        )
        order = ("cross_attn", "norm", "self_attn", "norm", "ffn", "norm")
        if dropout:  # stacked layers hold no RNG streams; the reference's rate is 0
            raise ValueError("the scanned decoders support dropout 0 only")
        self.remat = bool(remat)
        self.scan = True  # False: the same layers as an unrolled Python loop
        self.transformer_decoder = DetrTransformerDecoder(
            LayerStack(lambda r: DetrTransformerDecoderLayer(
                [MultiheadAttention(embed, decoder_heads, dropout, dropout, dtype=dtype,
                                    rngs=r) for _ in range(2)],
                embed, decoder_ffn_channels, order, dropout, dtype=dtype, rngs=r),
                num_decoder_layers, rngs=rngs),
            embed,
            rngs=rngs,
        )
        project = embed != feat_channels or enforce_decoder_input_project
        self.decoder_input_projs = nnx.List([
            torch_conv(feat_channels, embed, 1, dtype=dtype, rngs=rngs)
            if project else None
            for _ in range(num_transformer_feat_level)
        ])
        self.query_embed = nnx.Embed(num_queries, feat_channels, param_dtype=_F32,
                                     embedding_init=embedding_normal, rngs=rngs)
        self.text_proj = nnx.List([
            torch_linear(text_dim, feat_channels, dtype=dtype, rngs=rngs),
            None,  # ReLU
            torch_linear(feat_channels, feat_channels, dtype=dtype, rngs=rngs),
        ])
        self.level_embed = nnx.Embed(num_transformer_feat_level, feat_channels,
                                     param_dtype=_F32, embedding_init=embedding_normal,
                                     rngs=rngs)
        self.cls_embed = torch_linear(feat_channels, num_classes + 1, dtype=dtype, rngs=rngs)
        self.mask_embed = nnx.List([
            torch_linear(feat_channels, feat_channels, dtype=dtype, rngs=rngs),
            None,  # ReLU
            torch_linear(feat_channels, feat_channels, dtype=dtype, rngs=rngs),
            None,  # ReLU
            torch_linear(feat_channels, out_channels, dtype=dtype, rngs=rngs),
        ])

    @classmethod
    def from_config(cls, decoder: Any, *, in_channels: Sequence[int],
                    num_classes: int, text_dim: int, remat: bool = False, dtype=_F32,
                    rngs: nnx.Rngs) -> TqdmHead:
        """The head of ``config.model.decoder`` (``model.config.DecoderConfig`` or a mapping
        with its fields): one query per class, ``decoder.num_heads``
        heads in both decoders, output channels = feature channels and GroupNorm over
        min(32, feat_channels) groups, as MFuser builds it."""
        return cls(
            in_channels=in_channels, feat_channels=decoder.feat_channels,
            out_channels=decoder.feat_channels, num_classes=num_classes,
            num_queries=num_classes, text_dim=text_dim,
            pixel_decoder_layers=decoder.pixel_decoder_layers,
            pixel_decoder_heads=decoder.num_heads, num_points=decoder.deform_points,
            pixel_decoder_ffn_channels=decoder.pixel_ffn,
            num_decoder_layers=decoder.decoder_layers, decoder_heads=decoder.num_heads,
            decoder_ffn_channels=decoder.ffn, num_groups=min(32, decoder.feat_channels),
            remat=remat, dtype=dtype, rngs=rngs)

    def forward_head(self, decoder_out, mask_feature, levels: MemoryLevels, level):
        """Class logits, mask logits and the next attention mask from the queries.

        decoder_out (B, Q, C); mask_feature (B, H, W, C'); ``level`` (an int or a traced
        scalar) picks the memory level the mask is resized to. Returns (cls (B, Q, K+1),
        masks (B, Q, H, W), attn_mask bool (B, Q, S), True = blocked, padding blocked).
        """
        x = self.transformer_decoder.post_norm(decoder_out.astype(_F32))
        cls_pred = self.cls_embed(x).astype(_F32)
        m = jax.nn.relu(self.mask_embed[0](x))
        m = jax.nn.relu(self.mask_embed[2](m))
        m = self.mask_embed[4](m)
        mask_pred = jnp.einsum("bqc,bhwc->bqhw", m.astype(self.dtype),
                               mask_feature.astype(self.dtype),
                               preferred_element_type=_F32)
        # ops.resize's bilinear matrices, rows h then w, zero rows in the padding
        highest = jax.lax.Precision.HIGHEST
        small = jnp.einsum("ih,bqhw->bqiw", levels.resize_h[level], mask_pred,
                           precision=highest)
        small = jnp.einsum("jw,bqiw->bqij", levels.resize_w[level], small, precision=highest)
        blocked = jax.nn.sigmoid(small.reshape(*small.shape[:2], -1)) < 0.5
        attn_mask = blocked | ~levels.valid[level]
        return cls_pred, mask_pred, jax.lax.stop_gradient(attn_mask)

    def __call__(self, features: Sequence[jax.Array], texts: jax.Array, *,
                 deterministic: bool | None = None):
        b = features[0].shape[0]
        if texts.ndim != 3 or texts.shape[:2] != (b, self.num_queries):
            raise ValueError(
                f"texts must be (B={b}, num_queries={self.num_queries}, C), got {texts.shape}")
        mask_features, memories = self.pixel_decoder(features, texts,
                                                     deterministic=deterministic)
        # memories go from low to high resolution
        decoder_inputs, decoder_pos = [], []
        for i in range(self.num_transformer_feat_level):
            proj = self.decoder_input_projs[i]
            mem = memories[i] if proj is None else proj(memories[i])
            _, h, w, c = mem.shape
            decoder_inputs.append(mem.astype(_F32) + self.level_embed.embedding[i])
            decoder_pos.append(sine_positional_encoding(h, w, c // 2).reshape(1, h, w, c))
        levels = pad_levels(decoder_inputs, decoder_pos, mask_features.shape[1:3])
        query = self.text_proj[2](jax.nn.relu(self.text_proj[0](texts))).astype(_F32)
        query_pos = self.query_embed.embedding[...][None]

        cls_pred, mask_pred, attn_mask = self.forward_head(query, mask_features, levels, 0)
        n_levels = self.num_transformer_feat_level

        def layer(modules, carry, level):  # layer i attends to level i mod n_levels
            query, attn_mask = carry
            memory = levels.memory[level]
            query = modules[0](query, memory, memory, query_pos=query_pos,
                               key_pos=levels.pos[level],
                               attn_masks=[unmask_full_rows(attn_mask, levels.valid[level]),
                                           None],
                               deterministic=deterministic)
            cls_pred, mask_pred, attn_mask = self.forward_head(
                query, mask_features, levels, (level + 1) % n_levels)
            return (query, attn_mask), (cls_pred, mask_pred)

        stack = self.transformer_decoder.layers
        _, (cls_preds, mask_preds) = scan_layers(
            layer, (stack,), (query, attn_mask), jnp.arange(len(stack)) % n_levels,
            remat=self.remat, unroll=not self.scan, outputs=True)
        return ([cls_pred, *cls_preds], [mask_pred, *mask_preds])
