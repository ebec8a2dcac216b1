"""eva02's section of ``config.model`` (``config.model.eva02``): plain data, imported by the
configs without the tower's model (towers/registry.py)."""

from mfuser_jax.towers.spec import TowerConfig

CONFIG = TowerConfig(
    large=dict(width=1024, layers=24, heads=16, mlp_ratio=2.6667, output_dim=768,
               pt_hw_seq_len=16, text_width=768, text_heads=12, text_layers=12,
               text_activation="gelu", vocab_size=49408, token_length=5, n_ctx=8),
    tiny=dict(width=32, layers=4, heads=2, output_dim=32, text_width=32, text_heads=2,
              text_layers=2),
    patch_size=14,
    weight_decay=1e-5,
    no_decay_keys=("norm", "level_embed", "query_embed"))
