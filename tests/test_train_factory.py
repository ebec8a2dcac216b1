"""Model registry: registration, lazy 'mfuser' entry, clear error for unknown names."""

import ml_collections
import pytest
from flax import nnx

from mfuser_jax.models import factory


def test_register_and_build():
    @factory.register_model("unit_test_linear")
    class Lin(nnx.Module):
        def __init__(self, cfg, *, rngs):
            self.fc = nnx.Linear(cfg.width, 2, rngs=rngs)

    cfg = ml_collections.ConfigDict({"name": "unit_test_linear", "width": 3})
    model = factory.build_model(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model, Lin) and model.fc.kernel[...].shape == (3, 2)
    del factory.MODEL_REGISTRY["unit_test_linear"]


def test_unknown_name_lists_known_models():
    cfg = ml_collections.ConfigDict({"name": "nope"})
    with pytest.raises(ValueError, match="unknown model name 'nope'.*mfuser"):
        factory.build_model(cfg, rngs=nnx.Rngs(0))


def test_mfuser_is_lazy(monkeypatch):
    import sys
    import types
    fake = types.ModuleType("fake_mfuser_module")

    class FakeMFuser:
        def __init__(self, cfg, *, rngs):
            self.cfg = cfg

    fake.MFuser = FakeMFuser
    monkeypatch.setitem(sys.modules, "fake_mfuser_module", fake)
    monkeypatch.setitem(factory._LAZY_MODELS, "lazy_test", ("fake_mfuser_module", "MFuser"))
    cfg = ml_collections.ConfigDict({"name": "lazy_test"})
    assert "lazy_test" not in factory.MODEL_REGISTRY
    assert isinstance(factory.build_model(cfg, rngs=nnx.Rngs(0)), FakeMFuser)
    factory.MODEL_REGISTRY.pop("lazy_test")
    assert factory._LAZY_MODELS["mfuser"] == ("mfuser_jax.models.mfuser", "MFuser")
