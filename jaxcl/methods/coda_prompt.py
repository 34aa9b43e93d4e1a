"""CODA-Prompt (Smith et al., CVPR 2023): prompts as attention-weighted sums of learned
prompt components on a frozen pretrained ViT, by prefix-tuning.

As the authors' code (GT-RIPL/CODA-Prompt, ``models/zoo.py`` ``CodaPrompt``,
``learners/prompt.py``, ``experiments/cifar-100.sh``):

* on each block of ``layers``, ``pool_size`` components, each a prompt ``P_m`` of
  ``length`` tokens, a key ``K_m`` and an attention vector ``A_m`` (of the model's width);
* with ``q`` the frozen model's cls feature of the un-prompted image (no gradient), the
  weights are ``alpha_m = cos(q * A_m, K_m)`` and the prompt is ``sum_m alpha_m P_m``; its
  first ``length / 2`` tokens are prepended to the block's attention keys, the other half
  to its values;
* the components are cut into ``num_tasks`` equal slices: task t trains slice t only
  (``state.trainable`` freezes the earlier slices bit for bit, and the code's ``detach``
  is kept), uses slices ``0..t``, and the later ones are still zero;
* at the start of every task its slice of K, A and P is initialised by Gram-Schmidt:
  random normal vectors made orthogonal to every earlier component, normalised (the
  code's ``gram_schmidt``, including its projection formula for the earlier components,
  which are no longer exactly orthonormal after training);
* loss = cross-entropy over the current task's classes (the earlier classes masked, as
  the code) + ``ortho`` x (``||K K^T - I||^2`` + same for A and P, each a mean over the
  components in use, summed over the blocks); the published scripts use ``ortho = 0``;
* the representation is the cls token's output; the model is frozen, the components and
  the head train. No task id at test time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _ptm, base


def defaults() -> dict:
    return {
        "pool_size": 100,  # components per block (split equally among the tasks)
        "length": 8,  # prompt tokens: length / 2 key prefixes and length / 2 value prefixes
        "layers": (0, 1, 2, 3, 4),  # blocks with prompts
        "ortho": 0.0,  # weight of the orthogonality penalty (the code's mu; 0 in its scripts)
    }


def validate(config) -> None:
    m = config.method
    base.need(isinstance(m.pool_size, int) and m.pool_size >= config.num_tasks, "pool_size",
              f"must be an integer >= num_tasks ({config.num_tasks}), got {m.pool_size!r}")
    base.need(isinstance(m.length, int) and m.length >= 2 and m.length % 2 == 0, "length",
              f"must be an even integer >= 2 (half key, half value prefixes), got {m.length!r}")
    base.check_range(m, "ortho", 0)


def gram_schmidt(vv, start, stop, key):
    """``vv`` ``[n, d]`` with rows ``start..stop-1`` replaced, in order, by random normal
    vectors minus their projections on every earlier row, normalised (GT-RIPL/CODA-Prompt
    ``CodaPrompt.gram_schmidt``); ``start`` and ``stop`` may be traced."""
    n = vv.shape[0]
    rows = jnp.arange(n)

    def body(k, uu):
        v = jax.random.normal(jax.random.fold_in(key, k), vv.shape[1:], vv.dtype)
        den = jnp.sum(uu * uu, 1)
        use = (rows < k) & (den >= 1e-8)
        coef = jnp.where(use, jnp.dot(uu, v, precision=jax.lax.Precision.HIGHEST) / jnp.where(use, den, 1.0), 0.0)
        u = v - jnp.dot(coef, uu, precision=jax.lax.Precision.HIGHEST)
        u = u / jnp.linalg.norm(u)
        return uu.at[k].set(jnp.where((k >= start) & (k < stop), u, uu[k]))

    return jax.lax.fori_loop(0, n, body, vv)


def ortho_penalty(t, active):
    """``mean((T T^T - I)^2)`` over the active rows of ``t`` ``[n, d]``."""
    t = jnp.where(active[:, None], t, 0.0)
    m = jnp.dot(t, t.T, precision=jax.lax.Precision.HIGHEST) - jnp.eye(t.shape[0])
    both = active[:, None] & active[None, :]
    return jnp.sum(jnp.where(both, m * m, 0.0)) / jnp.maximum(jnp.sum(both), 1)


BACKBONE = "vit"  # a pretrained ViT's token interface (jaxcl.models.vit)


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    layers = _ptm.check_layers(model, "layers", m.layers)
    pool, length, mu = m.pool_size, m.length, m.ortho
    per_task = pool // info.num_tasks
    comps = jnp.arange(pool)

    def init_prompts(rng, width):  # each task's slice is filled by begin_task
        z = lambda *s: jnp.zeros((len(layers),) + s, jnp.float32)  # noqa: E731
        return {"p": z(pool, length, width), "k": z(pool, width), "a": z(pool, width)}

    def begin_task(state, task):
        start, stop = task * per_task, (task + 1) * per_task
        key = jax.random.fold_in(jax.random.fold_in(state.rng, 0xC0DA), task)
        p = state.params[_ptm.PROMPT]
        new = {}
        for i, name in enumerate(("k", "a", "p")):
            x = p[name]
            flat = x.reshape(x.shape[:2] + (-1,))
            keys = jax.random.split(jax.random.fold_in(key, i), len(layers))
            new[name] = jax.vmap(gram_schmidt, (0, None, None, 0))(flat, start, stop, keys).reshape(x.shape)
        own = (comps >= start) & (comps < stop)
        trainable = dict(state.trainable)
        trainable[_ptm.PROMPT] = {k: jnp.broadcast_to(own.reshape((1, pool) + (1,) * (v.ndim - 2)), v.shape)
                                  for k, v in new.items()}
        return state.replace(params={**state.params, _ptm.PROMPT: new}, trainable=trainable)

    def forward(params, state, x, task, train, rng, mask):
        p = params[_ptm.PROMPT]
        start, stop = task * per_task, (task + 1) * per_task
        active = comps[None, :] < jnp.reshape(stop, (-1, 1))  # [1 or B, pool]: a task per sample too
        if train:  # the earlier tasks' components get no gradient (the code's detach)
            old = (comps < start)
            p = {k: jnp.where(old.reshape((1, pool) + (1,) * (v.ndim - 2)), jax.lax.stop_gradient(v), v)
                 for k, v in p.items()}
        q = _ptm.frozen_features(model, params, x)  # [B, D]
        aq = q[None, :, None, :] * p["a"][:, None]  # [layers, B, pool, D]
        alpha = jnp.einsum("lbkd,lkd->lbk", _ptm.l2_normalize(aq), _ptm.l2_normalize(p["k"]))
        alpha = jnp.where(active[None], alpha, 0.0)
        prompt = jnp.einsum("lbk,lkpd->lbpd", alpha, p["p"])  # [layers, B, length, D]
        half = length // 2
        prefixes = [None] * model.depth
        for i, layer in enumerate(layers):
            prefixes[layer] = (prompt[i, :, :half], prompt[i, :, half:])
        feat = _ptm.features(model, params, x, train, rng, prefixes=prefixes, pool="cls")
        logits = _ptm.classify(model, params, feat, task)
        if mask is None:
            return logits, 0.0, {}
        pen = sum(ortho_penalty(p[k][i].reshape(pool, -1), active[0]) for i in range(len(layers)) for k in ("k", "a", "p"))
        return logits, mu * pen, {"ortho": pen}

    return _ptm.prompt_method("coda_prompt", config, model, info, init_prompts=init_prompts, forward=forward,
                              begin_task=begin_task, element_masks=True)
