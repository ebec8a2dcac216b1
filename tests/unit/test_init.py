"""Initialisation as the original actually runs, tensor by tensor, against PyTorch.

The original's train.py calls only backbone.init_weights() (which loads the CLIP file) and
text_encoder.init_weights(); the decode head's and pixel decoder's init_weights() are never
called. So every trainable module outside the encoders starts from what its constructor
gives: torch's defaults (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.MultiheadAttention,
nn.Embedding), plus the two mmcv 1.x modules that initialise themselves in __init__
(ConvModule: kaiming_normal fan_out/relu, bias 0; MultiScaleDeformableAttention).

The reference here is the PyTorch module built by torch's own constructors at the same
shapes (the head restatement of tests/refs/decoder.py, with mmcv's two constructor-time
inits), drawn several times; each of our tensors must match its std, mean and
largest magnitude within sampling error.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch.nn as tnn  # noqa: E402

from mfuser_jax.weights.state_dict import torch_state_dict_of  # noqa: E402
from mfuser_jax.model.variants import vfm_fusion_args  # noqa: E402
from mfuser_jax.towers.clip.fusion import MFuserBackbone  # noqa: E402
from mfuser_jax.towers.registry import get_vfm  # noqa: E402
from mfuser_jax.model.mask_decoder import TqdmHead  # noqa: E402
from tests.refs.decoder import THead, mmcv_constructor_inits, torch_cfg  # noqa: E402
from tests.support import TINY_HEAD as TINY  # noqa: E402

# The shapes of test_decoder.py's and test_backbone_variants.py's models, so that in one
# pytest run their compiled initialisers are reused. The torch side is drawn many times, so
# the sampling error is essentially ours alone.
TORCH_DRAWS = 16


def _assert_same_distribution(ours: dict, build_torch, keys=None):
    """Each of ``ours`` (torch-named arrays, one draw) against TORCH_DRAWS draws of
    ``build_torch()``'s state dict: std and mean within 5 standard errors of one draw; the largest
    magnitude at least 0.6x torch's typical one and at most 1.5x torch's largest (for a
    uniform init that is its bound, which a normal draw of the same std overshoots)."""
    draws = []
    for seed in range(TORCH_DRAWS):
        torch.manual_seed(seed)
        draws.append({k: v.detach().numpy().astype(np.float64)
                      for k, v in build_torch().state_dict().items()})
    keys = sorted(ours) if keys is None else keys
    assert set(keys) <= set(draws[0]), sorted(set(keys) - set(draws[0]))
    bad = []
    for key in keys:
        got = np.asarray(ours[key], np.float64)
        want = np.stack([d[key] for d in draws])
        assert got.shape == want.shape[1:], key
        n = got.size
        std, want_std = got.std(), want.std()
        mean, want_mean = got.mean(), want.mean()
        peak = np.abs(got).max()
        typical_peak = np.mean([np.abs(w).max() for w in want])
        # Standard errors of one n-element draw's std and mean; the std's depends on the
        # distribution's kurtosis (1.8 uniform, 3 normal).
        centred = want - want.mean()
        kurtosis = (centred**4).mean() / max(want_std**4, 1e-30)
        std_error = want_std * math.sqrt(max(kurtosis - 1.0, 0.0) / (4 * n))
        if (abs(std - want_std) > 5 * std_error + 1e-7
                or abs(mean - want_mean) > 5 * want_std / math.sqrt(n) + 1e-7
                or not 0.6 * typical_peak - 1e-7 <= peak <= 1.5 * np.abs(want).max() + 1e-7):
            bad.append(f"{key}: std {std:.4g} vs {want_std:.4g}, mean {mean:.3g} vs "
                       f"{want_mean:.3g}, max|x| {peak:.4g} vs {typical_peak:.4g}")
    assert not bad, "\n".join(bad)


def test_head_and_pixel_decoder_start_as_the_original_constructs_them():
    ours = torch_state_dict_of(TqdmHead(**TINY, rngs=nnx.Rngs(0)))
    _assert_same_distribution(ours, lambda: mmcv_constructor_inits(THead(torch_cfg(TINY))))


def test_backbone_projections_and_fpn_are_torch_defaults():
    width, layers = 32, 4
    dinov2 = SimpleNamespace(embed_dim=width, num_heads=2, mlp_ratio=4.0, init_values=0.5)
    vfm = vfm_fusion_args(get_vfm("dinov2"), dinov2, image_size=64, patch_size=16,
                          layers=layers)
    backbone = MFuserBackbone(image_size=64, patch_size=16, width=width, layers=layers,
                              heads=2, output_dim=24, drop_path_rate=0.1, **vfm,
                              out_indices=(0, 1, 2, 3), d_state=16, d_conv=3, expand=1,
                              scan_backend="reference", rngs=nnx.Rngs(0))
    ours = torch_state_dict_of(backbone)
    fpn = 2 * width

    class Trainable(tnn.Module):  # clip/models.py builds these after its towers
        def __init__(self):
            super().__init__()
            self.adapter_proj1 = tnn.Sequential(*[tnn.Linear(width, width) for _ in range(layers)])
            self.adapter_proj2 = tnn.Sequential(*[tnn.Linear(width, width) for _ in range(layers)])
            self.adapter_proj3 = tnn.Linear(width, width)
            self.fpn1 = tnn.Sequential(tnn.ConvTranspose2d(fpn, fpn, 2, 2), tnn.BatchNorm2d(fpn),
                                       tnn.GELU(), tnn.ConvTranspose2d(fpn, fpn, 2, 2))
            self.fpn2 = tnn.Sequential(tnn.ConvTranspose2d(fpn, fpn, 2, 2))

    keys = [k for k in ours if k.startswith(("adapter_proj", "fpn"))
            and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(keys) == 2 * 2 * layers + 2 + 2 * 3 + 2, sorted(keys)
    _assert_same_distribution(ours, Trainable, keys)
