"""Device mesh and shardings: batches split along a ``data`` axis, state replicated.

All placement goes through ``jax.jit`` shardings and ``jax.device_put`` (no ``pmap``):
the same code runs on one device, on a GPU/TPU host, and on N virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


class ShardingError(ValueError):
    pass


def make_mesh(num_devices: int = -1) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (-1: all)."""
    devices = jax.devices()
    n = len(devices) if num_devices in (-1, 0, None) else num_devices
    if not 1 <= n <= len(devices):
        raise ShardingError(f"mesh.data: asked for {num_devices} devices, {len(devices)} visible")
    return Mesh(np.asarray(devices[:n]), (AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Arrays whose axis ``batch_axis`` is the batch (after run and step axes)."""
    return NamedSharding(mesh, P(*([None] * batch_axis), AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ShardingError(f"{what}={batch_size} is not divisible by the {n} devices of the mesh; "
                            f"use a multiple of {n} or set mesh.data")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host arrays -> device arrays split along the batch axis."""
    return jax.device_put(batch, data_sharding(mesh))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
