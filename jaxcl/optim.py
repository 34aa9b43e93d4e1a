"""Optimizers from the config, with the learning rate as state so that a schedule
stepped per epoch (PyTorch's MultiStepLR / CosineAnnealingLR habit) never recompiles the
train step."""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def make(cfg) -> optax.GradientTransformation:
    """``cfg`` is ``config.optimizer``. Weight decay is L2 added to the gradient before
    momentum/Adam (``torch.optim.SGD``/``Adam``); ``adamw`` decouples it."""

    def build(learning_rate):
        parts = []
        if cfg.grad_clip:
            parts.append(optax.clip_by_global_norm(cfg.grad_clip))
        if cfg.name == "sgd":
            if cfg.weight_decay:
                parts.append(optax.add_decayed_weights(cfg.weight_decay))
            parts.append(optax.sgd(learning_rate, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
        elif cfg.name == "adam":
            if cfg.weight_decay:
                parts.append(optax.add_decayed_weights(cfg.weight_decay))
            parts.append(optax.adam(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        elif cfg.name == "adamw":
            parts.append(optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
        else:
            raise ValueError(f"optimizer.name: {cfg.name!r} is not one of sgd, adam, adamw")
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(learning_rate=cfg.lr)


def lr_at(cfg, epoch: int, epochs: int, phase=None) -> float:
    """Learning rate of ``epoch`` (0-based) of a phase of ``epochs`` epochs: the
    phase's own (``phase.lr`` decayed by ``cfg.gamma`` at ``phase.milestones``) when it
    sets one, else ``cfg``'s schedule."""
    if phase is not None and phase.lr is not None:
        return phase.lr * cfg.gamma ** sum(epoch >= m for m in phase.milestones)
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    return cfg.lr


def with_lr(opt_state, lr):
    """``opt_state`` with its injected learning rate set to ``lr`` (a number, or one per
    run of a state stacked over runs)."""
    hp = dict(opt_state.hyperparams)
    cur = jnp.asarray(hp["learning_rate"])
    hp["learning_rate"] = jnp.broadcast_to(jnp.asarray(lr, dtype=cur.dtype), cur.shape)  # per run when stacked
    return opt_state._replace(hyperparams=hp)
