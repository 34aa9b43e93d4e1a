"""Experience replay: a reservoir memory of the samples seen (``method.memory_size`` in
all; ``memory=ring`` keeps ``memory_size`` per task instead; ``memory=balanced`` is a
class-balanced reservoir of ``memory_size``, as the ContinualAI baselines' ER); each step trains on the
incoming batch plus ``replay_batch`` samples drawn from the memory, in one forward, on the
mean cross-entropy over the concatenated batch (as Avalanche's ReplayPlugin and Mammoth's
ER; the incoming batch alone while the memory is empty), then stores the incoming batch. The memory is the one NCCL uses (``_memory``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _memory, base


def defaults() -> dict:
    return {"memory_size": 200, "replay_batch": 10, "memory": "reservoir"}


def validate(config) -> None:
    m = config.method
    base.check_range(m, "memory_size", 1)
    base.check_range(m, "replay_batch", 1)
    base.check_choice(m, "memory", _memory.KINDS)


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    num_classes, class_of = _memory.global_classes(info)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        mem = _memory.new(m.memory, m.memory_size, x.shape[1:], info.num_outputs, num_tasks=info.num_tasks,
                          num_classes=num_classes)
        return state.replace(extra={"memory": mem})

    def loss(params, state, batch, task, rng, phase):
        rep, have = _memory.memory_sample(state.extra["memory"], jax.random.fold_in(rng, 1), m.replay_batch)
        b = batch["x"].shape[0]
        x = jnp.concatenate([batch["x"], rep["x"]])
        t = jnp.concatenate([jnp.broadcast_to(task, (b,)), rep["task"]])
        z, model_state = base.apply(model, params, state.model_state, x, t, train=True, rng=rng)
        ce = base.cross_entropy(z[:b], batch["y"], batch["mask"])
        ce_r = jnp.where(have, base.cross_entropy(z[b:], rep["y"]), 0.0)
        n_in, n_rep = batch["mask"].sum(), jnp.where(have, float(m.replay_batch), 0.0)
        total = (ce * n_in + ce_r * n_rep) / jnp.maximum(n_in + n_rep, 1.0)
        return total, {"model_state": model_state,
                       "metrics": {"ce": ce, "ce_replay": ce_r, "acc": base.accuracy(z[:b], batch["y"], batch["mask"])}}

    def after_step(state, aux, batch, task, rng, phase):
        q = jnp.zeros(batch["y"].shape + (info.num_outputs,))
        mem = _memory.insert(state.extra["memory"], batch, task, q, jax.random.fold_in(rng, 2), class_of)
        return state.replace(extra={**state.extra, "memory": mem})

    return base.make("er", config, model, init=init, loss=loss, after_step=after_step)
