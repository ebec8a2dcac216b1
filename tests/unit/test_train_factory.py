"""Model registry: registration, lazy 'mfuser' entry, clear error for unknown names;
init_model's build from shapes."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mfuser_jax.model import factory


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
    assert factory._LAZY_MODELS["mfuser"] == ("mfuser_jax.model.mfuser", "MFuser")



class _Encoded(nnx.Module):
    """A frozen 'encoder' that load_pretrained would fill, a head, batch statistics, an RNG
    stream and a plain array attribute."""

    pretrained_filter = staticmethod(
        lambda path, value: isinstance(value, nnx.Param) and path[0] == "encoder")
    trainable_filter = staticmethod(lambda path, value: path[0] == "head")

    def __init__(self, cfg, *, rngs):
        self.encoder = nnx.Linear(4, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.ids = np.arange(3)


def _values(model, which):
    """numpy copies of the selected state's leaves (RNG keys as their key data)."""
    out = []
    for x in jax.tree.leaves(nnx.state(model, which)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def test_init_model_computes_all_but_what_it_skips_with_the_same_values():
    factory.register_model("unit_test_encoded")(_Encoded)
    try:
        cfg = ml_collections.ConfigDict({"name": "unit_test_encoded"})
        whole = factory.init_model(cfg, seed=3)
        part = factory.init_model(cfg, seed=3, skip_pretrained=True)
        # what a restore builds: neither the encoder nor what the checkpoint holds
        to_restore = factory.init_model(cfg, seed=3, skip_pretrained=True,
                                        skip_checkpointed=True)
        other = factory.init_model(cfg, seed=4)
    finally:
        del factory.MODEL_REGISTRY["unit_test_encoded"]
    assert factory.abstract_paths(whole) == []
    left = factory.abstract_paths(part)
    assert len(left) == 2 and all("encoder" in p for p in left)  # its kernel and bias
    rest = nnx.Not(_Encoded.pretrained_filter)
    want, got = _values(whole, rest), _values(part, rest)
    assert len(want) == len(got) > 5
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(part.ids), np.arange(3))
    assert sorted(factory.abstract_paths(to_restore)) == sorted(
        left + [f"['{m}']['{v}'].value" for m, v in (("bn", "mean"), ("bn", "var"),
                                                       ("head", "bias"), ("head", "kernel"))])
    computed = nnx.Not(nnx.Any(_Encoded.pretrained_filter, factory.checkpointed(to_restore)))
    want, got = _values(whole, computed), _values(to_restore, computed)
    assert len(want) == len(got) > 3  # the BatchNorm's scale and bias, the RNG stream
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(other.head.kernel[...]),
                              np.asarray(whole.head.kernel[...]))
