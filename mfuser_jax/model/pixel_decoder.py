"""tqdm's multi-scale deformable-attention pixel decoder, and the mmcv 1.x blocks it uses.

Ported from devinxzhang/MFuser mmseg/models/plugins/tqdm_msdeformattn_pixel_decoder.py
(itself mmdet 2.x's MSDeformAttnPixelDecoder plus a cross-attention to the text
embeddings) and from the mmcv 1.5 bricks it is built of (open-mmlab/mmcv v1.5.1:
mmcv/cnn/bricks/transformer.py MultiheadAttention, FFN, BaseTransformerLayer;
mmcv/ops/multi_scale_deform_attn.py MultiScaleDeformableAttention; mmseg's
SinePositionalEncoding and MlvlPointGenerator). Attribute names mirror the originals so
``load_torch_state_dict`` maps ``decode_head.pixel_decoder.*`` keys by rule.

Layout: images NHWC, tokens (batch, length, channels) -- the originals are sequence-first
internally, which changes no arithmetic. Parameters float32; Linear/Conv matmuls run in
``dtype``; attention logits, softmax, GroupNorm/LayerNorm and the residual stream stay in
float32.

Fidelity notes (mmcv behaviour that the config text hides):
  * ``DetrTransformerDecoderLayer(feedforward_channels=2048, ffn_cfgs=dict(
    feedforward_channels=1024, ...))``: mmcv's BaseTransformerLayer copies the deprecated
    ``feedforward_channels`` argument over ``ffn_cfgs``, so the FFN hidden size is 2048
    in both the pixel decoder and the transformer decoder of the released model.
  * The pixel decoder's config overrides the plugin default order to
    ('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm'): attentions.0 is the
    deformable self-attention, attentions.1 the cross-attention to the text.
  * ``DetrTransformerDecoder`` owns a ``post_norm`` LayerNorm; with
    ``return_intermediate=True`` the pixel decoder uses ``post_norm(last layer output)``.
  * Every mmcv attention adds its own residual (``identity + out``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax.nn.layers import (
    TorchMultiheadAttention,
    mmcv_conv_module_init,
    torch_conv,
    torch_layer_norm,
    torch_linear,
)
from mfuser_jax.nn.stack import LayerStack, dropout_stream, scan_layers
from mfuser_jax.ops.deform_attn import multi_scale_deformable_attention
from mfuser_jax.ops.resize import resize

__all__ = [
    "ConvModule",
    "DetrTransformerDecoder",
    "DetrTransformerDecoderLayer",
    "FFN",
    "MultiScaleDeformableAttention",
    "MultiheadAttention",
    "TqdmMSDeformAttnPixelDecoder",
    "sine_positional_encoding",
]

_F32 = jnp.float32

# Initialisation is what the original's modules get at construction: its train.py never
# calls the head's or the pixel decoder's init_weights() (their xavier/caffe2 schemes), only
# the backbone's and the text encoder's. Constructors that initialise themselves (mmcv's
# ConvModule and MultiScaleDeformableAttention) are followed; everything else keeps torch's
# defaults (nn/layers.py).
xavier_uniform = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
embedding_normal = nnx.initializers.normal(1.0)  # nn.Embedding


def sine_positional_encoding(
    height: int,
    width: int,
    num_feats: int,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
    offset: float = 0.0,
) -> jax.Array:
    """mmseg's SinePositionalEncoding for an unpadded map: (height, width, 2*num_feats).

    Channel order as the original: [y features, x features], each interleaving
    sin(p / t_0), cos(p / t_0), sin(p / t_1), ... with t_k = temperature**(2k / num_feats).
    """
    y = np.arange(1, height + 1, dtype=np.float32)
    x = np.arange(1, width + 1, dtype=np.float32)
    if normalize:
        y = (y + offset) / (y[-1] + eps) * scale
        x = (x + offset) / (x[-1] + eps) * scale
    dim_t = np.arange(num_feats, dtype=np.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)

    def encode(p):  # (n,) -> (n, num_feats)
        p = p[:, None] / dim_t
        return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=-1).reshape(len(p), -1)

    pos_y = np.broadcast_to(encode(y)[:, None, :], (height, width, num_feats))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (height, width, num_feats))
    return jnp.asarray(np.concatenate([pos_y, pos_x], axis=-1), _F32)


class ConvModule(nnx.Module):
    """mmcv ConvModule (conv -> GroupNorm -> optional ReLU); keys conv.*, gn.*."""

    def __init__(self, in_ch, out_ch, kernel_size, *, bias, num_groups, relu, dtype=_F32,
                 rngs: nnx.Rngs):
        pad = kernel_size // 2
        self.conv = nnx.Conv(
            in_ch,
            out_ch,
            (kernel_size, kernel_size),
            padding=((pad, pad), (pad, pad)),
            use_bias=bias,
            dtype=dtype,
            param_dtype=_F32,
            kernel_init=mmcv_conv_module_init,  # its constructor's own init_weights()
            bias_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        self.gn = nnx.GroupNorm(out_ch, num_groups=num_groups, epsilon=1e-5, dtype=_F32,
                                param_dtype=_F32, rngs=rngs)
        self.relu = relu

    def __call__(self, x):
        y = self.gn(self.conv(x).astype(_F32))
        return jax.nn.relu(y) if self.relu else y


class MultiheadAttention(nnx.Module):
    """mmcv's MultiheadAttention wrapper: positions added to query/key, residual added.
    ``attn`` is torch.nn.MultiheadAttention (``layers.TorchMultiheadAttention``, keys
    attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.*). ``attn_mask`` is boolean,
    True = may NOT attend (PyTorch's convention): (B, Q, S), the same for every head, or
    broadcastable to (B, heads, Q, S); a fully masked row gives NaN with the default
    einsum core, as in PyTorch (see ``layers.dot_product_attention`` for the others)."""

    def __init__(self, embed_dims, num_heads, attn_drop=0.0, proj_drop=0.0, *, dtype=_F32,
                 rngs: nnx.Rngs):
        self.embed_dims = embed_dims
        self.attn = TorchMultiheadAttention(embed_dims, num_heads, attn_drop, dtype=dtype,
                                            rngs=rngs)
        self.proj_drop = nnx.Dropout(proj_drop, rngs=dropout_stream(rngs))

    def __call__(self, query, key, value, *, query_pos=None, key_pos=None, attn_mask=None,
                 deterministic=None, **unused):
        identity = query
        q = query if query_pos is None else query + query_pos
        k = key if key_pos is None else key + key_pos
        if attn_mask is not None and attn_mask.ndim == 3:
            attn_mask = attn_mask[:, None]  # same mask for every head, as the original
        out = self.attn(q, k, value, attn_mask=attn_mask, deterministic=deterministic)
        return identity + self.proj_drop(out, deterministic=deterministic).astype(identity.dtype)


class MultiScaleDeformableAttention(nnx.Module):
    """mmcv's MultiScaleDeformableAttention (2-d reference points), residual included."""

    def __init__(self, embed_dims=256, num_heads=8, num_levels=4, num_points=4, dropout=0.0,
                 *, dtype=_F32, rngs: nnx.Rngs):
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} not divisible by num_heads {num_heads}")
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        # mmcv init_weights (its constructor calls it): zero offset weights, biases pointing each head in its own
        # direction at distance 1..num_points; uniform attention; xavier projections.
        thetas = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
        grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
        grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
        self.sampling_offsets = torch_linear(
            embed_dims, num_heads * num_levels * num_points * 2, dtype=dtype, rngs=rngs,
            kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros)
        self.sampling_offsets.bias[...] = jnp.asarray(grid.reshape(-1), _F32)
        self.attention_weights = torch_linear(
            embed_dims, num_heads * num_levels * num_points, dtype=dtype, rngs=rngs,
            kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros)
        self.value_proj = torch_linear(embed_dims, embed_dims, dtype=dtype, rngs=rngs,
                                 kernel_init=xavier_uniform, bias_init=nnx.initializers.zeros)
        self.output_proj = torch_linear(embed_dims, embed_dims, dtype=dtype, rngs=rngs,
                                  kernel_init=xavier_uniform, bias_init=nnx.initializers.zeros)
        self.dropout = nnx.Dropout(dropout, rngs=dropout_stream(rngs))

    def __call__(self, query, key=None, value=None, *, query_pos=None, reference_points,
                 spatial_shapes: Sequence[tuple[int, int]], deterministic=None, **unused):
        """query, value (B, S, C); reference_points (B or 1, Q, levels, 2) in [0, 1]."""
        value = query if value is None else value
        identity = query
        if query_pos is not None:
            query = query + query_pos
        b, q, _ = query.shape
        h, lv, p = self.num_heads, self.num_levels, self.num_points
        if len(spatial_shapes) != lv:
            raise ValueError(f"{len(spatial_shapes)} spatial shapes for {lv} levels")
        v = self.value_proj(value).reshape(b, value.shape[1], h, -1)
        offsets = self.sampling_offsets(query).astype(_F32).reshape(b, q, h, lv, p, 2)
        weights = self.attention_weights(query).astype(_F32).reshape(b, q, h, lv * p)
        weights = jax.nn.softmax(weights, axis=-1).reshape(b, q, h, lv, p)
        # offsets are in pixels of each level: normalise by (w, h).
        normalizer = jnp.asarray([[w_, h_] for h_, w_ in spatial_shapes], _F32)
        locations = (reference_points.astype(_F32)[:, :, None, :, None, :]
                     + offsets / normalizer[None, None, None, :, None, :])
        out = multi_scale_deformable_attention(v, spatial_shapes, locations, weights)
        out = self.output_proj(out)
        return identity + self.dropout(out, deterministic=deterministic).astype(identity.dtype)


class FFN(nnx.Module):
    """mmcv FFN (two fcs): keys layers.0.0 (Linear) and layers.1 (Linear); residual added."""

    def __init__(self, embed_dims, feedforward_channels, ffn_drop=0.0, *, dtype=_F32,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([
            nnx.List([
                torch_linear(embed_dims, feedforward_channels, dtype=dtype, rngs=rngs),
                None,  # ReLU
                nnx.Dropout(ffn_drop, rngs=dropout_stream(rngs)),
            ]),
            torch_linear(feedforward_channels, embed_dims, dtype=dtype, rngs=rngs),
            nnx.Dropout(ffn_drop, rngs=dropout_stream(rngs)),
        ])

    def __call__(self, x, *, deterministic=None):
        fc1, _, drop1 = self.layers[0]
        y = drop1(jax.nn.relu(fc1(x)), deterministic=deterministic)
        y = self.layers[2](self.layers[1](y), deterministic=deterministic)
        return x + y.astype(x.dtype)


class DetrTransformerDecoderLayer(nnx.Module):
    """mmcv BaseTransformerLayer (post-norm): attentions.N, ffns.0, norms.N in op order."""

    def __init__(self, attentions: Sequence[nnx.Module], embed_dims, feedforward_channels,
                 operation_order: Sequence[str], ffn_drop=0.0, *, dtype=_F32, rngs: nnx.Rngs):
        if operation_order[0] == "norm":
            raise ValueError("pre-norm layers are not used by this model")
        if len(attentions) != sum(op in ("self_attn", "cross_attn") for op in operation_order):
            raise ValueError("one attention module per self_attn/cross_attn in operation_order")
        self.operation_order = tuple(operation_order)
        self.attentions = nnx.List(list(attentions))
        self.ffns = nnx.List([FFN(embed_dims, feedforward_channels, ffn_drop, dtype=dtype,
                                  rngs=rngs)])
        self.norms = nnx.List([torch_layer_norm(embed_dims, rngs)
                               for op in operation_order if op == "norm"])

    def __call__(self, query, key, value, *, query_pos=None, key_pos=None, attn_masks=None,
                 deterministic=None, **attn_kwargs):
        n_attn = len(self.attentions)
        attn_masks = [None] * n_attn if attn_masks is None else list(attn_masks)
        a = n = 0
        for op in self.operation_order:
            if op == "self_attn":
                query = self.attentions[a](query, query, query, query_pos=query_pos,
                                           key_pos=query_pos, attn_mask=attn_masks[a],
                                           deterministic=deterministic, **attn_kwargs)
                a += 1
            elif op == "cross_attn":
                query = self.attentions[a](query, key, value, query_pos=query_pos,
                                           key_pos=key_pos, attn_mask=attn_masks[a],
                                           deterministic=deterministic, **attn_kwargs)
                a += 1
            elif op == "norm":
                query = self.norms[n](query.astype(_F32))
                n += 1
            else:
                query = self.ffns[0](query, deterministic=deterministic)
        return query


class DetrTransformerDecoder(nnx.Module):
    """Container with keys layers.N.* and post_norm.* (the caller applies post_norm).
    ``layers``: a list of layers, or a ``LayerStack`` when they are scanned."""

    def __init__(self, layers, embed_dims, *, rngs: nnx.Rngs):
        self.layers = layers if isinstance(layers, LayerStack) else nnx.List(list(layers))
        self.post_norm = torch_layer_norm(embed_dims, rngs)


class TqdmMSDeformAttnPixelDecoder(nnx.Module):
    """Pixel decoder: deformable self-attention over the 3 coarsest levels with
    cross-attention to the text embeddings, then an FPN step to the finest level.

    ``__call__(feats, texts)``: feats = 4 NHWC maps (strides 4, 8, 16, 32), texts (B, K,
    text_dim). Returns (mask_feature (B, H/4, W/4, out_channels), multi-scale memories: a
    list of ``num_outs`` NHWC maps from low to high resolution, (1/32, 1/16, 1/8)).
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (256, 512, 1024, 2048),
        feat_channels: int = 256,
        out_channels: int = 256,
        text_dim: int = 768,
        num_text_embeds: int = 19,
        num_outs: int = 3,
        num_groups: int = 32,
        num_layers: int = 6,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        feedforward_channels: int = 2048,
        dropout: float = 0.0,
        operation_order: Sequence[str] = ("self_attn", "norm", "cross_attn", "norm", "ffn",
                                          "norm"),
        *,
        remat: bool = False,
        dtype=_F32,
        rngs: nnx.Rngs,
    ):
        self.num_input_levels = len(in_channels)
        self.num_encoder_levels = num_levels
        self.num_outs = num_outs
        self.feat_channels = feat_channels
        self.dtype = dtype
        if feat_channels % 2:
            raise ValueError("feat_channels must be even (sine encoding uses half per axis)")
        # from low to high resolution
        self.input_convs = nnx.List([
            ConvModule(in_channels[i], feat_channels, 1, bias=True, num_groups=num_groups,
                       relu=False, dtype=dtype, rngs=rngs)
            for i in range(self.num_input_levels - 1,
                           self.num_input_levels - num_levels - 1, -1)
        ])
        if "self_attn" not in operation_order or "cross_attn" not in operation_order:
            raise ValueError("the pixel decoder layer needs self_attn and cross_attn")

        if dropout:  # stacked layers hold no RNG streams; the reference's rate is 0
            raise ValueError("the scanned pixel decoder supports dropout 0 only")

        def attentions(rngs):
            # In operation order: the deformable attention is the self-attention.
            mods = []
            for op in operation_order:
                if op == "self_attn":
                    mods.append(MultiScaleDeformableAttention(
                        feat_channels, num_heads, num_levels, num_points, dropout,
                        dtype=dtype, rngs=rngs))
                elif op == "cross_attn":
                    mods.append(MultiheadAttention(feat_channels, num_heads, dropout, dropout,
                                                   dtype=dtype, rngs=rngs))
            return mods

        self.remat = bool(remat)
        self.scan = True  # False: the same layers as an unrolled Python loop
        self.encoder = DetrTransformerDecoder(
            LayerStack(lambda r: DetrTransformerDecoderLayer(
                attentions(r), feat_channels, feedforward_channels, operation_order, dropout,
                dtype=dtype, rngs=r), num_layers, rngs=rngs),
            feat_channels,
            rngs=rngs,
        )
        self.level_encoding = nnx.Embed(num_levels, feat_channels, param_dtype=_F32,
                                        embedding_init=embedding_normal, rngs=rngs)
        # FPN for the levels that skip the encoder, from low to high resolution.
        self.lateral_convs = nnx.List()
        self.output_convs = nnx.List()
        for i in range(self.num_input_levels - num_levels - 1, -1, -1):
            self.lateral_convs.append(ConvModule(
                in_channels[i], feat_channels, 1, bias=False, num_groups=num_groups,
                relu=False, dtype=dtype, rngs=rngs))
            self.output_convs.append(ConvModule(
                feat_channels, feat_channels, 3, bias=False, num_groups=num_groups,
                relu=True, dtype=dtype, rngs=rngs))
        self.mask_feature = torch_conv(feat_channels, out_channels, 1, dtype=dtype, rngs=rngs)
        self.text_proj = torch_linear(text_dim, feat_channels, dtype=dtype, rngs=rngs)
        self.text_pos_embed = nnx.Embed(num_text_embeds, feat_channels, param_dtype=_F32,
                                        embedding_init=embedding_normal, rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], texts: jax.Array, *, deterministic=None):
        if len(feats) != self.num_input_levels:
            raise ValueError(f"expected {self.num_input_levels} feature maps, got {len(feats)}")
        b = feats[0].shape[0]
        if texts.ndim != 3 or texts.shape[0] != b:
            raise ValueError(f"texts must be (B={b}, K, C), got {texts.shape}")
        inputs, positions, refs, shapes = [], [], [], []
        for i in range(self.num_encoder_levels):
            level_idx = self.num_input_levels - i - 1
            feat = feats[level_idx]
            _, h, w, _ = feat.shape
            projected = self.input_convs[i](feat)
            pos = sine_positional_encoding(h, w, self.feat_channels // 2)
            pos = pos + self.level_encoding.embedding[i].astype(_F32)
            # MlvlPointGenerator centres (offset 0.5) normalised by the level size: (x, y).
            ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w,
                                 indexing="ij")
            inputs.append(projected.reshape(b, h * w, -1))
            positions.append(pos.reshape(h * w, -1))
            refs.append(np.stack([xs.reshape(-1), ys.reshape(-1)], -1))
            shapes.append((h, w))
        query = jnp.concatenate(inputs, axis=1)
        query_pos = jnp.concatenate(positions, axis=0)[None]
        # The same per-level reference point is used on every level (valid ratios 1).
        ref = jnp.asarray(np.concatenate(refs, 0), _F32)
        reference_points = jnp.broadcast_to(ref[None, :, None, :],
                                             (1, ref.shape[0], self.num_encoder_levels, 2))
        text = self.text_proj(texts)
        text_pos = self.text_pos_embed.embedding[...][None].astype(_F32)
        if text_pos.shape[1] != texts.shape[1]:
            raise ValueError(f"{texts.shape[1]} text embeddings for num_text_embeds="
                             f"{text_pos.shape[1]}")
        def layer(layers, q, _):
            return layers[0](q, text, text, query_pos=query_pos, key_pos=text_pos,
                             reference_points=reference_points, spatial_shapes=tuple(shapes),
                             deterministic=deterministic)

        # remat: the deformable sampling's gathers (queries x heads x levels x points x
        # corners x channels) are recomputed in the backward pass instead of kept per layer.
        query, _ = scan_layers(layer, (self.encoder.layers,), query, remat=self.remat,
                               unroll=not self.scan)
        memory = self.encoder.post_norm(query.astype(_F32))

        outs, start = [], 0
        for h, w in shapes:
            outs.append(memory[:, start : start + h * w].reshape(b, h, w, -1))
            start += h * w
        for i in range(self.num_input_levels - self.num_encoder_levels - 1, -1, -1):
            cur = self.lateral_convs[i](feats[i])
            y = cur + resize(outs[-1], cur.shape[1:3], axes=(1, 2), dtype=outs[-1].dtype)
            outs.append(self.output_convs[i](y))
        mask_feature = self.mask_feature(outs[-1]).astype(_F32)
        return mask_feature, outs[: self.num_outs]
