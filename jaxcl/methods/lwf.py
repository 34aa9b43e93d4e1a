"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

While learning task t the loss gains ``alpha_t * KD``: the outputs of the network as it
was after task t-1 (kept frozen in the method's state), computed on the current batch,
distilled into the current network at temperature T. As Avalanche's LwFPlugin (the
ContinualAI baselines' reference): ``KD = KL(softmax(z_old / T) || softmax(z / T))``
averaged over the batch, without a T^2 factor,

* one head per task (task-incremental): summed over the heads of the earlier tasks;
* one head (class-/domain-incremental): over the output units active in earlier tasks
  (the classes seen so far; every unit in the domain-incremental case).

``method.alpha`` is one weight for every task, or one per task (the baselines' Split-MNIST
schedule ``(0, 0.5, 1.333, 2.25, 3.2)``); ``method.temperature`` is T.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.methods import base


def defaults() -> dict:
    return {"alpha": (1.0,), "temperature": 2.0}


def kl(teacher, student, t, units=None):
    """KL(softmax(teacher/T) || softmax(student/T)) per sample, over ``units`` (a bool mask
    of the output units to include; all when None)."""
    if units is not None:
        teacher = jnp.where(units, teacher, -1e9)
        student = jnp.where(units, student, -1e9)
    p = jax.nn.softmax(teacher / t, -1)
    return jnp.sum(p * (jax.nn.log_softmax(teacher / t, -1) - jax.nn.log_softmax(student / t, -1)), -1)


def validate(config) -> None:
    m = config.method
    alpha = base.per_task(m.alpha, config.num_tasks, "alpha", "weights")
    base.need(all(a >= 0 for a in alpha), "alpha", f"weights must be >= 0, got {m.alpha}")
    base.check_range(m, "temperature", 0, strict=True)


def make(config, model, info) -> base.Method:
    validate(config)
    num_tasks, temp = info.num_tasks, float(config.method.temperature)
    alpha = jnp.asarray(base.per_task(config.method.alpha, num_tasks, "alpha", "weights"), jnp.float32)
    per_task_heads = info.num_heads == num_tasks and num_tasks > 1
    # output units of each task in the single-head scenarios
    if info.scenario == "class":
        units = np.zeros((num_tasks, info.num_outputs), bool)
        for t, (start, n) in enumerate(zip(info.class_offsets, info.task_classes)):
            units[t, start:start + n] = True
    else:
        units = np.ones((num_tasks, info.num_outputs), bool)
    units = jnp.asarray(units)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        return state.replace(extra={"old_params": state.params, "old_stats": state.model_state,
                                    "seen": jnp.zeros((info.num_outputs,), bool)})

    def loss(params, state, batch, task, rng, phase):
        n = jnp.maximum(batch["mask"].sum(), 1.0)
        e = state.extra
        if per_task_heads:  # every head in one forward: the current one for CE, the old ones for KD
            z, model_state = base.apply(model, params, state.model_state, batch["x"], "all", train=True, rng=rng)
            logits = jnp.take(z, task, axis=1)
            z_old, _ = base.apply(model, e["old_params"], e["old_stats"], batch["x"], "all", train=False)
            old = (jnp.arange(num_tasks) < task).astype(jnp.float32)
            per = jax.vmap(lambda a, b: kl(a, b, temp), in_axes=1, out_axes=1)(jax.lax.stop_gradient(z_old), z)
            kd = jnp.sum(per * old * batch["mask"][:, None]) / n
        else:
            logits, model_state = base.apply(model, params, state.model_state, batch["x"], task, train=True, rng=rng)
            z_old, _ = base.apply(model, e["old_params"], e["old_stats"], batch["x"], task, train=False)
            kd = jnp.sum(kl(jax.lax.stop_gradient(z_old), logits, temp, e["seen"]) * batch["mask"]) / n
            kd = jnp.where(jnp.any(e["seen"]), kd, 0.0)
        ce = base.cross_entropy(logits, batch["y"], batch["mask"])
        weight = jnp.where(task > 0, alpha[task], 0.0)
        return ce + weight * kd, {"model_state": model_state,
                                  "metrics": {"ce": ce, "kd": kd, "acc": base.accuracy(logits, batch["y"], batch["mask"])}}

    def after_phase(state, task, phase):
        e = dict(state.extra)
        e["old_params"], e["old_stats"] = state.params, state.model_state
        e["seen"] = e["seen"] | units[task]
        return state.replace(extra=e)

    return base.make("lwf", config, model, init=init, loss=loss, after_phase=after_phase)
