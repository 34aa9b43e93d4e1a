"""Task streams: a dataset cut into tasks, in one of three scenarios.

A :class:`Stream` is a tuple of :class:`Task` s plus the scenario that says what the
model predicts:

* ``task``: task-incremental. One head per task; labels are local to the task
  (``0..C_t-1``); the task id is given at test time.
* ``class``: class-incremental. One head over every class of the stream; labels are the
  class's position in the stream (``offset_t + local``); no task id at test.
* ``domain``: domain-incremental. One head of ``max C_t`` outputs shared by all tasks;
  labels are local.

Streams: ``split`` (classes partitioned into tasks), ``permuted`` (a fixed pixel
permutation per task), ``rotated`` (a fixed rotation per task) and ``multi`` (one dataset
per task, brought to one input shape). Everything is determined by ``seed``.

``data.pipeline=grain`` builds the same streams over :class:`~jaxcl.data.sources.LazyImages`:
each task holds indices into its source and the transforms of its images (pad/crop,
permutation, rotation), not the pixels, and the grain pipeline
(:mod:`jaxcl.data.pipeline`) reads them. Every transform is one function applied to a
whole array (memory) or to one image (grain), so both give the same pixels.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxcl.data.sources import DataError, Dataset, LazyImages, load


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int32 local labels 0..num_classes-1
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple  # what each local label stands for (source class ids)
    mean: np.ndarray  # per-channel, on the 0..1 scale
    std: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """What a model and a method need to know of a stream (static, hashable)."""

    num_tasks: int
    scenario: str
    input_shape: tuple  # (H, W, C)
    num_heads: int
    num_outputs: int  # outputs per head
    classes_per_head: tuple  # valid outputs of each head
    task_classes: tuple  # classes of each task

    @property
    def class_offsets(self) -> tuple:
        """Index of each task's first class over the whole stream (task t's classes are
        ``class_offsets[t] .. class_offsets[t] + task_classes[t] - 1``)."""
        return tuple(int(sum(self.task_classes[:t])) for t in range(len(self.task_classes)))


@dataclasses.dataclass(frozen=True)
class Stream:
    name: str
    scenario: str
    tasks: tuple
    allow_missing_classes: bool = dataclasses.field(default=False, repr=False)  # data.allow_missing_classes
    pipeline: str = dataclasses.field(default="memory", repr=False, compare=False)  # memory | grain (images lazy)
    pipeline_why: str = dataclasses.field(default="", repr=False, compare=False)  # why (data.pipeline=auto)

    def __post_init__(self):
        if self.scenario not in ("task", "class", "domain"):
            raise DataError(f"scenario: {self.scenario!r} is not one of task, class, domain")
        if not self.tasks:
            raise DataError(f"stream {self.name!r} has no tasks")
        shapes = {t.x_train.shape[1:] for t in self.tasks}
        if len(shapes) > 1:
            raise DataError(f"stream {self.name!r}: tasks have different input shapes {sorted(shapes)}")
        for i, t in enumerate(self.tasks):
            for split, x, y in (("training", t.x_train, t.y_train), ("test", t.x_test, t.y_test)):
                if len(x) == 0:
                    raise DataError(f"task {i} ({t.name}, classes {list(t.classes)}) has no {split} samples")
                if len(x) != len(y):
                    raise DataError(f"task {i} ({t.name}): {len(x)} {split} inputs but {len(y)} labels")
                if y.min() < 0 or y.max() >= t.num_classes:
                    raise DataError(
                        f"task {i} ({t.name}): {split} labels out of range {int(y.min())}..{int(y.max())}, "
                        f"expected 0..{t.num_classes - 1}"
                    )
            self._check_classes(i, t)

    def _check_classes(self, i: int, t: Task) -> None:
        """Every class of a task has training and test samples (unless allowed), and a
        task- or domain-incremental task holds two classes to tell apart."""
        where = f"task {i} ({t.name}) of stream {self.name}"
        if not self.allow_missing_classes:
            for split, y in (("training", t.y_train), ("test", t.y_test)):
                missing = [t.classes[c] for c in sorted(set(range(t.num_classes)) - set(np.unique(y).tolist()))]
                if missing:
                    raise DataError(
                        f"{where}: class {missing[0]} has no {split} samples ({len(missing)} of its classes "
                        f"{list(t.classes)} have none); check the labels, or data.train_limit/test_limit, or let it "
                        "through with data.allow_missing_classes=True")
        present = np.unique(t.y_train)
        if self.scenario != "class" and len(present) < 2:
            raise DataError(
                f"{where}: its training split holds the single class {t.classes[int(present[0])]}; a "
                f"{self.scenario}-incremental task needs at least two classes to tell apart")

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def offsets(self) -> np.ndarray:
        return np.asarray(self.info.class_offsets, np.int32)

    @property
    def info(self) -> StreamInfo:
        per_task = tuple(t.num_classes for t in self.tasks)
        if self.scenario == "task":
            heads, outputs, per_head = len(self.tasks), max(per_task), per_task
        elif self.scenario == "class":
            heads, outputs = 1, int(sum(per_task))
            per_head = (outputs,)
        else:
            heads, outputs = 1, max(per_task)
            per_head = (outputs,)
        return StreamInfo(
            num_tasks=len(self.tasks),
            scenario=self.scenario,
            input_shape=tuple(self.tasks[0].x_train.shape[1:]),
            num_heads=heads,
            num_outputs=outputs,
            classes_per_head=per_head,
            task_classes=per_task,
        )

    def targets(self, task: int, y_local: np.ndarray) -> np.ndarray:
        """Labels as the model's outputs index them in this scenario."""
        if self.scenario == "class":
            return y_local + self.offsets[task]
        return y_local


# ----------------------------------------------------------------------------- helpers


def _channel_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std on the 0..1 scale, over (at most) the first 10k images,
    read 1,000 images at a time (the same numbers for an array in memory and for lazy
    images, without holding 10k large images at once). uint8 pixels are counted per
    channel into 256-bin histograms, so the sums are exact and ~10x faster than float64
    sums (CIFAR-10: 0.05 s instead of 0.49 s, paid by every stream build); other dtypes
    are summed in float64."""
    n = min(len(x), 10000)
    channels = int(x.shape[-1])
    hist = np.zeros((channels, 256), np.int64)
    s1 = s2 = 0.0
    for lo in range(0, n, 1000):
        chunk = np.asarray(x[lo:min(lo + 1000, n)])
        if chunk.dtype == np.uint8:
            flat = chunk.reshape(-1, channels)
            for c in range(channels):
                hist[c] += np.bincount(flat[:, c], minlength=256)
        else:
            chunk = chunk.astype(np.float64) / 255.0
            s1 = s1 + chunk.sum(axis=(0, 1, 2))
            s2 = s2 + np.square(chunk).sum(axis=(0, 1, 2))
    level = np.arange(256, dtype=np.float64) / 255.0
    s1, s2 = s1 + hist @ level, s2 + hist @ np.square(level)
    count = n * int(np.prod(x.shape[1:3]))
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _rows(x, sel):
    """``x[sel]``; for lazy images a view of those rows (nothing is read)."""
    return x.rows(sel) if isinstance(x, LazyImages) else x[sel]


def _apply(fn, x, shape):
    """``fn`` (a transform of a whole array) on ``x``; lazily, per image, for lazy images."""
    return x.then(fn, shape) if isinstance(x, LazyImages) else fn(x)


def _subset(x, y, limit: int, rng: np.random.Generator):
    if limit and len(x) > limit:
        idx = np.sort(rng.choice(len(x), size=limit, replace=False))
        return _rows(x, idx), y[idx]
    return (x if isinstance(x, LazyImages) else np.asarray(x)), np.asarray(y)


def _make_task(name, x_tr, y_tr, x_te, y_te, classes, mean, std, limits, rng) -> Task:
    x_tr, y_tr = _subset(x_tr, y_tr, limits[0], rng)
    x_te, y_te = _subset(x_te, y_te, limits[1], rng)
    return Task(name, x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32), tuple(classes), mean, std)


# ----------------------------------------------------------------------------- streams


def split(ds: Dataset, num_tasks: int, classes_per_task: int, *, scenario: str = "task",
          class_order: Sequence[int] = (), shuffle_classes: bool = False, superclasses: bool = False,
          seed: int = 0, limits=(0, 0), allow_missing_classes: bool = False) -> Stream:
    """Partition the classes of ``ds`` into ``num_tasks`` tasks of ``classes_per_task``;
    with ``superclasses``, one task per superclass (CIFAR-100's 20 coarse labels, in
    label order) holding its fine classes."""
    rng = np.random.default_rng([seed, 1])
    if superclasses:
        if ds.coarse_train is None:
            raise DataError(f"data.superclass_tasks: dataset {ds.name!r} has no superclass labels")
        groups = sorted(set(ds.coarse_train.tolist()))
        if num_tasks > len(groups):
            raise DataError(f"{num_tasks} superclass tasks asked, {ds.name} has {len(groups)} superclasses")
        members = [sorted(set(ds.y_train[ds.coarse_train == g].tolist())) for g in groups[:num_tasks]]
        sizes = {len(m) for m in members}
        if len(sizes) != 1:
            raise DataError(f"superclasses of {ds.name} hold different numbers of classes: {sorted(sizes)}")
        class_order, classes_per_task = [c for m in members for c in m], sizes.pop()
    order = list(class_order) if class_order else list(range(ds.num_classes))
    if class_order:
        bad = [c for c in order if not 0 <= c < ds.num_classes]
        if bad or len(set(order)) != len(order):
            raise DataError(f"data.class_order: {order} must list distinct classes of 0..{ds.num_classes - 1}")
    elif shuffle_classes:
        order = list(rng.permutation(ds.num_classes))
    need = num_tasks * classes_per_task
    if classes_per_task < 1 or need > len(order):
        raise DataError(
            f"split {ds.name}: {num_tasks} tasks x {classes_per_task} classes needs {need} classes, "
            f"the dataset has {len(order)}"
        )
    mean, std = _channel_stats(ds.x_train)
    tasks = []
    for t in range(num_tasks):
        cls = [int(c) for c in order[t * classes_per_task:(t + 1) * classes_per_task]]
        lut = np.full(ds.num_classes, -1, np.int32)
        lut[cls] = np.arange(len(cls))
        tr, te = np.isin(ds.y_train, cls), np.isin(ds.y_test, cls)
        tasks.append(_make_task(
            f"{ds.name}[{','.join(map(str, cls))}]",
            _rows(ds.x_train, tr), lut[ds.y_train[tr]], _rows(ds.x_test, te), lut[ds.y_test[te]],
            cls, mean, std, limits, rng,
        ))
    return Stream(f"split_{ds.name}", scenario, tuple(tasks), allow_missing_classes)


def _per_task_stream(ds: Dataset, kind: str, num_tasks: int, transform, scenario: str,
                     seed: int, limits, allow_missing_classes: bool) -> Stream:
    rng = np.random.default_rng([seed, 2])
    mean, std = _channel_stats(ds.x_train)
    cls = tuple(range(ds.num_classes))
    base = [_subset(ds.x_train, ds.y_train, limits[0], rng), _subset(ds.x_test, ds.y_test, limits[1], rng)]
    tasks = []
    for t in range(num_tasks):
        (xtr, ytr), (xte, yte) = base
        f, label = transform(t)
        tasks.append(Task(f"{ds.name}-{kind}{label}", _apply(f, xtr, xtr.shape[1:]), ytr, _apply(f, xte, xte.shape[1:]),
                          yte, cls, mean, std))
    return Stream(f"{kind}_{ds.name}", scenario, tuple(tasks), allow_missing_classes)


class _Permute:
    """A fixed permutation of the pixels of every image of an array (picklable: grain
    workers apply it)."""

    def __init__(self, perm):
        self.perm = perm

    def __call__(self, x):
        n = len(self.perm)
        return np.ascontiguousarray(np.asarray(x).reshape(len(x), n)[:, self.perm].reshape(x.shape))


class _Rotate:
    """Every image of an array rotated by ``angle`` degrees, bilinear, zero fill."""

    def __init__(self, angle: float):
        self.angle = angle

    def __call__(self, x):
        from scipy import ndimage

        x = np.asarray(x, np.float32)
        r = ndimage.rotate(x, self.angle, axes=(1, 2), reshape=False, order=1, mode="constant", cval=0.0)
        return np.clip(np.round(r), 0, 255).astype(np.uint8)


def permuted(ds: Dataset, num_tasks: int, *, scenario: str = "domain", seed: int = 0,
             limits=(0, 0), allow_missing_classes: bool = False) -> Stream:
    """Each task applies its own fixed random permutation to the pixels (every task is
    permuted, the first included, as Avalanche's PermutedMNIST)."""
    rng = np.random.default_rng([seed, 3])
    n = int(np.prod(ds.image_shape))
    perms = [rng.permutation(n) for _ in range(num_tasks)]

    def transform(t):
        return _Permute(perms[t]), str(t)

    return _per_task_stream(ds, "permuted", num_tasks, transform, scenario, seed, limits, allow_missing_classes)


def rotated(ds: Dataset, num_tasks: int, *, angles: Sequence[float] = (), max_angle: float = 180.0,
            scenario: str = "domain", seed: int = 0, limits=(0, 0), allow_missing_classes: bool = False) -> Stream:
    """Each task rotates every image by its own angle (default: evenly spaced in
    [0, max_angle)), bilinear, zero fill."""
    angles = list(angles) if angles else [max_angle * t / num_tasks for t in range(num_tasks)]
    if len(angles) != num_tasks:
        raise DataError(f"data.angles: {len(angles)} angles given for {num_tasks} tasks")

    def transform(t):
        return _Rotate(angles[t]), f"{angles[t]:g}"

    return _per_task_stream(ds, "rotated", num_tasks, transform, scenario, seed, limits, allow_missing_classes)


class _ToShape:
    def __init__(self, shape):
        self.shape = tuple(shape)

    def __call__(self, x):
        return _to_shape(x, self.shape)


def _to_shape(x: np.ndarray, shape: tuple) -> np.ndarray:
    """Zero-pad (centred) or centre-crop to (H, W) and repeat greyscale to C channels."""
    h, w, c = shape
    if isinstance(x, LazyImages):
        if x.shape[3] not in (1, c):
            raise DataError(f"cannot bring {x.shape[3]}-channel images to {c} channels")
        return x if x.shape[1:] == tuple(shape) else x.then(_ToShape(shape), shape)
    x = np.asarray(x)
    if x.shape[3] != c:
        if x.shape[3] != 1:
            raise DataError(f"cannot bring {x.shape[3]}-channel images to {c} channels")
        x = np.repeat(x, c, axis=3)
    for axis, size in ((1, h), (2, w)):
        cur = x.shape[axis]
        if cur < size:
            before = (size - cur) // 2
            pad = [(0, 0)] * 4
            pad[axis] = (before, size - cur - before)
            x = np.pad(x, pad)
        elif cur > size:
            start = (cur - size) // 2
            x = np.take(x, np.arange(start, start + size), axis=axis)
    return x


def multi(datasets: Sequence[Dataset], *, scenario: str = "task", classes_per_task: int = 0, seed: int = 0,
          limits=(0, 0), shape: tuple = (), allow_missing_classes: bool = False) -> Stream:
    """One task per dataset (or, with ``classes_per_task``, one per consecutive group of
    that many of each dataset's classes), images zero-padded and channel-repeated to
    ``shape`` (H, W, C), by default the largest of the datasets' (MNIST 28x28x1 -> 32x32x3
    next to CIFAR-10; give (32, 32, 3) to feed MNIST alone to a backbone pretrained on
    CIFAR). Each dataset keeps its own normalisation."""
    _refuse_repeats([d.name for d in datasets])
    rng = np.random.default_rng([seed, 4])
    if shape and len(shape) != 3:
        raise DataError(f"data.image_shape: expected (H, W, C), got {tuple(shape)}")
    shape = tuple(shape) or tuple(max(d.image_shape[i] for d in datasets) for i in range(3))
    tasks = []
    for d in datasets:
        xtr, xte = _to_shape(d.x_train, shape), _to_shape(d.x_test, shape)
        mean, std = _channel_stats(xtr)
        size = classes_per_task or d.num_classes
        if d.num_classes % size:
            raise DataError(f"data.classes_per_task={size} does not divide the {d.num_classes} classes of {d.name}")
        for start in range(0, d.num_classes, size):
            cls = list(range(start, start + size))
            tr, te = np.isin(d.y_train, cls), np.isin(d.y_test, cls)
            name = d.name if size == d.num_classes else f"{d.name}[{start}-{start + size - 1}]"
            tasks.append(_make_task(name, _rows(xtr, tr), d.y_train[tr] - start, _rows(xte, te), d.y_test[te] - start, cls,
                                    mean, std, limits, rng))
    return Stream("multi_" + "_".join(d.name for d in datasets), scenario, tuple(tasks), allow_missing_classes)


def _refuse_repeats(names) -> None:
    """A multi stream lists each dataset once: the same dataset twice would be the same
    task learned twice under two task ids, its test set counted twice in ACC and BWT."""
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise DataError(f"data.datasets: {', '.join(map(repr, twice))} listed more than once ({list(names)}); "
                        "each dataset makes its own tasks, so list it once (data.classes_per_task cuts one "
                        "dataset into several tasks)")


def _select(stream: Stream, keep) -> Stream:
    """Only the tasks at the indices ``keep`` (all when empty), in that order."""
    if not keep:
        return stream
    bad = [k for k in keep if not 0 <= k < len(stream)]
    if bad:
        raise DataError(f"data.tasks: {bad} out of range for a stream of {len(stream)} tasks")
    return dataclasses.replace(stream, tasks=tuple(stream.tasks[k] for k in keep))


def _materialise(ds: Dataset) -> Dataset:
    """``ds`` with its lazy images read into memory."""
    return dataclasses.replace(ds, x_train=np.asarray(ds.x_train), x_test=np.asarray(ds.x_test))


def host_budget(configured_mb: float = 0) -> tuple[int, str]:
    """(bytes of images data.pipeline=auto keeps in memory, where that figure comes from)."""
    import os

    if configured_mb:
        return int(configured_mb * 2**20), f"data.memory_budget_mb={configured_mb:g}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 4, f"a quarter of the host's {total / 2**30:.1f} GiB"


def _choose(cfg, datasets) -> tuple[str, str]:
    """``data.pipeline=auto``: memory when the images the stream is built from fit the
    budget (an upper bound: before train/test limits), else grain; and why."""
    d = cfg.data
    shape = tuple(d.image_shape) if d.stream == "multi" and d.image_shape else None
    need = sum((len(ds.x_train) + len(ds.x_test)) * int(np.prod(shape or ds.image_shape)) for ds in datasets)
    need *= cfg.num_tasks if d.stream in ("permuted", "rotated") else 1
    budget, where = host_budget(d.get("memory_budget_mb", 0))
    fits = need <= budget
    return ("memory" if fits else "grain"), (f"data.pipeline=auto: {need / 2**20:.1f} MiB of images "
                                             f"{'within' if fits else 'over'} the budget of {budget / 2**20:.1f} MiB "
                                             f"({where})")


def build(cfg) -> Stream:
    """The stream a run config describes (``cfg.data``, ``cfg.num_tasks``, ``cfg.scenario``).
    ``data.pipeline`` grain (or auto, when the images do not fit the budget) builds it
    over lazy images; ``stream.pipeline`` says which, ``stream.pipeline_why`` why."""
    d = cfg.data
    limits = (d.train_limit, d.test_limit)
    num_classes = d.get("num_classes", 0)  # declared classes of data.name (0: its own, or found)
    allow = d.get("allow_missing_classes", False)  # a task may miss a class in a split
    pipeline = d.get("pipeline", "memory")
    why = f"data.pipeline={pipeline}"

    def get(name, num_classes=0):
        return load(name, d.source, d.dir, label_key=d.label_key, download=d.download, tfds_dir=d.tfds_dir,
                    num_classes=num_classes, image_size=d.get("image_size", 0), lazy=pipeline != "memory",
                    tfds_splits=tuple(d.get("tfds_splits", ("train", "test"))))

    if d.stream == "multi":
        if num_classes:
            raise DataError("data.num_classes declares the classes of data.name; a multi stream takes each "
                            "dataset's own")
        _refuse_repeats(list(d.datasets))
        datasets = [get(n) for n in d.datasets]
    else:
        if d.tasks:
            raise DataError("data.tasks selects tasks of multi streams only")
        if d.stream not in ("split", "permuted", "rotated"):
            raise DataError(f"data.stream: {d.stream!r} is not one of split, permuted, rotated, multi")
        datasets = [get(d.name, num_classes)]
    if pipeline == "auto":
        pipeline, why = _choose(cfg, datasets)
        if pipeline == "memory":
            datasets = [_materialise(ds) for ds in datasets]
    stream = _build(cfg, datasets, limits, allow)
    return dataclasses.replace(stream, pipeline=pipeline, pipeline_why=why)


def _build(cfg, datasets, limits, allow) -> Stream:
    d = cfg.data
    if d.stream == "multi":
        stream = multi(datasets, scenario=cfg.scenario, classes_per_task=d.classes_per_task,
                       seed=cfg.seed, limits=limits, shape=tuple(d.image_shape), allow_missing_classes=allow)
        stream = _select(stream, d.tasks)
        if len(stream) != cfg.num_tasks:
            raise DataError(f"data.datasets {list(d.datasets)} with data.classes_per_task={d.classes_per_task} "
                            f"make {len(stream)} tasks but num_tasks is {cfg.num_tasks}")
        return stream
    ds = datasets[0]
    common = dict(scenario=cfg.scenario, seed=cfg.seed, limits=limits, allow_missing_classes=allow)
    if d.stream == "split":
        return split(ds, cfg.num_tasks, d.classes_per_task, class_order=d.class_order,
                     shuffle_classes=d.shuffle_classes, superclasses=d.superclass_tasks, **common)
    if d.stream == "permuted":
        return permuted(ds, cfg.num_tasks, **common)
    return rotated(ds, cfg.num_tasks, angles=d.angles, max_angle=d.max_angle, **common)
