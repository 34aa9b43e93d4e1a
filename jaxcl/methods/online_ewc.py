"""Online EWC (Schwarz et al., ICML 2018, "Progress & Compress"; Avalanche's
``EWCPlugin(mode='online')``): one running importance instead of one per task.

After task k the importance is decayed and the new Fisher added, and the anchor moves to
the parameters after task k:

    F <- decay * F + F_k,      a <- theta_k,      penalty = lambda * sum_i F_i (theta_i - a_i)^2

(no 1/2 factor, as Avalanche). ``method.decay`` is Schwarz et al.'s gamma (1.0: every
task's Fisher kept at full weight, but anchored at the latest parameters only, unlike
:mod:`~jaxcl.methods.ewc`). The Fisher estimate is EWC's (``method.fisher``).
"""
import jax
import jax.numpy as jnp

from jaxcl.methods import base, ewc


def defaults() -> dict:
    return {"ewc_lambda": 1.0, "decay": 1.0, "fisher": "batch"}


def validate(config) -> None:
    m = config.method
    base.check_range(m, "ewc_lambda", 0)
    base.need((m.decay >= 0.0) & (m.decay <= 1.0), "decay", f"{m.decay} is not in [0, 1]")
    ewc.check_estimate(m.fisher)


def make(config, model, info) -> base.Method:
    validate(config)
    lam, decay = config.method.ewc_lambda, config.method.decay
    plain_loss = base.classification_loss(model)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        return state.replace(extra={"importance": zeros, "anchor": zeros, "acc": zeros,
                                    "count": jnp.zeros((), jnp.float32)})

    def penalty(params, extra):
        terms = jax.tree_util.tree_map(lambda p, f, a: jnp.sum(f * (p - a) ** 2), params, extra["importance"],
                                       extra["anchor"])
        return sum(jax.tree_util.tree_leaves(terms))

    def loss(params, state, batch, task, rng, phase):
        ce, aux = plain_loss(params, state, batch, task, rng, phase)
        pen = penalty(params, state.extra)
        aux["metrics"]["ewc_penalty"] = pen
        return ce + lam * pen, aux

    def after_phase(state, task, phase):
        e = dict(state.extra)
        e["importance"] = jax.tree_util.tree_map(lambda f, new: decay * f + new, e["importance"],
                                                 ewc.accumulated_fisher(e))
        e["anchor"] = state.params
        return state.replace(extra=ewc.reset_fisher(e))

    return base.make("online_ewc", config, model, init=init, loss=loss,
                     consolidate=ewc.fisher_consolidate(model, config.method.fisher), after_phase=after_phase)
