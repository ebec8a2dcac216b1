"""DINOv3 ViT tower in NNX: parity with HF DINOv3ViTModel through both weight layouts
(HF safetensors, official .pth), the stepping protocol, RoPE, counts, errors, dtypes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mfuser_jax.weights import WeightFileError, load_torch_state_dict
from mfuser_jax.weights.state_dict import _targets
from mfuser_jax.nn.stack import scan_layers
from mfuser_jax.towers.dinov3.convert import (
    hf_to_official,
    is_hf_layout,
    load_dinov3_state_dict,
    to_official,
)
from mfuser_jax.towers.dinov3.model import DinoV3VisionTransformer, rope_periods

D, DEPTH, HEADS, REG, PATCH = 32, 3, 2, 4, 16
HEAD_DIM = D // HEADS
SIZES = [(64, 64), (48, 80)]  # 4x4 and a non-square 3x5 grid
TINY = dict(img_size=64, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
            n_storage_tokens=REG)


def _abstract(**kw):
    """Shapes only: building eagerly compiles every initializer op (slow on a shared CPU)."""
    return nnx.eval_shape(lambda: DinoV3VisionTransformer(**kw, rngs=nnx.Rngs(0)))


def _loaded(sd, **kw):
    """An abstract model filled by strict loading: every parameter becomes concrete."""
    return load_torch_state_dict(_abstract(**{**TINY, **kw}), sd, strict=True)


@nnx.jit
def _fwd(model, x):
    return model(x)


def _images(h, w, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)


def _hf_forward(model, images_nhwc, masks=None):
    with torch.no_grad():
        px = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
        kw = {} if masks is None else {"bool_masked_pos": torch.from_numpy(masks)}
        return model(pixel_values=px, **kw).last_hidden_state.numpy()


def _assert_tokens_close(got, want, atol=1e-5):
    """cls, storage tokens and patches compared separately, to float32 rounding."""
    got = np.asarray(got)
    assert got.shape == want.shape
    for name, sl in (("cls", slice(0, 1)), ("storage", slice(1, 1 + REG)),
                     ("patches", slice(1 + REG, None))):
        np.testing.assert_allclose(got[:, sl], want[:, sl], rtol=1e-5, atol=atol, err_msg=name)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=D, intermediate_size=4 * D, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, num_register_tokens=REG, patch_size=PATCH, image_size=64,
        layer_norm_eps=1e-5, hidden_act="gelu", rope_theta=100.0,
    )
    model = transformers.DINOv3ViTModel(cfg).eval()
    # Random everything (HF inits layer scale to 1, norms to 1/0, mask token to 0): every
    # parameter must matter for the comparison to catch a wrong mapping.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"norm\d?\.weight$", name):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "lambda1" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif name.startswith("embeddings.") and "patch_embeddings" not in name:
                p.copy_(torch.randn_like(p))
            elif "up_proj" in name:  # wide pre-activations: exact vs tanh GELU is visible
                p.copy_(0.25 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_sd(hf_model):
    return hf_model.state_dict()


@pytest.fixture(scope="module")
def ours(hf_sd):
    return _loaded(to_official(hf_sd, num_heads=HEADS))


# ------------------------------------------------------------------------- (a) HF parity


@pytest.mark.parametrize("hw", SIZES)
def test_matches_hf(hf_model, ours, hw):
    x = _images(*hw, seed=hw[1])
    got = _fwd(ours, jnp.asarray(x))
    assert got.shape == (2, 1 + REG + (hw[0] // PATCH) * (hw[1] // PATCH), D)
    _assert_tokens_close(got, _hf_forward(hf_model, x))


def test_mask_token_replaces_masked_patches(hf_model, ours):
    x = _images(64, 64, seed=3)
    masks = np.random.default_rng(3).random((2, 16)) < 0.5
    got = nnx.jit(lambda m, x, k: m(x, k))(ours, jnp.asarray(x), jnp.asarray(masks))
    _assert_tokens_close(got, _hf_forward(hf_model, x, masks))


def test_rope_tables_match_hf(hf_model, ours):
    # Ours: (sin, cos) (h*w, head_dim) float32; HF: (cos, sin) for the pixel batch.
    for h, w in SIZES:
        with torch.no_grad():
            cos, sin = hf_model.rope_embeddings(torch.zeros(1, 3, h, w))
        got_sin, got_cos = ours.block_aux(ours.grid_size(h, w))
        assert got_sin.shape == (h // PATCH * (w // PATCH), HEAD_DIM)
        assert got_sin.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got_sin), sin.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_cos), cos.numpy(), atol=1e-6)


def test_rope_coordinates_and_augmentation_only_with_a_key():
    plain = _abstract(**TINY).rope_embed
    rope = _abstract(**TINY, rope_rescale_coords=2.0).rope_embed
    grid = (3, 5)
    base = np.asarray(plain.coords(grid))
    # patch centres in [-1, 1], normalised per axis ("separate")
    np.testing.assert_allclose(base[:5, 1], (np.arange(5) + 0.5) / 5 * 2 - 1, rtol=1e-6)
    np.testing.assert_allclose(base[::5, 0], (np.arange(3) + 0.5) / 3 * 2 - 1, rtol=1e-6)
    for mode, n in (("max", 5), ("min", 3)):  # one divisor for both axes
        c = np.asarray(_abstract(**TINY, rope_normalize_coords=mode).rope_embed.coords(grid))
        np.testing.assert_allclose(c[:5, 1], (np.arange(5) + 0.5) / n * 2 - 1, rtol=1e-6)
        np.testing.assert_allclose(c[::5, 0], (np.arange(3) + 0.5) / n * 2 - 1, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(rope.coords(grid)), base)  # no key: eval
    np.testing.assert_array_equal(np.asarray(plain.coords(grid, jax.random.key(1))), base)
    scales = []
    for seed in range(8):
        aug = np.asarray(rope.coords(grid, jax.random.key(seed)))
        s = aug[0, 0] / base[0, 0]  # one log-uniform factor for both axes
        np.testing.assert_allclose(aug, s * base, rtol=1e-5, atol=1e-7)
        scales.append(float(s))
    assert all(0.5 <= s <= 2.0 for s in scales) and len(set(scales)) == 8
    assert min(scales) < 1.0 < max(scales)


# ---------------------------------------------------------------- stepping protocol


def test_block_by_block_stepping_equals_call(ours):
    # What the fused backbone does: prepare_tokens, block_aux once, block per layer, norm.
    x = jnp.asarray(_images(48, 80, seed=2))
    assert ours.num_prefix_tokens == 1 + REG and ours.grid_size(48, 80) == (3, 5)
    t = ours.prepare_tokens(x)
    assert t.shape == (2, 1 + REG + 15, D) and t.dtype == jnp.float32
    aux = ours.block_aux(ours.grid_size(48, 80))
    assert ours.layer_inputs(None) is None and ours.layer_inputs(jax.random.key(0)) is None
    stepped, _ = scan_layers(
        lambda layers, c, xi: ours.block(layers[0], c, xi, aux), (ours.blocks,), t,
        ours.layer_inputs(None))
    want = np.asarray(_fwd(ours, x))
    np.testing.assert_allclose(np.asarray(ours.norm(stepped)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="RoPE tables"):
        ours.block(ours.blocks[0], t)
    with pytest.raises(ValueError, match="do not fit"):  # tables of another grid
        ours.block(ours.blocks[0], t, None, ours.block_aux((4, 4)))


def test_drop_path_layer_inputs():
    model = _abstract(**TINY, drop_path_rate=0.2)
    keys, rates = model.layer_inputs(jax.random.key(0))
    assert keys.shape[0] == DEPTH and np.allclose(rates, 0.2)  # no decay rule in DINOv3
    assert model.layer_inputs(None) is None


# -------------------------------------------------------- (b) safetensors, (c) .pth


def test_hf_safetensors_file(tmp_path, hf_model, hf_sd, ours):
    from safetensors.numpy import save_file

    # The hub files (facebook/dinov3-vitl16-*) name blocks "layer.N."; transformers 5's
    # state dict says "model.layer.N.": both are read.
    hub = {re.sub(r"^model\.layer\.", "layer.", k): v.numpy() for k, v in hf_sd.items()}
    assert any(k.startswith("layer.0.") for k in hub) and is_hf_layout(hub)
    save_file(hub, str(tmp_path / "model.safetensors"))
    sd = load_dinov3_state_dict(tmp_path / "model.safetensors", num_heads=HEADS)
    want_sd = to_official(hf_sd, num_heads=HEADS)
    assert set(sd) == set(want_sd)
    for k in sd:
        np.testing.assert_array_equal(sd[k], want_sd[k], err_msg=k)
    x = _images(48, 80, seed=4)
    _assert_tokens_close(_fwd(_loaded(sd), jnp.asarray(x)), _hf_forward(hf_model, x))


# The official names of a one-block DINOv3 ViT with storage tokens (dinov3/models/
# vision_transformer.py, mask_k_bias, layer scale), written out so that both the module
# and the converter are checked against the original naming, not against each other.
OFFICIAL_ONE_BLOCK_PARAMS = {
    "cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight",
    "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
    "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
    "blocks.0.attn.proj.bias", "blocks.0.ls1.gamma", "blocks.0.norm2.weight",
    "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
    "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias", "blocks.0.ls2.gamma", "norm.weight",
    "norm.bias",
}
OFFICIAL_BUFFERS = {"rope_embed.periods", "blocks.0.attn.qkv.bias_mask"}


def _official_from_hf(hf_sd, seed=0):
    """The official .pth layout, by inverting transformers' convert_dinov3_vit_to_hf.py:
    q/k/v rows concatenated into qkv (with a random key bias, which the official masks),
    mask_token (1, 1, D) -> (1, D), the buffers the official module saves, and the
    training-only local_cls_norm of the SAT-493M ViT-L."""
    g = torch.Generator().manual_seed(seed)
    renames = [("attention.o_proj", "attn.proj"), ("layer_scale1.lambda1", "ls1.gamma"),
               ("layer_scale2.lambda1", "ls2.gamma"), ("mlp.up_proj", "mlp.fc1"),
               ("mlp.down_proj", "mlp.fc2")]
    sd = {}
    for k, v in hf_sd.items():
        v = v.detach().clone()
        if k == "embeddings.cls_token":
            sd["cls_token"] = v
        elif k == "embeddings.register_tokens":
            sd["storage_tokens"] = v
        elif k == "embeddings.mask_token":
            sd["mask_token"] = v[0]
        elif k.startswith("embeddings.patch_embeddings."):
            sd["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            sd[k] = v
        elif "_proj." in k and ".attention." in k and "o_proj" not in k:
            continue  # q/k/v, below
        else:
            i, rest = re.match(r"^model\.layer\.(\d+)\.(.+)$", k).groups()
            for a, b in renames:
                rest = rest.replace(a, b)
            sd[f"blocks.{i}.{rest}"] = v
    for i in range(DEPTH):
        p = f"model.layer.{i}.attention."
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [hf_sd[p + "q_proj.weight"], hf_sd[p + "k_proj.weight"], hf_sd[p + "v_proj.weight"]])
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [hf_sd[p + "q_proj.bias"], torch.randn(D, generator=g), hf_sd[p + "v_proj.bias"]])
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
            [torch.ones(D), torch.zeros(D), torch.ones(D)])
    # RopePositionEmbedding._init_weights with base 100, float32
    sd["rope_embed.periods"] = 100.0 ** (
        2 * torch.arange(HEAD_DIM // 4, dtype=torch.float32) / (HEAD_DIM // 2))
    sd["local_cls_norm.weight"] = torch.randn(D, generator=g)
    sd["local_cls_norm.bias"] = torch.randn(D, generator=g)
    return sd


def test_official_names():
    names = {key: shape for key, _, _, shape in
             _targets(_abstract(img_size=32, embed_dim=16, depth=1, num_heads=2))}
    assert set(names) == OFFICIAL_ONE_BLOCK_PARAMS
    assert names["mask_token"] == (1, 16) and names["storage_tokens"] == (1, 4, 16)
    assert names["blocks.0.attn.qkv.bias"] == (48,)
    assert names["patch_embed.proj.weight"] == (16, 3, 16, 16)


def _per_block(names):
    return {k.replace("blocks.0.", f"blocks.{i}.") for k in names for i in range(DEPTH)}


def test_official_pth_file(tmp_path, hf_model, hf_sd):
    official = _official_from_hf(hf_sd)
    assert set(official) == _per_block(OFFICIAL_ONE_BLOCK_PARAMS | OFFICIAL_BUFFERS) | {
        "local_cls_norm.weight", "local_cls_norm.bias"}
    assert not is_hf_layout(official)
    torch.save(official, tmp_path / "dinov3_vitl16_pretrain.pth")
    sd = load_dinov3_state_dict(tmp_path / "dinov3_vitl16_pretrain.pth", num_heads=HEADS)
    assert set(sd) == _per_block(OFFICIAL_ONE_BLOCK_PARAMS)
    # The file's k third is random; the folded mask zeroes it, the q and v thirds pass.
    bias = sd["blocks.1.attn.qkv.bias"]
    assert not bias[D:2 * D].any()
    np.testing.assert_array_equal(bias[:D], official["blocks.1.attn.qkv.bias"][:D].numpy())
    x = _images(48, 80, seed=5)
    want = _hf_forward(hf_model, x)
    _assert_tokens_close(_fwd(_loaded(sd), jnp.asarray(x)), want)

    # The mask matters: RoPE rotates k after its bias, so an unmasked key bias shifts the
    # logits by a position-dependent amount (a model that ignored the mask would differ).
    raw = {k: v.numpy() for k, v in official.items()
           if not k.endswith("bias_mask") and not k.startswith(("rope_", "local_"))}
    unmasked = _loaded(raw, mask_k_bias=False)
    assert rel_err(_fwd(unmasked, jnp.asarray(x)), want) > 1e-3
    # ... and with the in-module mask the raw file bias gives HF's output again.
    _assert_tokens_close(_fwd(_loaded(raw), jnp.asarray(x)), want)


def test_official_buffers_are_checked(hf_sd):
    official = {k: v.numpy() for k, v in _official_from_hf(hf_sd).items()}
    # A released file may hold the periods rounded to bfloat16 (training's rope dtype).
    bf16 = official["rope_embed.periods"].astype(jnp.bfloat16).astype(np.float32)
    assert not np.array_equal(bf16, official["rope_embed.periods"])
    to_official({**official, "rope_embed.periods": bf16}, num_heads=HEADS)
    with pytest.raises(WeightFileError, match="rope_base=100"):
        to_official({**official, "rope_embed.periods": rope_periods(HEAD_DIM, 1000.0)},
                    num_heads=HEADS)
    with pytest.raises(WeightFileError, match="wrong num_heads"):
        to_official(official, num_heads=4)
    # An all-zero mask (no qkv bias at all in the official forward) is folded in.
    zero = {k: (np.zeros_like(v) if k.endswith("bias_mask") else v) for k, v in official.items()}
    assert not to_official(zero, num_heads=HEADS)["blocks.0.attn.qkv.bias"].any()
    leaky = {**official, "blocks.2.attn.qkv.bias_mask": np.ones(3 * D, np.float32)}
    with pytest.raises(WeightFileError, match="blocks.2.attn.qkv.bias_mask lets a key bias"):
        to_official(leaky, num_heads=HEADS)
    nan = {**official, "blocks.0.attn.qkv.bias_mask": np.full(3 * D, np.nan, np.float32)}
    with pytest.raises(WeightFileError, match="not finite"):
        to_official(nan, num_heads=HEADS)
    # HF: a zero k_proj.bias is harmless, a non-zero one is not reproducible.
    k = "model.layer.0.attention.k_proj.bias"
    assert "blocks.0.attn.qkv.bias" in hf_to_official({**hf_sd, k: torch.zeros(D)})
    with pytest.raises(WeightFileError, match="k_proj.bias is non-zero"):
        hf_to_official({**hf_sd, k: torch.ones(D)})


# ---------------------------------------------------------------------- (d) counts


def _count_ours(**kw):
    abstract = _abstract(**kw)
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_full_size_parameter_count():
    # dinov3_vitl16: patch 1024*3*16*16 + 1024 = 787,456; cls 1,024; storage 4*1024 =
    # 4,096; mask 1,024; 24 blocks x 12,598,272 (norms 4,096, qkv 3,148,800, proj
    # 1,049,600, layer scales 2,048, MLP 8,393,728) = 302,358,528; norm 2,048.
    ours = _count_ours()
    assert ours == 303_154_176
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        num_register_tokens=4, patch_size=16)
    with torch.device("meta"):
        hf = transformers.DINOv3ViTModel(cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    # HF stores no key bias; the official qkv.bias (ours) keeps its masked third.
    assert ours == hf_count + 24 * 1024


# ---------------------------------------------------------------------- (e) errors


def test_unknown_and_missing_keys_in_one_error(hf_sd):
    official = {k: v.numpy() for k, v in _official_from_hf(hf_sd).items()}
    bad = {k: v for k, v in official.items() if k != "blocks.1.mlp.fc2.bias"}
    bad["head.weight"] = np.zeros((10, D), np.float32)
    with pytest.raises(WeightFileError) as err:
        to_official(bad, num_heads=HEADS, source="dinov3.pth")
    msg = str(err.value)
    assert msg.startswith("dinov3.pth: does not fit the DINOv3 ViT tower (official")
    assert "unknown keys (1)" in msg and "head.weight" in msg
    assert "missing keys (1)" in msg and "blocks.1.mlp.fc2.bias" in msg

    hf = {k: v for k, v in hf_sd.items() if k != "model.layer.2.attention.v_proj.weight"}
    hf["pooler.dense.weight"] = torch.zeros(D, D)
    with pytest.raises(WeightFileError) as err:
        to_official(hf, num_heads=HEADS)
    msg = str(err.value)
    assert "Hugging Face DINOv3ViTModel" in msg
    assert "pooler.dense.weight" in msg and "model.layer.2.attention.v_proj.weight" in msg

    # A DINOv2 file: the learned position table gives it away.
    dinov2 = {k: v for k, v in official.items() if k not in ("storage_tokens",)}
    dinov2["pos_embed"] = np.zeros((1, 17, D), np.float32)
    with pytest.raises(WeightFileError, match="DINOv2"):
        to_official(dinov2, num_heads=HEADS)
    with pytest.raises(WeightFileError, match="empty"):
        to_official({})


def test_layer_norms_are_torch_layernorm_eps_1e5(ours):
    # "layernormbf16" is nn.LayerNorm(eps=1e-5) (DINOv2 used 1e-6): rows of small spread
    # make eps visible. Rows far from 0 check the two-pass variance (a one-pass float32
    # E[x^2] - E[x]^2 loses the digits of such rows).
    import torch.nn.functional as F

    rng = np.random.default_rng(7)
    blk = ours.blocks[1]
    for x in (0.01 * rng.normal(size=(2, 3, D)), 300.0 + rng.normal(size=(2, 3, D))):
        x = x.astype(np.float32)
        for norm in (blk.norm1, blk.norm2, ours.norm):
            scale, bias = (torch.tensor(np.asarray(v[...])) for v in (norm.scale, norm.bias))
            want = F.layer_norm(torch.from_numpy(x), (D,), scale, bias, eps=1e-5).numpy()
            np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-4,
                                       atol=1e-4)


# ---------------------------------------------------------------------- dtypes


def _param_dtypes(model):
    return {np.dtype(v.dtype) for v in jax.tree.leaves(nnx.state(model, nnx.Param))}


def test_parameters_float32_and_bfloat16_compute(hf_model, hf_sd):
    assert _param_dtypes(_abstract()) == {np.dtype(np.float32)}
    model = _loaded(to_official(hf_sd, num_heads=HEADS), dtype=jnp.bfloat16)
    assert _param_dtypes(model) == {np.dtype(np.float32)}
    x = _images(48, 80, seed=6)
    t = model.prepare_tokens(jnp.asarray(x))
    blk = model.blocks[0]
    assert t.dtype == jnp.float32
    assert blk.attn.qkv(blk.norm1(t)).dtype == jnp.bfloat16  # the matmuls run in dtype
    assert blk(t, model.block_aux((3, 5))).dtype == jnp.float32  # the stream does not
    assert rel_err(_fwd(model, jnp.asarray(x)), _hf_forward(hf_model, x)) < 3e-2
