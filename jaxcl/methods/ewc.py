"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

After task k the importance F_k of every parameter is estimated on task k's training
data and the parameters a_k are stored; while learning task t the loss gains one penalty
per earlier task (Avalanche's ``mode='separate'``; no 1/2 factor, as Avalanche and the
ContinualAI baselines):

    lambda * sum_{k < t} sum_i F_k,i * (theta_i - a_k,i)^2

A sum of quadratics is one quadratic, so the state is kept in closed form instead of
stacking every F_k and a_k:

    sum_k F_k (theta - a_k)^2 = A (theta - m)^2 + c,
    A = sum_k F_k,   m = sum_k F_k a_k / A,   c >= 0 a constant.

The penalty and its gradient 2 A (theta - m) are exactly those of the per-task sum, at
the cost of two parameter-sized arrays instead of 2T (on Permuted-MNIST x10 this more
than doubles the train steps per second). ``c`` is tracked so the reported penalty is
the full sum.

Importance estimates (``method.fisher``):

* ``batch``: the mean over mini-batches of the squared gradient of the batch's mean
  loss, model in eval mode: what Avalanche's EWCPlugin computes, and so what the
  ContinualAI baselines' figures were produced with;
* ``empirical``: the mean over samples of each sample's squared gradient (the empirical
  Fisher of the EWC paper), computed with ``vmap``.
"""
import jax
import jax.numpy as jnp

from jaxcl.methods import base


def defaults() -> dict:
    return {"ewc_lambda": 1.0, "fisher": "batch"}


def validate(config) -> None:
    base.check_range(config.method, "ewc_lambda", 0)
    check_estimate(config.method.fisher)


def make(config, model, info) -> base.Method:
    validate(config)
    lam = config.method.ewc_lambda
    estimate = config.method.fisher
    plain_loss = base.classification_loss(model)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        extra = {
            "importance": zeros,  # A: summed importance of the consolidated tasks
            "anchor": zeros,  # m: their importance-weighted anchor
            "const": jnp.zeros((), jnp.float32),  # c
            "acc": zeros,  # importance being accumulated for the current task
            "count": jnp.zeros((), jnp.float32),
        }
        return state.replace(extra=extra)

    def penalty(params, extra):
        terms = jax.tree_util.tree_map(lambda p, a, m: jnp.sum(a * (p - m) ** 2), params, extra["importance"],
                                       extra["anchor"])
        return sum(jax.tree_util.tree_leaves(terms)) + extra["const"]

    def loss(params, state, batch, task, rng, phase):
        ce, aux = plain_loss(params, state, batch, task, rng, phase)
        pen = penalty(params, state.extra)
        aux["metrics"]["ewc_penalty"] = pen
        return ce + lam * pen, aux

    consolidate = fisher_consolidate(model, estimate)

    def after_phase(state, task, phase):
        """Fold task ``task``'s quadratic F (theta - a)^2 into A (theta - m)^2 + c."""
        e = dict(state.extra)
        fisher = accumulated_fisher(e)

        def fold(a_old, m_old, f, p):
            a_new = a_old + f
            safe = jnp.where(a_new > 0, a_new, 1.0)
            m_new = jnp.where(a_new > 0, m_old + (f / safe) * (p - m_old), p)  # exact p when a_old = 0
            gap = jnp.sum(jnp.where(a_new > 0, a_old * f / safe, 0.0) * (m_old - p) ** 2)
            return a_new, m_new, gap

        folded = jax.tree_util.tree_map(fold, e["importance"], e["anchor"], fisher, state.params)
        is_triple = lambda x: isinstance(x, tuple)  # noqa: E731
        e["importance"] = jax.tree_util.tree_map(lambda t: t[0], folded, is_leaf=is_triple)
        e["anchor"] = jax.tree_util.tree_map(lambda t: t[1], folded, is_leaf=is_triple)
        e["const"] = e["const"] + sum(t[2] for t in jax.tree_util.tree_leaves(folded, is_leaf=is_triple))
        return state.replace(extra=reset_fisher(e))

    return base.make("ewc", config, model, init=init, loss=loss, consolidate=consolidate, after_phase=after_phase)


# ----------------------------------------------------------------------------- shared with online_ewc


def check_estimate(estimate: str) -> None:
    base.need(estimate in ("batch", "empirical"), "fisher", f"{estimate!r} is not one of batch, empirical")


def fisher_consolidate(model, estimate: str):
    """``consolidate``: add the batch's squared gradients to ``extra['acc']`` and their
    count to ``extra['count']`` (the Fisher estimate is ``acc / count``)."""

    def eval_ce(params, model_state, x, y, mask, task):
        logits, _ = base.apply(model, params, model_state, x, task, train=False)
        return base.cross_entropy(logits, y, mask)

    def consolidate(state, batch, task, phase):
        if estimate == "batch":
            g = jax.grad(eval_ce)(state.params, state.model_state, batch["x"], batch["y"], batch["mask"], task)
            sq, n = jax.tree_util.tree_map(jnp.square, g), jnp.ones(())
        else:
            def one(x, y):
                return jax.grad(eval_ce)(state.params, state.model_state, x[None], y[None], None, task)

            g = jax.vmap(one)(batch["x"], batch["y"])
            m = batch["mask"]
            sq = jax.tree_util.tree_map(lambda v: jnp.tensordot(m, v ** 2, axes=1), g)
            n = m.sum()
        extra = dict(state.extra)
        extra["acc"] = jax.tree_util.tree_map(jnp.add, extra["acc"], sq)
        extra["count"] = extra["count"] + n
        return state.replace(extra=extra)

    return consolidate


def accumulated_fisher(extra):
    return jax.tree_util.tree_map(lambda a: a / jnp.maximum(extra["count"], 1.0), extra["acc"])


def reset_fisher(extra):
    return {**extra, "acc": jax.tree_util.tree_map(jnp.zeros_like, extra["acc"]),
            "count": jnp.zeros((), jnp.float32)}
