"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained
Models: Generalizability and Adaptivity are All You Need", IJCV 2024): a prototype
classifier on the frozen pretrained model, no training.

As the authors' code (zhoudw-zdw/RevisitingCIL, ``models/simplecil.py``): every class's
prototype is the mean of the frozen model's final features (the cls token after the last
LayerNorm) over its training images, and an image's logit for a class is the cosine
similarity of its feature to the prototype (the code's ``CosineLinear`` with the
prototypes as weights). Classes not seen yet are never predicted.

Each task has one phase, ``prototypes``, of zero epochs: nothing is trained (the model's
parameters are all frozen, ``state.trainable`` all False); the loop's consolidation pass
over the task's training data adds every feature to its class's sum and count
(``consolidate``), and ``after_phase`` turns the sums into normalised prototypes. The
class and domain scenarios keep one prototype per output unit; the task scenario one per
(task, class).

``adapt_epochs > 0``: the same paper's first-session adaptation (APER, ``models/aper_vpt.py``
with its shallow visual prompt): on task 1 only, a phase ``adapt`` trains
``adapt_tokens`` prompt tokens inserted after the cls token (the model's ``prompts``,
uniform init as L2P's) and the head (cross-entropy on task 1's classes) with the run's
optimizer, the trunk frozen; then everything is frozen, and every prototype and every
image's feature is the concatenation of the frozen model's feature and the prompted
model's (the code's two backbones, ``torch.cat`` of their features).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _ptm, base


def defaults() -> dict:
    return {
        "adapt_epochs": 0,  # first-session adaptation (APER) epochs on task 1; 0: plain SimpleCIL
        "adapt_tokens": 5,  # its prompt tokens (the code's prompt_token_num)
    }


def validate(config) -> None:
    m = config.method
    for k, low in (("adapt_epochs", 0), ("adapt_tokens", 1)):
        base.need(isinstance(m[k], int) and m[k] >= low, k, f"must be an integer >= {low}, got {m[k]!r}")


def prototypes(sums, counts):
    """Normalised class means ``[rows, D]`` from the feature sums and counts."""
    return _ptm.l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])


BACKBONE = "vit"  # a pretrained ViT's token interface (jaxcl.models.vit)


def make(config, model, info) -> base.Method:
    validate(config)
    _ptm.check_model(model, "simplecil")
    rows, offsets = _ptm.class_table(info)
    adapt = config.method.adapt_epochs > 0
    units = _ptm.output_units(info)

    def feature(params, x, train=False, rng=None):
        """The frozen model's feature; with adaptation, the prompted model's after it."""
        plain = _ptm.frozen_features(model, params, x)
        if not adapt:
            return plain
        tuned = _ptm.features(model, params, x, train, rng, prompts=params[_ptm.PROMPT]["tokens"])
        return jnp.concatenate([plain, tuned], -1)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        params, trainable = state.params, _ptm.frozen_trunk(state.params, head=False)
        if adapt:
            params = {**params, _ptm.PROMPT: {"tokens": _ptm.uniform()(jax.random.fold_in(rng, 11),
                                                                       (config.method.adapt_tokens, model.width))}}
            trainable = _ptm.frozen_trunk(params, head=True)  # the prompt tokens and the head: task 1 only
        d = feature(params, x[:1]).shape[-1]
        extra = {"sums": jnp.zeros((rows, d), jnp.float32), "counts": jnp.zeros((rows,), jnp.float32),
                 "protos": jnp.zeros((rows, d), jnp.float32)}
        return state.replace(params=params, extra=extra, trainable=trainable)

    def loss(params, state, batch, task, rng, phase):  # the adapt phase only: prototypes train nothing
        params = _ptm.without_trunk_gradient(params, head=True)
        feat = _ptm.features(model, params, batch["x"], True, rng, prompts=params[_ptm.PROMPT]["tokens"])
        logits = _ptm.classify(model, params, feat, task)
        ce, metrics = _ptm.masked_loss(logits, batch, task, units)
        return ce, {"metrics": metrics}

    def consolidate(state, batch, task, phase):
        if phase == "adapt":
            return state
        feat = feature(state.params, batch["x"])
        onehot = jax.nn.one_hot(_ptm.rows_of(batch["y"], task, offsets), rows) * batch["mask"][:, None]
        e = dict(state.extra)
        e["sums"] = e["sums"] + jnp.dot(onehot.T, feat, precision=jax.lax.Precision.HIGHEST)
        e["counts"] = e["counts"] + onehot.sum(0)
        return state.replace(extra=e)

    def after_phase(state, task, phase):
        if phase == "adapt":  # adapted once: everything frozen from here on
            return state.replace(trainable=jax.tree_util.tree_map(jnp.zeros_like, state.trainable))
        return state.replace(extra={**state.extra, "protos": prototypes(state.extra["sums"], state.extra["counts"])})

    def predict(state, x, task):
        feat = _ptm.l2_normalize(feature(state.params, x))
        scores = jnp.dot(feat, state.extra["protos"].T, precision=jax.lax.Precision.HIGHEST)
        scores = jnp.where(state.extra["counts"] > 0, scores, _ptm.NEG)
        return _ptm.task_logits(scores, task, info, offsets)

    stats = (base.Phase("prototypes", 0),)
    first = ((base.Phase("adapt", config.method.adapt_epochs),) if adapt else ()) + stats
    return base.make("simplecil", config, model, init=init, loss=loss, consolidate=consolidate,
                     after_phase=after_phase, predict=predict, phases=lambda t: first if t == 0 else stats,
                     frozen_backbone=True)
