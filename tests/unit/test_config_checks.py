"""Start-up settings that follow the reference: matmul precision, sizes that must agree,
the class-loss groups against the batch, no dead config fields."""

import jax
import jax.numpy as jnp
import pytest

from configs import base
from mfuser_jax import process as T
from mfuser_jax.model import factory
from mfuser_jax.run.restore import build_and_load


@pytest.fixture
def restore_precision():
    before = jax.config.jax_default_matmul_precision
    yield
    jax.config.update("jax_default_matmul_precision", before)


def _paper_config(arg=None):
    return base.make_config("gta", ("cityscapes",), arg)


def test_matmul_precision_is_full_float32_in_every_entry_point(monkeypatch, restore_precision):
    """PyTorch 2.0.1 computes float32 matmuls in full float32 (allow_tf32 off since 1.12):
    the paper configs ask XLA for HIGHEST precision, which every entry point (train, eval,
    predict all build through build_and_load) applies before compiling."""
    config = _paper_config()
    config.model.pretrained = ""
    jax.config.update("jax_default_matmul_precision", "default")
    monkeypatch.setattr(factory, "create_model", lambda c, **options: "model")
    assert build_and_load(config) == "model"
    assert jax.config.jax_default_matmul_precision == "highest"
    hlo = jax.jit(jnp.dot).lower(jnp.ones((2, 2)), jnp.ones((2, 2))).as_text()
    assert "precision = [HIGHEST, HIGHEST]" in hlo
    config.matmul_precision = "tf32"
    with pytest.raises(T.UserError, match="matmul_precision"):
        T.apply_matmul_precision(config)


def test_crop_sizes_must_agree_with_the_model():
    T.check_config(_paper_config())
    T.check_config(_paper_config("size=tiny"))
    config = _paper_config()
    config.model.image_size = 640  # as --config.model.image_size=640 alone would
    with pytest.raises(T.UserError, match=r"model\.image_size=640, data\.crop_size=512, "
                                          r"evaluation\.crop_size=512.*--config"):
        T.check_config(config)
    config.data.crop_size = config.evaluation.crop_size = 640
    T.check_config(config)


def test_class_loss_groups_must_divide_the_micro_batch():
    config = _paper_config("small_gpu=True")  # 4 images, 2 micro-batches of 2
    T.check_config(config)
    config.optim.grad_accum = 4
    with pytest.raises(T.UserError, match="cls_norm_images=2"):
        T.check_config(config)
    config.model.loss.cls_norm_images = 0
    T.check_config(config)


def test_dinov2_depth_is_the_vlm_depth():
    """The towers are fused layer by layer, so DINOv2 has the VLM's depth; a separate
    dinov2.depth field was set but never read."""
    for vlm in base.VLMS:
        model = base.mfuser_model_config("large", vlm)
        assert "depth" not in model.dinov2 and model[vlm].layers == 24
