"""Analytic FLOP count of MFuser (CLIP variant) from its model config, batch and image size.

The model config is a ``mfuser_jax.model.config.ModelConfig`` (where ml_collections is
absent) or configs/base.py's ``mfuser_model_config`` ConfigDict; only its fields are read.

Conventions (the usual MFU ones, e.g. PaLM appendix B):

* A matmul / convolution counts 2 FLOPs per multiply-accumulate. Attention counts its two
  batched matmuls (QK^T and PV: 4 * L_q * L_k * width). Elementwise work (norms, softmax,
  activations, residual adds, bilinear sampling weights) is NOT counted: on an accelerator it
  is memory-bound and it is not what a matmul peak measures.
* The selective scan counts 9 FLOPs per (token, channel, state): exp(delta*A) argument,
  delta*B*u, the recurrence's multiply-add and the C contraction, plus the D skip and gate
  are per (token, channel) and ignored. It is a few percent of an MVFuser's matmuls.
* Multi-scale deformable attention counts its projections; the bilinear gather is counted as
  its weighted sum (2 FLOPs per sampled value per corner).

Training step (``train_step_flops``): a parameter-owning op costs 1x forward + 1x for the
gradient w.r.t. its input + 1x for the gradient w.r.t. its weights. Frozen ops skip the
weight gradient but still need the input gradient wherever a trainable parameter lies
upstream. In MFuser the MVFusers write back into BOTH towers after every layer
(clip_x += fused, dino_x += proj2(fused)), so the gradient of every adapter in layer i flows
through the frozen CLIP and DINOv2 blocks i+1..L-1: those frozen blocks cost 2x forward.
Only the patch embeddings and block 0 of each tower (nothing trainable upstream) cost 1x.
The frozen text tower costs 2x too: the trainable CoOp ``contexts`` enter at its input.
Rematerialisation adds one more forward of the remat'ed layers to the EXECUTED count, not
to the model FLOPs (MFU uses model FLOPs, so remat shows up as lower MFU).

``xla_flops(fn, *args)`` gives XLA's own count (compiled cost analysis) for comparison; it
also counts elementwise ops, so it reads somewhat higher than these matmul FLOPs on tiny
widths, and how it counts a while loop (the lax.scan / chunked scan body) depends on the
XLA version.
"""

from __future__ import annotations

import math
from typing import Any

from mfuser_jax.towers.registry import get_vlm, vlm_names

__all__ = ["attention_block_flops", "mvfuser_flops", "backbone_flops", "decoder_flops",
           "text_flops", "mfuser_forward_flops", "train_step_flops", "xla_flops"]


def attention_block_flops(tokens: int, width: int, mlp_hidden: int, kv_tokens: int | None = None
                          ) -> int:
    """Pre-norm transformer block on one sequence: qkv + out projection, attention, MLP."""
    kv = tokens if kv_tokens is None else kv_tokens
    proj = 2 * tokens * width * width * 2 + 2 * kv * width * width * 2  # q, out; k, v
    attn = 4 * tokens * kv * width
    mlp = 4 * tokens * width * mlp_hidden
    return proj + attn + mlp


def mvfuser_flops(length: int, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 1,
                  dt_rank: int | None = None) -> dict[str, int]:
    """One MVFuser on one sequence of ``length`` tokens: matmul/conv part and scan part."""
    d_inner = expand * d_model
    half = d_inner // 2
    r = math.ceil(d_model / 16) if dt_rank is None else dt_rank
    mm = 2 * length * (d_model * d_inner            # in_proj
                       + 2 * half * d_conv           # two depthwise convs
                       + half * (r + 2 * d_state)    # x_proj
                       + r * half                    # dt_proj
                       + half * d_model)             # out_proj
    return {"matmul": mm, "scan": 9 * length * half * d_state}


def _clip(model_cfg: Any):
    """The tower section; the counts below are written for the CLIP variant's towers (a VLM
    whose spec sets ``analytic_flops``: CLIP's layout, class token, 4x MLP, projections)."""
    vlm = model_cfg.vlm
    if not get_vlm(vlm).build.analytic_flops:
        covered = [n for n in vlm_names() if get_vlm(n).build.analytic_flops]
        raise ValueError(f"analytic FLOPs cover {', '.join(covered)} only, not vlm={vlm!r}")
    return model_cfg[vlm]


def _grid(image_hw, patch):
    return image_hw[0] // patch, image_hw[1] // patch


def backbone_flops(model_cfg: Any, batch: int, image_hw: tuple[int, int]) -> dict[str, int]:
    """Forward FLOPs of the fused backbone, split by what training does with them."""
    c, d, m = _clip(model_cfg), model_cfg.dinov2, model_cfg.mvfuser
    p = int(model_cfg.patch_size)
    gh, gw = _grid(image_hw, p)
    n_patch = gh * gw
    t = n_patch + 1  # class token + patches (no registers)
    w, dd, layers = int(c.width), int(d.embed_dim), int(c.layers)
    clip_block = attention_block_flops(t, w, 4 * w)
    dino_block = attention_block_flops(t, dd, int(dd * float(d.mlp_ratio)))
    fuser = mvfuser_flops(2 * t, w, int(m.d_state), int(m.d_conv), int(m.expand))
    proj12 = 2 * t * dd * w * 2
    fpn_dim = w + dd
    # ConvTranspose 2x2/2: every input pixel feeds 4 outputs: fpn1 = two (g, then 2g), fpn2 = one
    fpn = 2 * fpn_dim * fpn_dim * 4 * n_patch * (1 + 4 + 1)
    embed = 2 * t * (dd * w + w * int(c.output_dim))  # adapter_proj3 + ln_post/proj
    patch_embed = 2 * n_patch * 3 * p * p * (w + dd)
    out = {
        # frozen, nothing trainable upstream: forward only
        "frozen_no_grad": batch * (patch_embed + clip_block + dino_block),
        # frozen, but adapters upstream: forward + input gradient
        "frozen_with_grad": batch * (layers - 1) * (clip_block + dino_block),
        "trainable": batch * (layers * (fuser["matmul"] + fuser["scan"] + proj12) + fpn + embed),
    }
    # adapter_proj3 and the CLIP proj are trainable/frozen mixed; counted trainable (small).
    out["mvfuser_scan"] = batch * layers * fuser["scan"]
    out["fused_layers"] = batch * layers * (clip_block + dino_block + fuser["matmul"] + fuser["scan"]
                                            + proj12)
    out["total"] = out["frozen_no_grad"] + out["frozen_with_grad"] + out["trainable"]
    return out


def text_flops(model_cfg: Any, batch: int, image_hw: tuple[int, int]) -> dict[str, int]:
    """Frozen text tower (once per forward, K class prompts) and the context decoder."""
    c, cd = _clip(model_cfg), model_cfg.context_decoder
    k = int(model_cfg.num_classes)
    s = int(c.token_length) + int(c.n_ctx)
    wt, e = int(c.text_width), int(c.output_dim)
    tower = k * int(c.text_layers) * attention_block_flops(s, wt, 4 * wt) + 2 * k * wt * e
    gh, gw = _grid(image_hw, int(model_cfg.patch_size))
    n_vis = gh * gw + 1
    cw = int(cd.width)
    dec = 2 * n_vis * e * cw + 2 * k * e * cw + 2 * k * cw * e  # memory_proj, text_proj, out_proj
    fuser = mvfuser_flops(2 * k + n_vis, cw)  # the ContextDecoder's MVFuser: its defaults
    layer = (8 * k * cw * cw + 4 * k * k * cw      # self-attention
             + fuser["matmul"] + fuser["scan"]     # MVFuser over [t, visual, t]
             + 16 * k * cw * cw)                   # MLP 4x
    dec += int(cd.layers) * layer
    score_map = 2 * gh * gw * k * e
    return {"text_tower": tower, "context_decoder": batch * (dec + score_map)}


def _mha(q_len, kv_len, width):
    return 4 * q_len * width * width + 4 * kv_len * width * width + 4 * q_len * kv_len * width


def decoder_flops(model_cfg: Any, batch: int, image_hw: tuple[int, int]) -> int:
    """TqdmHead forward: MSDeformAttn pixel decoder with text cross-attention + mask decoder."""
    c, d, dec = _clip(model_cfg), model_cfg.dinov2, model_cfg.decoder
    gh, gw = _grid(image_hw, int(model_cfg.patch_size))
    cin = int(c.width) + int(d.embed_dim)
    f, e = int(dec.feat_channels), int(c.output_dim)
    heads, points, k = int(dec.num_heads), int(dec.deform_points), int(model_cfg.num_classes)
    # FPN maps: strides 4, 8, 16, 32 relative to the image = 4g, 2g, g, g/2 of the patch grid
    sizes = [(gh * 4, gw * 4), (gh * 2, gw * 2), (gh, gw), (gh // 2, gw // 2)]
    hw = [a * b for a, b in sizes]
    levels = 3
    q = sum(hw[1:])
    total = sum(2 * n * cin * f for n in hw[1:])  # input 1x1 convs
    total += 2 * k * e * f                        # text_proj
    msda = (4 * q * f * f                         # value_proj, output_proj
            + 2 * q * f * heads * levels * points * 3  # sampling offsets (x2) and weights
            + 2 * q * levels * points * 4 * f)    # bilinear weighted sums (4 corners)
    layer = msda + _mha(q, k, f) + 4 * q * f * int(dec.pixel_ffn)
    total += int(dec.pixel_decoder_layers) * layer
    total += 2 * hw[0] * cin * f + 2 * hw[0] * 9 * f * f + 2 * hw[0] * f * f  # lateral, output, mask_feature
    # mask decoder: queries = classes; masks on the stride-4 map
    total += 2 * k * e * f + 2 * k * f * f  # text -> query MLP
    head = 2 * k * f * (k + 1) + 3 * 2 * k * f * f + 2 * k * f * hw[0]
    mem = [hw[3], hw[2], hw[1]]  # low to high resolution
    n_layers = int(dec.decoder_layers)
    total += (n_layers + 1) * head
    for i in range(n_layers):
        total += _mha(k, mem[i % 3], f) + _mha(k, k, f) + 4 * k * f * int(dec.ffn)
    return batch * total


def mfuser_forward_flops(model_cfg: Any, batch: int, image_hw: tuple[int, int]) -> dict[str, int]:
    """Forward FLOPs by part and in total."""
    bb = backbone_flops(model_cfg, batch, image_hw)
    tx = text_flops(model_cfg, batch, image_hw)
    dec = decoder_flops(model_cfg, batch, image_hw)
    out = {"backbone": bb["total"], "text_tower": tx["text_tower"],
           "context_decoder": tx["context_decoder"], "decoder": dec}
    out["total"] = sum(out.values())
    return out


def train_step_flops(model_cfg: Any, batch: int, image_hw: tuple[int, int], remat: bool = False
                     ) -> dict[str, int]:
    """Model FLOPs of one training step (see the module docstring for the accounting) and the
    executed FLOPs (with remat's recomputation of the fused layers)."""
    bb = backbone_flops(model_cfg, batch, image_hw)
    tx = text_flops(model_cfg, batch, image_hw)
    dec = decoder_flops(model_cfg, batch, image_hw)
    model = (bb["frozen_no_grad"] + 2 * bb["frozen_with_grad"] + 3 * bb["trainable"]
             + 2 * tx["text_tower"] + 3 * tx["context_decoder"] + 3 * dec)
    executed = model
    if remat:  # the fused layers (towers + adapters) are recomputed once in the backward pass
        executed = model + bb["fused_layers"]
    return {"model": model, "executed": executed,
            "forward": bb["total"] + tx["text_tower"] + tx["context_decoder"] + dec}


def xla_flops(fn, *args) -> float | None:
    """XLA's FLOP count of ``jax.jit(fn)(*args)`` from the compiled cost analysis, or None."""
    import jax

    try:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
