"""PackNet (Mallya & Lazebnik, CVPR 2018): tasks packed into one network by magnitude pruning.

As the reference code (arunmallya/packnet, ``src/prune.py``) does it:

* One integer per prunable weight (every conv and dense kernel of the trunk; heads are
  per task and never pruned; a single head shared by all tasks, in the domain- and
  class-incremental scenarios, is pruned like the trunk, as Avalanche's recipe does)
  names the task that owns it, ``0`` = free. Task t's view of
  the network is every weight whose owner is in ``1..t+1`` (owners are 1-based); that
  mask tree is derived from the owner tree, never stored per task.
* Training task t: the free weights are handed to t and only the weights t owns are
  trainable. The loop masks the *update* after the optimizer, so momentum and weight
  decay cannot move a frozen weight by a single bit.
* After training task t: per layer, among the weights t owns, take the k-th smallest
  magnitude (``k = round(fraction * owned)``) as cutoff and free every one with
  ``|w| <= cutoff`` (ties go with the cutoff, as the reference), setting them to zero;
  then retrain the survivors for ``retrain_epochs`` (the freed weights stay exactly
  zero); they are frozen from the next task on.
* ``method.prune`` is the per-task schedule of fractions: one value for every task, or
  one per task; a value <= 0 (``-1``) means: do not prune after that task (and no
  retraining). ``()`` gives every task an equal share of the trunk, whatever
  ``num_tasks`` is: task t frees ``(T-1-t)/(T-t)`` of what it took, the last keeps all. Avalanche's Tiny-ImageNet proportions are
  ``(0.90, 0.88, 0.87, 0.85, 0.83, 0.80, 0.75, 0.66, 0.50, 0.00)``.
* Biases and batch norm are trained on the first task only and frozen after (the
  reference's default; batch norm runs in inference mode from the second task on: the
  later tasks' phases are named ``train-frozen-bn``/``retrain-frozen-bn``). With
  ``method.task_norm``, every task has its own batch-norm affine parameters and
  statistics instead (a :class:`~jaxcl.models.layers.TaskNorm` in every unit).
* On a Vision Transformer the prunable kernels are every dense layer's: the patch
  embedding (a dense layer on flattened patches), qkv, the attention projection and the
  MLP's two; LayerNorms, biases, the cls token and the position embedding follow the
  bias rule (first task only); ``task_norm`` is refused (a ViT has no batch norm).
* Inference for task t applies t's mask and head; a batch mixing tasks is served in one
  compiled call (one masked forward per task present in the batch).

The k-th smallest magnitude is found by bisection on the float bits (32 vectorised
counting passes), which is exact and needs no sort.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.methods import base
from jaxcl.models import layers


def defaults() -> dict:
    return {
        "prune": (0.5,),  # fraction of a task's weights freed after it, per task (<= 0: keep all)
        "retrain_epochs": 1,  # epochs of retraining the survivors after pruning
        "retrain_lr": 0.0,  # learning rate of the retraining (0: the optimizer's schedule)
        "retrain_milestones": (),  # retraining epochs at which its lr *= optimizer.gamma
        "task_norm": False,  # per-task batch norm instead of first-task-only batch norm
    }


def schedule(prune, num_tasks: int) -> np.ndarray:
    """``method.prune`` as one fraction per task (``()``: equal shares of the trunk)."""
    fr = [float(f) for f in (prune if isinstance(prune, (tuple, list)) else (prune,))]
    if not fr:
        fr = [(num_tasks - 1 - t) / (num_tasks - t) for t in range(num_tasks - 1)] + [-1.0]
    fr = list(base.per_task(fr, num_tasks, "prune", "fractions given"))
    base.need(all(f < 1.0 for f in fr), "prune", f"fractions must be < 1 (<= 0 means no pruning), got {fr}")
    return np.asarray(fr, np.float32)


def validate(config) -> None:
    m = config.method
    schedule(m.prune, config.num_tasks)
    base.check_range(m, "retrain_epochs", 0)
    base.check_range(m, "retrain_lr", 0)
    base.need(all(e >= 0 for e in m.retrain_milestones), "retrain_milestones",
              f"epochs must be >= 0, got {m.retrain_milestones}")


def kth_smallest_bits(bits: jax.Array, k: jax.Array) -> jax.Array:
    """The k-th smallest (1-based) of ``bits`` (uint32; excluded entries 0xFFFFFFFF),
    by bisection: the smallest v with count(bits <= v) >= k."""

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    return lo


def prune_layer(w: jax.Array, owner: jax.Array, who: jax.Array, fraction: jax.Array):
    """Free the ``fraction`` of ``w``'s weights owned by ``who`` with the smallest
    magnitude (ties with the cutoff included). Returns (w, owner)."""
    owned = owner == who
    n = jnp.sum(owned, dtype=jnp.int32)
    k = jnp.floor(fraction * n.astype(jnp.float32) + 0.5).astype(jnp.int32)  # round half up, as Python 2
    bits = jax.lax.bitcast_convert_type(jnp.abs(w).astype(jnp.float32), jnp.uint32)
    bits = jnp.where(owned, bits, jnp.uint32(0xFFFFFFFF))
    cutoff = kth_smallest_bits(bits.reshape(-1), k)
    remove = owned & (bits <= cutoff) & (k > 0)
    return jnp.where(remove, jnp.zeros_like(w), w), jnp.where(remove, jnp.zeros_like(owner), owner)


def make(config, model, info) -> base.Method:
    validate(config)
    num_tasks = info.num_tasks
    fractions = schedule(config.method.prune, num_tasks)
    frac_arr = jnp.asarray(fractions)
    task_norm = config.method.task_norm
    if task_norm:
        if not hasattr(model, "norm"):
            raise ValueError(f"method.task_norm needs a model with batch norm; {config.model.name} has none (per-task "
                             "batch norm replaces the `norm` layers of a jaxcl model); pass task_norm=False")
        model = model.clone(norm=functools.partial(layers.TaskNorm, num_tasks))
    owner_dtype = jnp.uint8 if num_tasks < 255 else jnp.uint16
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(info.input_shape))))
    shared_bn = bool(jax.tree_util.tree_leaves(shapes.get("batch_stats", {})))
    if info.num_heads == num_tasks > 1:  # else task 2 would train on the head task 1 froze
        base.check_task_heads("PackNet", shapes["params"], num_tasks)
    retrain = base.Phase("retrain", base.epochs(config, config.method.retrain_epochs),
                         config.method.retrain_lr or None, tuple(config.method.retrain_milestones))
    train_phase = base.Phase("train", base.epochs(config))
    # Shared batch norm learns on the first task only; later tasks run it on its statistics.
    # Their phases carry the suffix FROZEN_BN, so batch norm's mode is static in each
    # compiled step (a traced switch would pay the learning mode's backward pass always).
    FROZEN_BN = "-frozen-bn"

    shared_head = info.num_heads == 1  # domain/class-incremental: one head, pruned like the trunk

    def prunable(path, leaf) -> bool:
        keys = [getattr(k, "key", None) for k in path]
        return (keys[0] == "params" and keys[-1] == "kernel" and leaf.ndim >= 2
                and ("head" not in keys or shared_head))

    def trainable(state, task):
        """Which parameters task ``task`` may change: the kernels it owns, its rows of
        the per-task leaves, and everything else only on the first task."""
        who = (task + 1).astype(owner_dtype)
        row = jnp.arange(num_tasks) == task

        def leaf(path, w, o):
            if o.ndim:
                return o == who
            if layers.is_per_task(path) and w.shape[:1] == (num_tasks,):
                return row.reshape((-1,) + (1,) * (w.ndim - 1))
            return task == 0

        return jax.tree_util.tree_map_with_path(leaf, state.params, state.extra["owner"])

    def init(rng, x):
        state = base.init_state(model, rng, x)
        owner = jax.tree_util.tree_map_with_path(
            lambda p, w: jnp.zeros(w.shape if prunable(p, w) else (), owner_dtype), state.params)
        state = state.replace(extra={"owner": owner})
        return state.replace(trainable=trainable(state, jnp.int32(0)))  # the shapes every later state has

    def begin_task(state, task):
        who = (task + 1).astype(owner_dtype)
        owner = jax.tree_util.tree_map(lambda o: jnp.where(o == 0, who, o) if o.ndim else o, state.extra["owner"])
        state = state.replace(extra={**state.extra, "owner": owner})
        return state.replace(trainable=trainable(state, task))

    def loss(params, state, batch, task, rng, phase):
        train = not phase.endswith(FROZEN_BN)  # static: batch norm learns, or runs on its statistics
        logits, model_state = base.apply(model, params, state.model_state, batch["x"], task, train=train, rng=rng)
        ce = base.cross_entropy(logits, batch["y"], batch["mask"])
        return ce, {"model_state": model_state,
                    "metrics": {"ce": ce, "acc": base.accuracy(logits, batch["y"], batch["mask"])}}

    def after_phase(state, task, phase):
        if not phase.startswith("train"):  # retraining done: the survivors are frozen by the next begin_task
            return state
        who = (task + 1).astype(owner_dtype)
        fraction = frac_arr[task]
        pruned = jax.tree_util.tree_map(
            lambda w, o: prune_layer(w, o, who, fraction) if o.ndim else (w, o),
            state.params, state.extra["owner"])
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        params = jax.tree_util.tree_map(lambda t: t[0], pruned, is_leaf=is_pair)
        owner = jax.tree_util.tree_map(lambda t: t[1], pruned, is_leaf=is_pair)
        state = state.replace(params=params, extra={**state.extra, "owner": owner})
        return state.replace(trainable=trainable(state, task))  # survivors only: freed weights stay 0

    def masked(params, owner, task):
        who = (task + 1).astype(owner_dtype)
        return jax.tree_util.tree_map(
            lambda w, o: jnp.where((o >= 1) & (o <= who), w, jnp.zeros_like(w)) if o.ndim else w, params, owner)

    def predict_one(state, x, task):
        params = masked(state.params, state.extra["owner"], task)
        return base.apply(model, params, state.model_state, x, task, train=False)[0]

    def predict(state, x, task):
        task = jnp.asarray(task, jnp.int32)
        if task.ndim == 0:
            return predict_one(state, x, task)
        out = jnp.zeros((x.shape[0], info.num_outputs), jnp.float32)

        def body(k, out):
            here = task == k
            logits = jax.lax.cond(jnp.any(here), lambda: predict_one(state, x, k), lambda: out)
            return jnp.where(here[:, None], logits, out)

        return jax.lax.fori_loop(0, num_tasks, body, out)

    def phases(task: int):
        ps = (train_phase, retrain) if fractions[task] > 0 and retrain.epochs > 0 else (train_phase,)
        if task > 0 and not task_norm and shared_bn:
            ps = tuple(p._replace(name=p.name + FROZEN_BN) for p in ps)
        return ps

    def report(state):
        owner = [o for o in jax.tree_util.tree_leaves(state.extra["owner"]) if o.ndim]
        n = sum(o.size for o in owner)
        counts = sum(jnp.bincount(o.reshape(-1).astype(jnp.int32), length=num_tasks + 1) for o in owner)
        per_task = [x for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
                    if layers.is_per_task(path) and x.shape[:1] == (num_tasks,)]
        per_task_bytes = sum(x.size * x.dtype.itemsize for x in per_task) // num_tasks
        return {
            "prunable_weights": int(n),
            "owner_index_bytes": int(n * jnp.dtype(owner_dtype).itemsize),  # all tasks together
            "bytes_per_added_task": int(per_task_bytes),  # its head (and batch norm), nothing per weight
            "bytes_if_one_bool_mask_per_task": int(n),
            "fraction_free": counts[0] / n,
            "fraction_owned": counts[1:] / n,
            "prune_schedule": fractions.tolist(),
        }

    return base.make("packnet", config, model, init=init, begin_task=begin_task, loss=loss,
                     after_phase=after_phase, predict=predict, phases=phases, report=report)
