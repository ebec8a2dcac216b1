"""Device mesh, partition rules and host-local -> global batches.

The mesh comes from `config.mesh`, a tuple of (axis name, size) pairs; a size of -1 takes the
devices left over (default `(("data", -1),)`: every visible device on one data axis). Batches
are sharded on 'data'; parameters are replicated, except that frozen parameters at or above
`config.sharding.fsdp_min_size` elements may be split over 'data' (FSDP of the frozen towers:
they take no optimizer state, so sharding them only saves weight memory).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that reveal a multi-process launch jax.distributed can detect itself.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return any(k in os.environ for k in _CLUSTER_ENV[2:])


def maybe_initialize_distributed(config: Any = None) -> bool:
    """Calls `jax.distributed.initialize()` when asked or when a cluster launch is detected.

    `config.distributed` (optional): `enabled` ("auto" | True | False), `coordinator_address`,
    `num_processes`, `process_id` (explicit values for a manual launch, e.g. two processes on
    localhost). Must run before anything touches a device. Returns True if initialised.
    """
    dist = config.get("distributed", None) if config is not None else None
    enabled = dist.get("enabled", "auto") if dist is not None else "auto"
    if enabled is False or enabled == "false":
        return False
    explicit = dist is not None and bool(dist.get("coordinator_address", ""))
    if enabled == "auto" and not explicit and not _cluster_detected():
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=dist.coordinator_address,
                      num_processes=int(dist.num_processes),
                      process_id=int(dist.process_id))
    jax.distributed.initialize(**kwargs)
    return True


def _axis_sizes(mesh_spec: Sequence[Sequence[Any]] | None, n_devices: int
                ) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(names, sizes) of config.mesh over ``n_devices``; one size may be -1 (the rest)."""
    spec = [tuple(x) for x in (mesh_spec or ((DATA_AXIS, -1),))]
    names = [str(name) for name, _ in spec]
    sizes = [int(size) for _, size in spec]
    if DATA_AXIS not in names:
        raise ValueError(f"config.mesh {spec} needs a {DATA_AXIS!r} axis")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {spec}: at most one axis may have size -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"config.mesh {spec} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"config.mesh {spec} has {math.prod(sizes)} slots for "
                         f"{n_devices} devices")
    return tuple(names), tuple(sizes)


def make_mesh(mesh_spec: Sequence[Sequence[Any]] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh from (axis, size) pairs; one size may be -1 (the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = _axis_sizes(mesh_spec, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names)


def abstract_mesh(mesh_spec: Sequence[Sequence[Any]] | None, num_devices: int
                  ) -> jax.sharding.AbstractMesh:
    """The mesh of ``make_mesh`` for ``num_devices`` devices that need not exist: programs
    sharded over it lower (for any platform) but cannot run."""
    names, sizes = _axis_sizes(mesh_spec, int(num_devices))
    return jax.sharding.AbstractMesh(sizes, names)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis on 'data', the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: Sequence[int], data_size: int, min_size: int) -> P:
    """Splits the largest axis divisible by the data axis size, for arrays >= min_size."""
    if data_size <= 1 or min_size <= 0 or math.prod(shape) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for axis in order:
        if shape[axis] % data_size == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, *, fsdp_min_size: int = 0) -> Any:
    """NamedShardings for a pytree of arrays: replicated, or FSDP for large leaves."""
    data_size = mesh.shape[DATA_AXIS]

    def one(x):
        return NamedSharding(mesh, fsdp_spec(np.shape(x), data_size, fsdp_min_size))

    return jax.tree.map(one, tree)


def put_global(tree: Any, shardings: Any) -> Any:
    """Places host values that are identical on every process as global arrays."""

    def one(x, sharding):
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # typed PRNG keys (nnx.Rngs state): place the raw key data, then re-wrap
            data = one(jax.random.key_data(x), NamedSharding(sharding.mesh, P()))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = to_host(x) if isinstance(x, jax.Array) else np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local batch (leading axis = global batch / process count) -> global arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """Host copy of a replicated (or fully addressable) array, on any process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if not x.sharding.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x.addressable_data(0))
