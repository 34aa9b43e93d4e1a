"""CLR: Channel-wise Lightweight Reprogramming (Ge et al., ICCV 2023).

A pretrained CNN stays frozen; each task learns only a cheap channel-wise transform of the
conv feature maps, its batch norm and its head (reference code:
gyhandy/Channel-wise-Lightweight-Reprogramming, ``network/``):

* after a conv, before its batch norm, a depthwise 3x3 conv (one kernel per channel,
  padding 1, no bias) initialised to the identity (centre tap 1), so that before training
  the network computes exactly what the backbone computes;
* the kernels live in their own Flax collection ``clr``, stacked per task
  (``[tasks, k, k, 1, C]``) and picked by the task id; a batch mixing tasks is served in
  one call (each sample convolved with its task's kernels);
* every task has its own batch-norm affine parameters and statistics (a
  :class:`~jaxcl.models.layers.TaskNorm`, initialised from the backbone's batch norm)
  and its own head; those, and the task's CLR kernels, are all that train.

``method.variant`` (reported in the results):

* ``reduced``: after every conv except 1x1 convs (the reference code's default
  ``reduced_v1``, its README's main method);
* ``full``: after every conv (the reference's ``base``);
* ``reduced_v2``: 3x3 after k>1 convs, 1x1 (a per-channel scale) after 1x1 convs;
* ``head``: no reprogramming and the backbone's batch norm frozen: a per-task linear
  head on the frozen backbone (the linear-probe / SGD-LL baseline of the paper).

CLR is defined on conv feature maps; a Vision Transformer (``vit_*``) has none but its
patch embedding, so CLR refuses it by name (``ConfigError``) rather than guess a ViT form.

``method.task_bn=False`` keeps the backbone's batch norm shared and frozen (inference
mode) instead of per task: the setting of the PyTorch speed peer (W3).

The optional penalty is ``method.l2 * sum ||w||_2`` (the norm, not its square) over each
of the task's trainable tensors, as the reference's ``train(reg="l2")`` (lambda 1e-5);
the reference trains with Adam lr 1e-3 and a step decay x0.1 every third of the epochs
(the benchmark configs' ``method=clr`` defaults). The backbone comes from
``model.pretrained`` (a jaxcl run, e.g. ``jaxcl run pretrain``) and never changes: its
weights are outside every trainable mask and outside the gradient (``stop_gradient``),
which also spares the weight-gradient convolutions.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.methods import _intercept, base
from jaxcl.models import layers
from jaxcl.models.vit import ViT

VARIANTS = ("reduced", "full", "reduced_v2", "head")


def defaults() -> dict:
    # task_bn: every task trains its own batch norm (the reference); False keeps the
    # backbone's batch norm frozen in inference mode (../shared/peers W3's setting)
    return {"variant": "reduced", "l2": 0.0, "task_bn": True}


def identity_kernel(key, shape, dtype=jnp.float32):
    """``[tasks, k, k, 1, C]`` depthwise kernels that pass every channel through."""
    tasks, k, _, _, c = shape
    return jnp.zeros(shape, dtype).at[:, k // 2, k // 2, 0, :].set(1.0)


def dw_size(variant: str, conv_kernel: int) -> int:
    """Size of the reprogramming kernel after a conv of size ``conv_kernel`` (0: none)."""
    if variant == "head" or (variant == "reduced" and conv_kernel == 1):
        return 0
    return 1 if variant == "reduced_v2" and conv_kernel == 1 else 3


class CLRConv(layers.Conv):
    """A conv followed by its per-task depthwise reprogramming (collection ``clr``)."""

    num_tasks: int = 1
    variant: str = "reduced"

    def post(self, y, task):
        size = dw_size(self.variant, self.kernel_size)
        if not size:
            return y
        c = y.shape[-1]
        kernels = self.variable("clr", "kernel", identity_kernel, None, (self.num_tasks, size, size, 1, c)).value
        task = jnp.zeros((), jnp.int32) if task is None else jnp.asarray(task, jnp.int32)
        # kernels[task]: [k, k, 1, C] for a scalar task, [B, k, k, 1, C] (one task per sample) for a vector
        return layers.depthwise(y, kernels[task].astype(y.dtype))


def reprogramming_hook(num_tasks: int, variant: str):
    """CLRConv's ``post`` for a plain ``flax.linen.Conv`` (through interception)."""

    def hook(layer, x, y, task, call):
        size = dw_size(variant, _intercept.kernel_size(layer)) if isinstance(layer, nn.Conv) else 0
        if not size:
            return y
        kernels = layer.variable("clr", "kernel", identity_kernel, None, (num_tasks, size, size, 1, y.shape[-1])).value
        task = jnp.zeros((), jnp.int32) if task is None else jnp.asarray(task, jnp.int32)
        return layers.depthwise(y, kernels[task].astype(y.dtype))

    return hook


def _safe_norm(x):
    """||x||_2 with a zero (not NaN) gradient at x = 0, as the reference skips zero norms."""
    sq = jnp.sum(jnp.square(x))
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def refuse_vit(name: str) -> None:
    raise base.ConfigError(f"model.name={name}: CLR reprograms the feature maps of convolutions (a depthwise "
                           "conv after each); a Vision Transformer has none, so CLR does not run on it. For a "
                           "frozen ViT use sgd_ll (a linear probe) or a prompt method")


def validate(config) -> None:
    from jaxcl import models

    if config.model.name in models.VITS:
        refuse_vit(config.model.name)
    base.check_choice(config.method, "variant", VARIANTS)
    base.check_range(config.method, "l2", 0)
    if config.scenario != "task":
        raise base.ConfigError(f"scenario: CLR is task-incremental: it needs one head per task (scenario=task), "
                               f"got {config.scenario}")


def make(config, model, info) -> base.Method:
    validate(config)
    variant = config.method.variant
    if info.num_heads != info.num_tasks:
        raise ValueError("CLR is task-incremental: it needs one head per task (scenario=task)")
    num_tasks, lam = info.num_tasks, config.method.l2
    task_bn = config.method.task_bn and variant != "head"
    if isinstance(model, ViT):
        refuse_vit(config.model.name)
    plain = _intercept.is_plain(model, ("conv", "norm"))
    shapes = _intercept.collections(model, jnp.zeros((1,) + tuple(info.input_shape)))
    if plain:  # flax.linen Conv layers, reprogrammed through interception
        if not any(p[-1].key == "kernel" and w.ndim == 4 for p, w in jax.tree_util.tree_flatten_with_path(shapes)[0]):
            raise ValueError(f"CLR reprograms convolutions; model {config.model.name} has none")
        if task_bn:
            raise ValueError("CLR's per-task batch norm (method.task_bn=True) replaces the `norm` layers of a jaxcl "
                             f"model; {config.model.name} has none: pass task_bn=False (its own batch norm, if any, "
                             "then stays frozen in inference mode)")
        if variant != "head":
            model = _intercept.Intercepted(model, reprogramming_hook(num_tasks, variant))
    elif not hasattr(model, "conv") or not hasattr(model, "norm"):
        raise ValueError(f"CLR reprograms convolutions; model {config.model.name} has none")
    else:
        if variant != "head":
            model = model.clone(conv=functools.partial(CLRConv, num_tasks=num_tasks, variant=variant))
        if task_bn:
            model = model.clone(norm=functools.partial(layers.TaskNorm, num_tasks))
    base.check_task_heads("CLR", shapes["params"], num_tasks)  # only the heads, the kernels and batch norm train

    def per_task(path) -> bool:
        keys = [getattr(k, "key", None) for k in path]
        return keys[0] == "clr" or layers.is_per_task(path)

    def trainable(params, task):
        row = jnp.arange(num_tasks) == task
        return jax.tree_util.tree_map_with_path(
            lambda p, w: row.reshape((-1,) + (1,) * (w.ndim - 1)) if per_task(p) else jnp.zeros((), bool), params)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        return state.replace(trainable=trainable(state.params, jnp.int32(0)))

    def begin_task(state, task):
        return state.replace(trainable=trainable(state.params, task))

    def loss(params, state, batch, task, rng, phase):
        # the backbone is a constant: no gradient flows into (or is computed for) its weights
        params = jax.tree_util.tree_map_with_path(lambda p, w: w if per_task(p) else jax.lax.stop_gradient(w), params)
        # per-task batch norm learns; the backbone's own (linear probe, task_bn=False) stays frozen
        logits, model_state = base.apply(model, params, state.model_state, batch["x"], task, train=task_bn, rng=rng)
        ce = base.cross_entropy(logits, batch["y"], batch["mask"])
        metrics = {"ce": ce, "acc": base.accuracy(logits, batch["y"], batch["mask"])}
        total = ce
        if lam:
            norms = [_safe_norm(w[task]) for p, w in jax.tree_util.tree_flatten_with_path(params)[0] if per_task(p)]
            reg = sum(norms)
            metrics["l2_norm_penalty"] = reg
            total = ce + lam * reg
        return total, {"model_state": model_state, "metrics": metrics}

    def report(state) -> dict[str, Any]:
        return param_report(state.params, num_tasks, variant)

    return base.make("clr", config, model, init=init, begin_task=begin_task, loss=loss, report=report)


def param_report(params, num_tasks: int, variant: str) -> dict:
    """Per-task reprogramming, batch-norm and head parameters, and their share of the
    backbone (its convolutions plus one set of batch-norm affine parameters)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]

    def count(pred):
        return sum(w.size for p, w in leaves if pred([getattr(k, "key", None) for k in p]))

    clr = count(lambda k: k[0] == "clr") // num_tasks
    head = count(lambda k: "head" in k) // num_tasks
    task_bn = count(lambda k: any(isinstance(x, str) and x.startswith("task_") for x in k)) // num_tasks
    shared_bn = count(lambda k: "bn" in k)
    convs = count(lambda k: k[0] == "params" and "head" not in k and k[-1] == "kernel")
    backbone = convs + task_bn + shared_bn
    pct = (lambda n: round(100.0 * n / backbone, 4)) if backbone else (lambda n: None)
    return {"variant": variant, "clr_per_task": clr, "bn_per_task": task_bn, "head_per_task": head,
            "backbone": backbone, "clr_pct_of_backbone": pct(clr),
            "clr_bn_pct_of_backbone": pct(clr + task_bn), "all_per_task_pct_of_backbone": pct(clr + task_bn + head)}


def count_for(model_name: str, variant: str, num_outputs: int = 10, input_shape=(32, 32, 3)) -> dict:
    """The parameter report of ``variant`` on a model from :mod:`jaxcl.models`, from
    shapes only (no arrays allocated): for the accounting in the docs and tests."""
    from jaxcl import models
    from jaxcl.data import StreamInfo

    info = StreamInfo(num_tasks=1, scenario="task", input_shape=tuple(input_shape), num_heads=1,
                      num_outputs=num_outputs, classes_per_head=(num_outputs,), task_classes=(num_outputs,))
    model = models.build(_ModelCfg(model_name), info)
    if variant != "head":
        model = model.clone(conv=functools.partial(CLRConv, num_tasks=1, variant=variant),
                            norm=functools.partial(layers.TaskNorm, 1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape))))
    return param_report({k: v for k, v in shapes.items() if k != "batch_stats"}, 1, variant)


class _ModelCfg:
    def __init__(self, name):
        self.name, self.init, self.dtype, self.width = name, "torch", "float32", 0
        self.hidden, self.activation, self.dropout = (400, 400), "relu", 0.0

