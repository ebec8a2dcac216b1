"""DINOv2 ViT in NNX: parity with HF Dinov2Model, official names, MFuser's resize, counts."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from mfuser_jax.weights import WeightFileError, load_torch_state_dict, torch_state_dict_of
from mfuser_jax.weights.state_dict import _targets
from mfuser_jax.towers.dinov2.convert import (
    check_dinov2_state_dict,
    hf_to_official,
    is_dinov2_state_dict,
    load_dinov2_state_dict,
    resize_for_mfuser,
    to_official,
)
from mfuser_jax.towers.dinov2.model import Block, DinoVisionTransformer

D, DEPTH, HEADS, PATCH, IMG = 64, 2, 4, 8, 32  # stored grid 4x4


def _abstract(**kw):
    """Shapes only: building eagerly compiles every initializer op (slow on a shared CPU)."""
    return nnx.eval_shape(lambda: DinoVisionTransformer(**kw, rngs=nnx.Rngs(0)))


def _torch_shapes(model):
    return {key: shape for key, _, _, shape in _targets(model)}


def _loaded(sd, **kw):
    """An abstract model filled by strict loading: every parameter becomes concrete."""
    model = load_torch_state_dict(_abstract(**kw), sd, strict=True)
    model.eval()
    return model


@nnx.jit
def _fwd(model, x):
    return model(x)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(
        hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=4 * D, mlp_ratio=4, image_size=IMG, patch_size=PATCH,
        layer_norm_eps=1e-6, hidden_act="gelu",
    )
    model = transformers.Dinov2Model(cfg).eval()
    # Random everything (HF inits layer scale to 1, norms to 1/0, positions small): every
    # parameter must matter for the comparison to catch a wrong mapping.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or (
                    name == "layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "lambda1" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif "embeddings" in name and "projection" not in name:
                p.copy_(torch.randn_like(p))
            elif "fc1" in name:  # wide pre-activations: exact vs tanh GELU is visible
                p.copy_(0.25 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ours(hf_model):
    return _loaded(hf_to_official(hf_model.state_dict()), img_size=IMG, patch_size=PATCH,
                   embed_dim=D, depth=DEPTH, num_heads=HEADS, init_values=1.0)


def _images(h, w, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)


def _hf_forward(model, images_nhwc):
    with torch.no_grad():
        px = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
        return model(pixel_values=px).last_hidden_state.numpy()


def _official_interpolate_pos_encoding(self, embeddings, height, width):
    """facebookresearch/dinov2 interpolate_pos_encoding (offset 0.1, no antialias), restated
    on HF's Dinov2Embeddings: scale_factor=(h0 + 0.1) / M, not size=(h0, w0) as HF does."""
    npatch = embeddings.shape[1] - 1
    n = self.position_embeddings.shape[1] - 1
    if npatch == n and height == width:
        return self.position_embeddings
    pos = self.position_embeddings.float()
    m = int(math.sqrt(n))
    h0, w0 = height // PATCH, width // PATCH
    grid = F.interpolate(
        pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2),
        scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False,
    )
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


def test_matches_hf_at_stored_size(hf_model, ours):
    x = _images(IMG, IMG)
    got = _fwd(ours, jnp.asarray(x))
    want = _hf_forward(hf_model, x)
    assert got.shape == (2, 1 + (IMG // PATCH) ** 2, D)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("hw", [(40, 24), (32, 36)])
def test_matches_official_interpolation_at_other_sizes(hf_model, ours, hw):
    # HF interpolates with size=(h0, w0); official DINOv2 (and MFuser's copy) with
    # scale_factor=(h0 + 0.1) / M, which moves the sampling points. Compare against HF with
    # its embeddings patched to the official algorithm. (32, 36): same 4x4 grid as stored
    # but a non-square image, which the official code still resamples.
    x = _images(*hw, seed=1)
    emb = hf_model.embeddings
    emb.interpolate_pos_encoding = types.MethodType(_official_interpolate_pos_encoding, emb)
    try:
        want = _hf_forward(hf_model, x)
    finally:
        del emb.interpolate_pos_encoding
    got = _fwd(ours, jnp.asarray(x))
    assert got.shape == (2, 1 + (hw[0] // PATCH) * (hw[1] // PATCH), D)
    assert rel_err(got, want) < 1e-5


def test_official_offset_interpolation_differs_from_size_interpolation():
    # Why the restatement above is needed: the 0.1 offset is not a no-op.
    pos = torch.randn(1, 8, 4, 4)
    official = F.interpolate(pos, scale_factor=(5.1 / 4, 3.1 / 4), mode="bicubic")
    by_size = F.interpolate(pos, size=(5, 3), mode="bicubic")
    assert official.shape == by_size.shape
    assert (official - by_size).abs().max() > 1e-2


def test_block_by_block_stepping_equals_call(ours):
    x = jnp.asarray(_images(IMG, IMG, seed=2))
    t = ours.prepare_tokens(x)
    assert t.shape == (2, 17, D) and t.dtype == jnp.float32
    for blk in ours.blocks:
        t = blk(t)
    np.testing.assert_allclose(np.asarray(ours.norm(t)), np.asarray(_fwd(ours, x)),
                               rtol=1e-5, atol=1e-5)


def test_mask_token_replaces_masked_patches(hf_model, ours):
    x = _images(IMG, IMG, seed=3)
    masks = np.random.default_rng(3).random((2, 16)) < 0.5
    with torch.no_grad():
        want = hf_model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2),
                        bool_masked_pos=torch.from_numpy(masks)).last_hidden_state.numpy()
    got = ours(jnp.asarray(x), masks=jnp.asarray(masks))
    assert rel_err(got, want) < 1e-5


# Official names of a one-block DINOv2 ViT (dinov2/models/vision_transformer.py with
# block_chunks=0, no registers), written out so that both our module and hf_to_official are
# checked against the original naming, not against each other.
OFFICIAL_ONE_BLOCK_KEYS = {
    "cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight",
    "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
    "blocks.0.ls1.gamma", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight",
    "blocks.0.mlp.fc2.bias", "blocks.0.ls2.gamma", "norm.weight", "norm.bias",
}


def test_official_names_and_strict_loading(hf_model):
    names = _torch_shapes(_abstract(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                    num_heads=2))
    assert set(names) == OFFICIAL_ONE_BLOCK_KEYS
    assert names["blocks.0.attn.qkv.weight"] == (48, 16)
    assert names["patch_embed.proj.weight"] == (16, 3, 8, 8)
    assert names["mask_token"] == (1, 16)

    sd = hf_to_official(hf_model.state_dict())
    expected = {k.replace("blocks.0.", f"blocks.{i}.") for k in OFFICIAL_ONE_BLOCK_KEYS
                for i in range(DEPTH)}
    assert set(sd) == expected
    # The merged qkv rows are q, k, v in that order.
    hf_sd = hf_model.state_dict()
    q_key = next(k for k in hf_sd if k.startswith("encoder.layer.1.attention.")
                 and ("q_proj.weight" in k or "query.weight" in k))
    np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"][:D], hf_sd[q_key].numpy())
    # Strict loading consumes every key and round-trips the values.
    model = _loaded(sd, img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH,
                    num_heads=HEADS)
    back = torch_state_dict_of(model)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_hf_hub_spelling_is_accepted(hf_model):
    # Checkpoints on the hub (facebook/dinov2-*) use the pre-transformers-5 names.
    new = hf_model.state_dict()
    old = {}
    for k, v in new.items():
        k = (k.replace("attention.q_proj", "attention.attention.query")
             .replace("attention.k_proj", "attention.attention.key")
             .replace("attention.v_proj", "attention.attention.value")
             .replace("attention.o_proj", "attention.output.dense"))
        old["dinov2." + k] = v
    a, b = hf_to_official(new), hf_to_official(old)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _official_sd(embed_dim=8, depth=1, heads=2, patch=14, img=518, seed=0):
    shapes = _torch_shapes(_abstract(img_size=img, patch_size=patch, embed_dim=embed_dim,
                                     depth=depth, num_heads=heads))
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_resize_for_mfuser_restates_reference_and_loads():
    sd = _official_sd()
    assert sd["pos_embed"].shape == (1, 1370, 8)
    # MFuser's loading code (models/backbones/clip/models.py), restated in torch.
    ref = {k: torch.from_numpy(v) for k, v in sd.items()}
    pos = ref["pos_embed"]
    tokens = pos[:, 1:].reshape(-1, 37, 37, 8).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(32, 32), mode="bicubic", align_corners=False)
    ref["pos_embed"] = torch.cat([pos[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    ref["patch_embed.proj.weight"] = F.interpolate(
        ref["patch_embed.proj.weight"].float(), size=(16, 16), mode="bicubic",
        align_corners=False)

    got = resize_for_mfuser(sd, patch_size=16, img_size=512)
    assert set(got) == set(sd)
    for k in sd:
        np.testing.assert_allclose(got[k], ref[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(got["pos_embed"][:, 0], sd["pos_embed"][:, 0])

    model = _loaded(got, img_size=512, patch_size=16, embed_dim=8, depth=1, num_heads=2)
    assert model.pos_embed[...].shape == (1, 1025, 8)
    # A 512 px crop uses the stored table as is: 1 + 32 * 32 tokens.
    out = nnx.eval_shape(lambda m: m.prepare_tokens(jnp.zeros((1, 512, 512, 3))), model)
    assert out.shape == (1, 1025, 8)


def _count(model_fn):
    abstract = nnx.eval_shape(model_fn)
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_full_size_parameter_counts():
    # ViT-L/14 at 518 px as released (dinov2_vitl14_pretrain.pth), mask_token included:
    # patch 1024*3*14*14 + 1024 = 603,136; cls 1,024; pos 1370*1024 = 1,402,880;
    # mask 1,024; 24 blocks x 12,598,272 = 302,358,528; norm 2,048 -> 304,368,640.
    full = _count(lambda: DinoVisionTransformer(rngs=nnx.Rngs(0)))
    assert full == 304_368_640
    # MFuser: patch 16, 512 px. Patch 1024*3*16*16 + 1024 = 787,456; pos 1025*1024 =
    # 1,049,600: 304,368,640 + (787,456 - 603,136) + (1,049,600 - 1,402,880) = 304,199,680.
    mfuser = _count(lambda: DinoVisionTransformer(img_size=512, patch_size=16,
                                                  rngs=nnx.Rngs(0)))
    assert mfuser == 304_199_680


def test_wrong_checkpoint_gives_clear_error():
    clip_sd = {
        "visual.conv1.weight": np.zeros((4, 3, 14, 14), np.float32),
        "visual.positional_embedding": np.zeros((5, 4), np.float32),
        "visual.transformer.resblocks.0.attn.in_proj_weight": np.zeros((12, 4), np.float32),
        "positional_embedding": np.zeros((77, 4), np.float32),
        "text_projection": np.zeros((4, 4), np.float32),
    }
    assert not is_dinov2_state_dict(clip_sd)
    with pytest.raises(WeightFileError) as err:
        to_official(clip_sd, source="ViT-L-14-336px.pt")
    msg = str(err.value)
    assert "ViT-L-14-336px.pt" in msg and "CLIP" in msg
    assert "missing" in msg and "pos_embed" in msg and "blocks.0.attn.qkv.weight" in msg
    with pytest.raises(WeightFileError, match="not a DINOv2"):
        resize_for_mfuser(clip_sd)

    sd = _official_sd(patch=8, img=16)
    assert is_dinov2_state_dict(sd)
    with pytest.raises(WeightFileError, match="register tokens"):
        check_dinov2_state_dict({**sd, "register_tokens": np.zeros((1, 4, 8), np.float32)})
    with pytest.raises(WeightFileError, match="classifier.weight"):
        hf_to_official({"embeddings.cls_token": np.zeros((1, 1, 8)),
                        "classifier.weight": np.zeros((2, 8))})


def test_load_dinov2_file(tmp_path, hf_model):
    sd = _official_sd()
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "dinov2.pth")
    got = load_dinov2_state_dict(tmp_path / "dinov2.pth", patch_size=16, img_size=512)
    assert got["pos_embed"].shape == (1, 1025, 8)
    assert got["patch_embed.proj.weight"].shape == (8, 3, 16, 16)
    # HF safetensors files are renamed on the way in.
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()},
              str(tmp_path / "hf.safetensors"))
    got = load_dinov2_state_dict(tmp_path / "hf.safetensors", patch_size=PATCH, img_size=IMG)
    assert set(got) == set(hf_to_official(hf_model.state_dict()))
    torch.save({"visual.conv1.weight": torch.zeros(4, 3, 14, 14)}, tmp_path / "clip.pth")
    with pytest.raises(WeightFileError, match="clip.pth.*CLIP"):
        load_dinov2_state_dict(tmp_path / "clip.pth")


def test_hf_and_chunked_inputs_normalise(hf_model):
    assert is_dinov2_state_dict(hf_model.state_dict())
    sd = _official_sd(patch=8, img=16, depth=2)
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v
               for k, v in sd.items()}
    assert set(to_official(chunked)) == set(sd)


def test_layer_norm_is_two_pass_like_torch(ours):
    # DINOv2-L has tokens with very large activations; E[x^2] - E[x]^2 in float32 (nnx's
    # fast variance) loses the variance of such rows.
    x = 300.0 + np.random.default_rng(7).normal(size=(2, 3, D)).astype(np.float32)
    norm = ours.blocks[0].norm1
    want = F.layer_norm(torch.from_numpy(x), (D,), torch.tensor(np.asarray(norm.scale[...])),
                        torch.tensor(np.asarray(norm.bias[...])), eps=1e-6).numpy()
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)


def test_drop_path_is_per_sample_and_off_in_eval():
    p = 0.5
    blk = nnx.jit(lambda: Block(D, HEADS, init_values=0.5, drop_path=p,
                                rngs=nnx.Rngs(0, dropout=1)))()
    call = nnx.jit(lambda b, x: b(x))

    @nnx.jit
    def paths(b, x):  # the four outputs training can give, and the eval output
        attn = lambda t: b.ls1(b.attn(b.norm1(t)))  # noqa: E731
        ffn = lambda t: b.ls2(b.mlp(b.norm2(t)))  # noqa: E731
        outs = []
        for m1 in (0.0, 1.0):
            x1 = x + m1 * attn(x) / (1 - p)
            outs += [x1 + m2 * ffn(x1) / (1 - p) for m2 in (0.0, 1.0)]
        x1 = x + attn(x)
        return jnp.concatenate(outs), x1 + ffn(x1)

    x0 = jnp.asarray(np.random.default_rng(6).normal(size=(1, 5, D)).astype(np.float32))
    combos, want_eval = map(np.asarray, paths(blk, x0))
    y = np.asarray(call(blk, jnp.broadcast_to(x0, (64, 5, D))))
    dist = np.stack([np.abs(y - c).max(axis=(1, 2)) for c in combos], axis=1)
    assert (dist.min(axis=1) < 1e-5).all()  # each sample took one of the four paths
    assert len(set(dist.argmin(axis=1).tolist())) > 1  # and not all the same one

    blk.eval()  # no drop, no 1/(1-p) rescaling
    np.testing.assert_allclose(np.asarray(call(blk, x0)), want_eval, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_stream(hf_model):
    model = _loaded(hf_to_official(hf_model.state_dict()), img_size=IMG, patch_size=PATCH,
                    embed_dim=D, depth=DEPTH, num_heads=HEADS, init_values=1.0,
                    dtype=jnp.bfloat16)
    x = _images(IMG, IMG, seed=5)
    t = model.prepare_tokens(jnp.asarray(x))
    assert t.dtype == jnp.float32 and model.blocks[0](t).dtype == jnp.float32
    assert model.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32
    assert rel_err(_fwd(model, jnp.asarray(x)), _hf_forward(hf_model, x)) < 3e-2
