"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for
Continual Learning", NeurIPS 2023): a fixed random projection with a non-linearity on the
frozen pretrained features, second-order class statistics, and a ridge-regression
classifier.

As the authors' code (RanPAC/RanPAC, ``RanPAC.py``, ``replace_fc`` and
``optimise_ridge_parameter``):

* ``h = relu(f @ W_rand)``: ``f`` the frozen model's final cls feature ``[D]``,
  ``W_rand ~ N(0, 1)`` ``[D, M]`` drawn once per run and never trained
  (``method.projection`` = M, 10,000 in the paper; 0 uses ``f`` itself, the code's
  ``M=0``);
* over every task's training data, ``G += H^T H`` (the Gram matrix, ``[M, M]``) and
  ``C += H^T Y`` (``Y`` the one-hot targets over all classes);
* after each task, the classifier ``W = (G + lambda I)^-1 C`` and ``logits = h @ W``
  (classes not seen yet are never predicted);
* ``lambda`` is chosen after each task, as the code does, among ``10^-8 .. 10^8`` by the
  mean squared error of the ridge solution fitted on 80% of that task's samples and
  tested on the other 20%. The code splits the task's shuffled feature list at 80%; here
  every fifth sample of the consolidation pass is held out (the split is a streamed
  statistic: ``G``, ``C`` of the fitted part and of the held-out part, so no feature is
  stored). The selection diagonalises the fitted part's Gram matrix once and scores
  every lambda from it.

By default nothing is trained (the paper's ablation "No Phase 1"): each task's one phase,
``statistics``, has zero epochs and the loop's consolidation pass accumulates the
statistics. ``adapt_epochs > 0`` adds the paper's Phase 1, first-session parameter-efficient
tuning, with its VPT option (:class:`jaxcl.methods._ptm.FirstSession`: shallow prompt tokens
and the head trained on task 1 in a phase ``adapt``, then frozen); ``f`` is then the
prompted model's feature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.methods import _ptm, base

HIGHEST = jax.lax.Precision.HIGHEST
RIDGES = tuple(10.0 ** np.arange(-8, 9))  # the code's candidates for lambda


def defaults() -> dict:
    return {
        "projection": 10000,  # M: random features (0: the pretrained features themselves, no projection)
        "holdout": 5,  # every holdout-th sample of a task is held out when choosing lambda (the code's 80/20)
        **_ptm.adapt_settings(),  # Phase 1
    }


def validate(config) -> None:
    m = config.method
    base.need(isinstance(m.projection, int) and m.projection >= 0, "projection",
              f"must be an integer >= 0 (0: no random projection), got {m.projection!r}")
    base.need(isinstance(m.holdout, int) and m.holdout >= 2, "holdout", f"must be an integer >= 2, got {m.holdout!r}")
    _ptm.check_adapt(m)


def choose_ridge(g_fit, c_fit, g_val, c_val):
    """(lambda, losses): the candidate whose ridge solution fitted on (g_fit, c_fit) has
    the least squared error on the held-out samples (whose statistics are g_val, c_val;
    the error up to a constant is ``tr(W^T G_val W) - 2 tr(W^T C_val)``)."""
    e, v = jnp.linalg.eigh(g_fit)
    vc = jnp.dot(v.T, c_fit, precision=HIGHEST)
    ridges = jnp.asarray(RIDGES, jnp.float32)

    def loss(r):
        w = jnp.dot(v, vc / (e + r)[:, None], precision=HIGHEST)
        return jnp.sum(w * jnp.dot(g_val, w, precision=HIGHEST)) - 2 * jnp.sum(w * c_val)

    losses = jax.lax.map(loss, ridges)
    losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    return ridges[jnp.argmin(losses)], losses


def solve(g, c, lam):
    return jnp.linalg.solve(g + lam * jnp.eye(g.shape[0], dtype=g.dtype), c)


BACKBONE = "vit"  # a pretrained ViT's token interface (jaxcl.models.vit)


def make(config, model, info) -> base.Method:
    validate(config)
    _ptm.check_model(model, "ranpac")
    rows, offsets = _ptm.class_table(info)
    m_rand, holdout = config.method.projection, config.method.holdout
    first = _ptm.FirstSession(config, model, info)

    def feature(params, x):
        return first.features(params, x) if first.epochs else _ptm.frozen_features(model, params, x)

    def project(state, x):
        f = feature(state.params, x)
        if not m_rand:
            return f
        return jax.nn.relu(jnp.dot(f, state.extra["w_rand"], precision=HIGHEST))

    def init(rng, x):
        state = first.init(rng, base.init_state(model, rng, x))
        d = feature(state.params, x[:1]).shape[-1]
        m = m_rand or d
        z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
        extra = {
            "w_rand": jax.random.normal(jax.random.fold_in(rng, 7), (d, m_rand), jnp.float32) if m_rand else z(0),
            "g": z(m, m), "c": z(m, rows),  # every task's statistics
            "g_fit": z(m, m), "c_fit": z(m, rows), "g_val": z(m, m), "c_val": z(m, rows),  # this task's split
            "n_task": jnp.zeros((), jnp.int32),  # samples of this task seen by the consolidation pass
            "seen": jnp.zeros((rows,), bool),
            "w": z(m, rows), "ridge": z(),
        }
        return state.replace(extra=extra)

    def consolidate(state, batch, task, phase):
        if phase == "adapt":
            return state
        e = dict(state.extra)
        h = project(state, batch["x"])
        mask = batch["mask"]
        y = jax.nn.one_hot(_ptm.rows_of(batch["y"], task, offsets), rows) * mask[:, None]
        hm = h * mask[:, None]
        position = e["n_task"] + jnp.cumsum(mask.astype(jnp.int32)) - 1
        val = ((position % holdout) == holdout - 1).astype(jnp.float32) * mask
        fit = mask - val
        gram = lambda w: jnp.dot((h * w[:, None]).T, h, precision=HIGHEST)  # noqa: E731
        cross = lambda w: jnp.dot((h * w[:, None]).T, y, precision=HIGHEST)  # noqa: E731
        e["g"] = e["g"] + jnp.dot(hm.T, h, precision=HIGHEST)
        e["c"] = e["c"] + jnp.dot(h.T, y, precision=HIGHEST)
        e["g_fit"], e["c_fit"] = e["g_fit"] + gram(fit), e["c_fit"] + cross(fit)
        e["g_val"], e["c_val"] = e["g_val"] + gram(val), e["c_val"] + cross(val)
        e["n_task"] = e["n_task"] + mask.sum().astype(jnp.int32)
        e["seen"] = e["seen"] | (y.sum(0) > 0)
        return state.replace(extra=e)

    def after_phase(state, task, phase):
        if phase == "adapt":
            return first.after_adapt(state)
        e = dict(state.extra)
        e["ridge"], _ = choose_ridge(e["g_fit"], e["c_fit"], e["g_val"], e["c_val"])
        e["w"] = solve(e["g"], e["c"], e["ridge"])
        for k in ("g_fit", "c_fit", "g_val", "c_val"):
            e[k] = jnp.zeros_like(e[k])
        e["n_task"] = jnp.zeros_like(e["n_task"])
        return state.replace(extra=e)

    def predict(state, x, task):
        scores = jnp.dot(project(state, x), state.extra["w"], precision=HIGHEST)
        scores = jnp.where(state.extra["seen"], scores, _ptm.NEG)
        return _ptm.task_logits(scores, task, info, offsets)

    def report(state):
        return {"ridge": state.extra["ridge"]}

    # the loss is reached only in Phase 1 (adapt): the statistics phase has no epochs
    return base.make("ranpac", config, model, init=init, loss=first.loss, consolidate=consolidate,
                     after_phase=after_phase, predict=predict, phases=first.phases(base.Phase("statistics", 0)),
                     report=report, frozen_backbone=True)
