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
reads an optional ``source_logits``. Anything else is refused by name, and so are a label
outside its task's classes and a task id outside ``[0, num_tasks)`` (see :class:`Trainer`).

The model follows :data:`jaxcl.methods.base.PROTOCOL`; ``train`` may be keyword-only and
``task`` left out (:func:`jaxcl.methods.base.protocol_model`).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import config as config_lib
from jaxcl import xla
from jaxcl.data import StreamInfo
from jaxcl.methods import base
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
    model = base.protocol_model(model)  # keyword-only train is adapted; no train argument is refused
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
    info = stream_info(model, sample, c.num_tasks, scenario, classes_per_task)
    with warnings.catch_warnings():
        # the trunk may still be loaded into the state: jaxcl.trainer looks at the first step
        warnings.simplefilter("ignore", base.UntrainedBackboneWarning)
        made = module.make(c, model, info)
    return made._replace(info=info)


def stream_info(model, sample, num_tasks: int, scenario: str, classes_per_task=None) -> StreamInfo:
    """The :class:`~jaxcl.data.StreamInfo` a method needs, read from a sample and the
    model's output on it."""
    x = jnp.asarray(sample["x"] if isinstance(sample, Mapping) else sample)
    model = base.protocol_model(model)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x[:1], jnp.zeros((), jnp.int32),
                                                        False)[0])
    if not hasattr(out, "shape") or len(out.shape) != 2:
        got = jax.tree_util.tree_map(lambda a: f"{a.dtype}{list(a.shape)}", out)
        raise base.ModelError(f"{type(model).__name__} must return logits [batch, outputs] from "
                              f"{base.PROTOCOL}; on a batch of 1 it returned {got}")
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

    Checked: a task id outside ``[0, num_tasks)`` (every call), a label outside its
    task's classes or a per-sample task id outside the stream (``step`` and the
    consolidation batches; on the host before dispatch, see :func:`check_values_of`), and a
    loss that went NaN or infinite in any step since ``init`` (``end_phase`` and
    ``predict`` raise :class:`~jaxcl.train.NonFiniteLossError` naming the step,
    ``state.bad_step``). A method training on a frozen backbone (CLR, SGD-LL) warns
    (:class:`~jaxcl.methods.base.UntrainedBackboneWarning`) at the first step when the
    backbone is still the random initialisation ``init`` made.
    """

    method: Method
    init: Callable[..., State]
    begin_task: Callable[..., State]
    step: Callable[..., tuple]
    end_phase: Callable[..., State]
    predict: Callable[..., jax.Array]


def trainer(method: Method, tx, *, augment: bool = False, check_values: bool = True) -> Trainer:
    """A :class:`Trainer` of ``method`` with the optax optimizer ``tx`` (``augment``:
    random crop and flip of image batches on device, as ``data.augment``).

    ``check_values=False`` skips the label and per-sample task id checks of every batch
    (their cost, measured by ``benchmarks/own_loop_checks.py``, is in
    ``benchmarks/RESULTS.md``); a label outside its task's classes then trains silently
    (towards the last class for -1, to NaN for one too large). Task ids given as
    arguments, batch keys, shapes and dtypes, and the NaN check are always on."""
    from jaxcl import train  # the loop's own train step: one definition of the masked update

    shape: dict[str, Any] = {}
    info = method.info
    trunk: dict[str, Any] = {}  # a frozen trunk's leaf as init made it, until the first step
    step_fn = xla.jit(train.make_train_step(method, tx, augment), donate_argnums=0, static_argnums=3)
    begin = xla.jit(method.begin_task)
    after = xla.jit(method.after_phase, static_argnums=2)
    consolidate = xla.jit(method.consolidate, static_argnums=3) if method.consolidate else None
    reset = xla.jit(lambda s: s.replace(opt_state=tx.init(s.params)))
    predict = xla.jit(method.predict)

    def init(rng, x) -> State:
        x = jnp.asarray(x)
        shape["x"] = tuple(x.shape[1:])
        state = xla.jit(lambda r, x: reset(method.init(r, x)))(rng, x)
        trunk.clear()
        if method.frozen_backbone:
            trunk.update(_frozen_leaf(state))
        return state

    def task_id(task, where: str) -> int:
        return check_task(task, info, where)

    def phase_name(task, phase) -> str:
        names = [p.name for p in method.phases(int(task))]
        name = phase.name if isinstance(phase, Phase) else (names[0] if phase is None else phase)
        if name not in names:
            raise ValueError(f"phase {name!r} is not a phase of task {int(task)} for {method.name} "
                             f"(method.phases({int(task)}): {', '.join(names)})")
        return name

    def batch_of(batch, task):
        b = checked_keys(batch, task, shape.get("x"), method.name)
        return to_device(check_values_of(b, task, info) if check_values else b)

    def step(state, batch, task, phase=None):
        task = task_id(task, "step")
        b = batch_of(batch, task)
        name = phase_name(task, phase)
        if trunk:
            _warn_untrained(trunk, state, method.name)
            trunk.clear()
        return step_fn(state, b, jnp.int32(task), name)

    def end_phase(state, task, phase=None, batches: Iterable = ()):
        task = task_id(task, "end_phase")
        name = phase_name(task, phase)
        check_finite(state, f"task {task}, phase {name!r}")
        if consolidate is not None:
            n = 0
            for batch in batches:
                state = consolidate(state, batch_of(batch, task), jnp.int32(task), name)
                n += 1
            if not n:
                raise ValueError(f"{method.name} consolidates over the task's data after each phase: pass the "
                                 "task's training batches to end_phase(state, task, phase, batches)")
        return reset(after(state, jnp.int32(task), name))

    def begin_task(state, task):
        return reset(begin(state, jnp.int32(task_id(task, "begin_task"))))

    def predict_fn(state, x, task):
        x = jnp.asarray(x)
        if np.ndim(task) == 0 and not isinstance(task, str):
            task = task_id(task, "predict")
        elif not isinstance(task, str):  # one per sample
            check_task_ids(task, info, "predict: task")
        check_finite(state, "predict")
        return predict(state, x, task)

    return Trainer(method=method, init=init, begin_task=begin_task, step=step, end_phase=end_phase,
                   predict=predict_fn)


def check_task(task, info: StreamInfo | None, where: str = "task") -> int:
    """``task`` (a task id given to a :class:`Trainer` call) as an int, or a ValueError
    naming it when it is not a task of the stream."""
    try:
        t = int(task)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: task {task!r} is not a task id (an int, 0 .. num_tasks - 1)") from None
    if info is not None and not 0 <= t < info.num_tasks:
        raise ValueError(f"{where}: task {t} is not a task of this stream (num_tasks={info.num_tasks}: task ids "
                         f"0 .. {info.num_tasks - 1})")
    return t


def check_task_ids(task, info: StreamInfo | None, key: str = "batch['task']") -> None:
    """Per-sample task ids (fetched to the host when on a device): all in
    ``[0, num_tasks)``, or a ValueError naming the first that is not."""
    if info is None:
        return
    t = np.asarray(task)
    bad = np.flatnonzero((t < 0) | (t >= info.num_tasks))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{key}: task id {int(t.reshape(-1)[i])} (sample {i}) is not a task of this stream "
                         f"(num_tasks={info.num_tasks}: task ids 0 .. {info.num_tasks - 1})")


def check_values_of(batch: dict, task: int, info: StreamInfo | None) -> dict:
    """``batch`` (as :func:`checked_keys` returns it) after checking its values on the host:
    every sample's task id in ``[0, num_tasks)`` and its label among its task's classes
    (``0 .. task_classes[t] - 1``; in the class scenario the stream-wide ids
    ``class_offsets[t] ..``). Padding samples (mask 0) are not checked: their label and
    task id are set to the task's first class and ``task`` (a label out of range would
    make the masked loss NaN). A ValueError names the first bad value otherwise."""
    if info is None:
        return batch
    y, tids, real = np.asarray(batch["y"]), np.asarray(batch["task"]), np.asarray(batch["mask"]) != 0
    check_task_ids(np.where(real, tids, task), info)
    safe = np.where(real, tids, task)
    width = np.asarray(info.task_classes)[safe]
    low = np.asarray(info.class_offsets)[safe] if info.scenario == "class" else np.zeros_like(safe)
    out = (y < low) | (y >= low + width)
    bad = np.flatnonzero(out & real)
    if bad.size:
        i = int(bad[0])
        t, lo, hi = int(safe[i]), int(low[i]), int(low[i] + width[i] - 1)
        where = ("labels are stream-wide in the class scenario: task t's classes are class_offsets[t] .. "
                 "class_offsets[t] + task_classes[t] - 1; give batch['task'] when a batch mixes tasks"
                 if info.scenario == "class" else "labels count from 0 within each task")
        raise ValueError(f"batch['y']: label {int(y[i])} (sample {i}, task {t}) is not one of the task's classes "
                         f"{lo} .. {hi} ({where})")
    if (out | (tids != safe)).any():  # padding with a label or task id out of range: made harmless
        first = (np.asarray(info.class_offsets)[task] if info.scenario == "class" else 0)
        batch = {**batch, "y": np.where(real, y, first).astype(np.int32), "task": safe.astype(np.int32)}
    return batch


def check_finite(state: State, where: str) -> None:
    """Raise :class:`~jaxcl.train.NonFiniteLossError` when a step of ``state`` had a loss
    that was not finite (``state.bad_step >= 0``, the first such global step)."""
    from jaxcl.train import NonFiniteLossError

    bad = int(jax.device_get(state.bad_step))
    if bad >= 0:
        raise NonFiniteLossError(
            f"the loss is not finite (NaN or inf) at global step {bad} (state.bad_step; {where}, state.step "
            f"{int(jax.device_get(state.step))}): that step and every one after it updated the state from a "
            "non-finite loss, so its parameters (NaN, in general) and predictions mean nothing. Lower the learning rate (or check the data: "
            "inputs, labels) and train again from "
            + (f"a state kept from before step {bad}" if bad else "the start (the very first step failed)"))


def _frozen_leaf(state: State) -> dict:
    """A frozen trunk's smallest weight matrix or kernel (not a head's), copied to the
    host: what the first step compares to see whether the trunk was ever loaded."""
    from jaxcl.models import layers

    flags = dict(jax.tree_util.tree_flatten_with_path(state.trainable)[0])
    leaves = [(w.size, path, w) for path, w in jax.tree_util.tree_flatten_with_path(state.params)[0]
              if getattr(path[0], "key", None) == "params" and np.ndim(w) >= 2 and not layers.is_per_task(path)
              and np.ndim(flags.get(path, True)) == 0 and not bool(flags.get(path, True))]
    if not leaves:
        return {}
    _, path, w = min(leaves, key=lambda item: item[0])
    return {"path": path, "value": np.asarray(w)}


def _warn_untrained(trunk: dict, state: State, method_name: str) -> None:
    leaf = dict(jax.tree_util.tree_flatten_with_path(state.params)[0]).get(trunk["path"])
    if leaf is not None and np.array_equal(np.asarray(leaf), trunk["value"]):
        name = "state.params" + jax.tree_util.keystr(trunk["path"])
        warnings.warn(
            f"method {method_name} trains on a frozen backbone, and this state's backbone is its random initialisation "
            f"({name} is as init made it): load a pretrained trunk into the state before the first step (README, "
            "From Python: jaxcl.models.torch_weights.load_pretrained, from a torchvision/timm .safetensors file or "
            "an earlier run's workdir; on the command line, model.pretrained)", base.UntrainedBackboneWarning,
            stacklevel=3)


def check_batch(batch, task, input_shape=None, method_name: str = "") -> dict:
    """``batch`` as the train step takes it (``mask`` and ``task`` filled in), or a
    ValueError naming the key that is missing, unknown or of the wrong shape or dtype."""
    return to_device(checked_keys(batch, task, input_shape, method_name))


def to_device(batch: dict) -> dict:
    """A checked batch as the train step's device arrays (int32 labels and task ids,
    float32 mask)."""
    kinds = {"y": jnp.int32, "task": jnp.int32, "mask": jnp.float32}
    return {k: jnp.asarray(v, kinds[k]) if k in kinds else v for k, v in batch.items()}


def checked_keys(batch, task, input_shape=None, method_name: str = "") -> dict:
    """:func:`check_batch` without the move to the device: the arrays as given (numpy
    or jax), ``mask`` and ``task`` filled in."""
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
        out[key] = v
    if "source_logits" in batch:
        out["source_logits"] = batch["source_logits"]
    return out


__all__ = ["BATCH_KEYS", "Trainer", "check_batch", "check_finite", "check_task", "check_task_ids", "check_values_of",
           "method", "stream_info", "trainer"]
