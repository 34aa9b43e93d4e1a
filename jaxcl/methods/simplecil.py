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
with its shallow visual prompt, :class:`jaxcl.methods._ptm.FirstSession`): on task 1
only, a phase ``adapt`` trains ``adapt_tokens`` prompt tokens and the head, the trunk
frozen; then everything is frozen, and every prototype and every image's feature is the
concatenation of the frozen model's feature and the prompted model's (the code's two
backbones, ``torch.cat`` of their features).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _ptm, base


def defaults() -> dict:
    return _ptm.adapt_settings()


def validate(config) -> None:
    _ptm.check_adapt(config.method)


def prototypes(sums, counts):
    """Normalised class means ``[rows, D]`` from the feature sums and counts."""
    return _ptm.l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])


BACKBONE = "vit"  # a pretrained ViT's token interface (jaxcl.models.vit)


def make(config, model, info) -> base.Method:
    validate(config)
    _ptm.check_model(model, "simplecil")
    rows, offsets = _ptm.class_table(info)
    first = _ptm.FirstSession(config, model, info)

    def feature(params, x):
        """The frozen model's feature; with adaptation, the prompted model's after it."""
        plain = _ptm.frozen_features(model, params, x)
        return jnp.concatenate([plain, first.features(params, x)], -1) if first.epochs else plain

    def init(rng, x):
        state = first.init(rng, base.init_state(model, rng, x))
        d = feature(state.params, x[:1]).shape[-1]
        extra = {"sums": jnp.zeros((rows, d), jnp.float32), "counts": jnp.zeros((rows,), jnp.float32),
                 "protos": jnp.zeros((rows, d), jnp.float32)}
        return state.replace(extra=extra)

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
        if phase == "adapt":
            return first.after_adapt(state)
        return state.replace(extra={**state.extra, "protos": prototypes(state.extra["sums"], state.extra["counts"])})

    def predict(state, x, task):
        feat = _ptm.l2_normalize(feature(state.params, x))
        scores = jnp.dot(feat, state.extra["protos"].T, precision=jax.lax.Precision.HIGHEST)
        scores = jnp.where(state.extra["counts"] > 0, scores, _ptm.NEG)
        return _ptm.task_logits(scores, task, info, offsets)

    # the loss is reached only in the adapt phase: the prototypes phase has no epochs
    return base.make("simplecil", config, model, init=init, loss=first.loss, consolidate=consolidate,
                     after_phase=after_phase, predict=predict, phases=first.phases(base.Phase("prototypes", 0)),
                     frozen_backbone=True)
