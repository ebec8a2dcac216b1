"""siglip's section of ``config.model`` (``config.model.siglip``): plain data, imported by the
configs without the tower's model (towers/registry.py)."""

from mfuser_jax.towers.spec import TowerConfig

CONFIG = TowerConfig(
    large=dict(width=1024, layers=24, heads=16, intermediate_size=4096, output_dim=1024,
               text_width=1024, text_heads=16, text_layers=24,
               text_intermediate_size=4096, vocab_size=32000, token_length=5, n_ctx=5,
               tokenizer=""),  # spiece.model; "" = <model.pretrained>/spiece.model
    tiny=dict(width=32, layers=4, heads=2, intermediate_size=64, output_dim=32,
              text_width=32, text_heads=2, text_layers=2, text_intermediate_size=64),
    runtime=("tokenizer",),
    patch_size=16,
    weight_decay=1e-5,
    no_decay_keys=("norm", "level_embed", "query_embed"))
