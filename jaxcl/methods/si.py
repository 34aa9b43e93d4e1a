"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

Each parameter's importance is the path integral of its contribution to the drop in the
loss while a task is learned: per train step, ``omega -= g * (theta_new - theta_old)``
with ``g`` the gradient of the task's loss (without the SI penalty, as the authors' code's
``unreg_grads``). At the end of task k, with ``delta = theta_k - theta_{k-1}``,

    Omega += omega / (delta^2 + xi),     omega <- 0,     anchor <- theta_k

and the loss of later tasks gains ``lambda / 2 * sum_i Omega_i (theta_i - anchor_i)^2``
(the ``/ 2`` as Avalanche's SynapticIntelligencePlugin, which the ContinualAI baselines
ran). ``method.omega_max`` > 0 clips Omega from above, as Avalanche does (its
``clip_to=0.001``); 0 keeps the paper's unclipped Omega.
"""
import jax
import jax.numpy as jnp

from jaxcl.methods import base


def defaults() -> dict:
    return {"si_lambda": 1.0, "xi": 0.1, "omega_max": 0.0}


def validate(config) -> None:
    m = config.method
    base.check_range(m, "si_lambda", 0)
    base.need(m.xi > 0, "xi", f"{m.xi} must be > 0 (it keeps Omega finite where a parameter did not move)")
    base.check_range(m, "omega_max", 0)


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    lam, xi, cap = float(m.si_lambda), float(m.xi), float(m.omega_max)
    plain_loss = base.classification_loss(model)
    tmap = jax.tree_util.tree_map

    def init(rng, x):
        state = base.init_state(model, rng, x)
        zeros = tmap(jnp.zeros_like, state.params)
        # start: the parameters when the current task began; anchor: after the last task
        return state.replace(extra={"omega": zeros, "big_omega": zeros, "anchor": state.params,
                                    "start": state.params})

    def importance(extra):  # Omega as the penalty sees it (clipped as Avalanche when omega_max > 0)
        return tmap(lambda o: jnp.minimum(o, cap), extra["big_omega"]) if cap > 0 else extra["big_omega"]

    def penalty(params, extra):
        terms = tmap(lambda p, o, a: jnp.sum(o * (p - a) ** 2), params, importance(extra), extra["anchor"])
        return 0.5 * sum(jax.tree_util.tree_leaves(terms))

    def loss(params, state, batch, task, rng, phase):
        ce, aux = plain_loss(params, state, batch, task, rng, phase)
        pen = penalty(params, state.extra)
        aux["metrics"]["si_penalty"] = pen
        return ce + lam * pen, aux

    def begin_task(state, task):
        return state.replace(extra={**state.extra, "start": state.params})

    def after_step(state, aux, batch, task, rng, phase):
        e = state.extra
        prev = aux["prev_params"]
        # the task loss's gradient: the total's minus the penalty's, lambda Omega (theta - anchor)
        g = tmap(lambda gt, o, p, a: gt - lam * o * (p - a), aux["grads"], importance(e), prev, e["anchor"])
        omega = tmap(lambda w, gi, new, old: w - gi * (new - old), e["omega"], g, state.params, prev)
        return state.replace(extra={**e, "omega": omega})

    def after_phase(state, task, phase):
        e = dict(state.extra)

        e["big_omega"] = tmap(lambda big, w, p, s: big + w / ((p - s) ** 2 + xi), e["big_omega"], e["omega"],
                              state.params, e["start"])
        e["omega"] = tmap(jnp.zeros_like, e["omega"])
        e["anchor"] = e["start"] = state.params
        return state.replace(extra=e)

    return base.make("si", config, model, init=init, loss=loss, begin_task=begin_task, after_step=after_step,
                     after_phase=after_phase)
