"""Replay memories shared by the methods that replay (ER, A-GEM, NCCL, DER++): fixed-size
arrays in the method's state, so they live on the device, checkpoint with the rest of the
state and never change shape.

* reservoir (Vitter's Algorithm R): every sample seen is kept with equal probability;
* ring: ``per_task`` slots per task, filled cyclically (GEM's episodic memory);
* balanced: class-balanced reservoir (CBRS, Chrysakis & Moens, ICML 2020): while there is
  room every sample is stored; then a sample of a class that is not among the largest in
  memory replaces a random sample of a largest class, and a sample of a largest class c
  replaces a random sample of c with probability (c's slots) / (c's samples seen). Each
  class ends with an equal share, a uniform sample of that class's stream (what
  Avalanche's adaptive ``ClassBalancedBuffer`` keeps).

A memory is a dict of arrays ``x, y, task, q`` (soft targets or logits stored with the
sample), ``filled`` and the count ``seen``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp



KINDS = ("reservoir", "ring", "balanced")


def new(kind: str, size: int, x_shape, num_outputs: int, *, num_tasks: int = 1, num_classes: int = 0) -> dict:
    """An empty memory of ``kind``: ``size`` slots in all (``ring``: per task)."""
    if kind not in KINDS:
        raise ValueError(f"method.memory: {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "balanced":
        return balanced_init(size, x_shape, num_outputs, num_classes)
    mem = memory_init(size * (num_tasks if kind == "ring" else 1), x_shape, num_outputs)
    if kind == "ring":
        mem["seen_per_task"] = jnp.zeros((num_tasks,), jnp.int32)
    return mem


def insert(mem: dict, batch: dict, task, q, rng, class_of=None) -> dict:
    """Store a train batch (inputs, labels, the task id, ``q`` per sample, its mask) by the
    memory's own policy (told apart by its arrays); ``class_of(y, task)`` gives a
    balanced memory each sample's class over the stream."""
    tids = jnp.broadcast_to(task, batch["y"].shape)
    args = (mem, batch["x"], batch["y"], tids, q, batch["mask"])
    if "seen_per_task" in mem:
        return ring_insert(*args, mem["y"].shape[0] // mem["seen_per_task"].shape[0])
    if "seen_per_class" in mem:
        return balanced_insert(*args, class_of(batch["y"], tids), rng)
    return reservoir_insert(*args, rng)


def memory_init(size: int, x_shape, num_outputs: int) -> dict:
    return {"x": jnp.zeros((size,) + tuple(x_shape), jnp.float32), "y": jnp.zeros((size,), jnp.int32),
            "task": jnp.zeros((size,), jnp.int32), "q": jnp.zeros((size, num_outputs), jnp.float32),
            "filled": jnp.zeros((size,), bool), "seen": jnp.zeros((), jnp.int32)}


def reservoir_insert(mem: dict, x, y, task, q, mask, rng) -> dict:
    """Algorithm R, one sample at a time (in order): the n-th sample seen replaces a random
    slot with probability size / n, so every sample seen is kept with equal probability."""
    size = mem["y"].shape[0]
    x, y, task, q, mask = (jnp.asarray(a) for a in (x, y, task, q, mask))

    def one(i, carry):
        mem, key = carry
        key, sub = jax.random.split(key)
        n = mem["seen"]
        j = jnp.where(n < size, n, jax.random.randint(sub, (), 0, jnp.maximum(n + 1, 1)))
        keep = (mask[i] > 0) & (j < size)
        slot = jnp.where(keep, j, 0)

        def put(a, v):
            return a.at[slot].set(jnp.where(keep, v, a[slot]))

        mem = {**mem, "x": put(mem["x"], x[i]), "y": put(mem["y"], y[i]), "task": put(mem["task"], task[i]),
               "q": put(mem["q"], q[i]), "filled": put(mem["filled"], True),
               "seen": n + (mask[i] > 0).astype(jnp.int32)}
        return mem, key

    return jax.lax.fori_loop(0, x.shape[0], one, (mem, rng))[0]


def ring_insert(mem: dict, x, y, task, q, mask, per_task: int) -> dict:
    """Each task owns ``per_task`` consecutive slots, filled cyclically (GEM's memory)."""
    x, y, task, q, mask = (jnp.asarray(a) for a in (x, y, task, q, mask))

    def one(i, mem):
        t = task[i]
        slot = t * per_task + mem["seen_per_task"][t] % per_task
        keep = mask[i] > 0

        def put(a, v):
            return a.at[slot].set(jnp.where(keep, v, a[slot]))

        return {**mem, "x": put(mem["x"], x[i]), "y": put(mem["y"], y[i]), "task": put(mem["task"], t),
                "q": put(mem["q"], q[i]), "filled": put(mem["filled"], True),
                "seen_per_task": mem["seen_per_task"].at[t].add(keep.astype(jnp.int32)),
                "seen": mem["seen"] + keep.astype(jnp.int32)}

    return jax.lax.fori_loop(0, x.shape[0], one, mem)


def balanced_init(size: int, x_shape, num_outputs: int, num_classes: int) -> dict:
    mem = memory_init(size, x_shape, num_outputs)
    mem["cls"] = jnp.zeros((size,), jnp.int32)
    mem["seen_per_class"] = jnp.zeros((num_classes,), jnp.int32)
    return mem


def balanced_insert(mem: dict, x, y, task, q, mask, cls, rng) -> dict:
    """CBRS, one sample at a time; ``cls`` is each sample's class id over the whole
    stream (what the balance is over)."""
    num_classes = mem["seen_per_class"].shape[0]
    x, y, task, q, mask, cls = (jnp.asarray(a) for a in (x, y, task, q, mask, cls))

    def pick(key, ok):
        return jax.random.categorical(key, jnp.where(jnp.any(ok), jnp.where(ok, 0.0, -jnp.inf), 0.0))

    def one(i, carry):
        mem, key = carry
        key, k_big, k_own, k_acc = jax.random.split(key, 4)
        c, valid = cls[i], mask[i] > 0
        seen_c = mem["seen_per_class"][c] + 1
        counts = jnp.zeros((num_classes,), jnp.int32).at[mem["cls"]].add(mem["filled"].astype(jnp.int32))
        full = jnp.all(mem["filled"])
        largest = counts.max()
        c_largest = counts[c] == largest
        slot_free = jnp.argmin(mem["filled"])
        slot_big = pick(k_big, mem["filled"] & (counts[mem["cls"]] == largest))
        slot_own = pick(k_own, mem["filled"] & (mem["cls"] == c))
        accept = jax.random.uniform(k_acc) * seen_c < counts[c]
        slot = jnp.where(~full, slot_free, jnp.where(c_largest, slot_own, slot_big))
        keep = valid & (~full | ~c_largest | accept)

        def put(a, v):
            return a.at[slot].set(jnp.where(keep, v, a[slot]))

        mem = {**mem, "x": put(mem["x"], x[i]), "y": put(mem["y"], y[i]), "task": put(mem["task"], task[i]),
               "q": put(mem["q"], q[i]), "cls": put(mem["cls"], c), "filled": put(mem["filled"], True),
               "seen_per_class": mem["seen_per_class"].at[c].add(valid.astype(jnp.int32)),
               "seen": mem["seen"] + valid.astype(jnp.int32)}
        return mem, key

    return jax.lax.fori_loop(0, x.shape[0], one, (mem, rng))[0]


def global_classes(info):
    """``(num_classes, fn)``: the number of classes over the stream and ``fn(y, task)``,
    a label's class id over the stream (labels restart at 0 per task in the task-
    incremental scenario; elsewhere they already are stream-wide)."""
    if info.scenario == "task":
        offsets = jnp.asarray(info.class_offsets, jnp.int32)
        return int(sum(info.task_classes)), lambda y, task: y + offsets[task]
    return int(info.num_outputs), lambda y, task: y


def memory_sample(mem: dict, rng, n: int, allowed=None):
    """``n`` slots drawn uniformly with replacement among the filled (and allowed) ones;
    ``ok`` is False when there is none. One integer draw per sample and a search in the
    running count of usable slots (a categorical draw would need n x size Gumbel numbers:
    19 ms of A-GEM's 22 ms step at 256 x 4250 on a 2-core CPU)."""
    ok_slots = mem["filled"] if allowed is None else mem["filled"] & allowed
    count = jnp.cumsum(ok_slots.astype(jnp.int32))
    r = jax.random.randint(rng, (n,), 0, jnp.maximum(count[-1], 1))
    idx = jnp.minimum(jnp.searchsorted(count, r, side="right"), count.shape[0] - 1)  # the (r+1)-th usable slot
    pick = {k: mem[k][idx] for k in ("x", "y", "task", "q")}
    return pick, count[-1] > 0
