"""Mask2Former (tqdm head) losses and the score-map loss against numpy and a PyTorch
restatement of the original's loss_single / ToMask / IdentityAssigner / mmseg losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfuser_jax.model.losses import (
    Mask2FormerLossConfig,
    classification_loss,
    mask2former_layer_loss,
    mask2former_layer_loss_at_points,
    mask2former_loss,
    point_mask_losses,
    sample_label_masks,
    score_map_loss,
    semantic_to_targets,
)
from mfuser_jax.ops.point_sample import point_sample

K = 5
IGNORE = 255

# Jitted once per shape: one compile is much cheaper than eager op-by-op dispatch on CPU.
_at_points = jax.jit(mask2former_layer_loss_at_points, static_argnames=("cls_norm_groups",))


def _rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def _labels(rng, b, h, w, absent=(3,)):
    lab = rng.integers(0, K, size=(b, h, w))
    for c in absent:
        lab[lab == c] = 0
    lab[:, :2, :3] = IGNORE  # some ignore pixels (as padding would give)
    lab[1, 4:, :] = 2
    return lab.astype(np.int32)


# --------------------------------------------------------------------------- torch reference
def _torch_loss_single(cls_scores, mask_preds, labels, points, class_weight, num_groups=1):
    """The original's per-layer loss on given points, restated in PyTorch.

    ToMask (np.unique of the label map, ignore removed) -> IdentityAssigner (query
    gt_label + n*K) -> pseudo sampler -> tqdmHead.loss_single with mmseg's
    CrossEntropyLoss(class_weight) / BCE / naive DiceLoss and their avg_factors.
    ``points[b, q]`` are the points the original would have drawn for query q's mask.
    ``num_groups`` splits the batch as the original's GPUs would (per-GPU losses averaged
    as DDP averages gradients; num_total_masks reduce_mean-ed across them).
    """
    cls_scores = torch.from_numpy(np.asarray(cls_scores, np.float32))
    mask_preds = torch.from_numpy(np.asarray(mask_preds, np.float32))
    points = torch.from_numpy(np.asarray(points, np.float32))
    b, q, _ = cls_scores.shape
    cw = torch.tensor(class_weight, dtype=torch.float32)
    per = b // num_groups
    # First pass: per-group positive counts for reduce_mean.
    groups = []
    for g in range(num_groups):
        sl = slice(g * per, (g + 1) * per)
        labels_list, masks_list, pos_list = [], [], []
        for i in range(g * per, (g + 1) * per):
            lab = labels[i]
            gt_labels = np.unique(lab)
            gt_labels = gt_labels[gt_labels != IGNORE]
            gt_masks = torch.from_numpy(np.stack([lab == c for c in gt_labels]).astype(np.int64)) \
                if len(gt_labels) else torch.zeros((0,) + lab.shape, dtype=torch.int64)
            gt_labels = torch.from_numpy(gt_labels.astype(np.int64))
            assigned = torch.zeros(q, dtype=torch.long)
            rows = torch.cat([gt_labels + n * K for n in range(q // K)])
            cols = torch.cat([torch.arange(len(gt_labels)) for _ in range(q // K)])
            assigned[rows] = cols + 1
            pos = torch.nonzero(assigned > 0).squeeze(-1).unique()
            lbl = torch.full((q,), K, dtype=torch.long)
            lbl[pos] = gt_labels[assigned[pos] - 1]
            labels_list.append(lbl)
            masks_list.append(gt_masks[assigned[pos] - 1])
            pos_list.append(pos)
        groups.append((sl, labels_list, masks_list, pos_list))
    num_total_masks = max(np.mean([sum(len(p) for p in grp[3]) for grp in groups]), 1)

    out = {"loss_cls": 0.0, "loss_mask": 0.0, "loss_dice": 0.0}
    for sl, labels_list, masks_list, pos_list in groups:
        lbl = torch.stack(labels_list).flatten()
        scores = cls_scores[sl].flatten(0, 1)
        ce = F.cross_entropy(scores, lbl, weight=cw, reduction="none")
        loss_cls = 2.0 * ce.sum() / cw[lbl].sum()
        mask_weights = torch.zeros(per, q)
        for j, pos in enumerate(pos_list):
            mask_weights[j, pos] = 1
        preds = mask_preds[sl][mask_weights > 0]
        targets = torch.cat(masks_list)
        pts = points[sl][mask_weights > 0]
        if targets.shape[0] == 0:
            loss_mask = loss_dice = preds.sum()
        else:
            grid = lambda p: p[:, :, None] * 2.0 - 1.0  # mmcv point_sample
            tp = F.grid_sample(targets[:, None].float(), grid(pts), align_corners=False)[:, 0, :, 0]
            pp = F.grid_sample(preds[:, None], grid(pts), align_corners=False)[:, 0, :, 0]
            s = pp.sigmoid()
            dice = 1 - (2 * (s * tp).sum(1) + 1.0) / (s.sum(1) + tp.sum(1) + 1.0)
            loss_dice = 5.0 * dice.sum() / num_total_masks
            bce = F.binary_cross_entropy_with_logits(pp.reshape(-1), tp.reshape(-1), reduction="none")
            loss_mask = 5.0 * bce.sum() / (num_total_masks * pts.shape[1])
        out["loss_cls"] += float(loss_cls) / num_groups
        out["loss_mask"] += float(loss_mask) / num_groups
        out["loss_dice"] += float(loss_dice) / num_groups
    return out


def _inputs(rng, b=2, q=K, h=6, w=7, hl=24, wl=28, p=40):
    cls = rng.normal(size=(b, q, K + 1)).astype(np.float32)
    masks = (2 * rng.normal(size=(b, q, h, w))).astype(np.float32)
    labels = _labels(rng, b, hl, wl)
    pts = rng.uniform(0, 1, size=(b, q, p, 2)).astype(np.float32)
    pts[..., :3, :] = [[0, 0], [1, 1], [0.02, 0.99]]  # borders
    return cls, masks, labels, pts


CW = [1.0] * K + [0.1]


@pytest.mark.parametrize("q", [K, 2 * K])
def test_layer_loss_matches_torch_restatement(q):
    rng = np.random.default_rng(0)
    cls, masks, labels, pts = _inputs(rng, q=q)
    got = _at_points(jnp.asarray(cls), jnp.asarray(masks),
                                           jnp.asarray(labels), jnp.asarray(pts))
    ref = _torch_loss_single(cls, masks, labels, pts, CW)
    for name in ("loss_cls", "loss_mask", "loss_dice"):
        assert got[name].dtype == jnp.float32
        assert _rel_err(got[name], ref[name]) < 1e-5, name


def test_layer_loss_per_gpu_class_normalisation():
    rng = np.random.default_rng(1)
    cls, masks, labels, pts = _inputs(rng, b=4)
    labels[2] = 1  # one image with a single class: weights differ a lot between groups
    got = _at_points(jnp.asarray(cls), jnp.asarray(masks),
                                           jnp.asarray(labels), jnp.asarray(pts),
                                           cls_norm_groups=2)
    ref = _torch_loss_single(cls, masks, labels, pts, CW, num_groups=2)
    for name in ref:
        assert _rel_err(got[name], ref[name]) < 1e-5, name
    one = _at_points(jnp.asarray(cls), jnp.asarray(masks),
                                           jnp.asarray(labels), jnp.asarray(pts))
    assert abs(float(one["loss_cls"]) - float(got["loss_cls"])) > 1e-4


def test_pieces_match_numpy():
    rng = np.random.default_rng(2)
    cls, masks, labels, pts = _inputs(rng)
    targets, gt_masks, present = jax.jit(semantic_to_targets, static_argnums=1)(
        jnp.asarray(labels), K)
    # Targets: query k positive iff class k occurs (ignore excluded); masks are label == k.
    for b in range(2):
        classes = set(np.unique(labels[b]).tolist()) - {IGNORE}
        np.testing.assert_array_equal(np.asarray(present[b]), [k in classes for k in range(K)])
        np.testing.assert_array_equal(np.asarray(targets[b]),
                                      [k if k in classes else K for k in range(K)])
        for k in range(K):
            np.testing.assert_array_equal(np.asarray(gt_masks[b, k]), labels[b] == k)
    assert not bool(present[:, 3].any())

    # Weighted CE in numpy.
    t = np.asarray(targets)
    logp = cls - np.log(np.exp(cls).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
    w = np.asarray(CW)[t]
    ref_ce = (w * nll).sum() / w.sum()
    got_ce = classification_loss(jnp.asarray(cls), jnp.asarray(t), jnp.asarray(CW))
    assert _rel_err(got_ce, ref_ce) < 1e-5

    # Label-map point sampling equals point-sampling the dense one-hot masks.
    dense = jax.jit(point_sample)(gt_masks.reshape(2 * K, 1, 24, 28), jnp.asarray(pts.reshape(2 * K, -1, 2)))
    direct = jax.jit(sample_label_masks)(jnp.asarray(labels), jnp.asarray(pts), jnp.arange(K))
    np.testing.assert_allclose(np.asarray(direct), np.asarray(dense).reshape(2, K, -1), atol=1e-6)

    # BCE and naive dice in numpy over positive masks.
    x = np.asarray(jax.jit(point_sample)(jnp.asarray(masks.reshape(2 * K, 1, 6, 7)),
                                jnp.asarray(pts.reshape(2 * K, -1, 2)))).reshape(2, K, -1)
    y = np.asarray(direct, np.float64)
    pos = np.asarray(present)
    bce = np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - x * y
    s = 1 / (1 + np.exp(-x.astype(np.float64)))
    dice = 1 - (2 * (s * y).sum(-1) + 1) / (s.sum(-1) + y.sum(-1) + 1)
    n = pos.sum()
    got_bce, got_dice = jax.jit(point_mask_losses)(jnp.asarray(x), jnp.asarray(y), jnp.asarray(pos))
    assert _rel_err(got_bce, bce[pos].sum() / (n * x.shape[-1])) < 1e-5
    assert _rel_err(got_dice, dice[pos].sum() / n) < 1e-5


def test_absent_class_only_feeds_no_object_ce():
    rng = np.random.default_rng(3)
    cls, masks, labels, pts = _inputs(rng)
    f = lambda c, m: _at_points(c, m, jnp.asarray(labels), jnp.asarray(pts))
    base = f(jnp.asarray(cls), jnp.asarray(masks))
    # Class 3 is absent everywhere: changing its mask logits changes nothing.
    masks2 = masks.copy()
    masks2[:, 3] = rng.normal(size=masks2[:, 3].shape) * 10
    other = f(jnp.asarray(cls), jnp.asarray(masks2))
    for name in base:
        assert float(base[name]) == pytest.approx(float(other[name]), rel=1e-6)
    g_mask = jax.grad(lambda m: sum(f(jnp.asarray(cls), m).values()))(jnp.asarray(masks))
    assert np.all(np.asarray(g_mask)[:, 3] == 0)
    assert np.any(np.asarray(g_mask)[:, 0] != 0)
    # Its class row is pushed toward no-object with weight 0.1 only.
    g_cls = np.asarray(jax.grad(lambda c: f(c, jnp.asarray(masks))["loss_cls"])(jnp.asarray(cls)))
    t, _, _ = semantic_to_targets(jnp.asarray(labels), K)
    wsum = np.asarray(CW)[np.asarray(t)].sum()
    sm = np.exp(cls[:, 3]) / np.exp(cls[:, 3]).sum(-1, keepdims=True)
    onehot = np.zeros_like(sm)
    onehot[:, K] = 1
    np.testing.assert_allclose(g_cls[:, 3], 2.0 * 0.1 * (sm - onehot) / wsum, rtol=1e-4, atol=1e-7)


def test_no_positive_anywhere():
    rng = np.random.default_rng(4)
    cls, masks, _, pts = _inputs(rng)
    labels = np.full((2, 24, 28), IGNORE, np.int32)
    got = _at_points(jnp.asarray(cls), jnp.asarray(masks),
                                           jnp.asarray(labels), jnp.asarray(pts))
    ref = _torch_loss_single(cls, masks, labels, pts, CW)
    assert float(got["loss_mask"]) == 0.0 and float(got["loss_dice"]) == 0.0
    assert _rel_err(got["loss_cls"], ref["loss_cls"]) < 1e-5


def test_deep_supervision_keys_sum_and_jit():
    rng = np.random.default_rng(5)
    layers = 2
    cls = [jnp.asarray(rng.normal(size=(2, K, K + 1)).astype(np.float32)) for _ in range(layers)]
    masks = [jnp.asarray(rng.normal(size=(2, K, 6, 7)).astype(np.float32)) for _ in range(layers)]
    labels = jnp.asarray(_labels(rng, 2, 24, 28))
    key = jax.random.key(7)
    cfg = {"num_points": 32}  # a plain mapping (e.g. a ConfigDict) is accepted
    assert Mask2FormerLossConfig.from_any(cfg) == Mask2FormerLossConfig(num_points=32)
    full = jax.jit(lambda c, m, l, k: mask2former_loss(c, m, l, k, cfg))
    losses = full(cls, masks, labels, key)
    expected_keys = {f"d{i}.loss_{n}" for i in range(layers - 1) for n in ("cls", "mask", "dice")}
    expected_keys |= {"loss_cls", "loss_mask", "loss_dice"}
    assert set(losses) == expected_keys
    keys = jax.random.split(key, layers)
    layer = jax.jit(lambda c, m, l, k: mask2former_layer_loss(c, m, l, k, num_points=32))
    for i in range(layers):
        one = layer(cls[i], masks[i], labels, keys[i])
        prefix = "" if i == layers - 1 else f"d{i}."
        for n, v in one.items():
            assert float(losses[prefix + n]) == pytest.approx(float(v), rel=1e-6)
    # Layers stacked on axis 0 give the same numbers as a list.
    stacked = full(jnp.stack(cls), jnp.stack(masks), labels, key)
    for n in losses:
        assert float(stacked[n]) == pytest.approx(float(losses[n]), rel=1e-5)
    # Fresh points for another key: the mask losses change, the class loss does not.
    other = full(cls, masks, labels, jax.random.key(8))
    assert float(other["loss_mask"]) != float(losses["loss_mask"])
    assert float(other["loss_cls"]) == pytest.approx(float(losses["loss_cls"]), rel=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        Mask2FormerLossConfig.from_any({"num_point": 3})


def test_bfloat16_inputs_are_computed_in_float32():
    rng = np.random.default_rng(6)
    cls, masks, labels, pts = _inputs(rng)
    cls_b, masks_b = jnp.asarray(cls, jnp.bfloat16), jnp.asarray(masks, jnp.bfloat16)
    got = _at_points(cls_b, masks_b, jnp.asarray(labels), jnp.asarray(pts))
    ref = _torch_loss_single(np.asarray(cls_b, np.float32), np.asarray(masks_b, np.float32),
                             labels, pts, CW)
    for name in ref:
        assert got[name].dtype == jnp.float32
        assert _rel_err(got[name], ref[name]) < 1e-5


def _torch_score_map_loss(score_nchw, labels, avg_non_ignore=False):
    x = torch.from_numpy(score_nchw) / 0.07
    x = F.interpolate(x, size=labels.shape[1:], mode="bilinear", align_corners=False)
    lab = torch.from_numpy(labels.astype(np.int64))
    loss = F.cross_entropy(x, lab, ignore_index=IGNORE, reduction="none")
    denom = (lab != IGNORE).sum() if avg_non_ignore else lab.numel()
    return float(loss.sum() / denom)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_score_map_loss_matches_mmseg(avg_non_ignore):
    rng = np.random.default_rng(7)
    score = np.tanh(rng.normal(size=(2, K, 5, 6))).astype(np.float32)  # cosine-like
    labels = _labels(rng, 2, 20, 24)
    ref = _torch_score_map_loss(score, labels, avg_non_ignore)
    first = score_map_loss(jnp.asarray(score), jnp.asarray(labels), channels_last=False,
                           avg_non_ignore=avg_non_ignore)
    last = score_map_loss(jnp.asarray(score.transpose(0, 2, 3, 1)), jnp.asarray(labels),
                          avg_non_ignore=avg_non_ignore)
    assert _rel_err(first, ref) < 1e-5
    assert _rel_err(last, ref) < 1e-5
    # Ignored pixels contribute nothing: changing what the scores say there is moot.
    labels2 = labels.copy()
    labels2[0, 10:, :] = IGNORE
    a = score_map_loss(jnp.asarray(score), jnp.asarray(labels2), channels_last=False)
    assert _rel_err(a, _torch_score_map_loss(score, labels2)) < 1e-5
    assert float(a) < float(first) or avg_non_ignore


def test_paper_config_normalises_the_class_loss_per_reference_gpu():
    """The paper configs' loss settings on the global batch of 4 give the reference's
    class loss: each of its 2 GPUs normalises its 2 images' weighted CE by their own
    target weights, DDP averages the two (torch restatement with two groups)."""
    from configs.base import mfuser_model_config

    lc = mfuser_model_config("large").loss
    cfg = Mask2FormerLossConfig(num_points=16, no_object_weight=float(lc.no_object_weight),
                                loss_cls_weight=float(lc.cls),
                                cls_norm_images=int(lc.cls_norm_images))
    rng = np.random.default_rng(11)
    cls, masks, labels, pts = _inputs(rng, b=4)
    labels[0] = 1  # unequal target weights between the two GPUs' images
    got = mask2former_loss([jnp.asarray(cls)], [jnp.asarray(masks)], jnp.asarray(labels),
                           jax.random.key(0), cfg)
    ref = _torch_loss_single(cls, masks, labels, pts, CW, num_groups=2)
    assert _rel_err(got["loss_cls"], ref["loss_cls"]) < 1e-5
    one = _torch_loss_single(cls, masks, labels, pts, CW, num_groups=1)
    assert _rel_err(got["loss_cls"], one["loss_cls"]) > 1e-3  # the grouping matters here
    with pytest.raises(ValueError, match="cls_norm_images=2"):
        mask2former_loss([jnp.asarray(cls[:3])], [jnp.asarray(masks[:3])],
                         jnp.asarray(labels[:3]), jax.random.key(0), cfg)
