"""Mesh construction, partition rules and host-local -> global batches (8 fake CPU devices
in a subprocess for the multi-device part)."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mfuser_jax import sharding as shd
from tests.support import REPO


def test_default_mesh_spans_all_devices():
    mesh = shd.make_mesh(None)
    assert mesh.axis_names == ("data",)
    assert mesh.shape["data"] == jax.device_count()


def test_mesh_spec_errors():
    with pytest.raises(ValueError, match="data"):
        shd.make_mesh((("model", -1),))
    with pytest.raises(ValueError, match="at most one"):
        shd.make_mesh((("data", -1), ("model", -1)))
    with pytest.raises(ValueError, match="slots"):
        shd.make_mesh((("data", 3),))


def test_fsdp_rule():
    assert shd.fsdp_spec((1024, 4096), 8, 1000) == P(None, "data")   # largest divisible
    assert shd.fsdp_spec((1024, 4098), 8, 1000) == P("data", None)   # next one
    assert shd.fsdp_spec((1024, 4096), 8, 10 ** 8) == P()             # too small
    assert shd.fsdp_spec((7, 9), 8, 1) == P()                         # nothing divides
    assert shd.fsdp_spec((1024,), 1, 1) == P()                        # one device


def test_no_distributed_without_cluster(monkeypatch):
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    import ml_collections
    cfg = ml_collections.ConfigDict({"distributed": {"enabled": "auto",
                                                     "coordinator_address": ""}})
    assert shd.maybe_initialize_distributed(cfg) is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert shd._cluster_detected() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert shd._cluster_detected() is True


def test_eight_fake_devices():
    code = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import PartitionSpec as P
        from mfuser_jax import sharding as shd
        assert jax.device_count() == 8
        mesh = shd.make_mesh((("data", -1),))
        assert mesh.shape["data"] == 8
        mesh2 = shd.make_mesh((("data", 4), ("model", 2)))
        assert dict(mesh2.shape) == {"data": 4, "model": 2}
        x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
        g = shd.global_batch({"x": x}, mesh)["x"]
        assert g.shape == (16, 3) and g.sharding.spec == P("data")
        assert len(g.addressable_shards) == 8
        assert g.addressable_shards[1].data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(g), x)
        tree = {"big": np.ones((64, 32), np.float32), "small": np.ones((3,), np.float32)}
        sh = shd.tree_shardings(tree, mesh, fsdp_min_size=1000)
        assert sh["big"].spec == P("data", None) and sh["small"].spec == P()
        placed = shd.put_global(tree, sh)
        assert placed["big"].addressable_shards[0].data.shape == (8, 32)
        np.testing.assert_array_equal(shd.to_host(placed["big"]), tree["big"])
        print("OK")
    """)
    flags = os.environ.get("XLA_FLAGS", "")  # the suite's settings, then the device count
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
