"""jaxcl inside your own JAX code: a method from keyword settings, and a train step for
your own loop.

>>> import jax, jax.numpy as jnp, optax, flax.linen as nn
>>> import jaxcl
>>> class MyMLP(nn.Module):
...     @nn.compact
...     def __call__(self, x, task=None, train=False):
...         return nn.Dense(4)(nn.relu(nn.Dense(16)(x.reshape(len(x), -1))))
>>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros((8,), jnp.int32)}
>>> method = jaxcl.method("ewc", MyMLP(), batch, num_tasks=2, scenario="domain", ewc_lambda=10.0)
>>> loop = jaxcl.trainer(method, optax.sgd(0.1))
>>> state = loop.init(jax.random.PRNGKey(0), batch["x"])
>>> state = loop.begin_task(state, 0)
>>> for phase in method.phases(0):
...     state, metrics = loop.step(state, batch, 0, phase)
...     state = loop.end_phase(state, 0, phase, [batch])
>>> loop.predict(state, batch["x"], 0).shape
(8, 4)

A batch is a dict: ``x`` (float inputs ``[B, ...]``, the shape of the sample the method
was made with), ``y`` (int labels ``[B]``; in the task scenario a task's labels count from
0), and optionally ``mask`` (``[B]``, 1 for a real sample, 0 for padding; default ones)
and ``task`` (int ``[B]``, each sample's task; default the task being learned). ResCL also
reads an optional ``source_logits``. Anything else is refused by name.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import config as config_lib
from jaxcl.data import StreamInfo
from jaxcl.methods.base import Method, Phase, State

BATCH_KEYS = ("x", "y", "mask", "task")


def method(name: str, model, sample, *, num_tasks: int, scenario: str = "task", classes_per_task=None,
           epochs: int = 1, online: bool = False, **settings) -> Method:
    """The method ``name`` (``jaxcl.methods.available()``) for your Flax ``model``.

    ``sample``: a batch (or just its ``x``) of the data you will train on; the input shape
    and the number of outputs are read from it and from the model's output on it.
    ``scenario``: ``task`` (a head per task, task id given), ``class`` or ``domain`` (one
    head). ``classes_per_task``: an int or one per task (default: every output in the
    task and domain scenarios, an equal share of the outputs in the class scenario).
    ``epochs``: the epochs of each phase (``method.phases(t)``). ``settings``: the
    method's hyperparameters (``jaxcl.methods.<name>.defaults()``); a misspelt key, a
    value of the wrong type or out of range is refused by name.

    This builds the same config the command line builds and calls the same
    ``make(config, model, info)``.
    """
    c = config_lib.base_config()
    c.num_tasks, c.scenario, c.epochs, c.online = int(num_tasks), scenario, int(epochs), bool(online)
    c.model.name = type(model).__name__
    module = config_lib.method_module(name)
    defaults = module.defaults()
    settings = {k: (v,) if isinstance(defaults.get(k), tuple) and not isinstance(v, (tuple, list)) else v
                for k, v in settings.items()}  # prune=0.5 for prune=(0.5,)
    c = config_lib.finalize(c, f"method={name}", {name: {f"method.{k}": v for k, v in settings.items()}})
    if scenario not in config_lib.SCENARIOS:
        raise config_lib.ConfigError(f"scenario: {scenario!r} is not one of {', '.join(config_lib.SCENARIOS)}")
    if num_tasks < 1 or epochs < 1:
        raise config_lib.ConfigError(f"num_tasks and epochs must be >= 1, got {num_tasks} and {epochs}")
    module.validate(c)
    return module.make(c, model, stream_info(model, sample, c.num_tasks, scenario, classes_per_task))


def stream_info(model, sample, num_tasks: int, scenario: str, classes_per_task=None) -> StreamInfo:
    """The :class:`~jaxcl.data.StreamInfo` a method needs, read from a sample and the
    model's output on it."""
    x = jnp.asarray(sample["x"] if isinstance(sample, Mapping) else sample)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x[:1], jnp.zeros((), jnp.int32),
                                                        False)[0])
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise ValueError(f"{type(model).__name__} must return logits [batch, outputs] from "
                         "__call__(x, task=None, train=False); it returned {out}")
    outputs = int(out.shape[-1])
    if classes_per_task is None:
        if scenario == "class" and outputs % num_tasks:
            raise ValueError(f"classes_per_task: {outputs} outputs do not split evenly into {num_tasks} tasks; "
                             "give classes_per_task (one int per task)")
        classes_per_task = outputs // num_tasks if scenario == "class" else outputs
    per_task = tuple(int(n) for n in (classes_per_task if isinstance(classes_per_task, (tuple, list))
                                      else (classes_per_task,) * num_tasks))
    if len(per_task) != num_tasks or max(per_task) > outputs or (scenario == "class" and sum(per_task) > outputs):
        raise ValueError(f"classes_per_task: {classes_per_task} does not fit {num_tasks} tasks and the model's "
                         f"{outputs} outputs")
    heads = num_tasks if scenario == "task" else 1
    return StreamInfo(num_tasks=num_tasks, scenario=scenario, input_shape=tuple(x.shape[1:]), num_heads=heads,
                      num_outputs=outputs, classes_per_head=per_task if heads > 1 else (outputs,),
                      task_classes=per_task)


# ----------------------------------------------------------------------------- your own loop


class Trainer(NamedTuple):
    """The contract of :mod:`jaxcl.methods.base` as five jitted calls for your own loop.

    * ``init(rng, x) -> State``: ready to train (optimizer state included);
    * ``begin_task(state, task) -> State``: the method's task set-up, fresh optimizer state;
    * ``step(state, batch, task, phase) -> (state, metrics)``: one train step: the method's
      loss and gradient transform, the optimizer, the update masked by
      ``state.trainable`` (frozen weights keep their bits), ``after_step`` with its aux;
      ``phase`` is a :class:`Phase` of ``method.phases(task)`` or its name (default: the
      task's first); the batch is checked (see the module docstring);
    * ``end_phase(state, task, phase, batches) -> State``: the consolidation pass over
      ``batches`` (the task's training data, for the methods that have one: EWC), then
      ``after_phase`` (PackNet prunes, EWC stores its anchor, ...), fresh optimizer state;
    * ``predict(state, x, task) -> logits``: ``task`` a scalar or one per sample.
    """

    method: Method
    init: Callable[..., State]
    begin_task: Callable[..., State]
    step: Callable[..., tuple]
    end_phase: Callable[..., State]
    predict: Callable[..., jax.Array]


def trainer(method: Method, tx, *, augment: bool = False) -> Trainer:
    """A :class:`Trainer` of ``method`` with the optax optimizer ``tx`` (``augment``:
    random crop and flip of image batches on device, as ``data.augment``)."""
    from jaxcl import train  # the loop's own train step: one definition of the masked update

    shape: dict[str, Any] = {}
    step_fn = jax.jit(train.make_train_step(method, tx, augment), donate_argnums=0, static_argnums=3)
    begin = jax.jit(method.begin_task)
    after = jax.jit(method.after_phase, static_argnums=2)
    consolidate = jax.jit(method.consolidate, static_argnums=3) if method.consolidate else None
    reset = jax.jit(lambda s: s.replace(opt_state=tx.init(s.params)))
    predict = jax.jit(method.predict)

    def init(rng, x) -> State:
        x = jnp.asarray(x)
        shape["x"] = tuple(x.shape[1:])
        return jax.jit(lambda r, x: reset(method.init(r, x)))(rng, x)

    def phase_name(task, phase) -> str:
        names = [p.name for p in method.phases(int(task))]
        name = phase.name if isinstance(phase, Phase) else (names[0] if phase is None else phase)
        if name not in names:
            raise ValueError(f"phase {name!r} is not a phase of task {int(task)} for {method.name} "
                             f"(method.phases({int(task)}): {', '.join(names)})")
        return name

    def step(state, batch, task, phase=None):
        b = check_batch(batch, task, shape.get("x"), method.name)
        return step_fn(state, b, jnp.int32(task), phase_name(task, phase))

    def end_phase(state, task, phase=None, batches: Iterable = ()):
        name = phase_name(task, phase)
        if consolidate is not None:
            n = 0
            for batch in batches:
                state = consolidate(state, check_batch(batch, task, shape.get("x"), method.name), jnp.int32(task),
                                    name)
                n += 1
            if not n:
                raise ValueError(f"{method.name} consolidates over the task's data after each phase: pass the "
                                 "task's training batches to end_phase(state, task, phase, batches)")
        return reset(after(state, jnp.int32(task), name))

    return Trainer(method=method, init=init, begin_task=lambda state, task: reset(begin(state, jnp.int32(task))),
                   step=step, end_phase=end_phase, predict=lambda state, x, task: predict(state, jnp.asarray(x), task))


def check_batch(batch, task, input_shape=None, method_name: str = "") -> dict:
    """``batch`` as the train step takes it (``mask`` and ``task`` filled in), or a
    ValueError naming the key that is missing, unknown or of the wrong shape or dtype."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch: expected a dict with keys x, y (and optionally mask, task), got {type(batch).__name__}")
    allowed = BATCH_KEYS + (("source_logits",) if method_name == "rescl" else ())
    unknown = sorted(set(batch) - set(allowed))
    if unknown:
        raise ValueError(f"batch: unknown key(s) {', '.join(map(repr, unknown))}; a batch has {', '.join(allowed)}")
    for key in ("x", "y"):
        if key not in batch:
            raise ValueError(f"batch: missing {key!r} (a batch has x: inputs [B, ...], y: int labels [B])")
    x = batch["x"] if hasattr(batch["x"], "dtype") else np.asarray(batch["x"])
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"batch['x']: dtype {x.dtype}, expected a float dtype (scale and normalise your inputs)")
    n = x.shape[0] if x.ndim else 0
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"batch['x']: shape {tuple(x.shape)}, expected [B, {', '.join(map(str, input_shape))}] "
                         "(the shape init was given)")
    out = {"x": x}
    for key, kind, default in (("y", "int", None), ("mask", "float", lambda: np.ones(n, np.float32)),
                               ("task", "int", lambda: np.full(n, int(task), np.int32))):
        v = batch[key] if key in batch else default()
        v = v if hasattr(v, "dtype") else np.asarray(v)
        if tuple(v.shape) != (n,):
            raise ValueError(f"batch[{key!r}]: shape {tuple(v.shape)}, expected ({n},): one per sample of x")
        if kind == "int" and not jnp.issubdtype(v.dtype, jnp.integer):
            raise ValueError(f"batch[{key!r}]: dtype {v.dtype}, expected an integer dtype")
        if kind == "float" and not (jnp.issubdtype(v.dtype, jnp.floating) or v.dtype == bool):
            raise ValueError(f"batch[{key!r}]: dtype {v.dtype}, expected float (1 = real sample, 0 = padding)")
        out[key] = jnp.asarray(v, jnp.int32 if kind == "int" else jnp.float32)
    if "source_logits" in batch:
        out["source_logits"] = batch["source_logits"]
    return out


__all__ = ["BATCH_KEYS", "Trainer", "check_batch", "method", "stream_info", "trainer"]
