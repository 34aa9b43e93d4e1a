"""What the loop feeds its compiled calls: batches made on the host, or indices into a
stream resident on the device.

Every sample of a stream has one *global index*: its position in the concatenation of
the tasks' arrays (task 0's samples first). A training pool (one task, or tasks 0..t
for cumulative methods) is a contiguous range of it, so an epoch's order (a pure
function of seed, task, phase and epoch, drawn on the host as always) names the same
samples on both paths:

* **host** (``resident=False``): the loop's items are batches made in numpy
  (:func:`jaxcl.data.batches`), gathered, normalised and padded on the host;
* **device** (``resident=True``): the stream lives in device memory as uint8 and an
  item is ``{"idx": int32 [B], "valid": bool [B]}``; :func:`gather` makes the batch on
  the device by looking each pixel value up in the same table made once on the host
  (:func:`~jaxcl.data.batches.levels`), so both paths train on the same numbers, bit
  for bit.

Several runs (seeds) trained in one program each have their own orders; when their
streams differ (a seed-dependent stream: permutations, shuffled classes, subsets) each
run has its own resident copy, stacked on a leading run axis.

Several processes: each makes only its block of every item (:meth:`Feed.place`): its
rows of each batch, and, when the mesh's ``runs`` axis spreads the runs over processes,
only its own runs (and only their resident copies).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.data.batches import Pool, _make, levels, normalize, pool
from jaxcl.data.sources import DataError
from jaxcl.data.streams import Stream


def gather(src: dict, idx: jax.Array, valid: jax.Array) -> dict:
    """The batch at global indices ``idx`` of a resident split ``src``; entries with
    ``valid`` False are padding (zeros, mask 0), exactly as the host pads."""
    tid = src["task"][idx]
    x = normalize(src["levels"], src["x"][idx].astype(jnp.int32), tid)
    v = valid.reshape((-1,) + (1,) * (x.ndim - 1))
    return {"x": jnp.where(v, x, 0.0), "y": jnp.where(valid, src["y"][idx], 0),
            "task": jnp.where(valid, tid, 0), "mask": valid.astype(jnp.float32)}


def stream_bytes(stream: Stream) -> int:
    """Bytes of a stream's images (train and test), as it would sit on the device."""
    return sum(t.x_train.nbytes + t.x_test.nbytes for t in stream.tasks)


def device_budget() -> tuple[int, str]:
    """(bytes a resident stream may take, where that figure comes from): half the
    first device's memory, or a quarter of the host's on CPU."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 2, f"half of {dev.device_kind}'s {stats['bytes_limit'] / 2**30:.1f} GiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 4, f"a quarter of the host's {total / 2**30:.1f} GiB (device: {dev.platform})"


def choose_resident(setting: str, streams: list[Stream]) -> bool:
    """``data.on_device`` (auto | true | false) against the streams' size."""
    need = sum(stream_bytes(s) for s in streams)
    budget, where = device_budget()
    if setting == "false":
        return False
    if setting == "true" and need > budget:
        raise DataError(f"data.on_device=true: the stream takes {need / 2**20:.1f} MiB of images and the budget is "
                        f"{budget / 2**20:.1f} MiB ({where}); use data.on_device=auto or false")
    return setting == "true" or need <= budget


class Feed:
    """Items for the compiled calls of ``R`` runs. ``streams`` are the distinct streams,
    ``run_stream[r]`` the one run ``r`` trains on. Items carry a leading run axis when
    ``R > 1``: always for training (each run has its order), and for evaluation and
    consolidation when the runs' streams differ (``self.per_run``)."""

    def __init__(self, streams: list[Stream], run_stream: list[int], *, normalize: bool, resident: bool):
        self.streams, self.run_stream, self.resident = streams, list(run_stream), resident
        self.path = "device" if resident else "host"  # what results.json reports as data_path
        self.normalize = normalize
        self.pipeline, self.pipeline_why = "memory", "data.pipeline=memory"  # see jaxcl.data.pipeline.make
        self.R = len(self.run_stream)
        self.per_run = len(streams) > 1
        # (this process, processes): each process makes only its own rows of every batch
        self.shard = (jax.process_index(), jax.process_count())
        self.local_runs = range(self.R)  # the runs this process feeds (see place)
        self.rows_of = None  # (lo, hi, of): its rows lo*B/of .. hi*B/of of a batch (see place)
        self._pools: dict = {}  # host path: the pool in use per (stream, split, tasks)
        self._src = {}
        if resident:
            for split in ("train", "test"):
                arrays = [pool(st, range(len(st)), split, normalize) for st in streams]
                arrays = [{"x": p.x, "y": p.y, "task": p.task, "levels": levels(p.mean, p.std)} for p in arrays]
                if self.per_run:  # one copy per run, padded to the longest
                    n = max(len(a["x"]) for a in arrays)
                    pad = lambda a: np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])  # noqa: E731
                    arrays = [{k: pad(v) if k in ("x", "y", "task") else v for k, v in arrays[i].items()}
                              for i in self.run_stream]
                    self._src[split] = {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}
                else:
                    self._src[split] = arrays[0]

    # -- sizes and ranges

    def _sizes(self, r: int, split: str) -> list[int]:
        return [len(t.x_train if split == "train" else t.x_test) for t in self.streams[self.run_stream[r]].tasks]

    def _range(self, r: int, split: str, tasks) -> tuple[int, int]:
        """Global indices ``lo .. hi-1`` of ``tasks`` (an int or a range) in ``split``."""
        lo_t, hi_t = (tasks[0], tasks[-1]) if isinstance(tasks, range) else (tasks, tasks)
        sizes = self._sizes(r, split)
        return int(sum(sizes[:lo_t])), int(sum(sizes[:hi_t + 1]))

    def size(self, r: int, split: str, tasks) -> int:
        lo, hi = self._range(r, split, tasks)
        return hi - lo

    def place(self, runs: range, rows: tuple[int, int, int]) -> None:
        """This process feeds only ``runs`` (its run groups' runs) and the rows
        ``rows[0]*B/rows[2] .. rows[1]*B/rows[2]`` of each batch
        (:func:`jaxcl.sharding.process_block`); per-run resident copies of other runs
        are dropped before they reach a device."""
        if len(runs) < self.R and self.pipeline == "grain":
            raise DataError(f"data.pipeline=grain: mesh.runs spreads the {self.R} runs over the JAX processes, which "
                            "the grain pipeline does not feed; use mesh.runs=1 or data.pipeline=memory")
        self.local_runs, self.rows_of = runs, tuple(rows)
        if self.per_run and len(runs) < self.R:
            self._src = {split: {k: v[runs.start:runs.stop] for k, v in a.items()} for split, a in self._src.items()}

    def drop_host_copies(self) -> None:
        """Forget the host arrays of the resident stream once they are on the device."""
        self._src = {}

    def src(self, split: str):
        """The resident arrays of ``split`` (to be placed on the device once), or None."""
        return self._src.get(split)

    def _host_pool(self, r: int, split: str, tasks) -> Pool:
        key = (self.run_stream[r], split, tasks)
        if key not in self._pools:
            self._pools = {k: v for k, v in self._pools.items() if k[:2] != key[:2]}  # one pool per split at a time
            self._pools[key] = pool(self.streams[key[0]], tasks, split, self.normalize)
        return self._pools[key]

    # -- items

    def _rows(self, batch_size: int) -> tuple[int, int]:
        """This process's rows ``lo .. hi-1`` of a global batch (a process's devices hold
        a contiguous block of the batch)."""
        if self.rows_of is not None:
            lo, hi, n = self.rows_of
            if batch_size % n:
                raise DataError(f"batch size {batch_size} does not split over the {n} devices of a run group")
            return lo * batch_size // n, hi * batch_size // n
        i, n = self.shard
        if batch_size % n:
            raise DataError(f"batch size {batch_size} does not split over {n} JAX processes")
        return i * batch_size // n, (i + 1) * batch_size // n

    def _item(self, r: int, split: str, tasks, local: np.ndarray, batch_size: int) -> dict:
        """Item for the samples at pool positions ``local`` of run ``r`` (padded to B)."""
        if self.resident:
            lo, _ = self._range(r, split, tasks)
            idx = np.zeros(batch_size, np.int32)
            idx[:len(local)] = lo + local
            return {"idx": idx, "valid": np.arange(batch_size) < len(local)}
        return _make(self._host_pool(r, split, tasks), np.asarray(local, np.int64), batch_size)

    def empty_item(self, batch_size: int, like: dict) -> dict:
        return {k: np.zeros_like(v) for k, v in like.items()}

    def train_items(self, tasks, orders: list[np.ndarray], slots: range, batch_size: int, K: int) -> dict:
        """``{"active": [R?, K], "item": [R?, K, ...]}`` for the training slots ``slots``
        (batch ``s`` of run r is ``orders[r][s*B:(s+1)*B]``; a run with fewer batches
        than a slot is inactive there; rows beyond ``len(slots)`` are inactive padding).
        Items hold this process's rows of each batch, of its runs only."""
        per_run = []
        lo, hi = self._rows(batch_size)
        rows = hi - lo
        for r in self.local_runs:
            n_batches = len(orders[r]) // batch_size
            items, active = [], np.zeros(K, bool)
            for k, s in enumerate(slots):
                if s < n_batches:
                    items.append(self._item(r, "train", tasks, orders[r][s * batch_size + lo:s * batch_size + hi],
                                            rows))
                    active[k] = True
                else:
                    items.append(None)
            like = next((i for i in items if i is not None), None)
            if like is None:
                like = self._item(r, "train", tasks, np.zeros(rows, np.int64), rows)
            items = [self.empty_item(rows, like) if i is None else i for i in items]
            items += [self.empty_item(rows, like)] * (K - len(items))
            per_run.append({"active": active, "item": {k: np.stack([i[k] for i in items]) for k in like}})
        return _stack_runs(per_run) if self.R > 1 else per_run[0]

    def pass_items(self, split: str, tasks, batch_size: int):
        """Items covering every sample of ``tasks`` in ``split`` once, in stored order
        (evaluation, consolidation); per run when the runs' streams differ; this
        process's rows of each batch (of its runs) only."""
        runs = self.local_runs if self.per_run else [0]
        sizes = [self.size(r, split, tasks) for r in runs]
        # as many items on every process: each is one call of a program all processes run
        n_batches = -(-max(self.size(r, split, tasks) for r in range(self.R)) // batch_size)
        lo, hi = self._rows(batch_size)
        for b in range(n_batches):
            per_run = []
            for r, n in zip(runs, sizes):
                local = np.arange(b * batch_size + lo, min(b * batch_size + hi, n))
                per_run.append(self._item(r, split, tasks, local, hi - lo))
            yield _stack_runs(per_run) if self.per_run else per_run[0]


def _stack_runs(items: list[dict]) -> dict:
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *items)
