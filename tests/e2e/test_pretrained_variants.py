"""Encoder conversion for the EVA02 and SigLIP variants: weight files in the originals'
formats (EVA02-CLIP .pt with rotary buffers, an HF SiglipModel .pth) at another resolution
than the model's, converted by convert_encoders and loaded into MFuser."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from mfuser_jax.towers.eva02.convert import eva02_state_dicts  # noqa: E402
from mfuser_jax.model.pretrained import convert_encoders  # noqa: E402
from mfuser_jax.weights.torch_io import read_state_dict  # noqa: E402
from mfuser_jax.model.mfuser import MFuser  # noqa: E402
from tests.refs.eva02 import TEVA, TTextTransformer  # noqa: E402
from tests.refs.eva02 import randomize as eva_randomize  # noqa: E402
from tests.support import REPO, tiny_config  # noqa: E402


def _dinov2_file(folder, cfg, image, patch):
    d = cfg.dinov2
    torch.manual_seed(0)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=d.embed_dim, num_hidden_layers=cfg[cfg.vlm].layers,
        num_attention_heads=d.num_heads,
        intermediate_size=4 * d.embed_dim, image_size=image, patch_size=patch,
        layer_norm_eps=1e-6))
    path = str(folder / "dinov2.safetensors")
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, path)
    return path


def test_eva02_encoders_convert_and_load(tmp_path):
    cfg = tiny_config("eva02")  # 56 px, patch 14: a 4x4 grid
    c = cfg.eva02
    # EVA02-CLIP as released: 'visual.'/'text.' prefixes, its own (3x3) grid, 77 text
    # positions, rotary buffers, logit_scale, inside 'module'.
    eva = eva_randomize(TEVA(img=42, patch=14, dim=c.width, heads=c.heads, depth=c.layers,
                             ratio=c.mlp_ratio, out=c.output_dim), 0)
    text = eva_randomize(TTextTransformer(77, vocab=c.vocab_size, width=c.text_width,
                                          heads=c.text_heads, layers=c.text_layers,
                                          out=c.output_dim), 1)
    sd = {f"visual.{k}": v for k, v in eva.state_dict().items()}
    sd.update({f"text.{k}": v for k, v in text.state_dict().items()})
    sd["logit_scale"] = torch.tensor(4.6)
    eva_path = str(tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt")
    torch.save({"module": sd}, eva_path)
    out = str(tmp_path / "converted")
    counts = convert_encoders(cfg, out, vfm_path=_dinov2_file(tmp_path, cfg, 56, 14),
                              vlm_path=eva_path)
    assert set(counts) == {"dinov2", "eva02_visual", "eva02_text"}

    model = MFuser(cfg, rngs=nnx.Rngs(1))
    adapter_before = np.asarray(model.backbone.adapter[0].in_proj.kernel[...])
    model.load_pretrained(out)
    visual_sd, text_sd = eva02_state_dicts(read_state_dict(eva_path), img_size=56,
                                           context_length=13)
    np.testing.assert_array_equal(model.backbone.vlm.pos_embed[...], visual_sd["pos_embed"])
    assert model.backbone.vlm.pos_embed.shape == (1, 17, c.width)  # 3x3 resized to 4x4
    np.testing.assert_array_equal(model.text_encoder.positional_embedding[...],
                                  text_sd["positional_embedding"])
    np.testing.assert_array_equal(model.backbone.vlm.blocks[0].attn.v_bias[...],
                                  sd["visual.blocks.0.attn.v_bias"].numpy())
    np.testing.assert_array_equal(model.backbone.adapter[0].in_proj.kernel[...], adapter_before)


def test_siglip_encoders_convert_and_load(tmp_path, spiece):
    cfg = tiny_config("siglip")  # 64 px, patch 16: a 4x4 grid
    c = cfg.siglip
    torch.manual_seed(2)
    weights = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(hidden_size=c.text_width, intermediate_size=c.text_intermediate_size,
                         num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
                         vocab_size=c.vocab_size, max_position_embeddings=16),
        vision_config=dict(hidden_size=c.width, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.layers, num_attention_heads=c.heads,
                           image_size=48, patch_size=16)))
    with torch.no_grad():
        weights.logit_scale.fill_(2.0)
        weights.logit_bias.fill_(-6.0)
    siglip_path = str(tmp_path / "siglip_vitl16_384.pth")
    torch.save(weights.state_dict(), siglip_path)
    out = str(tmp_path / "converted")
    with pytest.raises(Exception, match="siglip_tokenizer"):
        convert_encoders(cfg, out, vfm_path="unused", vlm_path=siglip_path)
    counts = convert_encoders(cfg, out, vfm_path=_dinov2_file(tmp_path, cfg, 64, 16),
                              vlm_path=siglip_path, tokenizer_path=spiece)
    assert set(counts) == {"dinov2", "siglip_visual", "siglip_text"}
    assert os.path.isfile(os.path.join(out, "spiece.model"))

    cfg.pretrained = out  # the tokenizer is found beside the weights
    model = MFuser(cfg, rngs=nnx.Rngs(1))
    model.load_pretrained(out)
    assert float(model.backbone.logit_scale[0]) == 2.0
    assert float(model.backbone.logit_bias[0]) == -6.0
    assert model.backbone.vlm.embeddings.position_embedding.embedding.shape == (16, c.width)
    np.testing.assert_array_equal(
        model.text_encoder.embeddings.position_embedding.embedding[...],
        weights.text_model.embeddings.position_embedding.weight.detach().numpy()[:10])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
    assert np.all(np.isfinite(np.asarray(model.backbone.vlm.prepare_tokens(x))))


def test_convert_weights_cli_asks_for_the_configs_vlm(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "convert_weights.py"),
         "--config", os.path.join(REPO, "configs", "demo.py") + ":vlm=eva02",
         "--dinov2", "d.pth", "--clip", "c.pt", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--eva02" in proc.stderr and "vlm='eva02'" in proc.stderr
