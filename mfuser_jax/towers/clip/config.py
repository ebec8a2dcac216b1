"""clip's section of ``config.model`` (``config.model.clip``): plain data, imported by the
configs without the tower's model (towers/registry.py)."""

from mfuser_jax.towers.spec import TowerConfig

CONFIG = TowerConfig(
    # text: QuickGELU, 5 name tokens + 5 contexts
    large=dict(width=1024, layers=24, heads=16, output_dim=768, drop_path_rate=0.1,
               text_width=768, text_heads=12, text_layers=12,
               text_activation="quick_gelu", vocab_size=49408, token_length=5, n_ctx=5),
    tiny=dict(width=32, layers=4, heads=2, output_dim=32, text_width=32, text_heads=2,
              text_layers=2),
    runtime=("drop_path_rate",),
    patch_size=16,  # the reference resizes CLIP's 14 to 16 (and DINOv2's with it)
    weight_decay=1e-4,  # the reference's CLIP config (EVA02 and SigLIP use 1e-5)
    no_decay_keys=("norm",))
