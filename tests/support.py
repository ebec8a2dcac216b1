"""Helpers several test files share: the repository's path, the tiny model configs, a tiny
batch, the configs and stand-ins of the release tests. The session-wide fixtures (the tiny
SentencePiece model, the tiny MFuser, the fake releases) are in tests/conftest.py; the
PyTorch restatements of the original modules in tests/refs/."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny tqdm head (TqdmHead's keywords; tests.refs.decoder.torch_cfg gives the torch
# restatement's): the shapes of test_decoder.py's and test_init.py's heads.
TINY_HEAD = dict(in_channels=(16, 16, 16, 16), feat_channels=32, out_channels=32, num_classes=5,
                 num_queries=5, text_dim=24, num_groups=4, pixel_decoder_layers=2,
                 pixel_decoder_heads=4, num_points=2, pixel_decoder_ffn_channels=64,
                 num_decoder_layers=3, decoder_heads=4, decoder_ffn_channels=64)


def scripts_cli():
    """scripts/_cli.py, the CLIs' shared plumbing, as a module: loaded from its file (scripts/
    is not a package), once per process, under the name the scripts import it by."""
    import importlib.util
    import sys

    if "_cli" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "_cli", os.path.join(REPO, "scripts", "_cli.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["_cli"] = module
        spec.loader.exec_module(module)
    return sys.modules["_cli"]


def rel_err(got, want):
    """|got - want| / |want| (Frobenius norms, float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ------------------------------------------------------------------------- tiny MFusers

def tiny_config(vlm="clip", **tower):
    """The tiny MFuser model config of ``vlm`` (configs/base.py), a new one per call: the
    reference scan, 64 loss points; ``tower`` updates the VLM's section."""
    from configs.base import mfuser_model_config
    cfg = mfuser_model_config("tiny", vlm)
    cfg.mvfuser.scan_backend = "reference"
    cfg.loss.num_points = 64
    cfg[vlm].update(tower)
    return cfg


def batch(b=2, size=64, seed=0):
    """Random uint8 images and labels over 6 classes, the first 4 rows ignored (255)."""
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.integers(0, 256, (b, size, size, 3)), jnp.uint8)
    labels = rng.integers(0, 6, (b, size, size)).astype(np.int32)
    labels[:, :4] = 255
    return images, jnp.asarray(labels)


def paths(state):
    """The paths of an nnx State's leaves, as tuples of strings."""
    return {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}


# ------------------------------------------------------------------- evaluation tests

class PaletteModel(nnx.Module):
    """Reads the class back from the fake images' palette colours, then answers with a
    fixed permutation of it: prediction = MISTAKE[label], known without the pipeline."""

    def __init__(self, mistake):
        from mfuser_jax.data.labels import PALETTE
        out_of = np.argsort(mistake)  # output channel j scores palette class out_of[j]
        self.palette = nnx.Variable(jnp.asarray(PALETTE[out_of], jnp.float32))

    def predict(self, images, class_names=None):
        x = images.astype(jnp.float32)[..., None, :]
        return -jnp.sum((x - self.palette[...]) ** 2, axis=-1)


def acdc_config(root):
    """An evaluation config over ACDC (the 19 classes) in ``root``: 32 px windows."""
    import ml_collections

    from configs.base import data_config
    from mfuser_jax.data.labels import CLASSES
    c = ml_collections.ConfigDict()
    c.seed, c.batch_size, c.data_root = 0, 1, str(root)
    c.data = data_config("synthetic", ("synthetic_real",))
    c.data.eval = ("acdc",)
    c.model = ml_collections.ConfigDict(dict(class_names=CLASSES, num_classes=19))
    c.evaluation = ml_collections.ConfigDict(dict(crop_size=32, stride=21, crop_batch=4))
    return c


# ------------------------------------------------------------------------ release tests

def release_config():
    """configs/demo.py (CLIP, 128 px) as the release tests convert it: the reference scan,
    40 steps."""
    from configs import demo
    c = demo.get_config()
    c.model.mvfuser.scan_backend = "reference"
    c.total_steps = 40
    return c


def small_release_config(vlm, **model):
    """configs/demo.py for ``vlm`` at a 4x4 patch grid (keeps the tests fast), the reference
    scan, 40 steps; ``model`` updates the model section."""
    from configs import demo
    c = demo.get_config(f"vlm={vlm}")
    c.model.image_size = 4 * c.model.patch_size
    c.data.crop_size = c.evaluation.crop_size = c.model.image_size  # they must agree
    c.evaluation.stride = (2 * c.model.image_size) // 3
    c.model.mvfuser.scan_backend = "reference"
    c.model.update(model)
    c.total_steps = 40
    return c


def abstract_mfuser(config):
    """config.model's MFuser built from shapes alone (every value abstract)."""
    from mfuser_jax.model.mfuser import MFuser
    return nnx.eval_shape(lambda: MFuser(config.model, rngs=nnx.Rngs(0)))


def concrete(model):
    """Fill every abstract leaf: zeros for arrays (a parameter that is never loaded stays
    zero, which the comparisons with the random release catch), fixed keys for the dropout
    RNG state, and the tokenized class names (a plain array attribute, CLIP's tokenizer)."""
    from mfuser_jax.towers.clip.tokenizer import tokenize

    def fill(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
        return jnp.zeros(x.shape, x.dtype)
    nnx.update(model, jax.tree.map(fill, nnx.state(model)))
    model.texts = np.asarray(tokenize(list(model.class_names), context_length=model.token_length))
    return model


def random_images(b=1, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3)).astype(np.uint8)


def save_pth(path, state_dict, meta):
    """An mmseg checkpoint file: {"meta": meta, "state_dict": tensors}."""
    from collections import OrderedDict

    import torch
    # np.array, not np.ascontiguousarray: the latter turns the 0-d MVFuser scales into (1,)
    torch.save({"meta": meta, "state_dict": OrderedDict(
        (k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())}, path)
