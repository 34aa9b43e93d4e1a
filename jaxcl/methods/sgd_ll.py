"""SGD-LL: a frozen backbone and one trainable last layer shared by every task, learned
by plain SGD task after task (the baseline of the CLR paper, Ge et al. ICCV 2023).

The backbone (every parameter but the head, and its batch norm in inference mode) comes
from ``model.pretrained`` and never changes: it is outside the trainable mask and the
gradient. The last layer has one output per class of the stream. In the class- and
domain-incremental scenarios every task's softmax runs over it all, so later tasks
overwrite what earlier ones learned there. In the task-incremental scenario a task's
logits are its classes' slice of the layer and its loss touches only that slice: SGD-LL
then coincides with CLR's ``variant=head`` (a linear probe per task, no forgetting). Without
``model.pretrained`` the backbone is the random initialisation (useful in tests only), and
``make`` warns (:class:`~jaxcl.methods.base.UntrainedBackboneWarning`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import models
from jaxcl.methods import base
from jaxcl.models import layers


def defaults() -> dict:
    return {}


def validate(config) -> None:
    """No settings to check."""


def make(config, model, info) -> base.Method:
    sliced = info.scenario == "task" and info.num_tasks > 1
    if sliced:
        if config.model.name not in models.available():
            raise ValueError("SGD-LL in the task scenario rebuilds a jaxcl model with one last layer over every class; "
                             f"with your own model ({config.model.name}) use scenario='class' or 'domain'")
        total = int(sum(info.task_classes))
        model = models.build(config.model, info, num_heads=1, num_outputs=total, classes_per_head=(total,))
        offsets = jnp.asarray(info.class_offsets, jnp.int32)
        widths = jnp.asarray(info.task_classes, jnp.int32)
    width = info.num_outputs

    def head_only(params):
        return jax.tree_util.tree_map_with_path(lambda p, w: jnp.asarray(layers.is_per_task(p)), params)

    def logits_of(params, model_state, x, task):
        z, _ = base.apply(model, params, model_state, x, task, train=False)
        if not sliced:
            return z
        t = jnp.broadcast_to(jnp.asarray(task, jnp.int32), (x.shape[0],))
        cols = offsets[t][:, None] + jnp.arange(width)
        out = jnp.take_along_axis(z, jnp.minimum(cols, z.shape[1] - 1), axis=1)
        return jnp.where(jnp.arange(width) < widths[t][:, None], out, -1e9)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        return state.replace(trainable=head_only(state.params))

    def loss(params, state, batch, task, rng, phase):
        params = jax.tree_util.tree_map_with_path(
            lambda p, w: w if layers.is_per_task(p) else jax.lax.stop_gradient(w), params)
        logits = logits_of(params, state.model_state, batch["x"], task)
        ce = base.cross_entropy(logits, batch["y"], batch["mask"])
        return ce, {"metrics": {"ce": ce, "acc": base.accuracy(logits, batch["y"], batch["mask"])}}

    def predict(state, x, task):
        return logits_of(state.params, state.model_state, x, task)

    return base.make("sgd_ll", config, model, init=init, loss=loss, predict=predict, frozen_backbone=True)
