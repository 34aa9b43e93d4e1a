"""Streams larger than memory: the loop's batches from a grain pipeline.

``data.pipeline=grain`` (or ``auto`` when the images do not fit ``data.memory_budget_mb``)
builds the stream over :class:`~jaxcl.data.sources.LazyImages` (labels and indices in
memory, pixels in the source: TFDS's ArrayRecord files through ``tfds.data_source``, a
memory-mapped ``.npy`` cache of an npz file, or the embedded arrays) and feeds the loop
through :class:`GrainFeed`:

* an epoch is a ``grain.MapDataset`` over the epoch's order (the same
  ``data.epoch_order`` permutation of the pool as the memory path) whose element reads,
  decodes, resizes (``data.image_size``), applies the task's transforms and normalises
  one image, batched ``B`` at a time; it runs in ``data.grain_workers`` worker
  processes (``mp_prefetch``; 0: in this process);
* the arithmetic is the memory path's, per sample (each pixel value looked up in the
  same table, :func:`~jaxcl.data.batches.levels`), so for a stream that fits in memory **both
  pipelines give bit-identical batches for the same seed** (tested) and the same
  results; ``data.augment`` stays on the device for both;
* the MapDataset is random access, so the batches of slots ``s..e`` of an epoch are a
  pure function of (seed, task, phase, epoch, slot): a run resumed in the middle of an
  epoch builds its iterator at the checkpoint's slot and reads exactly the batches an
  uninterrupted run reads. Nothing of the iterator needs saving beyond the loop's
  ``Position``;
* with several JAX processes, each reads its own rows of every batch
  (``B / process_count`` of them, :attr:`GrainFeed.shard`);
* a worker that dies (killed, out of memory) stops the run with a DataError naming it
  instead of hanging.

:func:`make` picks the feed a run asks for: this pipeline, or the memory path's
:class:`~jaxcl.data.feed.Feed` (on the host or the device). It lives here, above both,
so that :mod:`jaxcl.data.feed` never imports this module.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from jaxcl.data.batches import _stats, levels, normalize
from jaxcl.data.feed import Feed, _stack_runs, choose_resident
from jaxcl.data.sources import DataError, LazyImages
from jaxcl.data.streams import Stream


def make(config, streams: list[Stream], run_stream: list[int]) -> Feed:
    """The feed a run config asks for: a grain pipeline for streams built over lazy
    images (``data.pipeline`` grain, or auto over the budget), else the arrays on the
    device or the host (``data.on_device``). ``feed.pipeline`` / ``feed.pipeline_why``
    say which pipeline and why."""
    kinds = {getattr(s, "pipeline", "memory") for s in streams}
    if "grain" in kinds:
        return GrainFeed(streams, run_stream, normalize=config.data.normalize,
                         grain_workers=config.data.get("grain_workers", -1), why=streams[0].pipeline_why)
    resident = choose_resident(str(config.data.on_device).lower(), streams)
    feed = Feed(streams, run_stream, normalize=config.data.normalize, resident=resident)
    feed.pipeline_why = getattr(streams[0], "pipeline_why", "") or "data.pipeline=memory"
    return feed


def workers(setting: int) -> int:
    """``data.grain_workers`` as a count (-1: half the CPUs, at least one)."""
    return max(1, (os.cpu_count() or 2) // 2) if setting < 0 else int(setting)


class _Elements:
    """Pool position -> one sample: ``{"x": float32 HWC normalised, "y", "task", "mask"}``.
    Picklable (worker processes receive it): lazy images, labels and statistics."""

    def __init__(self, stream: Stream, tasks, split: str, normalize: bool):
        tasks = [tasks] if isinstance(tasks, (int, np.integer)) else list(tasks)
        self.images, self.y, self.tid = [], [], []
        for t in tasks:
            task = stream.tasks[t]
            x, y = (task.x_train, task.y_train) if split == "train" else (task.x_test, task.y_test)
            self.images.append(x)
            self.y.append(np.asarray(stream.targets(t, y), np.int32))
            self.tid.append(t)
        self.starts = np.cumsum([0] + [len(x) for x in self.images])
        self.mean, self.std = _stats(stream, normalize)
        self.levels = levels(self.mean, self.std)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __call__(self, p) -> dict:
        p = int(p)
        j = int(np.searchsorted(self.starts, p, side="right")) - 1
        local, t = p - int(self.starts[j]), self.tid[j]
        img = self.images[j][local]
        x = normalize(self.levels, np.asarray(img)[None], np.asarray([t]))[0]
        return {"x": x, "y": self.y[j][local], "task": np.int32(t), "mask": np.float32(1)}


class GrainFeed(Feed):
    """The loop's items (host batches) from grain pipelines; see the module docstring."""

    def __init__(self, streams: list[Stream], run_stream: list[int], *, normalize: bool, grain_workers: int = -1,
                 prefetch: int = 2, why: str = "data.pipeline=grain"):
        for s in streams:
            bad = [t.name for t in s.tasks if not isinstance(t.x_train, LazyImages)]
            if bad:
                raise DataError(f"data.pipeline=grain: the tasks {bad} of stream {s.name} hold arrays, not lazy "
                                "images; build the stream with data.build under data.pipeline=grain")
        super().__init__(streams, run_stream, normalize=normalize, resident=False)
        self.path, self.pipeline, self.pipeline_why = "grain", "grain", why
        self.workers, self.prefetch = workers(grain_workers), prefetch
        self.shard = (jax.process_index(), jax.process_count())  # (this process, processes): its rows of a batch
        self._elements: dict = {}
        self._open: dict = {}  # run -> (key, next slot, iterator): the epoch being read

    # -- grain

    def _elements_of(self, r: int, split: str, tasks) -> _Elements:
        key = (self.run_stream[r], split, tasks)
        if key not in self._elements:
            self._elements = {k: v for k, v in self._elements.items() if k[:2] != key[:2]}
            self._elements[key] = _Elements(self.streams[key[0]], tasks, split, self.normalize)
        return self._elements[key]

    def _rows(self, batch_size: int) -> tuple[int, int]:
        i, n = self.shard
        if batch_size % n:
            raise DataError(f"batch size {batch_size} does not split over {n} JAX processes")
        return i * batch_size // n, (i + 1) * batch_size // n

    def batches(self, elements: _Elements, positions: np.ndarray, batch_size: int, where: str):
        """Iterator over the batches of ``positions`` (consecutive runs of ``batch_size``,
        the last one possibly shorter), each this process's rows only."""
        import grain

        lo, hi = self._rows(batch_size)
        n = len(positions)
        rows = [positions[b:b + batch_size][lo:hi] for b in range(0, n, batch_size)]
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        sizes = [len(r) for r in rows]
        ds = grain.MapDataset.source(flat).map(elements)
        per = hi - lo
        ds = ds.batch(per, drop_remainder=False)
        threads = max(1, min(4, per))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(self.prefetch, threads)))
        if self.workers:
            _absl_flags()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                             per_worker_buffer_size=self.prefetch))
        return _Guarded(iter(it), where, sizes)

    # -- the Feed interface

    def train_items(self, tasks, orders: list[np.ndarray], slots: range, batch_size: int, K: int) -> dict:
        per_run = []
        lo, hi = self._rows(batch_size)
        for r in range(self.R):
            order = np.asarray(orders[r])
            n_batches = len(order) // batch_size
            key = (self.run_stream[r], tasks, batch_size, order.tobytes().__hash__(), len(order))
            open_ = self._open.get(r)
            if open_ is None or open_[0] != key or open_[1] != slots.start:
                start = min(slots.start, n_batches)
                positions = order[start * batch_size:n_batches * batch_size]
                it = self.batches(self._elements_of(r, "train", tasks), positions, batch_size,
                                  f"training batches of task(s) {tasks}")
                open_ = [key, start, it]
            items, active = [], np.zeros(K, bool)
            for k, s in enumerate(slots):
                if s < n_batches:
                    items.append(next(open_[2]))
                    open_[1] = s + 1
                    active[k] = True
            self._open[r] = open_
            if not items:  # this run has no batch in these slots: an inactive item of the right shape
                items.append(self._empty(r, "train", tasks, hi - lo))
                items[-1]["mask"][:] = 0
            like = items[0]
            items += [{k: np.zeros_like(v) for k, v in like.items()}] * (K - len(items))
            per_run.append({"active": active, "item": {k: np.stack([i[k] for i in items]) for k in like}})
        return _stack_runs(per_run) if self.R > 1 else per_run[0]

    def _empty(self, r: int, split: str, tasks, rows: int) -> dict:
        one = self._elements_of(r, split, tasks)(0)
        return {k: np.zeros((rows,) + np.shape(v), np.asarray(v).dtype) for k, v in one.items()}

    def pass_items(self, split: str, tasks, batch_size: int):
        runs = range(self.R) if self.per_run else [0]
        lo, hi = self._rows(batch_size)
        sizes = [self.size(r, split, tasks) for r in runs]
        its = [self.batches(self._elements_of(r, split, tasks), np.arange(n), batch_size,
                            f"{split} pass of task(s) {tasks}") for r, n in zip(runs, sizes)]
        for b in range(-(-max(sizes) // batch_size)):
            per_run = []
            for r, n, it in zip(runs, sizes, its):
                item = next(it, None) if b * batch_size < n else None
                if item is None:
                    item = self._empty(r, split, tasks, hi - lo)
                    item["mask"][:] = 0
                pad = (hi - lo) - len(item["mask"])
                if pad:  # the last batch, padded as the memory path pads
                    item = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in item.items()}
                per_run.append(item)
            yield _stack_runs(per_run) if self.per_run else per_run[0]

    def state(self) -> dict:
        """Where each run's open epoch iterator stands (for logs and checks; a resume
        does not need it: the loop's Position determines the batches)."""
        return {str(r): {"next_slot": int(o[1])} for r, o in self._open.items()}


class _Guarded:
    """A grain iterator whose failures (a worker that died, a bad image) are DataErrors
    naming what was being read."""

    def __init__(self, it, where: str, sizes: list[int]):
        self.it, self.where, self.sizes, self.n = it, where, sizes, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.n >= len(self.sizes):
            raise StopIteration
        try:
            b = next(self.it)
        except DataError:
            raise
        except StopIteration:
            raise DataError(f"data.pipeline=grain: the pipeline ended after {self.n} of {len(self.sizes)} batches "
                            f"({self.where})") from None
        except Exception as e:
            msg = str(e).splitlines()[0][:300]
            if "terminated unexpectedly" in msg or "Worker" in msg or "worker" in msg:
                raise DataError(f"data.pipeline=grain: a grain worker process died while reading {self.where} "
                                f"({msg}); it may have run out of memory: lower data.grain_workers or "
                                "data.image_size, or set data.grain_workers=0 to read in this process") from None
            raise DataError(f"data.pipeline=grain: reading {self.where} failed: {type(e).__name__}: {msg}") from None
        self.n += 1
        return {k: np.asarray(v) for k, v in b.items()}


def _absl_flags() -> None:
    """grain's worker processes read absl flags; parse them (to their defaults) when the
    program has not (a plain ``python`` or pytest run)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
