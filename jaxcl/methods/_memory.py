"""Replay memories shared by the methods that replay (ER, A-GEM, NCCL, DER++): fixed-size
arrays in the method's state, so they live on the device, checkpoint with the rest of the
state and never change shape.

* reservoir (Vitter's Algorithm R): every sample seen is kept with equal probability;
* ring: ``per_task`` slots per task, filled cyclically (GEM's episodic memory).

A memory is a dict of arrays ``x, y, task, q`` (soft targets or logits stored with the
sample), ``filled`` and the count ``seen``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp



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


def memory_sample(mem: dict, rng, n: int, allowed=None):
    """``n`` slots drawn uniformly with replacement among the filled (and allowed) ones;
    ``ok`` is False when there is none."""
    ok_slots = mem["filled"] if allowed is None else mem["filled"] & allowed
    logits = jnp.where(ok_slots, 0.0, -jnp.inf)
    idx = jax.random.categorical(rng, jnp.where(jnp.any(ok_slots), logits, 0.0), shape=(n,))
    pick = {k: mem[k][idx] for k in ("x", "y", "task", "q")}
    return pick, jnp.any(ok_slots)
