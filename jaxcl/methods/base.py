"""The method contract: what every continual-learning method in jaxcl is.

A method is a module ``jaxcl/methods/<name>.py`` with three functions:

* ``defaults() -> dict``: its hyperparameters and their defaults (they become the keys
  of ``config.method``);
* ``validate(config)``: refuses a setting no run can use with a :class:`ConfigError`
  naming its key (``jaxcl.config.validate`` calls it, so a bad value stops before any
  data is loaded; ``make`` calls it too);
* ``make(config, model, info) -> Method``: a factory that closes over the run config,
  the Flax model and the stream's :class:`~jaxcl.data.StreamInfo`, and returns a
  :class:`Method`, a NamedTuple of pure, jittable functions over a :class:`State`.

The training loop (:mod:`jaxcl.train`) drives every method the same way::

    state = init(rng, x)                               # once
    for task t:
        state = begin_task(state, t)
        for phase in phases(t):                        # Phase(name, epochs, lr, milestones)
            for each batch:                            # ONE jitted step, t traced
                grads = grad(loss)(state.params, state, batch, t, rng, phase.name)
                grads = transform_grads(grads, state, batch, t, rng, phase.name)
                updates = optimizer(grads)
                params = where(state.trainable, params + updates, params)
                state = after_step(state, aux, batch, t, rng, phase.name)
            if consolidate: for each batch of task t: state = consolidate(state, batch, t, phase.name)
            state = after_phase(state, t, phase.name)
        evaluate: predict(state, x, task_ids)

The task id ``t`` is a traced int32 (changing task never recompiles); the phase name is
a static string (one compiled step per kind of phase).
``state.trainable`` is a boolean tree over ``state.params``; a leaf is either a scalar
(the whole array) or an array of the parameter's shape (per-element masks, PackNet).
The loop applies it *after* the optimizer, so momentum and weight decay never move a
frozen weight. To add a method, copy ``finetune.py``.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any
# Model collections updated by the forward pass rather than by gradients.
STATE_COLLECTIONS = ("batch_stats",)


class ConfigError(ValueError):
    """A config key is unknown or holds a value the run cannot use (raised by each
    method's ``validate`` and by :mod:`jaxcl.config`, which re-exports it)."""


class ModelError(ValueError):
    """A model breaks the model protocol, or lacks what a method needs of it."""


class UntrainedBackboneWarning(UserWarning):
    """A method that trains only on top of a frozen backbone (CLR, SGD-LL) is about to
    train on a backbone that was never trained: its random initialisation."""


@flax.struct.dataclass
class State:
    params: PyTree  # every collection the loss is differentiated in: {'params': ..., 'clr': ...}
    model_state: PyTree  # collections the forward pass updates: {'batch_stats': ...}
    opt_state: PyTree
    trainable: PyTree  # bool tree over params (see module docstring)
    extra: PyTree  # the method's own arrays: anchors, Fisher, replay memory, owner masks, ...
    step: jax.Array  # global train step
    rng: jax.Array  # base key; step keys are fold_in(rng, step)
    bad_step: jax.Array  # first step whose loss was not finite, -1 if none


class Phase(NamedTuple):
    """One training phase of a task: ``epochs`` over the task's data. ``name`` is what the
    method's functions receive as ``phase`` (static: a method may compile different code
    per phase name). ``lr`` (with its own step ``milestones``, in epochs of the phase)
    replaces the optimizer's schedule for this phase; ``None`` keeps ``config.optimizer``'s."""

    name: str
    epochs: int
    lr: Optional[float] = None
    milestones: tuple = ()


class Method(NamedTuple):
    name: str
    # init allocates every array at its final shape: later functions may change values,
    # never shapes (the loop compiles once and restores checkpoints into init's shapes)
    init: Callable[[jax.Array, jax.Array], State]
    begin_task: Callable[[State, jax.Array], State]
    loss: Callable[..., tuple[jax.Array, dict]]  # (params, state, batch, task, rng, phase)
    transform_grads: Callable[..., Any]  # (grads, state, batch, task, rng, phase): e.g. A-GEM's projection
    after_step: Callable[..., State]  # (state, aux, batch, task, rng, phase); aux: the loss's aux plus
    # 'grads' (the loss gradient, before transform_grads) and 'prev_params' (before the update)
    consolidate: Optional[Callable[..., State]]  # (state, batch, task, phase), over the task's data
    after_phase: Callable[[State, jax.Array, str], State]
    predict: Callable[[State, jax.Array, jax.Array], jax.Array]  # (state, x, task) -> logits
    phases: Callable[[int], tuple]  # task index -> (Phase, ...)
    data: str  # 'current' (the task's data) or 'cumulative' (all tasks seen so far)
    report: Optional[Callable[[State], dict]]  # method-specific figures for results.json
    # the stream the method was made for (jaxcl.method and jaxcl.methods.build fill it in):
    # jaxcl.trainer checks task ids and labels against it
    info: Any = None
    # trains only on top of a backbone it never changes (CLR, SGD-LL): one that was never
    # trained is warned about (make: no model.pretrained; jaxcl.trainer: at the first step)
    frozen_backbone: bool = False


# ----------------------------------------------------------------------------- helpers


def init_state(model, rng: jax.Array, x: jax.Array, extra: PyTree = None) -> State:
    """Initialise the model's variables and an everything-trainable State."""
    k_params, k_dropout, k_state = jax.random.split(rng, 3)
    variables = model.init({"params": k_params, "dropout": k_dropout}, x, jnp.zeros((), jnp.int32), False)
    params = {k: v for k, v in variables.items() if k not in STATE_COLLECTIONS}
    model_state = {k: v for k, v in variables.items() if k in STATE_COLLECTIONS}
    return State(
        params=params,
        model_state=model_state,
        opt_state=None,
        trainable=jax.tree_util.tree_map(lambda _: jnp.ones((), bool), params),
        extra={} if extra is None else extra,
        step=jnp.zeros((), jnp.int32),
        rng=k_state,
        bad_step=-jnp.ones((), jnp.int32),
    )


def apply(model, params: PyTree, model_state: PyTree, x, task, *, train: bool, rng=None):
    """Forward pass; returns (logits, new model_state). Batch statistics are updated
    only in train mode."""
    variables = {**params, **model_state}
    rngs = {"dropout": rng} if rng is not None else {}
    if train and model_state:
        logits, new = model.apply(variables, x, task, train, rngs=rngs, mutable=list(model_state))
        return logits, {**model_state, **new}
    return model.apply(variables, x, task, train, rngs=rngs), model_state


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy over the samples with mask 1."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if mask is None:
        return ce.mean()
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def accuracy(logits, labels, mask=None):
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if mask is None:
        return hit.mean()
    return (hit * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def classification_loss(model, *, per_sample_task: bool = False):
    """The plain objective: cross-entropy of the model in train mode on the batch.
    The head is chosen by the task being learned, or per sample (``per_sample_task``)
    when batches mix tasks."""

    def loss(params, state: State, batch, task, rng, phase):
        t = batch["task"] if per_sample_task else task
        logits, model_state = apply(model, params, state.model_state, batch["x"], t, train=True, rng=rng)
        ce = cross_entropy(logits, batch["y"], batch["mask"])
        return ce, {"model_state": model_state, "metrics": {"ce": ce, "acc": accuracy(logits, batch["y"], batch["mask"])}}

    return loss


def default_predict(model):
    def predict(state: State, x, task):
        return apply(model, state.params, state.model_state, x, task, train=False)[0]

    return predict


def _identity_task(state, task):
    return state


def _identity_step(state, aux, batch, task, rng, phase):
    return state


def _identity_grads(grads, state, batch, task, rng, phase):
    return grads


def _identity_phase(state, task, phase):
    return state


def epochs(config, n: int | None = None) -> int:
    """Epochs of a phase: ``n`` (default ``config.epochs``), 1 in online mode."""
    return 1 if config.online else (config.epochs if n is None else n)


def make(name: str, config, model, *, init=None, loss=None, transform_grads=None, begin_task=None,
         after_step=None, consolidate=None, after_phase=None, predict=None, phases=None, data: str = "current",
         report=None, frozen_backbone: bool = False) -> Method:
    """A Method with the plain behaviour wherever a function is not given.
    ``frozen_backbone``: the method trains only on top of the model's trunk, which it
    never changes; without ``model.pretrained`` that is warned about
    (:class:`UntrainedBackboneWarning`)."""
    if frozen_backbone:
        warn_untrained_backbone(name, config)
    single = (Phase("train", epochs(config)),)
    return Method(
        name=name,
        init=init or (lambda rng, x: init_state(model, rng, x)),
        begin_task=begin_task or _identity_task,
        loss=loss or classification_loss(model, per_sample_task=data == "cumulative"),
        transform_grads=transform_grads or _identity_grads,
        after_step=after_step or _identity_step,
        consolidate=consolidate,
        after_phase=after_phase or _identity_phase,
        predict=predict or default_predict(model),
        phases=phases or (lambda task: single),
        data=data,
        report=report,
        frozen_backbone=frozen_backbone,
    )


def stack_like(tree: PyTree, n: int) -> PyTree:
    """Zeros with a leading axis of size ``n`` for every leaf (per-task state)."""
    return jax.tree_util.tree_map(lambda p: jnp.zeros((n,) + p.shape, p.dtype), tree)


def tree_set(stacked: PyTree, index, tree: PyTree) -> PyTree:
    """``stacked[index] = tree`` leaf by leaf, with a traced index."""
    return jax.tree_util.tree_map(lambda s, v: s.at[index].set(v.astype(s.dtype)), stacked, tree)


# ----------------------------------------------------------------------------- settings checks


def need(ok: bool, key: str, message: str) -> None:
    """Refuse ``method.<key>`` with ``message`` unless ``ok``. A traced value (a
    ``--sweep`` setting, each of whose values was checked as a number) passes."""
    if isinstance(ok, jax.core.Tracer):
        return
    if not ok:
        raise ConfigError(f"method.{key}: {message}")


def check_range(m, key: str, low: float, *, strict: bool = False) -> None:
    """``m[key] >= low`` (``> low`` when ``strict``)."""
    v = m[key]
    need(v > low if strict else v >= low, key, f"must be {'>' if strict else '>='} {low}, got {v}")


def check_choice(m, key: str, allowed) -> None:
    need(m[key] in allowed, key, f"{m[key]!r} is not one of {', '.join(allowed)}")


def per_task(values, num_tasks: int, key: str, what: str = "values") -> tuple:
    """A per-task setting as one value per task: one value is repeated for every task;
    otherwise there must be exactly ``num_tasks``."""
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    if len(values) == 1:
        return values * num_tasks
    need(len(values) == num_tasks, key, f"{len(values)} {what} for {num_tasks} tasks (give 1 or {num_tasks})")
    return values


def warn_untrained_backbone(method: str, config) -> None:
    """Warn (:class:`UntrainedBackboneWarning`, once) when ``method`` trains on a frozen
    backbone and ``config.model.pretrained`` gives none: the run would learn only on top
    of random features. (``jaxcl.trainer`` checks your own loop's state at its first step
    instead, as you may load the trunk into the state yourself.)"""
    if not config.model.get("pretrained", ""):
        warnings.warn(f"method {method} trains only on top of a frozen backbone and model.pretrained is empty: the backbone "
                      "stays its random initialisation. Set model.pretrained to a torchvision/timm .safetensors file "
                      "or an earlier jaxcl run's workdir (`jaxcl run pretrain` trains a trunk)",
                      UntrainedBackboneWarning, stacklevel=4)


# ----------------------------------------------------------------------------- the model protocol


HEADS_HOW = ("end the model in jaxcl.models.Heads(num_tasks, num_outputs, name='head') called with the task id, "
             "or give each per-task parameter a leading axis of num_tasks under a module named 'head'")


def check_task_heads(method: str, params: PyTree, num_tasks: int) -> None:
    """Refuse a model without one head per task (a method that trains or keeps a head per
    task would otherwise share, or freeze, the only head there is)."""
    from jaxcl.models import layers

    named = [(p, w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0] if layers.is_per_task(p)]
    wrong = [jax.tree_util.keystr(p) for p, w in named if tuple(w.shape[:1]) != (num_tasks,)]
    if not named or wrong:
        found = "no per-task head" if not named else f"{wrong[0]} without a leading axis of {num_tasks}"
        raise ValueError(f"{method} keeps one head per task (scenario=task) and the model has {found}: {HEADS_HOW}")


PROTOCOL = "__call__(self, x, task=None, train=False)"


def _signature(model) -> str:
    try:
        return f"__call__{inspect.signature(type(model).__call__)}"
    except (TypeError, ValueError):
        return "__call__ (signature unreadable)"


class KeywordModel:
    """A model whose ``__call__`` takes ``train`` (and ``task``, if at all) by keyword,
    called the way methods call every model: ``init``/``apply(variables, x, task, train)``
    positionally. The variables are the model's own (nothing is nested); any other
    attribute is the model's (``model.clone(unit=...)`` clones the model and keeps the
    adapter)."""

    def __init__(self, model, takes_task: bool):
        self.model, self.takes_task = model, takes_task

    def _call(self, fn, first, x, task, train, kw):
        extra = {"task": task} if self.takes_task else {}
        return fn(first, x, train=train, **extra, **kw)

    def init(self, rngs, x, task=None, train=False, **kw):
        return self._call(self.model.init, rngs, x, task, train, kw)

    def init_with_output(self, rngs, x, task=None, train=False, **kw):
        return self._call(self.model.init_with_output, rngs, x, task, train, kw)

    def apply(self, variables, x, task=None, train=False, **kw):
        return self._call(self.model.apply, variables, x, task, train, kw)

    def clone(self, **kw):
        return type(self)(self.model.clone(**kw), self.takes_task)

    def __getattr__(self, name):
        if name == "model":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self):
        return f"KeywordModel({self.model!r})"


def protocol_model(model):
    """``model`` as methods call it (``model.apply(variables, x, task, train)``), or a
    :class:`ModelError` naming the protocol and the model's signature.

    Accepted: ``__call__(x, task=None, train=False)`` (called as is), and a ``train``
    taken by keyword, with or without ``task``: ``__call__(x, *, train)``,
    ``__call__(x, task=None, *, train=False)``, ``__call__(x, train=False)`` (wrapped in
    :class:`KeywordModel`). A model without a ``train`` argument is refused."""
    if isinstance(model, KeywordModel):
        return model
    call = getattr(type(model), "__call__", None)
    try:
        sig = inspect.signature(call)
    except (TypeError, ValueError):
        return model  # a builtin or C callable: nothing to read, called as is
    params = list(sig.parameters.values())[1:]  # after self
    kinds = inspect.Parameter
    positional = [p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    named = {p.name: p.kind for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)}
    var_kw = any(p.kind == kinds.VAR_KEYWORD for p in params)
    var_pos = any(p.kind == kinds.VAR_POSITIONAL for p in params)
    takes_x = bool(positional) or var_pos
    if positional[2:3] == ["train"] or var_pos and "train" not in named:
        return model  # x, task, train by position: called as is
    if takes_x and (named.get("train", kinds.POSITIONAL_ONLY) != kinds.POSITIONAL_ONLY or var_kw):
        # train (and task) by keyword; the adapter takes the model's class name for messages
        adapter = type(type(model).__name__, (KeywordModel,), {"__module__": KeywordModel.__module__})
        return adapter(model, takes_task="task" in named or var_kw)
    lacks = ("no train argument (True while training: dropout on, batch statistics updated; False to evaluate)"
             if takes_x else "no positional input x")
    raise ModelError(f"{type(model).__name__} breaks the model protocol, {PROTOCOL} (train may be keyword-only, "
                     f"task may be left out): its {_signature(model)} takes {lacks}")
