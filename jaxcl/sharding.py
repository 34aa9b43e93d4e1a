"""Device mesh and shardings, as data: a 3-D mesh ``(runs, data, fsdp)`` and a short
list of rules that give every leaf of the state its PartitionSpec.

* Batches are split along both axes (every device gets its share of the batch).
* The state follows :data:`RULES` (first match wins, on the leaf's path such as
  ``params/params/fc1/kernel`` or ``opt_state/0/mu/params/fc1/kernel``): a leaf of at
  least ``mesh.min_shard_bytes`` is split along ``fsdp`` on its largest axis that the
  axis size divides; the replay memories are split along ``data``; everything else is
  replicated. The trees that shadow the parameters (optimizer moments, ``trainable``
  masks, PackNet's owner index, EWC/SI importances and anchors, CLR's per-task kernels,
  NCCL's calibration, ResCL's branches) have the same shapes, so they take the same
  sharding as their parameter: nothing is gathered to update them.
* With several runs in one program (seeds, sweeps) the leading run axis of the state,
  of the items, of the per-run resident streams and of every compiled function's
  outputs is split along ``runs``: each group of ``data x fsdp`` devices holds and
  trains ``R / mesh.runs`` whole runs, and ``data``/``fsdp`` work inside the group as
  above. A run never needs another run's numbers, so nothing crosses groups: with
  ``data = fsdp = 1`` the train step has no collective at all (tests/test_runs_axis.py
  reads the compiled HLO's replica groups). Items and streams that every run shares
  are replicated over ``runs``.

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
AXES = ("data", "fsdp")  # the axes a batch is split along (inside a run group)
MESH_AXES = ("runs", "data", "fsdp")

# (path pattern, how): "fsdp" = largest divisible axis along fsdp; "data" = first axis
# along data; "replicate". Paths are '/'-joined keys of the State.
RULES = (
    (r"^extra/(memory|mem)/", "data"),
    (r".*", "fsdp"),
)


class ShardingError(ValueError):
    pass


def make_mesh(data: int = -1, fsdp: int = 1, runs: int = 1) -> Mesh:
    """A ``(runs, data, fsdp)`` mesh over ``runs * data * fsdp`` devices of every
    process (``data=-1``: all devices not taken by ``runs`` and ``fsdp``). Devices are
    laid out runs-major, so a run group is a block of consecutive devices (on several
    processes: a process's own devices when it has a multiple of ``data * fsdp``)."""
    devices = jax.devices()
    if fsdp < 1:
        raise ShardingError(f"mesh.fsdp: must be >= 1, got {fsdp}")
    if runs < 1:
        raise ShardingError(f"mesh.runs: must be >= 1, got {runs}")
    if data in (-1, 0, None):
        if len(devices) % (fsdp * runs):
            what = f"mesh.fsdp={fsdp}" if runs == 1 else f"mesh.runs={runs} x mesh.fsdp={fsdp}"
            raise ShardingError(f"{what} does not divide the {len(devices)} devices")
        data = len(devices) // (fsdp * runs)
    n = runs * data * fsdp
    if not 1 <= n <= len(devices):
        lead = f"mesh.runs {runs} x " if runs > 1 else ""
        raise ShardingError(f"mesh.data: asked for {lead}{data} x mesh.fsdp {fsdp} = {n} devices, "
                            f"{len(devices)} visible"
                            + (f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    if jax.process_count() > 1 and n != len(devices):
        raise ShardingError(f"mesh: {runs} x {data} x {fsdp} = {n} devices, but the {jax.process_count()} processes "
                            f"have {len(devices)}; a multi-process mesh must use every device")
    return Mesh(np.asarray(devices[:n]).reshape(runs, data, fsdp), MESH_AXES)


def process_block(mesh: Mesh, n_runs: int) -> tuple[range, tuple[int, int, int]]:
    """What this process holds of a ``[runs, ..., batch, ...]`` item: (its runs, (lo,
    hi, of): the rows ``lo*B/of .. hi*B/of`` of each batch). Its devices must form one
    block of whole run groups x consecutive positions inside a group (true of the
    runs-major layout of :func:`make_mesh` when processes own consecutive devices)."""
    k, D, F = mesh.devices.shape
    me = jax.process_index()
    pos = [(g, d * F + f) for (g, d, f), dev in np.ndenumerate(mesh.devices) if dev.process_index == me]
    groups, rows = sorted({g for g, _ in pos}), sorted({j for _, j in pos})
    block = {(g, j) for g in groups for j in rows}
    if (set(pos) != block or groups != list(range(groups[0], groups[-1] + 1))
            or rows != list(range(rows[0], rows[-1] + 1))):
        raise ShardingError(f"mesh: the devices of process {me} are not one block of run groups x rows of the "
                            f"({k}, {D}, {F}) mesh; give every process the same number of devices")
    per = n_runs // k
    return range(groups[0] * per, (groups[-1] + 1) * per), (rows[0], rows[-1] + 1, D * F)


def group_size(mesh: Mesh) -> int:
    """Devices in one run group (``data x fsdp``): a batch is split over them."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def runs_axis(mesh: Mesh, lead: int = 1):
    """The mesh axis a leading run axis is split along: ``"runs"`` when ``lead`` and
    the mesh has more than one run group, else None (not split)."""
    return "runs" if lead and mesh.shape.get("runs", 1) > 1 else None


def check_runs(n_runs: int, mesh: Mesh) -> None:
    k = mesh.shape.get("runs", 1)
    if n_runs % k:
        raise ShardingError(f"mesh.runs={k} does not divide the {n_runs} runs (seeds x sweep settings); "
                            f"use a divisor of {n_runs}")


def data_sharding(mesh: Mesh) -> NamedSharding:
    return batch_sharding(mesh, 0)


def batch_sharding(mesh: Mesh, batch_axis: int = 0, lead: int = 0) -> NamedSharding:
    """Arrays whose axis ``batch_axis`` is the batch (after run and step axes), split
    over every device of a run group; a leading run axis (``lead=1``) along ``runs``."""
    spec = [None] * batch_axis
    if lead:
        spec[0] = runs_axis(mesh)
    return NamedSharding(mesh, P(*spec, AXES))


def runs_sharding(mesh: Mesh, lead: int = 1) -> NamedSharding:
    """Arrays whose only split axis is a leading run axis (per-run streams, flags,
    metrics); replicated when there is no run axis."""
    return NamedSharding(mesh, P(runs_axis(mesh, lead)) if lead else P())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = group_size(mesh)
    if batch_size % n:
        where = "the mesh" if mesh.shape.get("runs", 1) == 1 else "a run group (mesh.data x mesh.fsdp)"
        raise ShardingError(f"{what}={batch_size} is not divisible by the {n} devices of {where}; "
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
    """The PartitionSpec of one leaf; of ``lead`` leading axes (runs) the first is split
    along ``runs`` (when the mesh has several run groups), the others never. The size
    threshold counts elements as 4 bytes, so that a uint8 owner index or a bool mask is
    split exactly like the float32 weight it shadows."""
    inner = _inner_spec(path, shape, mesh, lead=lead, min_bytes=min_bytes, rules=rules)
    runs = runs_axis(mesh, lead) if len(shape) >= 1 else None
    if runs is None:
        return P(*inner) if any(inner) else P()
    return P(runs, *inner[1:]) if inner else P(runs)


def _inner_spec(path, shape, mesh, *, lead, min_bytes, rules) -> list:
    """The leaf's spec inside a run group, one entry per axis (or [] when replicated)."""
    size = int(np.prod(shape)) * 4 if shape else 4
    for pattern, how in rules:
        if not re.search(pattern, path):
            continue
        if how == "replicate" or len(shape) <= lead:
            return []
        axis_size = mesh.shape["fsdp" if how == "fsdp" else "data"]
        if axis_size == 1 or size < min_bytes:
            return []
        if how == "data":
            return [None] * lead + ["data"] if shape[lead] % axis_size == 0 else []
        dims = sorted(range(lead, len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if shape[d] % axis_size == 0:
                return [("fsdp" if i == d else None) for i in range(len(shape))]
        return []
    return []


def state_shardings(abstract, mesh: Mesh, *, lead: int = 0, min_bytes: int = 2**16, rules=RULES):
    """A NamedSharding for every leaf of ``abstract`` (a State of ShapeDtypeStructs)."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
        return NamedSharding(mesh, spec(_path(path), shape, itemsize, mesh, lead=lead, min_bytes=min_bytes,
                                        rules=rules))

    return jax.tree_util.tree_map_with_path(one, abstract)


def bytes_per_device(tree, shardings=None) -> dict:
    """The bytes of ``tree`` in total and on the fullest device: its jax Arrays as they
    are placed, or (with ``shardings``, a matching tree) its abstract leaves
    (``jax.eval_shape``) as ``shardings`` would place them."""
    total, per = 0, {}
    leaves = jax.tree_util.tree_leaves(tree)
    if shardings is None:
        pairs = [(a, a.sharding) for a in leaves if isinstance(a, jax.Array)]
    else:
        pairs = list(zip(leaves, jax.tree_util.tree_leaves(shardings)))
    for a, sh in pairs:
        itemsize = np.dtype(a.dtype).itemsize
        total += int(np.prod(a.shape, dtype=np.int64)) * itemsize
        b = int(np.prod(sh.shard_shape(a.shape), dtype=np.int64)) * itemsize
        for d in sh.device_set:
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


def put_local(tree, shardings, batch_axis: int | None = None):
    """Items holding this process's block of every array (its rows of each batch, of its
    runs) -> global arrays: every split leaf is assembled from every process's block
    (``jax.make_array_from_process_local_data`` infers the global shape from the
    sharding), the replicated ones are the same on every process. ``batch_axis`` is
    kept for callers; the sharding says which axes are split."""
    def one(a, sh):
        if jax.process_count() == 1:
            return jax.device_put(a, sh)
        if not sh.is_fully_replicated:
            return jax.make_array_from_process_local_data(sh, np.asarray(a))
        return _put_one(a, sh)

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda a: one(a, shardings), tree)
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
