"""Host-side batches of a stream, and on-device augmentation.

A batch is a dict of numpy arrays ``x`` (float32, normalised, NHWC), ``y`` (int32 target
in the stream's scenario), ``task`` (int32 per sample) and ``mask`` (float32; 0 marks
padding). Training batches are full (an epoch drops its last incomplete batch; the order
is redrawn every epoch, so every sample is seen); evaluation and consolidation batches
keep every sample and pad the last batch, so that one compiled function serves all.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.data.streams import Stream


@dataclasses.dataclass(frozen=True)
class Pool:
    """Samples to draw batches from; tasks may be mixed (joint training)."""

    x: np.ndarray  # uint8 [N, H, W, C]
    y: np.ndarray  # int32 targets
    task: np.ndarray  # int32 [N]
    mean: np.ndarray  # [num_tasks, C]
    std: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def _stats(stream: Stream, normalize: bool):
    if normalize:
        return np.stack([t.mean for t in stream.tasks]), np.stack([t.std for t in stream.tasks])
    c = stream.info.input_shape[-1]
    return np.zeros((len(stream), c), np.float32), np.ones((len(stream), c), np.float32)


def pool(stream: Stream, tasks, split: str = "train", normalize: bool = True) -> Pool:
    """The samples of ``tasks`` (an int or a list of task indices) in ``split``."""
    tasks = [tasks] if isinstance(tasks, (int, np.integer)) else list(tasks)
    xs, ys, ts = [], [], []
    for t in tasks:
        task = stream.tasks[t]
        x, y = (task.x_train, task.y_train) if split == "train" else (task.x_test, task.y_test)
        xs.append(x)
        ys.append(stream.targets(t, y))
        ts.append(np.full(len(x), t, np.int32))
    cat = (lambda a: a[0]) if len(tasks) == 1 else np.concatenate
    mean, std = _stats(stream, normalize)
    return Pool(cat(xs), cat(ys).astype(np.int32), cat(ts), mean, std)


def levels(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``[tasks, C, 256]`` float32: the normalised value of every pixel value of every
    channel of every task, ``(v / 255 - mean) / std``, computed once on the host. Every
    path (host batches, device gathers, grain workers) normalises by looking it up, so
    all give the same numbers bit for bit (arithmetic in a compiled program may fuse a
    multiply-add and round differently)."""
    v = np.arange(256, dtype=np.float32) * np.float32(1 / 255)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((v[None, None, :] - mean[:, :, None]) / std[:, :, None]).astype(np.float32)


def normalize(table, x, tid):
    """uint8 images ``x`` [N, H, W, C] of tasks ``tid`` [N] -> float32 (numpy or jax)."""
    c = np.arange(x.shape[-1])
    return table[tid[:, None, None, None], c[None, None, None, :], x]


def epoch_order(n: int, seed: int, *key: int) -> np.ndarray:
    """The sample order of one epoch, a pure function of the seed and position."""
    return np.random.default_rng([seed, *key]).permutation(n)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def _make(p: Pool, idx: np.ndarray, batch_size: int) -> dict:
    tid = p.task[idx]
    x = normalize(levels(p.mean, p.std), np.asarray(p.x[idx]), tid)
    b = {"x": x, "y": p.y[idx], "task": tid, "mask": np.ones(len(idx), np.float32)}
    pad = batch_size - len(idx)
    if pad:
        b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
    return b


def batches(p: Pool, batch_size: int, order: np.ndarray | None = None, *, drop_last: bool = False,
            start: int = 0) -> Iterator[dict]:
    """Batches of ``p`` in ``order`` (default: stored order), from batch ``start`` on."""
    order = np.arange(len(p)) if order is None else order
    for b in range(start, num_batches(len(p), batch_size, drop_last)):
        yield _make(p, order[b * batch_size:(b + 1) * batch_size], batch_size)


def augment(x: jax.Array, rng: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after zero padding by ``pad`` and random horizontal flip, per sample
    (the standard CIFAR augmentation), on device."""
    n, h, w, _ = x.shape
    k1, k2 = jax.random.split(rng)
    off = jax.random.randint(k1, (n, 2), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k2, 0.5, (n,))
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, o, f):
        crop = jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
        return jnp.where(f, crop[:, ::-1], crop)

    return jax.vmap(one)(xp, off, flip)
