"""dinov3's section of ``config.model`` (``config.model.dinov3``): plain data, imported by the
configs without the tower's model (towers/registry.py)."""

from mfuser_jax.towers.spec import TowerConfig

CONFIG = TowerConfig(
    large=dict(embed_dim=1024, num_heads=16, mlp_ratio=4.0, init_values=1e-5,
               n_storage_tokens=4, rope_base=100.0),
    tiny=dict(embed_dim=32, num_heads=2),
    patch_size=16)
