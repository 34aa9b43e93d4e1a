"""A-GEM (Chaudhry et al., ICLR 2019): the update may not increase the loss on a sample of
the episodic memory. With g the gradient on the incoming batch and g_ref the gradient on
``sample_size`` samples drawn from the memory of earlier tasks,

    g' = g - (g . g_ref / g_ref . g_ref) g_ref   if g . g_ref < 0,   else g

(``transform_grads``, computed over every parameter at once, as the paper and current
Avalanche; ``method.projection=per_tensor`` projects each parameter tensor on its own
part of g_ref, as Avalanche's AGEMPlugin did up to its 0.1 release). The memory keeps
``patterns_per_task`` samples of each task (a ring per task, GEM's episodic memory);
samples are stored as they stream by, as Avalanche's AGEMPlugin keeps a task's patterns."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _memory, base


def defaults() -> dict:
    return {"patterns_per_task": 250, "sample_size": 256, "projection": "global"}


def validate(config) -> None:
    m = config.method
    base.check_range(m, "patterns_per_task", 1)
    base.check_range(m, "sample_size", 1)
    base.check_choice(m, "projection", ("global", "per_tensor"))


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    num_tasks = info.num_tasks
    plain = base.classification_loss(model)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        mem = _memory.new("ring", m.patterns_per_task, x.shape[1:], info.num_outputs, num_tasks=num_tasks)
        return state.replace(extra={"memory": mem})

    def reference_grad(state, task, rng):
        mem = state.extra["memory"]
        rep, have = _memory.memory_sample(mem, rng, m.sample_size, mem["task"] < task)

        def mem_loss(params):
            z, _ = base.apply(model, params, state.model_state, rep["x"], rep["task"], train=True, rng=rng)
            return base.cross_entropy(z, rep["y"])

        return jax.grad(mem_loss)(state.params), have

    def transform_grads(grads, state, batch, task, rng, phase):
        g_ref, have = reference_grad(state, task, jax.random.fold_in(rng, 1))
        if m.projection == "per_tensor":
            def project(a, b):
                d = jnp.vdot(a, b)
                return a - jnp.where(have & (d < 0), d / jnp.maximum(jnp.vdot(b, b), 1e-12), 0.0) * b

            return jax.tree_util.tree_map(project, grads, g_ref)
        dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g_ref)))
        ref2 = sum(jnp.vdot(b, b) for b in jax.tree_util.tree_leaves(g_ref))
        coef = jnp.where(have & (dot < 0), dot / jnp.maximum(ref2, 1e-12), 0.0)
        return jax.tree_util.tree_map(lambda a, b: a - coef * b, grads, g_ref)

    def after_step(state, aux, batch, task, rng, phase):
        q = jnp.zeros(batch["y"].shape + (info.num_outputs,))
        return state.replace(extra={**state.extra, "memory": _memory.insert(state.extra["memory"], batch, task, q, rng)})

    return base.make("agem", config, model, init=init, loss=plain, transform_grads=transform_grads,
                     after_step=after_step)
