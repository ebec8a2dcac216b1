"""MFuser's training losses: text-query Mask2Former losses and the score-map loss.

Ported from devinxzhang/MFuser: mmseg/models/decode_heads/tqdm_head.py (loss_single,
get_targets), mmseg/models/utils/assigner.py (IdentityAssigner), the ToMask pipeline step
(mmseg/datasets/pipelines/formating.py), mmseg/models/losses/{cross_entropy_loss,
dice_loss,utils}.py, and models/segmentors/mfuser_clip.py + IdentityHead for the score map.

What the original does, and how it is expressed here without data-dependent shapes:

* Targets (ToMask + IdentityAssigner + MaskPseudoSampler): the positives of an image are
  the classes present in its (cropped, padded) label map, ignore (255) excluded; query q
  is tied to class q % K (the original allows num_queries = n * K; MFuser uses n = 1).
  Queries of absent classes get the no-object label K. Instead of gathering the
  positive masks we keep all B x Q masks and weight them by ``present``.
* Class loss: softmax CE with class weights ``[1] * K + [0.1]``, normalised by the sum of
  the weights of the targets (``avg_factor = class_weight[labels].sum()``), times 2.
* Mask losses on points: per positive mask, ``num_points`` points chosen on that mask's
  own logits (importance sampling, ``get_uncertain_point_coords_with_randomness``); the
  ground-truth mask (label resolution) and the prediction (1/4 resolution) are both
  bilinearly sampled there (normalised coordinates, so resolutions may differ).
  BCE-with-logits summed / (num_total_masks * num_points) times 5; naive dice
  ``1 - (2 a + 1) / (b + c + 1)`` on sigmoid, summed / num_total_masks, times 5;
  ``num_total_masks = max(#positives, 1)``; no positive anywhere -> both are 0.
* Deep supervision: one such triple per decoder prediction, logged as ``d{i}.loss_*``
  for all but the last and ``loss_*`` for the last.
* Score map: ``score_map / 0.07`` resized bilinearly (align_corners=False) to the label
  size, softmax CE with ignore 255. mmseg 0.16's CrossEntropyLoss (avg_non_ignore=False)
  divides by *all* pixels, ignored ones included: kept by default.

Distributed normalisation: the original runs per GPU and DDP averages gradients.
``num_total_masks`` is ``reduce_mean``-ed over GPUs, so per-GPU sum / mean count averaged
over GPUs equals the global sum / global count: computing on the global batch (one device
or a sharded global batch under jit) reproduces it exactly. The class-loss normaliser is
*not* reduced in the original (per-GPU weighted mean, then averaged): set
``cls_norm_images`` to the original's images per GPU (2 in the paper configs) to
reproduce that (0 = one weighted mean over the whole batch). The score-map mean is over equal-sized images,
so per-GPU and global means agree.

All losses are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mfuser_jax.data.labels import IGNORE_INDEX
from mfuser_jax.ops.point_sample import (
    bilinear_corners,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from mfuser_jax.ops.resize import resize

__all__ = [
    "Mask2FormerLossConfig",
    "semantic_to_targets",
    "default_class_weight",
    "classification_loss",
    "sample_label_masks",
    "point_mask_losses",
    "mask2former_layer_loss_at_points",
    "mask2former_layer_loss",
    "mask2former_loss",
    "score_map_loss",
]


@dataclasses.dataclass(frozen=True)
class Mask2FormerLossConfig:
    """The tqdm head's loss settings (configs/mfuser/mfuser_clip_vit-l_*.py)."""

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # None -> [1.0] * num_classes + [no_object_weight].
    class_weight: tuple[float, ...] | None = None
    no_object_weight: float = 0.1
    loss_cls_weight: float = 2.0
    loss_mask_weight: float = 5.0
    loss_dice_weight: float = 5.0
    dice_eps: float = 1.0
    ignore_index: int = IGNORE_INDEX
    # Images per class-loss normaliser group: the reference's images per GPU (each GPU
    # normalises its own class loss, DDP averages). 0 = one group over the whole batch.
    cls_norm_images: int = 0

    @classmethod
    def from_any(cls, cfg: "Mask2FormerLossConfig | Mapping[str, Any] | None"):
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        items = dict(cfg)
        if items.get("class_weight") is not None:
            items["class_weight"] = tuple(float(w) for w in items["class_weight"])
        unknown = set(items) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Mask2Former loss settings: {sorted(unknown)}")
        return cls(**items)


def default_class_weight(num_classes: int, no_object_weight: float = 0.1) -> jax.Array:
    return jnp.asarray([1.0] * num_classes + [no_object_weight], jnp.float32)


def _present_classes(labels: jax.Array, num_classes: int, ignore_index: int) -> jax.Array:
    """(B, H, W) int -> (B, K) bool: class k occurs in image b (ignore excluded)."""
    valid = labels != ignore_index
    hits = (labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)) & valid[..., None]
    return jnp.any(hits, axis=(1, 2))


def semantic_to_targets(labels: jax.Array, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """Identity-assignment targets from a semantic label map.

    labels: (B, H, W) int. Returns ``class_targets`` (B, K) int32 (k if class k is
    present, else K = no-object), ``gt_masks`` (B, K, H, W) float32 (label == k, ignore
    pixels are 0 in every mask) and ``present`` (B, K) bool.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, H, W), got {labels.shape}")
    classes = jnp.arange(num_classes, dtype=labels.dtype)
    valid = labels != ignore_index
    gt_masks = (labels[:, None] == classes[None, :, None, None]) & valid[:, None]
    present = jnp.any(gt_masks, axis=(2, 3))
    class_targets = jnp.where(present, jnp.arange(num_classes, dtype=jnp.int32), num_classes)
    return class_targets, gt_masks.astype(jnp.float32), present


def _query_targets(labels, num_queries, num_classes, ignore_index):
    """Per-query (class id, positive?) under the IdentityAssigner.

    Query q <-> class q % K for q < (Q // K) * K; later queries are always negatives.
    """
    q = jnp.arange(num_queries)
    query_class = q % num_classes
    tied = q < (num_queries // num_classes) * num_classes
    present = _present_classes(labels, num_classes, ignore_index)  # (B, K)
    positive = present[:, query_class] & tied[None, :]
    class_targets = jnp.where(positive, query_class[None, :], num_classes).astype(jnp.int32)
    return query_class, positive, class_targets


def classification_loss(cls_scores: jax.Array, class_targets: jax.Array,
                        class_weight: jax.Array, num_groups: int = 1) -> jax.Array:
    """mmseg CrossEntropyLoss(class_weight=w) with ``avg_factor = w[targets].sum()``.

    cls_scores (B, Q, K+1) logits, class_targets (B, Q) in [0, K]. Returns
    ``sum(w[y] * CE) / sum(w[y])`` (unweighted by the loss weight). With ``num_groups`` G
    the batch is split into G equal consecutive groups (the original's GPUs), each
    normalised on its own, and the G values averaged.
    """
    b = cls_scores.shape[0]
    if b % num_groups:
        raise ValueError(f"batch {b} is not divisible by cls_norm_groups={num_groups}")
    logp = jax.nn.log_softmax(cls_scores.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, class_targets[..., None], axis=-1)[..., 0]
    w = jnp.asarray(class_weight, jnp.float32)[class_targets]
    num = jnp.sum((w * nll).reshape(num_groups, -1), axis=1)
    den = jnp.sum(w.reshape(num_groups, -1), axis=1)
    return jnp.mean(num / den)


def sample_label_masks(labels: jax.Array, points: jax.Array, mask_classes: jax.Array,
                       ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """``point_sample`` of the binary masks (labels == class) without building them.

    labels (B, H, W) int; points (B, Q, P, 2) normalised (x, y); mask_classes (Q,) int.
    Returns (B, Q, P) float32, equal to point-sampling the float mask ``labels ==
    mask_classes[q]`` (ignore pixels count as 0) with grid_sample semantics.
    """
    b, h, w = labels.shape
    _, q, p, _ = points.shape
    flat = labels.reshape(b, h * w)
    target = mask_classes.astype(labels.dtype)[None, :, None]
    out = jnp.zeros((b, q, p), jnp.float32)
    for idx, wt in bilinear_corners(points, h, w):
        lab = jnp.take_along_axis(flat, idx.reshape(b, q * p), axis=1).reshape(b, q, p)
        hit = (lab == target) & (lab != ignore_index)
        out = out + jnp.where(hit, wt, 0.0)
    return out


def point_mask_losses(point_logits: jax.Array, point_targets: jax.Array,
                      positive: jax.Array, dice_eps: float = 1.0):
    """Mask BCE and naive dice over positive masks, mmseg-normalised.

    point_logits, point_targets (B, Q, P); positive (B, Q) bool. Returns (bce, dice)
    without loss weights: bce = sum over positives x points / (max(#pos, 1) * P), dice =
    sum over positives of 1 - (2 sum(s t) + eps) / (sum s + sum t + eps), s = sigmoid, /
    max(#pos, 1).
    """
    x = point_logits.astype(jnp.float32)
    t = point_targets.astype(jnp.float32)
    pos = positive.astype(jnp.float32)
    num_points = x.shape[-1]
    num_masks = jnp.maximum(jnp.sum(pos), 1.0)
    # binary_cross_entropy_with_logits, the overflow-safe form torch uses.
    bce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    loss_mask = jnp.sum(bce * pos[..., None]) / (num_masks * num_points)
    s = jax.nn.sigmoid(x)
    a = jnp.sum(s * t, axis=-1)
    dice = 1.0 - (2.0 * a + dice_eps) / (jnp.sum(s, -1) + jnp.sum(t, -1) + dice_eps)
    loss_dice = jnp.sum(dice * pos) / num_masks
    return loss_mask, loss_dice


def mask2former_layer_loss_at_points(
    cls_scores: jax.Array,
    mask_preds: jax.Array,
    labels: jax.Array,
    point_coords: jax.Array,
    *,
    class_weight: jax.Array | Sequence[float] | None = None,
    no_object_weight: float = 0.1,
    loss_cls_weight: float = 2.0,
    loss_mask_weight: float = 5.0,
    loss_dice_weight: float = 5.0,
    dice_eps: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    cls_norm_groups: int = 1,
) -> dict[str, jax.Array]:
    """One decoder layer's losses with given sampling points.

    cls_scores (B, Q, K+1) logits (last = no-object); mask_preds (B, Q, h, w) logits;
    labels (B, H, W) int (any resolution, ignore ``ignore_index``); point_coords
    (B, Q, P, 2) normalised (x, y) per mask (only those of positive masks matter).
    Returns {"loss_cls", "loss_mask", "loss_dice"}, loss weights applied.
    """
    b, q, k1 = cls_scores.shape
    num_classes = k1 - 1
    if mask_preds.ndim != 4 or mask_preds.shape[:2] != (b, q):
        raise ValueError(f"mask_preds must be (B, Q, h, w) = ({b}, {q}, h, w), got "
                         f"{mask_preds.shape}")
    if labels.ndim != 3 or labels.shape[0] != b:
        raise ValueError(f"labels must be (B, H, W) with B={b}, got {labels.shape}")
    if point_coords.ndim != 4 or point_coords.shape[:2] != (b, q) or point_coords.shape[-1] != 2:
        raise ValueError(f"point_coords must be (B, Q, P, 2), got {point_coords.shape}")
    if class_weight is None:
        class_weight = default_class_weight(num_classes, no_object_weight)
    class_weight = jnp.asarray(class_weight, jnp.float32)
    if class_weight.shape != (k1,):
        raise ValueError(f"class_weight must have {k1} entries, got {class_weight.shape}")

    query_class, positive, class_targets = _query_targets(labels, q, num_classes, ignore_index)
    loss_cls = classification_loss(cls_scores, class_targets, class_weight, cls_norm_groups)

    h, w = mask_preds.shape[-2:]
    p = point_coords.shape[2]
    point_coords = jax.lax.stop_gradient(point_coords.astype(jnp.float32))
    point_logits = point_sample(
        mask_preds.astype(jnp.float32).reshape(b * q, 1, h, w),
        point_coords.reshape(b * q, p, 2)).reshape(b, q, p)
    point_targets = sample_label_masks(labels, point_coords, query_class, ignore_index)
    loss_mask, loss_dice = point_mask_losses(point_logits, point_targets, positive, dice_eps)
    return {
        "loss_cls": loss_cls_weight * loss_cls,
        "loss_mask": loss_mask_weight * loss_mask,
        "loss_dice": loss_dice_weight * loss_dice,
    }


def mask2former_layer_loss(
    cls_scores: jax.Array,
    mask_preds: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    **kwargs,
) -> dict[str, jax.Array]:
    """One decoder layer's losses; sampling points drawn from ``key`` on the masks' own
    logits (importance sampling). ``kwargs`` as ``mask2former_layer_loss_at_points``."""
    points = get_uncertain_point_coords_with_randomness(
        key, mask_preds.astype(jnp.float32), num_points, oversample_ratio,
        importance_sample_ratio)
    return mask2former_layer_loss_at_points(cls_scores, mask_preds, labels, points, **kwargs)


def mask2former_loss(
    all_cls_scores: Sequence[jax.Array] | jax.Array,
    all_mask_preds: Sequence[jax.Array] | jax.Array,
    labels: jax.Array,
    key: jax.Array,
    cfg: Mask2FormerLossConfig | Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """Deep-supervised losses over all decoder predictions (list or stacked on axis 0).

    Keys as the tqdm head logs them: ``d{i}.loss_{cls,mask,dice}`` for predictions
    0..L-2 and ``loss_{cls,mask,dice}`` for the last. Each prediction gets its own
    points from ``jax.random.split(key, L)``; fold the step into ``key`` upstream so
    every step draws fresh points. The total loss is the sum of all values.
    """
    cfg = Mask2FormerLossConfig.from_any(cfg)
    num_layers = len(all_cls_scores)
    if len(all_mask_preds) != num_layers or num_layers == 0:
        raise ValueError(f"got {num_layers} class predictions and {len(all_mask_preds)} "
                         "mask predictions; need the same non-zero number")
    keys = jax.random.split(key, num_layers)
    batch, per_group = all_cls_scores[0].shape[0], cfg.cls_norm_images
    # A batch smaller than one group is one group (a GPU holding fewer images than the
    # reference's 2); check_config refuses training batches that split unevenly.
    per_group = min(per_group, batch)
    if per_group and batch % per_group:
        raise ValueError(f"a batch of {batch} images cannot be split into class-loss "
                         f"normaliser groups of cls_norm_images={per_group}")
    layer_kwargs = dict(
        num_points=cfg.num_points,
        oversample_ratio=cfg.oversample_ratio,
        importance_sample_ratio=cfg.importance_sample_ratio,
        class_weight=cfg.class_weight,
        no_object_weight=cfg.no_object_weight,
        loss_cls_weight=cfg.loss_cls_weight,
        loss_mask_weight=cfg.loss_mask_weight,
        loss_dice_weight=cfg.loss_dice_weight,
        dice_eps=cfg.dice_eps,
        ignore_index=cfg.ignore_index,
        cls_norm_groups=batch // per_group if per_group else 1,
    )
    # The layers' predictions share shapes: one traced layer loss, mapped over the layers
    # (compiled once instead of num_layers times; the same values and keys as a loop).
    per_layer = jax.lax.map(
        lambda args: mask2former_layer_loss(args[0], args[1], labels, args[2], **layer_kwargs),
        (jnp.asarray(all_cls_scores), jnp.asarray(all_mask_preds), keys))
    losses = {}
    for i in range(num_layers):
        prefix = "" if i == num_layers - 1 else f"d{i}."
        for name, value in per_layer.items():
            losses[prefix + name] = value[i]
    return losses


def score_map_loss(
    score_map: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.07,
    ignore_index: int = IGNORE_INDEX,
    channels_last: bool = True,
    loss_weight: float = 1.0,
    avg_non_ignore: bool = False,
) -> jax.Array:
    """The IdentityHead's loss on the pixel-text score map.

    score_map: cosine similarities, (B, h, w, K) if ``channels_last`` else (B, K, h, w);
    labels (B, H, W) int. Computes ``score_map / temperature`` (the segmentor's
    ``self.tau = 0.07``), resizes it bilinearly (align_corners=False) to (H, W) and takes
    softmax CE with ``ignore_index``. The sum is divided by all B*H*W pixels (mmseg 0.16's
    default, avg_non_ignore=False), or by the non-ignored ones if ``avg_non_ignore``.
    """
    x = score_map.astype(jnp.float32) / temperature
    if channels_last:
        x = jnp.moveaxis(x, -1, 1)
    if x.ndim != 4 or labels.ndim != 3 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"score_map must be 4-D and labels (B, H, W); got {score_map.shape} "
                         f"and {labels.shape}")
    x = resize(x, labels.shape[1:])
    logp = jax.nn.log_softmax(x, axis=1)
    valid = labels != ignore_index
    # Select the target log-prob by comparison rather than a gather: the gradient is then
    # elementwise instead of a scatter-add over (B, K, H, W). Ignore pixels match no class.
    classes = jnp.arange(x.shape[1], dtype=labels.dtype)[None, :, None, None]
    hit = (labels[:, None] == classes) & valid[:, None]
    total = -jnp.sum(jnp.where(hit, logp, 0.0))
    denom = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32) if avg_non_ignore else labels.size
    return loss_weight * total / denom
