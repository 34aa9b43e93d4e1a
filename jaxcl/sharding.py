"""Device mesh and shardings, as data: a 2-D mesh ``(data, fsdp)`` and a short list of
rules that give every leaf of the state its PartitionSpec.

* Batches are split along both axes (every device gets its share of the batch).
* The state follows :data:`RULES` (first match wins, on the leaf's path such as
  ``params/params/fc1/kernel`` or ``opt_state/0/mu/params/fc1/kernel``): a leaf of at
  least ``mesh.min_shard_bytes`` is split along ``fsdp`` on its largest axis that the
  axis size divides; the replay memories are split along ``data``; everything else is
  replicated. The trees that shadow the parameters (optimizer moments, ``trainable``
  masks, PackNet's owner index, EWC/SI importances and anchors, CLR's per-task kernels,
  NCCL's calibration, ResCL's branches) have the same shapes, so they take the same
  sharding as their parameter: nothing is gathered to update them.
* With several runs in one program (seeds, sweeps) the leading run axis is never split.

All placement goes through ``jax.jit`` shardings (no ``pmap``): the same code runs on one
device, on a GPU/TPU host, on virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and across processes.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
AXES = ("data", "fsdp")

# (path pattern, how): "fsdp" = largest divisible axis along fsdp; "data" = first axis
# along data; "replicate". Paths are '/'-joined keys of the State.
RULES = (
    (r"^extra/(memory|mem)/", "data"),
    (r".*", "fsdp"),
)


class ShardingError(ValueError):
    pass


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``data * fsdp`` devices of every process
    (``data=-1``: all devices not taken by ``fsdp``)."""
    devices = jax.devices()
    if fsdp < 1:
        raise ShardingError(f"mesh.fsdp: must be >= 1, got {fsdp}")
    if data in (-1, 0, None):
        if len(devices) % fsdp:
            raise ShardingError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    n = data * fsdp
    if not 1 <= n <= len(devices):
        raise ShardingError(f"mesh.data: asked for {data} x mesh.fsdp {fsdp} = {n} devices, {len(devices)} visible"
                            + (f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    if jax.process_count() > 1 and n != len(devices):
        raise ShardingError(f"mesh: {data} x {fsdp} = {n} devices, but the {jax.process_count()} processes have "
                            f"{len(devices)}; a multi-process mesh must use every device")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp), AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
    return batch_sharding(mesh, 0)


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Arrays whose axis ``batch_axis`` is the batch (after run and step axes), split
    over every device of the mesh."""
    return NamedSharding(mesh, P(*([None] * batch_axis), AXES))


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


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec(path: str, shape: tuple, itemsize: int, mesh: Mesh, *, lead: int = 0, min_bytes: int = 2**16,
         rules=RULES) -> P:
    """The PartitionSpec of one leaf; ``lead`` leading axes (runs) are never split. The
    size threshold counts elements as 4 bytes, so that a uint8 owner index or a bool mask
    is split exactly like the float32 weight it shadows."""
    size = int(np.prod(shape)) * 4 if shape else 4
    for pattern, how in rules:
        if not re.search(pattern, path):
            continue
        if how == "replicate" or len(shape) <= lead:
            return P()
        axis_size = mesh.shape["fsdp" if how == "fsdp" else "data"]
        if axis_size == 1 or size < min_bytes:
            return P()
        if how == "data":
            return P(*([None] * lead), "data") if shape[lead] % axis_size == 0 else P()
        dims = sorted(range(lead, len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if shape[d] % axis_size == 0:
                return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
        return P()
    return P()


def state_shardings(abstract, mesh: Mesh, *, lead: int = 0, min_bytes: int = 2**16, rules=RULES):
    """A NamedSharding for every leaf of ``abstract`` (a State of ShapeDtypeStructs)."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
        return NamedSharding(mesh, spec(_path(path), shape, itemsize, mesh, lead=lead, min_bytes=min_bytes,
                                        rules=rules))

    return jax.tree_util.tree_map_with_path(one, abstract)


def bytes_per_device(tree) -> dict:
    """The bytes of ``tree`` (jax Arrays) in total and on the fullest device."""
    total, per = 0, {}
    for a in jax.tree_util.tree_leaves(tree):
        if not isinstance(a, jax.Array):
            continue
        total += a.size * a.dtype.itemsize
        shard = a.sharding.shard_shape(a.shape)
        b = int(np.prod(shard)) * a.dtype.itemsize
        for d in a.sharding.device_set:
            per[d.id] = per.get(d.id, 0) + b
    return {"total": int(total), "per_device_max": int(max(per.values(), default=0)),
            "devices": len(per)}


def put(tree, shardings):
    """Host (numpy) or device arrays -> global arrays with ``shardings`` (a sharding, or
    a tree of them); every process passes the same values."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda a, s: put(a, s), tree, shardings)
    return jax.tree_util.tree_map(lambda a: _put_one(a, shardings), tree)


def _put_one(a, sh):
    if isinstance(a, jax.Array) or jax.process_count() == 1:
        return jax.device_put(a, sh)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])


def put_local(tree, shardings, batch_axis: int):
    """Items holding this process's rows of every batch -> global arrays: leaves split
    along the batch axis are assembled from every process's rows, the others are the
    same on every process."""
    def one(a, sh):
        if jax.process_count() == 1:
            return jax.device_put(a, sh)
        if np.ndim(a) > batch_axis and sh.spec != P():
            shape = list(np.shape(a))
            shape[batch_axis] *= jax.process_count()
            return jax.make_array_from_process_local_data(sh, np.asarray(a), tuple(shape))
        return _put_one(a, sh)

    return jax.tree_util.tree_map(one, tree, shardings)


# How many programs of one chain (each taking the previous one's output) may be in flight
# on virtual CPU devices; see :func:`pace`.
CPU_CHAIN_IN_FLIGHT = 4


def pace(state, calls: int, mesh: Mesh):
    """Wait for ``state`` every :data:`CPU_CHAIN_IN_FLIGHT` calls of a chain of programs
    (``calls``: how many were dispatched so far) when the mesh is several CPU devices of
    one process; otherwise return at once.

    XLA:CPU launches each device's part of a program from a shared thread pool, in no
    fixed order, and admits a bounded number of programs per device (32; 1 without
    asynchronous dispatch). A chain dispatched faster than it runs (the consolidation
    pass of a resident stream: its items are a few indices) can then fill one device's
    slots with later links waiting for an earlier one that cannot start, while the other
    devices wait for it in that link's all-reduce: a deadlock, which the runtime ends by
    aborting the process after 40 s. Keeping the host at most a few links ahead makes it
    impossible, at no cost on a CPU (the host has nothing else to overlap)."""
    devices = mesh.devices.flat
    if calls % CPU_CHAIN_IN_FLIGHT == 0 and mesh.devices.size > 1 and devices[0].platform == "cpu":
        jax.block_until_ready(state)
    return state
