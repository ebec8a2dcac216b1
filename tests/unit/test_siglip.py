"""SigLIP towers, tokenizer and weight conversion: parity with HF transformers' SigLIP
(random small configs), MFuser's additions (CoOp context, the per-token pooling branch)
against PyTorch restatements of modeling_siglip.py, and the loader's resizes against
torch.nn.functional.interpolate. The tiny SentencePiece model (fixture ``spiece``) is
tests/conftest.py's."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
import torch.nn.functional as F  # noqa: E402

from mfuser_jax.weights import WeightFileError, load_torch_state_dict  # noqa: E402
from mfuser_jax.towers.siglip.convert import siglip_state_dicts  # noqa: E402
from mfuser_jax.weights.torch_io import read_state_dict  # noqa: E402
from mfuser_jax.data.labels import CLASSES  # noqa: E402
from mfuser_jax.towers.siglip.model import SiglipTextTransformer, SiglipVisionTransformer  # noqa: E402
from mfuser_jax.towers.siglip.tokenizer import SiglipTokenizer  # noqa: E402
from tests.refs.siglip import pooling_head  # noqa: E402

D, LAYERS, HEADS, HIDDEN, VOCAB, POS, IMG, PATCH = 32, 2, 4, 64, 120, 16, 32, 8


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _hf_config(image=IMG):
    return transformers.SiglipConfig(
        text_config=dict(hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, vocab_size=VOCAB,
                         max_position_embeddings=POS, bos_token_id=None, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=image, patch_size=PATCH))


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    model = transformers.SiglipModel(_hf_config()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms, biases and probe
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 or "probe" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _towers(sd, image=IMG, context=POS):
    vision_sd, text_sd, scalars = siglip_state_dicts(sd, img_size=image, patch_size=PATCH,
                                                     context_length=context)
    vision = SiglipVisionTransformer(image, PATCH, D, LAYERS, HEADS, HIDDEN, rngs=nnx.Rngs(0))
    text = SiglipTextTransformer(context, VOCAB, D, LAYERS, HEADS, HIDDEN, rngs=nnx.Rngs(0))
    load_torch_state_dict(vision, vision_sd)
    load_torch_state_dict(text, text_sd)
    return vision, text, scalars


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def test_towers_match_hf_siglip(hf):
    vision, text, scalars = _towers(hf.state_dict())
    np.testing.assert_array_equal(scalars["logit_bias"], hf.logit_bias.detach().numpy())
    x = torch.randn(2, 3, IMG, IMG)
    ids = torch.randint(2, VOCAB, (3, POS))
    with torch.no_grad():
        v = hf.vision_model(pixel_values=x)
        t = hf.text_model(input_ids=ids)
    last, pooled = vision(_nhwc(x))
    assert rel_err(last, v.last_hidden_state) < 1e-5
    assert rel_err(pooled, v.pooler_output) < 1e-5
    assert rel_err(text(jnp.asarray(ids.numpy())), t.pooler_output) < 1e-5
    # tanh GELU, not the exact one: HF with exact GELU is measurably different
    with torch.no_grad():
        for layer in hf.vision_model.encoder.layers:
            layer.mlp.activation_fn = torch.nn.GELU()
        exact = hf.vision_model(pixel_values=x).pooler_output
        for layer in hf.vision_model.encoder.layers:
            layer.mlp.activation_fn = torch.nn.GELU(approximate="tanh")
    assert rel_err(pooled, exact) > 1e-5


def test_local_branch_and_context_match_the_original(hf):
    """MFuser's pooling head also runs every token through the probe's attention; its text
    embeddings put the CoOp context after token 0 (modeling_siglip.py)."""
    vision, text, _ = _towers(hf.state_dict())
    h = torch.randn(2, 16, D)
    with torch.no_grad():
        g, loc = pooling_head(hf.vision_model.head, h)
    ours_g, ours_l = vision.head(jnp.asarray(h.numpy()))
    assert rel_err(ours_g, g) < 1e-5 and rel_err(ours_l, loc) < 1e-5

    k, n1, n2 = 3, 5, 4
    ids = torch.randint(2, VOCAB, (k, n1))
    for context in (torch.randn(1, n2, D), torch.randn(2, k, n2, D)):
        tm = hf.text_model
        with torch.no_grad():
            emb = tm.embeddings.token_embedding(ids)
            b = context.shape[0]
            ctx = context if context.ndim == 4 else context[:, None].expand(b, k, n2, D)
            x = torch.cat([emb[None, :, :1].expand(b, k, 1, D), ctx,
                           emb[None, :, 1:].expand(b, k, n1 - 1, D)], dim=2).reshape(b * k, -1, D)
            x = x + tm.embeddings.position_embedding.weight[: n1 + n2]
            for layer in tm.encoder.layers:
                x = layer(x, None)
                x = x[0] if isinstance(x, tuple) else x
            want = tm.head(tm.final_layer_norm(x)[:, -1]).reshape(b, k, D)
        got = text(jnp.asarray(ids.numpy()), jnp.asarray(context.numpy()))
        assert got.shape == (b, k, D) and rel_err(got, want) < 1e-5


def test_conversion_resizes_as_the_original_loader(hf, tmp_path):
    """384 -> 512 px in MFuser; here a 4x4 grid at 32 px -> 6x6 at 48 px: bilinear
    F.interpolate for the positions; text positions cut to the context length."""
    path = str(tmp_path / "siglip.pth")
    torch.save(hf.state_dict(), path)
    sd = read_state_dict(path)
    vision_sd, text_sd, scalars = siglip_state_dicts(sd, img_size=48, patch_size=PATCH,
                                                     context_length=10)
    pos = hf.vision_model.embeddings.position_embedding.weight.detach()
    want = F.interpolate(pos.reshape(1, 4, 4, D).permute(0, 3, 1, 2), size=(6, 6),
                         mode="bilinear").reshape(D, 36).permute(1, 0)
    np.testing.assert_allclose(vision_sd["embeddings.position_embedding.weight"], want.numpy(),
                               rtol=1e-6, atol=1e-6)
    assert text_sd["embeddings.position_embedding.weight"].shape == (10, D)
    assert set(scalars) == {"logit_scale", "logit_bias"}
    vision, _, _ = _towers(hf.state_dict(), image=48, context=10)
    assert vision.embeddings.position_embedding.embedding.shape == (36, D)
    # run-time resize of the stored 4x4 table equals the converter's 6x6 one
    small, _, _ = _towers(hf.state_dict())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 48, 48, 3)), jnp.float32)
    np.testing.assert_allclose(small.prepare_tokens(x), vision.prepare_tokens(x), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(WeightFileError, match="not a SigLIP"):
        siglip_state_dicts({"visual.conv1.weight": np.zeros(1)})


# ------------------------------------------------------------------------------ tokenizer

TEXTS = list(CLASSES) + ["Traffic-Light!", "  motor   cycle ", "a very long class name with "
                                                                  "many words indeed", "cat"]


@pytest.mark.parametrize("length", [5, 16])
def test_tokenizer_matches_hf_siglip_tokenizer(spiece, length):
    ours = SiglipTokenizer(spiece)
    for legacy in (True, False):  # transformers 5 (legacy) and the 4.x loader MFuser used
        hf_tok = transformers.SiglipTokenizer(spiece, legacy=legacy)
        want = np.stack([hf_tok(text=t, truncation=True, max_length=length,
                                padding="max_length")["input_ids"] for t in TEXTS])
        np.testing.assert_array_equal(ours.tokenize(TEXTS, length), want)
    # truncation keeps the EOS last; padding repeats it (SigLIP pads with </s>)
    assert ours.tokenize(["a very long class name"], 3)[0, -1] == ours.eos_id == 1
    assert list(ours.tokenize(["sky"], length)[0, -2:]) == [ours.pad_id] * 2 == [1, 1]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        SiglipTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SiglipTokenizer(bad)
