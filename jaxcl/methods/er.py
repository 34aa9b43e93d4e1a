"""Experience replay: a reservoir memory of the samples seen (``method.memory_size`` in
all; ``memory=ring`` keeps ``memory_size`` per task instead); each step trains on the
incoming batch plus ``replay_batch`` samples drawn from the memory, in one forward
(``CE(incoming) + CE(replay)``, as Avalanche's and Mammoth's ER), then stores the incoming
batch. The memory is the one NCCL uses (``_memory``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _memory, base


def defaults() -> dict:
    return {"memory_size": 200, "replay_batch": 10, "memory": "reservoir"}


def make(config, model, info) -> base.Method:
    m = config.method
    if m.memory not in ("reservoir", "ring"):
        raise ValueError(f"method.memory: {m.memory!r} is not one of reservoir, ring")
    ring = m.memory == "ring"
    size = m.memory_size * (info.num_tasks if ring else 1)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        mem = _memory.memory_init(size, x.shape[1:], info.num_outputs)
        if ring:
            mem["seen_per_task"] = jnp.zeros((info.num_tasks,), jnp.int32)
        return state.replace(extra={"memory": mem})

    def loss(params, state, batch, task, rng, phase):
        rep, have = _memory.memory_sample(state.extra["memory"], jax.random.fold_in(rng, 1), m.replay_batch)
        b = batch["x"].shape[0]
        x = jnp.concatenate([batch["x"], rep["x"]])
        t = jnp.concatenate([jnp.broadcast_to(task, (b,)), rep["task"]])
        z, model_state = base.apply(model, params, state.model_state, x, t, train=True, rng=rng)
        ce = base.cross_entropy(z[:b], batch["y"], batch["mask"])
        ce_r = jnp.where(have, base.cross_entropy(z[b:], rep["y"]), 0.0)
        return ce + ce_r, {"model_state": model_state,
                           "metrics": {"ce": ce, "ce_replay": ce_r, "acc": base.accuracy(z[:b], batch["y"], batch["mask"])}}

    def after_step(state, aux, batch, task, rng, phase):
        mem = state.extra["memory"]
        tids = jnp.broadcast_to(task, batch["y"].shape)
        q = jnp.zeros(batch["y"].shape + (info.num_outputs,))
        if ring:
            mem = _memory.ring_insert(mem, batch["x"], batch["y"], tids, q, batch["mask"], m.memory_size)
        else:
            mem = _memory.reservoir_insert(mem, batch["x"], batch["y"], tids, q, batch["mask"], jax.random.fold_in(rng, 2))
        return state.replace(extra={**state.extra, "memory": mem})

    return base.make("er", config, model, init=init, loss=loss, after_step=after_step)
