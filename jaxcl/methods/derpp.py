"""DER++: Dark Experience Replay++ (Buzzega et al., NeurIPS 2020; reference code Mammoth).

A reservoir memory keeps each sample with the logits the network gave it when it was
seen. Each step trains on the incoming batch plus two independent samples of the memory:

    CE(incoming) + alpha * MSE(z(x1), stored logits of x1) + beta * CE(z(x2), y2)

(``method.beta = 0`` is DER). The three batches go through one forward pass. The MSE is
Mammoth's ``F.mse_loss`` (mean over samples and output units), over the output units the
sample's head has. The memory is the one ER and NCCL use (``_memory``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _memory, base


def defaults() -> dict:
    return {"memory_size": 200, "replay_batch": 32, "alpha": 0.1, "beta": 0.5}


def validate(config) -> None:
    m = config.method
    base.check_range(m, "memory_size", 1)
    base.check_range(m, "replay_batch", 1)
    base.check_range(m, "alpha", 0)
    base.check_range(m, "beta", 0)


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    r = m.replay_batch

    def init(rng, x):
        state = base.init_state(model, rng, x)
        return state.replace(extra={"memory": _memory.new("reservoir", m.memory_size, x.shape[1:], info.num_outputs)})

    def loss(params, state, batch, task, rng, phase):
        mem = state.extra["memory"]
        r1, have = _memory.memory_sample(mem, jax.random.fold_in(rng, 1), r)
        r2, _ = _memory.memory_sample(mem, jax.random.fold_in(rng, 2), r)
        b = batch["x"].shape[0]
        x = jnp.concatenate([batch["x"], r1["x"], r2["x"]])
        t = jnp.concatenate([jnp.broadcast_to(task, (b,)), r1["task"], r2["task"]])
        z, model_state = base.apply(model, params, state.model_state, x, t, train=True, rng=rng)
        ce = base.cross_entropy(z[:b], batch["y"], batch["mask"])
        valid = r1["q"] > -1e8  # units of the sample's head (the others hold the heads' -1e9)
        sq = jnp.where(valid, (z[b:b + r] - r1["q"]) ** 2, 0.0)
        mse = jnp.where(have, sq.sum() / jnp.maximum(valid.sum(), 1), 0.0)
        ce2 = jnp.where(have, base.cross_entropy(z[b + r:], r2["y"]), 0.0)
        total = ce + m.alpha * mse + m.beta * ce2
        return total, {"model_state": model_state, "logits": jax.lax.stop_gradient(z[:b]),
                       "metrics": {"ce": ce, "der_mse": mse, "ce_replay": ce2,
                                   "acc": base.accuracy(z[:b], batch["y"], batch["mask"])}}

    def after_step(state, aux, batch, task, rng, phase):
        mem = _memory.insert(state.extra["memory"], batch, task, aux["logits"], jax.random.fold_in(rng, 3))
        return state.replace(extra={**state.extra, "memory": mem})

    return base.make("derpp", config, model, init=init, loss=loss, after_step=after_step)
