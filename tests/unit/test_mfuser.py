"""The assembled MFuser: tiny forward/backward, trainable split, inference, full-size counts.
The tiny model comes from tests/conftest.py's ``tiny_mfuser`` (a fresh clone per test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import mfuser_model_config
from mfuser_jax.model.mfuser import MFuser
from mfuser_jax.model.variants import is_trainable_path
from mfuser_jax.nn.stack import stack_prefixes
from tests.support import batch, paths, tiny_config


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(tiny_mfuser):
    tiny_model = tiny_mfuser()
    images, labels = batch()
    graphdef, trainable, rest = nnx.split(tiny_model, tiny_model.trainable_filter, ...)

    @jax.jit
    def grads(trainable, rest):
        def loss(trainable):
            model = nnx.merge(graphdef, trainable, rest, copy=True)
            total, parts = model.loss(images, labels, jax.random.key(1))
            return total, parts
        return jax.grad(loss, has_aux=True)(trainable)

    g, parts = grads(trainable, rest)
    # The score-map term and all 3 predictions' class/mask/dice terms are present.
    assert "scr_map.loss_seg" in parts and "decode.loss_dice" in parts
    assert "decode.d0.loss_cls" in parts and len(parts) == 10
    assert all(np.isfinite(float(v)) for v in parts.values())

    grad_paths = paths(g)
    assert grad_paths == paths(trainable)
    assert all(is_trainable_path(p) for p in grad_paths)
    # a stacked parameter is checked layer by layer
    stacked = stack_prefixes(tiny_model)
    dead = [".".join(map(str, p)) for p, v in nnx.to_flat_state(g)
            if any(not np.any(a) for a in (
                np.asarray(v[...]) if any(tuple(map(str, p[:len(s)])) == s for s in stacked)
                else [np.asarray(v[...])]))]
    assert dead == [], f"parameters without gradient: {dead}"

    frozen = paths(nnx.state(tiny_model, nnx.Param)) - grad_paths
    assert any(p[:2] == ("backbone", "dinov2") for p in frozen)
    for tower in ("transformer", "conv1", "ln_post", "proj"):  # the CLIP tower
        assert any(p[:3] == ("backbone", "vlm", tower) for p in frozen), tower
    assert any(p[0] == "text_encoder" for p in frozen)
    assert not any(p[0] == "text_encoder" for p in grad_paths)


def test_scanned_layers_and_remat_change_nothing_but_the_program():
    """The stacked layers run as lax.scan (decoder: rounds of 3 levels) with remat give the
    loss and gradients of the same layers unrolled in Python (scan without remat, the small
    configs' default, is the same program minus the checkpoints; each compile here costs a
    minute of the suite, so one scanned program is compared)."""
    cfg = tiny_config()
    cfg.decoder.decoder_layers = 3  # one full round of the 3 levels: the periodic scan runs
    model = MFuser(cfg, rngs=nnx.Rngs(0))
    images, labels = batch(b=2)  # one class-loss normaliser group (cls_norm_images=2)
    graphdef_plain = nnx.graphdef(model)

    def loss_and_grads(scan, remat):
        model.set_layer_execution(scan=scan, remat=remat)
        try:
            graphdef, trainable, rest = nnx.split(model, model.trainable_filter, ...)
        finally:
            model.set_layer_execution(scan=True, remat=False)

        def loss(trainable):
            m = nnx.merge(graphdef, trainable, rest, copy=True)
            return m.loss(images, labels, jax.random.key(3))[0]
        return jax.jit(jax.value_and_grad(loss))(trainable)

    unrolled, g_unrolled = loss_and_grads(scan=False, remat=False)
    assert nnx.graphdef(model) == graphdef_plain
    value, grads = loss_and_grads(scan=True, remat=True)
    np.testing.assert_allclose(value, unrolled, rtol=1e-5)
    # Equal up to float reassociation: compare at each leaf's scale. The floor covers
    # leaves whose true gradient is 0 and whose computed one is float noise (~1e-7): conv
    # biases right before a norm that subtracts them again (the tiny pixel decoder's
    # input convs: GroupNorm with one channel per group).
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_unrolled)):
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=max(1e-5 * float(np.abs(b).max()), 1e-6))


def test_predict_and_custom_class_names(tiny_mfuser):
    tiny_model = tiny_mfuser()
    images, _ = batch(b=1, size=64)
    scores = tiny_model.predict(images)
    assert scores.shape == (1, 64, 64, 19) and scores.dtype == jnp.float32
    # Known names keep their trained slots: the channels are a selection of the full output.
    picked = tiny_model.predict(images, class_names=["car", "road"])
    np.testing.assert_allclose(picked, scores[..., [13, 0]], rtol=1e-5, atol=1e-6)
    # A new name takes a free slot; the output has one channel per name.
    # A new name takes the first free slot (sidewalk's, 1): the text, not the slot, decides.
    novel = tiny_model.predict(images, class_names=["road", "traffic cone"])
    assert novel.shape == (1, 64, 64, 2) and np.all(np.isfinite(novel))
    assert not np.allclose(novel[..., 1], scores[..., 1], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="class names"):
        tiny_model.predict(images, class_names=[])


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_parameter_counts():
    cfg = mfuser_model_config("large")
    model = nnx.eval_shape(lambda: MFuser(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    bb = params["backbone"]
    assert _count(bb["adapter"]) == 24 * 1_667_585 == 40_022_040
    assert _count([bb[f"adapter_proj{i}"] for i in (1, 2, 3)]) == 51_430_400
    assert _count([bb[f"fpn{i}"] for i in (1, 2)]) == 50_341_888
    assert _count(params["context_decoder"]) == 1_494_401
    # tqdm head: derived layer by layer from the original's constructors in tests/unit/test_decoder.py.
    assert _count(params["decode_head"]) == 26_766_292
    assert params["contexts"].shape == (1, 5, 768) and params["gamma"].shape == (768,)
    # Frozen towers at MFuser's sizes (patch 16, 512 px, 10 text positions); see
    # tests/unit/test_dinov2.py and tests/unit/test_clip.py for the derivations from the official ones.
    assert _count(bb["dinov2"]) == 304_199_680
    clip_visual = {k: v for k, v in bb.items() if not str(k).startswith(("dinov2", "adapter", "fpn"))}
    assert _count(clip_visual) == 304_936_960
    assert _count(params["text_encoder"]) == 123_598_848
    trainable = nnx.state(model, model.trainable_filter)
    frozen = 304_199_680 + 304_936_960 + 123_598_848
    assert _count(params) - _count(trainable) == frozen


@pytest.mark.slow
def test_overfits_one_synthetic_image(tiny_mfuser):
    """The whole trainable path learns: 150 AdamW steps on one scene cut the loss by > 80%."""
    import optax

    from mfuser_jax.data.synthetic import render_scene

    image, label = render_scene(0, size=(64, 64))
    images, labels = jnp.asarray(image[None]), jnp.asarray(label[None].astype(np.int32))
    model = tiny_mfuser()  # MFuser(tiny_config(), rngs=nnx.Rngs(0)), a fresh clone
    graphdef, trainable, rest = nnx.split(model, model.trainable_filter, ...)
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, rest, opt_state, i):
        def loss(trainable):
            m = nnx.merge(graphdef, trainable, rest, copy=True)
            total, _ = m.loss(images, labels, jax.random.fold_in(jax.random.key(0), i))
            return total, nnx.state(m, nnx.Not(model.trainable_filter))
        (total, rest), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), rest, opt_state, total

    history = []
    for i in range(150):
        trainable, rest, opt_state, total = step(trainable, rest, opt_state, i)
        history.append(float(total))
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    print(f"loss {first:.3f} -> {last:.3f}")
    assert np.isfinite(history).all() and last < 0.2 * first
