"""Random HF DINOv2 and CLIP models shaped like a tiny MFuser config (HF transformers'
Dinov2Model and CLIPModel, the originals' encoder weight formats), saved as the safetensors
files the encoder converter reads (tests that convert encoders share these)."""

import transformers
from safetensors.torch import save_file


def random_dinov2_and_clip(c, d, image_size: int):
    """(Dinov2Model, CLIPModel) at patch 14 and ``image_size`` for the tower section ``c``
    and DINOv2 section ``d``; seed torch first for reproducible weights."""
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=d.embed_dim, num_hidden_layers=c.layers, num_attention_heads=d.num_heads,
        intermediate_size=4 * d.embed_dim, image_size=image_size, patch_size=14,
        layer_norm_eps=1e-6))
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=c.text_width, intermediate_size=4 * c.text_width,
                         num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
                         vocab_size=c.vocab_size, max_position_embeddings=77),
        vision_config=dict(hidden_size=c.width, intermediate_size=4 * c.width,
                           num_hidden_layers=c.layers, num_attention_heads=c.heads,
                           image_size=image_size, patch_size=14),
        projection_dim=c.output_dim))
    return dino, clip


def save_safetensors(model, path: str) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path
