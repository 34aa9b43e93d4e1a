"""The continual-learning loop: one compiled call of K train steps for every task.

Sections: compiled functions, set-up (streams, model, method, mesh, feed), state (fresh
or restored), evaluation, one task, results, and :func:`run` tying them together.
For each task:

    begin_task -> epochs of compiled calls, each K train steps (a lax.scan, or unrolled on
    CPU for conv models: loop.chunk; task id traced: no recompilation when the task changes) -> consolidation pass (if the
    method has one) -> after_phase (per phase) -> evaluate every task, seen and unseen
    -> one row of the accuracy matrix -> checkpoint -> log

Data: the stream sits in device memory when it fits (``data.on_device``) and every
batch is gathered, normalised and augmented there; otherwise batches are made on the
host. Both paths draw the same samples in the same order (see :mod:`jaxcl.data.feed`).

Seeds: ``config.seeds`` (``jaxcl run --seeds 0 1 2``) trains every seed in one program:
the State gets a leading run axis and every compiled function is ``vmap``-ed over it.
Each seed writes ``seed_<k>/`` with a single run's files; ``summary.json`` holds the
mean and standard deviation over seeds. ``mesh.runs`` splits that run axis over groups
of devices, each group running the vmap over its own runs (:meth:`Setup.per_group`) or,
with ``loop.run_axis=map``, its runs one after another (:func:`run_map`).

A non-finite loss stops the run with :class:`NonFiniteLossError` naming the seed, task,
phase, epoch and step; the checkpoints written before it are kept, so nothing is lost.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcl import checkpoint as ckpt_lib
from jaxcl import config as config_lib
from jaxcl import data, distributed, logs, methods, metrics, models, optim, report, sharding, xla
from jaxcl.data import feed as feed_lib
from jaxcl.data import pipeline as pipeline_lib
from jaxcl.methods.base import State
from jaxcl.models import torch_weights

# How many times each compiled function was traced (a new trace means a recompile);
# read by the tests that check that changing task does not recompile.
TRACES: collections.Counter = collections.Counter()
AUTO_STEPS_PER_CALL = 64  # the most steps one call runs when loop.steps_per_call=auto


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class RunError(RuntimeError):
    """The run cannot start as asked (workdir state, resume)."""


@dataclasses.dataclass
class Position:
    """Where the stream is: the next batch (slot) to train on."""

    task: int = 0
    phase: int = 0
    epoch: int = 0
    batch: int = 0


# ----------------------------------------------------------------------------- compiled functions


def make_train_step(method: methods.Method, tx, augment: bool) -> Callable:
    """``(state, batch, task, phase) -> (state, metrics)``; ``task`` is traced, ``phase``
    (the phase's name) is static: one compiled step per kind of phase, for every task."""

    def train_step(state: State, batch: dict, task: jax.Array, phase: str):
        TRACES["train_step"] += 1
        rng = jax.random.fold_in(state.rng, state.step)
        if augment:
            batch = {**batch, "x": data.augment(batch["x"], jax.random.fold_in(rng, 1))}
        (loss, aux), grads = jax.value_and_grad(method.loss, has_aux=True)(
            state.params, state, batch, task, rng, phase)
        grads_raw = grads
        grads = method.transform_grads(grads, state, batch, task, rng, phase)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # Masking after the optimizer: a frozen weight keeps its exact bits whatever the
        # optimizer's momentum or weight decay would have done.
        params = jax.tree_util.tree_map(
            lambda p, u, m: jnp.where(m, p + u.astype(p.dtype), p), state.params, updates, state.trainable)
        finite = jnp.isfinite(loss)
        new = state.replace(
            params=params,
            opt_state=opt_state,
            model_state=aux.get("model_state", state.model_state),
            step=state.step + 1,
            bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step),
        )
        # after_step also sees the loss gradient (before transform_grads) and the
        # parameters before the update (SI's path integral); unused, XLA drops them
        new = method.after_step(new, {**aux, "grads": grads_raw, "prev_params": state.params}, batch, task, rng, phase)
        return new, {"loss": loss, **aux.get("metrics", {})}

    return train_step


def _batch(resident: bool, src, item) -> dict:
    """The batch an item stands for: gathered from the resident stream, or the item."""
    return feed_lib.gather(src, item["idx"], item["valid"]) if resident else item


def make_train_chunk(method: methods.Method, tx, augment: bool, resident: bool, unrolled: bool = False) -> Callable:
    """``(state, src, xs, task, phase) -> (state, metrics [K])``: the train step over the
    K items of ``xs``; a step whose ``xs["active"]`` is False leaves the state as it is
    (the padding of a chunk shorter than K) and reports zeros.

    ``unrolled=False``: a ``lax.scan`` whose body is a ``lax.cond`` (one copy of the step
    compiled; padding steps skipped). ``unrolled=True``: K copies of the step in a row and
    the padding masked arithmetically (``jnp.where`` over the new state and metrics), so
    that no step sits inside a loop or a conditional: XLA:CPU runs a convolution there
    ~20x slower (its weight-gradient convolutions keep a layout it has no fast kernel for),
    see ``loop.chunk``. Both compute the same numbers."""
    train_step = make_train_step(method, tx, augment)

    def train_chunk(state: State, src, xs: dict, task: jax.Array, phase: str):
        TRACES["train_chunk"] += 1
        # the step traced once per chunk, whichever copies and shape queries use it (jit's
        # trace cache: same function, same argument types); inlined, so the program is
        # what calling the step directly gives
        step = jax.jit(functools.partial(train_step, phase=phase), inline=True)
        if unrolled:
            outs = []
            for k in range(xs["active"].shape[0]):
                x = jax.tree_util.tree_map(lambda a: a[k], xs)
                new, out = step(state, _batch(resident, src, x["item"]), task)
                state = jax.tree_util.tree_map(lambda n, o: jnp.where(x["active"], n, o), new, state)
                outs.append(jax.tree_util.tree_map(lambda v: jnp.where(x["active"], v, jnp.zeros_like(v)), out))
            return state, jax.tree_util.tree_map(lambda *v: jnp.stack(v), *outs)
        first = jax.tree_util.tree_map(lambda a: a[0], xs["item"])
        shapes = jax.eval_shape(lambda s, b: step(s, b, task)[1], state, _batch(resident, src, first))
        idle = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(state, x):
            batch = _batch(resident, src, x["item"])
            return jax.lax.cond(x["active"], lambda s: step(s, batch, task), lambda s: (s, idle), state)

        return jax.lax.scan(body, state, xs)

    return train_chunk


def _jaxpr_has_convolution(jaxpr) -> bool:
    """Whether ``jaxpr`` computes a convolution anywhere (nested calls, custom gradients
    and control flow included)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns") and _jaxpr_has_convolution(sub):
                    return True
    return False


def run_map(S, make: Callable, in_axes, donate_argnums=(), out_shardings=None) -> Callable:
    """``loop.run_axis=map``: the function of all runs (stacked on a leading run axis,
    as :meth:`Setup.lift`'s) made of ``make(method, tx)``'s one-run function, jitted once
    and called for each run in turn on its slices of the arguments whose ``in_axes`` is
    0 (the others are shared), the outputs stacked. Each run computes exactly its single
    run's program; no convolution is batched over runs (XLA:CPU runs a ``vmap``-ed one as
    a grouped convolution, ~7x slower than the runs one after another). A swept value
    enters as a traced argument, so every run shares one compiled program.

    With several run groups (``mesh.runs`` = G) the groups go side by side and the runs
    of each group one after another: call i computes run i of every group, one run per
    group (:meth:`Setup.per_group` of the one-run function), so G devices each train a
    run at the same time and no value crosses groups (slicing and stacking stay inside
    each group's block of runs)."""
    R, G, axes = S.R, S.mesh.shape["runs"], tuple(in_axes)
    n = R // G  # runs per group
    donate = tuple(d + 1 for d in np.atleast_1d(donate_argnums).tolist())
    hp = {k: np.asarray(v, np.float32) for k, v in S.hp.items()}  # [R] each ({} without a sweep), split as the runs
    fn = None if hp else make(S.method, S.tx)

    def one_run(h, *args):
        if not hp:
            return fn(*args)
        m, tx = _built(S, h)
        return make(m, tx)(*args)

    tree_map, stacked = jax.tree_util.tree_map, {"out_shardings": out_shardings} if out_shardings is not None else {}
    if G == 1:  # one run's own program: wrapped as below, 8 ResNet seeds trained in 250 s, not 207 (measured once)
        one = xla.jit(one_run, donate_argnums=donate)
        split = jax.jit(lambda args: [tree_map(lambda a: a[r], args) for r in range(R)])
        stack = jax.jit(lambda outs: tree_map(lambda *o: jnp.stack(o), *outs), **stacked)
    else:  # every array below is [R, ...] or [G, ...] (one run of each group), split along runs
        def one_of_each(h, *args):  # the one run a group holds in this call (a block of 1 along runs)
            args = [tree_map(lambda a: a[0], a) if ax == 0 else a for a, ax in zip(args, axes)]
            return tree_map(lambda a: a[None], one_run(tree_map(lambda a: a[0], h), *args))

        one = xla.jit(S.per_group(one_of_each, (0, *axes)), donate_argnums=donate)
        split = jax.jit(S.per_group(lambda args: [tree_map(lambda a: a[i:i + 1], args) for i in range(n)], (0,)))
        stack = jax.jit(S.per_group(lambda outs: tree_map(lambda *o: jnp.concatenate(o), *outs), (0,)), **stacked)

    def call(*args):
        runs = split([hp, *[a for a, ax in zip(args, axes) if ax == 0]])
        outs = []
        for i in range(n):
            h, *mine = runs[i]
            mine = iter(mine)
            outs.append(one(h, *[next(mine) if ax == 0 else a for a, ax in zip(args, axes)]))
        return stack(outs)

    return call


def make_eval_step(method: methods.Method, resident: bool = False) -> Callable:
    """``(state, src, item, task) -> number of correct predictions`` (padding excluded)."""

    def eval_step(state: State, src, item: dict, task: jax.Array):
        TRACES["eval_step"] += 1
        batch = _batch(resident, src, item)
        logits = method.predict(state, batch["x"], task)
        hit = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return jnp.sum(hit * batch["mask"])

    return eval_step


def make_consolidate(method: methods.Method, resident: bool) -> Callable:
    def consolidate(state: State, src, item: dict, task: jax.Array, phase: str):
        return method.consolidate(state, _batch(resident, src, item), task, phase)

    return consolidate


# ----------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Setup:
    """Everything a run needs that is not state: built once from the config."""

    config: object
    seeds: tuple  # the seed of each run; runs are trained together
    settings: list  # the swept values of each run ({} when nothing is swept)
    multi: bool  # seeds or a sweep were asked for: a folder per run and a summary
    streams: list  # the distinct streams
    run_stream: list  # run r trains on streams[run_stream[r]]
    info: object
    model: object
    method: methods.Method
    mesh: object
    tx: object
    feed: feed_lib.Feed
    steps_per_call: int
    src: dict  # resident splits on the device (empty on the host path)
    fns: dict  # compiled functions, per phase where the phase is static
    run_configs: list = dataclasses.field(default_factory=list)  # each run's own config (its seed and setting)
    hp: dict = dataclasses.field(default_factory=dict)  # swept values traced into the program: KEY -> [R]
    state_sharding: object = None  # a NamedSharding per State leaf (sharding.RULES)
    chunk: str = "scan"  # how a compiled call runs its steps: loop.chunk with auto resolved (_loop_kinds)
    run_axis: str = "vmap"  # how several runs share the program: loop.run_axis with auto resolved
    groups_why: str = ""  # why the mesh has its number of run groups (auto_runs)
    init_make: Callable = None  # _make_init's, made once

    @property
    def R(self) -> int:
        return len(self.seeds)

    @property
    def num_tasks(self) -> int:
        return len(self.streams[0])

    def lift(self, make: Callable, in_axes):
        """``make(method, tx)``'s function as it is for one run, ``vmap``-ed over the
        leading run axis for several. When a sweep varies a method or optimizer value,
        each run's method and optimizer are built inside the vmap from its traced value.
        With several run groups (``mesh.runs``) each group runs that vmap over its own
        runs only (:meth:`per_group`)."""
        if not self.hp:
            fn = make(self.method, self.tx)
            return fn if self.R == 1 else self.per_group(jax.vmap(fn, in_axes=in_axes), in_axes)
        hp = {k: jnp.asarray(v, jnp.float32) for k, v in self.hp.items()}

        def one(h, *args):
            m, tx = _built(self, h)
            return make(m, tx)(*args)

        fn = self.per_group(jax.vmap(one, in_axes=(0, *in_axes)), (0, *in_axes))
        return lambda *args: fn(hp, *args)

    def per_group(self, fn: Callable, in_axes):
        """``fn`` (vmapped over runs) run by every run group on its block of runs: a
        ``shard_map`` manual over ``runs`` only, so that ``data`` and ``fsdp`` stay
        automatic inside the group and no value can cross groups (XLA's partitioner,
        left to itself, all-gathers a vmapped convolution's kernels across runs)."""
        if self.mesh.shape["runs"] == 1:
            return fn
        from jax.sharding import PartitionSpec as P

        specs = tuple(P("runs") if a == 0 else P() for a in in_axes)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P("runs"), axis_names={"runs"},
                             check_vma=False)

    def jit(self, make: Callable, in_axes, **jit_kw):
        """The compiled function of all runs: ``jax.jit`` of :meth:`lift` (one run, or
        ``loop.run_axis=vmap``: each run group's vmap, :meth:`per_group`), or with ``map``
        :func:`run_map` (one run's function compiled once and called for each run of a group
        in turn, the groups side by side)."""
        if self.R == 1 or self.run_axis == "vmap":
            return xla.jit(self.lift(make, in_axes), **jit_kw)
        return run_map(self, make, in_axes, **jit_kw)

    def run_dir(self, workdir: Path, r: int) -> Path:
        if not self.multi:
            return workdir
        d = workdir / config_lib.setting_name(self.settings[r]) if self.settings[r] else workdir
        return d / f"seed_{self.seeds[r]}" if self.config.seeds or not self.settings[r] else d

    def run_words(self, r: int) -> str:
        if not self.multi:
            return ""
        return " ".join(filter(None, [config_lib.setting_name(self.settings[r]),
                                      f"seed {self.seeds[r]}" if self.config.seeds else ""])) + ", "

    def pool_tasks(self, t: int):
        return range(t + 1) if self.method.data == "cumulative" else t


def _streams(config, seeds: tuple) -> tuple[list, list]:
    """(distinct streams, index of each run's stream). A stream whose content does not
    depend on the seed is built once and shared by every run."""
    depends = (config.data.stream == "permuted" or config.data.shuffle_classes
               or config.data.train_limit or config.data.test_limit)
    distinct = list(dict.fromkeys(seeds)) if depends else [seeds[0]]
    streams = [data.build(_with_seed(config, s)) for s in distinct]
    if len({s.info for s in streams}) > 1:
        raise data.DataError("seeds: the stream's shape differs between seeds (tasks, classes or input shape); "
                             "train these seeds in separate runs")
    return streams, [distinct.index(s) if depends else 0 for s in seeds]


def _with_seed(config, seed: int):
    return config_lib.override(config, [f"seed={seed}"]) if config.seed != seed else config


def _built(S: Setup, values: dict):
    """The method and optimizer of a run whose swept values are ``values`` (traced)."""
    import ml_collections

    c = ml_collections.ConfigDict(S.config.to_dict(), type_safe=False)
    for key, v in values.items():
        *path, leaf = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[leaf] = v
    return methods.build(c, S.model, S.info), optim.make(c.optimizer)


def auto_runs(config, n_runs: int, pipeline: str = "memory") -> tuple[int, str]:
    """``mesh.runs`` with -1 (auto) resolved, and why: the most run groups that divide
    both the runs and the devices ``mesh.data`` and ``mesh.fsdp`` leave, so runs spread
    over devices before batches split (no collective between groups); each group then
    ``vmap``-s its runs or, with ``loop.run_axis=map`` (auto's choice for a convolutional
    step on CPU), runs them one after another. One group with the grain pipeline over
    several processes (it feeds every run from every process)."""
    if config.mesh.runs != -1:
        return config.mesh.runs, "mesh.runs as set"
    per_group = config.mesh.fsdp * max(config.mesh.data, 1)
    free = jax.device_count() // per_group if jax.device_count() % per_group == 0 else 1
    if n_runs == 1 or free == 1:
        return 1, f"auto: {n_runs} run(s), {free} group(s) of devices free"
    if jax.process_count() > 1 and pipeline == "grain":
        return 1, "auto: the grain pipeline feeds every run from every process"
    groups = max(g for g in range(1, free + 1) if n_runs % g == 0 and free % g == 0)
    return groups, f"auto: {n_runs} runs over {free} free device group(s)"


def _loop_kinds(S: Setup, conv_cpu: bool) -> tuple[str, str]:
    """``loop.chunk`` and ``loop.run_axis`` with ``auto`` resolved. On CPU, when the model
    computes a convolution (``conv_cpu``; then so does its train step): ``unrolled``
    (XLA:CPU runs one inside a loop or a conditional ~20x slower) and ``map`` (~7x slower
    ``vmap``-ed over runs, as a grouped convolution); see benchmarks/RESULTS.md, issue 18.
    Otherwise ``scan`` (one compiled copy of the step: the point of the device loop on
    GPU/TPU, and as fast on CPU for dense models) and ``vmap`` (all runs in one batched
    program)."""
    chunk, axis = S.config.loop.chunk, S.config.loop.run_axis
    chunk = ("unrolled" if conv_cpu else "scan") if chunk == "auto" else chunk
    axis = ("map" if conv_cpu else "vmap") if axis == "auto" else axis
    return chunk, axis


def _auto_steps_per_call(S: Setup) -> int:
    """K for ``loop.steps_per_call=auto``. An unrolled chunk compiles K copies of the
    step and runs them no faster than one (a convolutional step costs far more than a
    call: the cnn on split_cifar10 compiled in 22 s / 31 s / 54 s for K = 1 / 2 / 4 at the
    same time per step), so K = 1 there. In a scan, one run skips a chunk's padding steps
    (a ``lax.cond``), so K is as large as allowed, never more than the shortest task's
    epoch. Runs stacked by ``vmap`` compute a padding step like any other, so K then
    minimises the steps computed plus a few steps' worth of overhead per call."""
    if S.chunk == "unrolled":
        return 1
    B = S.config.batch_size
    slots = [max(S.feed.size(r, "train", S.pool_tasks(t)) // B for r in range(S.R)) for t in range(S.num_tasks)]
    if S.R == 1:
        return max(1, min(AUTO_STEPS_PER_CALL, min(slots)))

    def cost(k):
        return sum(-(-n // k) * (k + 4) for n in slots)

    return min(range(1, AUTO_STEPS_PER_CALL + 1), key=lambda k: (cost(k), -k))


def _check_input_shape(model, info, config) -> bool:
    """Refuse, by name, images the model cannot take (say, too small for its pooling).
    Returns whether the model's forward computes a convolution, read from the same trace
    (the loop's ``auto`` choices on CPU, :func:`_loop_kinds`)."""
    x = jnp.zeros((1,) + tuple(info.input_shape), jnp.float32)
    task = jnp.zeros((), jnp.int32)
    where = f"model.name={config.model.name} cannot take images of shape {tuple(info.input_shape)} " \
            "(data.image_size / data.image_shape)"

    def forward():  # init runs the forward once, keeping every module's output
        return model.init(jax.random.PRNGKey(0), x, task, False, capture_intermediates=True,
                          mutable=True)["intermediates"]

    try:
        traced, inner = jax.make_jaxpr(forward, return_shape=True)()
    except Exception as e:  # noqa: BLE001 - the model's own error, named in our words below
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise data.DataError(f"{where}: {first}") from None
    empty = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_flatten_with_path(inner)[0] if 0 in a.shape]
    if empty:  # pooled down to nothing: the loss would be NaN
        raise data.DataError(f"{where}: {empty[0]} has an empty output (the image is too small for its pooling)")
    return _jaxpr_has_convolution(traced.jaxpr)


def setup(config) -> Setup:
    settings = config_lib.sweep_settings(config)
    runs = [(st, seed) for st in settings for seed in config_lib.run_seeds(config)]
    seeds = tuple(seed for _, seed in runs)
    multi = bool(config.seeds or config.sweep)
    run_configs = [config_lib.override(config, [f"seed={seed}"] + [f"{k}={v!r}" for k, v in st.items()])
                   if multi else config for st, seed in runs]
    streams, run_stream = _streams(config, seeds)
    info = streams[0].info
    model = models.build(config.model, info)
    conv = _check_input_shape(model, info, config)
    # runs share one program; a single run takes its own (swept) values as constants
    base = run_configs[0] if len(runs) == 1 else config
    method = methods.build(base, model, info)
    tx = optim.make(base.optimizer)
    conv_cpu = conv and jax.devices()[0].platform == "cpu"
    smallest = min(len(t.x_train) for s in streams for t in s.tasks)
    if smallest < config.batch_size:
        raise data.DataError(f"batch_size={config.batch_size} is larger than the smallest task's "
                             f"{smallest} training samples; lower batch_size")
    feed = pipeline_lib.make(config, streams, run_stream)
    groups, groups_why = auto_runs(config, len(runs), getattr(feed, "pipeline", "memory"))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, groups)
    sharding.check_runs(len(runs), mesh)
    sharding.check_batch(config.batch_size, mesh, "batch_size")
    sharding.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
    feed.place(*sharding.process_block(mesh, len(runs)))  # this process's runs and rows of every item
    S = Setup(config, seeds, [st for st, _ in runs], multi, streams, run_stream, info, model, method, mesh,
              tx, feed, 1, {}, {}, run_configs, groups_why=groups_why)
    if S.R > 1:  # the swept values the program computes with (the learning rate is set per epoch instead)
        S.hp = {k: np.asarray([st[k] for st, _ in runs], np.float32) for k in settings[0] if k != "optimizer.lr"}
    S.chunk, S.run_axis = _loop_kinds(S, conv_cpu)
    S.steps_per_call = config_lib.steps_per_call(config) or _auto_steps_per_call(S)
    # a resident copy per run (seed-dependent streams) is split along `runs` with the runs
    # (each process holds its runs' copies only)
    src_sharding = sharding.runs_sharding(mesh, int(feed.per_run))
    S.src = {split: (sharding.put_local if feed.per_run else sharding.put)(feed.src(split), src_sharding)
             for split in ("train", "test") if feed.src(split) is not None}
    feed.drop_host_copies()  # the resident arrays now live on the device
    if S.hp:
        _check_sweep(S)
    S.state_sharding = sharding.state_shardings(jax.eval_shape(S.lift(_make_init(S), (0,)), _keys(S)), mesh,
                                                lead=int(S.R > 1), min_bytes=config.mesh.min_shard_bytes)
    _compile(S)
    return S


def _compile(S: Setup) -> None:
    """The jitted functions; those with a static phase are made per phase on first use.
    Every output with a leading run axis stays split along ``runs`` (metrics, hits), so
    no compiled function gathers one run group's numbers onto another."""
    st, lead = S.state_sharding, int(S.R > 1)
    per_run = sharding.runs_sharding(S.mesh, lead)  # [R, ...] outputs; replicated for one run
    res, aug = S.feed.resident, S.config.data.augment
    ia = 0 if S.feed.per_run else None  # evaluation/consolidation items: per run or shared
    sa = ia if res else None  # resident arrays: per run when the streams differ

    def per_phase(make, in_axes, **jit):
        return functools.lru_cache(None)(
            lambda phase: S.jit(lambda m, tx: functools.partial(make(m, tx), phase=phase), in_axes, **jit))

    unrolled = S.chunk == "unrolled"
    S.fns["train"] = per_phase(lambda m, tx: make_train_chunk(m, tx, aug, res, unrolled), (0, sa, 0, None),
                               donate_argnums=0, out_shardings=(st, per_run))
    S.fns["eval"] = S.jit(lambda m, tx: make_eval_step(m, res), (0, sa, ia, None), out_shardings=per_run)
    S.fns["begin_task"] = S.jit(lambda m, tx: m.begin_task, (0, None), donate_argnums=0, out_shardings=st)
    S.fns["after_phase"] = per_phase(lambda m, tx: m.after_phase, (0, None), donate_argnums=0, out_shardings=st)
    if S.method.consolidate is not None:
        S.fns["consolidate"] = per_phase(lambda m, tx: make_consolidate(m, res), (0, sa, ia, None),
                                         donate_argnums=0, out_shardings=st)
    S.fns["reset_opt"] = S.jit(lambda m, tx: tx.init, (0,), out_shardings=st.opt_state)
    S.fns["set_lr"] = jax.jit(lambda state, lr: state.replace(opt_state=optim.with_lr(state.opt_state, lr)),
                              donate_argnums=0, out_shardings=st)


def _check_sweep(S: Setup) -> None:
    """Refuse, before training, a swept key the program cannot take as a traced number
    (a method that branches on it in Python, or sizes an array by it)."""
    sample = _sample(S)
    xs = S.feed.train_items(S.pool_tasks(0), [np.arange(S.config.batch_size)] * S.R, range(1), S.config.batch_size, 1)
    xs = xs if S.R == 1 else jax.tree_util.tree_map(lambda a: a[0], xs)  # run 0's host items
    src = S.src.get("train")
    if src is not None and S.feed.per_run:  # one run's copy, as shapes (another process may hold it)
        src = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), src)
    phases = S.method.phases(0)
    for key in S.hp:
        def probe(v, src):
            m, tx = _built(S, {key: v})
            state = m.init(jax.random.PRNGKey(0), sample)
            state = m.begin_task(state.replace(opt_state=tx.init(state.params)), jnp.int32(0))
            for ph in phases:
                state, _ = make_train_chunk(m, tx, S.config.data.augment, S.feed.resident)(
                    state, src, xs, jnp.int32(0), ph.name)
                state = m.after_phase(state, jnp.int32(0), ph.name)
            return m.predict(state, sample, jnp.int32(0))

        try:
            jax.eval_shape(probe, jnp.float32(1.0), src)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                jax.errors.TracerIntegerConversionError, jax.errors.TracerArrayConversionError) as e:
            raise config_lib.ConfigError(
                f"--sweep {key}: {S.config.method.name} uses {key} as a Python value when it builds its program "
                f"(so it is structural here); run its values as separate runs ({type(e).__name__})") from None


def _items(S: Setup, tree, batch_axis: int):
    """Host items -> device arrays, split inside each run group on their batch axis and
    along ``runs`` on their leading run axis when they have one (``batch_axis`` > 0 and
    several runs; leaves without a batch axis, such as a chunk's ``active`` flags, are
    split along ``runs`` only)."""
    lead = int(S.R > 1 and batch_axis > 0)  # items every run shares have their batch first
    split = sharding.batch_sharding(S.mesh, batch_axis, lead)
    flags = sharding.runs_sharding(S.mesh, lead)
    return sharding.put_local(tree, jax.tree_util.tree_map(lambda a: split if np.ndim(a) > batch_axis else flags, tree),
                              batch_axis)


# ----------------------------------------------------------------------------- state


def _first_batch(config, streams) -> dict:
    """A batch of the first task (init's shapes)."""
    return next(data.batches(data.pool(streams[0], 0, normalize=config.data.normalize), config.batch_size))


def _sample(S: Setup) -> np.ndarray:
    return _first_batch(S.config, S.streams)["x"]


def _make_init(S: Setup):
    """``make(method, tx) -> init(rng)`` for :meth:`Setup.lift`/:meth:`Setup.jit`, the
    same one for every caller of a Setup: with the Setup's own method and optimizer
    (no sweep) init is one inlined ``jax.jit``, so the run traces it once whether it is
    asked for the state's shapes (its shardings) or compiled."""
    if S.init_make is None:
        S.init_make = _init_of(_sample(S), S.method if not S.hp else None, S.tx)
    return S.init_make


def _init_of(sample, method=None, tx=None):
    """``make(m, tx)``; with ``method`` (and ``tx``): that pair's init is traced once (jit's
    trace cache), a swept pair (built inside the program from traced values) each time."""
    def init_of(m, tx):
        def init(rng):
            TRACES["init"] += 1
            state = m.init(rng, sample)
            return state.replace(opt_state=tx.init(state.params))
        return init

    shared = jax.jit(init_of(method, tx), inline=True) if method is not None else None

    def make(m, t):
        return shared if m is method and t is tx else init_of(m, t)

    return make


def _init_fn(S: Setup):
    return S.jit(_make_init(S), (0,), out_shardings=S.state_sharding)


def _keys(S: Setup) -> jax.Array:
    keys = [jax.random.PRNGKey(s) for s in S.seeds]
    return keys[0] if S.R == 1 else jnp.stack(keys)


@jax.jit
def _take_run(tree, r):
    return jax.tree_util.tree_map(lambda a: a[r], tree)


def _run_state(S: Setup, state, r: int):
    """Run ``r``'s slice of a device tree with a leading run axis: one compiled program for
    every run and leaf (an eager ``a[r]`` per leaf compiles a program per shape and index:
    ~1,800 for 8 seeds of a ResNet's state, 7.6 s)."""
    return state if S.R == 1 else _take_run(state, np.int32(r))


def _load_pretrained(S: Setup, state: State, path: str, echo) -> State:
    """Initialise the trunk (every parameter but the heads, and the batch statistics)
    from ``path``: a jaxcl run's workdir or a torchvision/timm ``.safetensors`` file
    (:mod:`jaxcl.models.torch_weights`); every run alike."""
    runs = []
    for r in range(S.R):
        one = distributed.fetch(_run_state(S, state, r))
        params, model_state, n_params, n_stats = torch_weights.load_pretrained(
            one.params, one.model_state, path, S.model)
        runs.append(one.replace(params=params, model_state=model_state))
    echo(f"initialised {n_params} parameter arrays and {n_stats} statistics arrays from {path}")
    state = runs[0] if S.R == 1 else jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *runs)
    return sharding.put(state, S.state_sharding)


def _fresh_record(S: Setup) -> dict:
    return {"runs": [{"accuracy_matrix": [], "initial_accuracy": None} for _ in range(S.R)],
            "wall_s": 0.0, "train_s": 0.0, "saves": 0, "slots": 0, "task_start_step": [0] * S.R}


# Keys a resume may change on purpose (--allow-change): they enter the program as values
# set per epoch, so the restored state fits them.
SAFE_CHANGES = ("optimizer.lr", "optimizer.schedule", "optimizer.milestones", "optimizer.gamma")


def _allowed(ckpt, index, fingerprint: dict, allow: tuple) -> tuple[dict, list]:
    """``fingerprint`` with the keys of ``allow`` taken from the checkpoint (so that they
    do not count as a different config), and the changes made that way."""
    bad = [k for k in allow if k not in SAFE_CHANGES]
    if bad:
        raise RunError(f"--allow-change {', '.join(bad)}: only {', '.join(SAFE_CHANGES)} may change on a resume "
                       "(the others change what the saved state means)")
    saved = ckpt.read_meta(index).get("config", {})
    fp, changes = json_copy(fingerprint), []
    for key in allow:
        section, leaf = key.split(".")
        old, new = saved.get(section, {}).get(leaf), fp.get(section, {}).get(leaf)
        if old != new:
            changes.append({"key": key, "checkpoint": old, "now": new})
            fp[section][leaf] = old
    return fp, changes


def json_copy(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d))


def _restore_or_init(S: Setup, ckpt, resume: bool, workdir: Path, echo, resume_from=None, allow_change=()):
    init_fn, keys = _init_fn(S), _keys(S)
    if ckpt.latest() is not None:
        if not resume:
            raise RunError(f"{workdir} already holds checkpoints; pass --resume to continue that run "
                           "or choose another --workdir")
        abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                          jax.eval_shape(init_fn, keys), S.state_sharding)
        at = ckpt.check(resume_from)
        fingerprint, changes = _allowed(ckpt, at, config_lib.fingerprint(S.config), tuple(allow_change))
        state, meta = ckpt.restore(abstract, fingerprint, index=at)
        pos, record = Position(**meta["position"]), meta["record"]
        if distributed.is_primary():
            for p in ckpt.set_aside_newer(at):
                echo(f"moved the newer checkpoint {p.name} aside to {p}")
        for c in changes:
            echo(f"resuming with {c['key']} = {c['now']!r} (the checkpoint's run had {c['checkpoint']!r})")
        record.setdefault("changes", []).extend({**c, "at": dataclasses.asdict(pos)} for c in changes)
        echo(f"resuming from {ckpt.directory / str(at)}: task {pos.task}, phase {pos.phase}, "
             f"epoch {pos.epoch}, batch {pos.batch}")
        return state, pos, record
    if resume_from is not None:
        raise RunError(f"--resume-from {resume_from}: {workdir} holds no checkpoint")
    if resume:
        echo(f"no checkpoint in {workdir}; starting from the beginning")
    state = init_fn(keys)
    if S.config.model.pretrained:
        state = _load_pretrained(S, state, S.config.model.pretrained, echo)
    return state, Position(), _fresh_record(S)


# ----------------------------------------------------------------------------- evaluation


def evaluate(S: Setup, state) -> list[list[float]]:
    """Accuracy of every run on every task's test set: ``[run][task]``."""
    B = S.config.eval_batch_size
    axis = 1 if S.feed.per_run else 0
    out = np.zeros((S.R, S.num_tasks))
    for j in range(S.num_tasks):
        hits = [S.fns["eval"](state, S.src.get("test"), _items(S, item, axis), jnp.int32(j))
                for item in S.feed.pass_items("test", j, B)]
        total = np.sum(np.reshape(distributed.fetch(hits), (len(hits), -1)), axis=0)  # [R] or [1]
        out[:, j] = total / np.asarray([S.feed.size(r, "test", j) for r in range(S.R)])
    return out.tolist()


# ----------------------------------------------------------------------------- one task


class _Logger:
    """Per-run windows of per-step metrics, flushed every ``log.every_steps`` steps and
    at the end of each epoch, exactly as a loop of single steps would."""

    def __init__(self, S: Setup, writers, every: int):
        self.S, self.writers, self.every = S, writers, every
        self.window = [[] for _ in range(S.R)]
        self.first = [None] * S.R  # each run's first loss: the scale a NaN's advice judges losses by
        self.peak = [0.0] * S.R  # each run's largest loss since the last checkpoint

    def add(self, r: int, rows: list[dict]) -> None:
        self.window[r].extend(rows)
        losses = [x["loss"] for x in rows if np.isfinite(x["loss"])]
        if losses:
            self.first[r] = losses[0] if self.first[r] is None else self.first[r]
            self.peak[r] = max(self.peak[r], max(losses))

    def flush(self, r: int, step: int, end_of_epoch: bool, **where) -> dict | None:
        w = self.window[r]
        if not w or (len(w) < self.every and not end_of_epoch):
            return None
        take, self.window[r] = (w, []) if end_of_epoch and len(w) <= self.every else (w[:self.every], w[self.every:])
        means = {k: float(np.mean([x[k] for x in take])) for k in take[0]}
        self.writers[r].write("train", step - len(self.window[r]), **where, **means)
        return means


def _run_phase(S: Setup, r: int, t: int, p: int):
    """Phase ``p`` of task ``t`` as run ``r`` sees it (a swept value may set its lr)."""
    if S.settings[r] and any(k.startswith("method.") for k in S.settings[r]):
        return methods.build(S.run_configs[r], S.model, S.info).phases(t)[p]
    return S.method.phases(t)[p]


def train_task(S: Setup, state, t: int, pos: Position, record: dict, hooks) -> State:
    """Train task ``t`` from ``pos`` (its start, or where a resumed run stopped): its
    phases, their consolidation passes and ``after_phase``."""
    cfg, m = S.config, S.method
    B, K = cfg.batch_size, S.steps_per_call
    task_id = jnp.int32(t)
    if pos == Position(t, 0, 0, 0):
        shapes = jax.tree_util.tree_map(jnp.shape, state)
        state = S.fns["begin_task"](state, task_id)
        if jax.tree_util.tree_map(jnp.shape, state) != shapes:
            raise RuntimeError(f"method {m.name}: begin_task changed the shapes of the State; "
                               "init must allocate every array at its final shape")
        if cfg.optimizer.reset_per_task and t > 0:
            state = state.replace(opt_state=S.fns["reset_opt"](state.params))
        record["task_start_step"] = np.atleast_1d(distributed.fetch(state.step)).tolist()
    tasks = S.pool_tasks(t)
    sizes = [S.feed.size(r, "train", tasks) for r in range(S.R)]
    slots_per_epoch = max(n // B for n in sizes)
    phases = m.phases(t)
    steps = np.atleast_1d(distributed.fetch(state.step)).astype(int)  # host copy: no sync per step
    every_ckpt = cfg.checkpoint.every_steps
    for p in range(pos.phase if pos.task == t else 0, len(phases)):
        phase = phases[p]
        resumed_here = (pos.task, pos.phase) == (t, p)
        if p > 0 and not resumed_here and cfg.optimizer.reset_per_task:
            state = state.replace(opt_state=S.fns["reset_opt"](state.params))  # fresh optimizer per phase
        first_epoch = pos.epoch if resumed_here else 0
        train_chunk = S.fns["train"](phase.name)
        bar = tqdm(total=(phase.epochs - first_epoch) * slots_per_epoch,
                   desc=f"task {t + 1}/{S.num_tasks} {phase.name}", unit="step", leave=False, dynamic_ncols=True,
                   disable=None if cfg.log.progress and distributed.is_primary() else True)  # None: only on a terminal
        hooks.clock_start()
        for e in range(first_epoch, phase.epochs):
            if hasattr(state.opt_state, "hyperparams"):
                lr = [optim.lr_at(rc.optimizer, e, phase.epochs, _run_phase(S, r, t, p)) for r, rc in
                      enumerate(S.run_configs or [cfg])]
                lr = lr[0] if S.R == 1 else np.asarray(lr, np.float32)
                state = S.fns["set_lr"](state, lr)
            orders = [data.epoch_order(n, S.seeds[r], t, p, e) for r, n in enumerate(sizes)]
            n_batches = [n // B for n in sizes]
            s = pos.batch if pos == Position(t, p, e, pos.batch) else 0
            while s < slots_per_epoch:
                end = min(s + K, slots_per_epoch)
                if every_ckpt:  # a chunk ends where a checkpoint is due
                    end = min(end, (record["slots"] // every_ckpt + 1) * every_ckpt - record["slots"] + s)
                xs = S.feed.train_items(tasks, orders, range(s, end), B, K)
                hooks.before_call()
                state, out = train_chunk(state, S.src.get("train"), _items(S, xs, 2 if S.R > 1 else 1), task_id)
                out = distributed.fetch(out)
                for r in range(S.R):
                    ran = [k for k in range(end - s) if s + k < n_batches[r]]
                    rows = [{k: float(np.reshape(v, (S.R, K) if S.R > 1 else (K,))[(r, i) if S.R > 1 else i])
                             for k, v in out.items()} for i in ran]
                    bad = [i for i, row in zip(ran, rows) if not np.isfinite(row["loss"])]
                    if bad:
                        hooks.nan(r, t, phase.name, e, steps[r] + ran.index(bad[0]), record)
                    steps[r] += len(rows)
                    hooks.logger.add(r, rows)
                    last = end >= min(n_batches[r], slots_per_epoch)
                    while True:
                        means = hooks.logger.flush(r, int(steps[r]), last and end > s and s < n_batches[r],
                                                   task=t, phase=phase.name, epoch=e)
                        if means is None:
                            break
                        if r == 0:
                            bar.set_postfix(loss=f"{means['loss']:.4f}", epoch=e + 1)
                bar.update(end - s)
                record["slots"] += end - s
                hooks.after_call(state)
                s = end
                if every_ckpt and record["slots"] % every_ckpt == 0:
                    hooks.save(state, Position(t, p, e, s))
        bar.close()
        jax.block_until_ready(state)
        hooks.clock_bank()
        if "consolidate" in S.fns:
            consolidate = S.fns["consolidate"](phase.name)
            axis = 1 if S.feed.per_run else 0
            for i, item in enumerate(S.feed.pass_items("train", t, B), 1):
                state = consolidate(state, S.src.get("train"), _items(S, item, axis), task_id)
                sharding.pace(state, i, S.mesh)  # a chain of programs: see sharding.pace
        state = S.fns["after_phase"](phase.name)(state, task_id)
    return state


# ----------------------------------------------------------------------------- results


def run_results(S: Setup, state, r: int, run_record: dict, record: dict, one=None) -> dict:
    """The results of run ``r`` (``results.json``): a single run's contract. ``one``:
    run ``r``'s state on the host, when the caller has it (else it is fetched)."""
    cfg = S.config
    stream = S.streams[S.run_stream[r]]
    one = distributed.fetch(_run_state(S, state, r)) if one is None else one
    R = run_record["accuracy_matrix"]
    steps = int(one.step)
    return {
        "method": cfg.method.name,
        "benchmark": cfg.benchmark,
        "scenario": cfg.scenario,
        "seed": S.seeds[r],
        "num_tasks": S.num_tasks,
        "model": cfg.model.name,
        "stream": {"name": stream.name, "tasks": [t.name for t in stream.tasks],
                   "train_sizes": [len(t.x_train) for t in stream.tasks],
                   "test_sizes": [len(t.x_test) for t in stream.tasks]},
        "accuracy_matrix": R,
        "initial_accuracy": run_record["initial_accuracy"],
        **metrics.summary(R, run_record["initial_accuracy"]),
        "params": metrics.param_counts(one.params, S.num_tasks, S.info.num_heads),
        "method_report": jax.tree_util.tree_map(
            lambda v: v.tolist() if hasattr(v, "tolist") else v,
            distributed.fetch(S.method.report(one))) if S.method.report else {},
        "wall_s": record["wall_s"],
        "train_s": record["train_s"],
        "train_steps": steps,
        "steps_per_s": metrics.steps_per_second(steps, record["train_s"]),  # this run's; all runs: x runs_in_program
        "runs_in_program": S.R,
        "data_path": S.feed.path,
        "data_pipeline": {"asked": cfg.data.pipeline, "picked": getattr(S.feed, "pipeline", "memory"),
                          "why": getattr(S.feed, "pipeline_why", "")},
        "steps_per_call": S.steps_per_call,
        "loop_chunk": S.chunk,
        "run_axis": S.run_axis,
        "resumed_with_changes": record.get("changes", []),
        "devices": {"count": int(S.mesh.devices.size), "platform": jax.devices()[0].platform,
                    "kind": jax.devices()[0].device_kind, "processes": jax.process_count(),
                    "mesh": dict(S.mesh.shape), "runs_why": S.groups_why},
        "state_bytes": sharding.bytes_per_device(state),  # all runs of the program together
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "setting": S.settings[r],
        "config": S.run_configs[r].to_dict(),
    }


def summary(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of ACC, BWT, FWT and forgetting, and the
    mean accuracy matrix (``summary.json``)."""
    R = np.asarray([x["accuracy_matrix"] for x in runs])
    first = runs[0]
    out = {k: first[k] for k in ("method", "benchmark", "scenario", "num_tasks", "model", "data_path",
                                 "steps_per_call", "runs_in_program", "devices", "state_bytes", "wall_s", "train_s",
                                 "setting", "config")}
    out["seeds"] = [x["seed"] for x in runs]
    out["accuracy_matrix"] = R.mean(0).tolist()
    out["accuracy_matrix_std"] = R.std(0).tolist()
    for k in ("acc", "bwt", "fwt", "forgetting"):
        v = np.asarray([x[k] for x in runs])
        out[k], out[f"{k}_std"] = float(v.mean()), float(v.std())
    out["per_seed"] = {str(x["seed"]): {k: x[k] for k in ("acc", "bwt", "fwt", "forgetting")} for x in runs}
    return out


# ----------------------------------------------------------------------------- the run


class _Hooks:
    """The loop's side effects: time keeping, checkpoints, the NaN stop, logs, the profile."""

    def __init__(self, S: Setup, ckpt, record: dict, t_start: float, wall_before: float, writers, workdir: Path,
                 echo: Callable[[str], None]):
        self.S, self.ckpt, self.record = S, ckpt, record
        self.t_start, self.wall_before = t_start, wall_before
        self.phase_clock = None
        self.logger = _Logger(S, writers, max(S.config.log.every_steps, 1))
        self._finite = None  # compiled on the first save
        self.workdir, self.echo = workdir, echo
        self.calls = 0  # train calls made by this process (the first compiles its program)
        self.tracing = None  # the step a jax.profiler trace started at, while one runs
        self.traced = False  # this process has written its trace (log.profile_steps)

    def before_call(self) -> None:
        """``log.profile_steps``: start a jax.profiler trace at the first train call after
        ``log.profile_after`` steps of the run, once this process has compiled a call."""
        lg = self.S.config.log
        if lg.profile_steps and not self.traced and self.tracing is None and self.calls \
                and self.record["slots"] >= lg.profile_after:
            try:
                jax.profiler.start_trace(str(self._profile_dir()))
            except RuntimeError as e:  # a trace of the caller's own already runs: the run goes on without one
                self.traced = True
                self.echo(f"log.profile_steps: no trace written ({e})")
                return
            self.tracing = self.record["slots"]

    def after_call(self, state) -> None:
        self.calls += 1
        if self.tracing is not None and self.record["slots"] >= self.tracing + self.S.config.log.profile_steps:
            self.stop_trace(state)

    def stop_trace(self, state=None) -> None:
        """End a running trace (its calls finished first); at the run's end or on any
        exit, so a trace never outlives its run."""
        if self.tracing is None:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        first, self.tracing, self.traced = self.tracing, None, True
        self.echo(f"profile of train steps {first}-{self.record['slots'] - 1}: {self._profile_dir()}")

    def _profile_dir(self) -> Path:
        d = self.workdir / "profile"  # one folder per process of a job: each writes a trace of its own
        return d / f"process_{jax.process_index()}" if jax.process_count() > 1 else d

    def clock_start(self) -> None:
        self.phase_clock = time.perf_counter()

    def clock_bank(self) -> None:
        if self.phase_clock is not None:
            now = time.perf_counter()
            self.record["train_s"] += now - self.phase_clock
            self.phase_clock = None

    def nan(self, r: int, t: int, phase: str, epoch: int, step: int, record: dict) -> None:
        start = record["task_start_step"][r]
        raise NonFiniteLossError(
            f"the loss is not finite (NaN or inf) at {self.S.run_words(r)}task {t}, phase {phase!r}, epoch {epoch}: "
            f"global step {step} (step {step - start} of the task); {self._advice(r)}")

    def _advice(self, r: int) -> str:
        """Which kept checkpoint can be resumed from: the newest whose parameters are
        finite and whose loss, over the steps before it, stayed in range (at most
        LOSS_RANGE times the run's first loss); or say that none can."""
        kept = sorted(self.ckpt.manager.all_steps(), reverse=True)
        if not kept:
            return ("no checkpoint had been written yet, so nothing is kept: lower optimizer.lr (or check the "
                    "data) and start again")
        why = []
        for i in kept:
            try:
                meta = self.ckpt.read_meta(i)
            except ckpt_lib.CheckpointError:
                why.append(f"{i} is damaged")
                continue
            health, m = meta["record"].get("health"), meta["position"]
            if health is None:
                why.append(f"{i} was written without a record of its loss")
                continue
            first, peak = health["first_loss"][r], health["loss_peak"][r]
            if not health["finite"][r]:
                why.append(f"{i} holds parameters that are not finite")
            elif first is not None and peak > LOSS_RANGE * max(first, 1e-3):
                why.append(f"{i} was written after the loss had reached {peak:.3g} ({LOSS_RANGE}x the run's first "
                           f"loss, {first:.3g}, is the range)")
            else:
                how = "--resume" if i == kept[0] else f"--resume-from {i}"
                return (f"checkpoint {self.ckpt.directory / str(i)} holds finite parameters written while the loss "
                        f"was in range (task {m['task']}, phase {m['phase']}, epoch {m['epoch']}, batch "
                        f"{m['batch']}){'; the newer ones cannot: ' + '; '.join(why) if why else ''}. Lower optimizer.lr "
                        f"(or check the data) and continue from it with {how} --allow-change optimizer.lr")
        return (f"no kept checkpoint can be resumed from ({'; '.join(why)}): start again in a new --workdir with "
                "a lower optimizer.lr (or check the data)")

    def save(self, state, at: Position) -> None:
        bad = np.atleast_1d(distributed.fetch(state.bad_step))
        if (bad >= 0).any():  # never checkpoint a state that has seen a NaN
            r = int(np.argmax(bad >= 0))
            self.nan(r, at.task, "?", at.epoch, int(bad[r]), self.record)
        if self.phase_clock is not None:
            self.clock_bank()
            self.clock_start()
        self.record["wall_s"] = self.wall_before + time.perf_counter() - self.t_start
        index = self.record["saves"]
        self.record["saves"] += 1  # the number the next save (after a resume too) will take
        # what a NaN later tells the user about this checkpoint (see _advice)
        if self._finite is None:
            self._finite = jax.jit(functools.partial(_finite_params, runs=self.S.R))
        lg = self.logger
        self.record["health"] = {"finite": np.atleast_1d(distributed.fetch(self._finite(state))).tolist(),
                                 "loss_peak": list(lg.peak), "first_loss": list(lg.first)}
        lg.peak = [0.0] * self.S.R
        # where the logs stand: a resume cuts them back to here and goes on with the
        # window of steps not yet logged, so they read as those of an uninterrupted run
        self.record["logs"] = {"offsets": [w.offset() for w in lg.writers], "window": lg.window,
                               "first": lg.first}
        meta = {"config": config_lib.fingerprint(self.S.config), "position": dataclasses.asdict(at),
                "record": self.record}
        self.ckpt.save(index, state, meta)


# A checkpoint is advised after a NaN only if the loss before it stayed within this many
# times the run's first loss (a loss 100x its value at initialisation is diverging).
LOSS_RANGE = 100


def _finite_params(state: State, runs: int) -> jax.Array:
    """Whether every parameter of each run is finite: ``[runs]`` bools."""
    leaves = [a for a in jax.tree_util.tree_leaves(state.params) if jnp.issubdtype(a.dtype, jnp.inexact)]
    per = [jnp.all(jnp.isfinite(a).reshape(runs, -1) if runs > 1 else jnp.isfinite(a).reshape(1, -1), axis=1)
           for a in leaves]
    return jnp.all(jnp.stack(per), axis=0)


def run(config, workdir: str | Path, *, resume: bool = False, resume_from: int | None = None,
        allow_change: tuple = (), echo: Callable[[str], None] = print) -> dict:
    """Run ``config`` in ``workdir`` and return the results dict (also ``results.json``);
    with several seeds, the summary over them (``summary.json``, each seed's results
    under ``"runs"``).

    With ``resume``, continue from the newest checkpoint in ``workdir``; the continued
    run ends with the same results as one never interrupted. ``resume_from``: continue
    from that checkpoint instead (say, the newest intact one; newer ones are set aside).
    ``allow_change``: keys of :data:`SAFE_CHANGES` whose new values the resumed run takes
    (recorded in ``results.json`` as ``resumed_with_changes``).
    """
    resume = resume or resume_from is not None
    t_start = time.perf_counter()
    config_lib.validate(config)
    workdir = Path(workdir)
    created = not workdir.exists()
    started = False  # whether this run has begun to write its logs and results (past every refusal)
    primary = distributed.is_primary()  # only process 0 writes files and talks
    echo = echo if primary else (lambda s: None)
    try:
        with contextlib.ExitStack() as cleanup:  # checkpointer and writers are closed on any exit
            S = setup(config)
            workdir.mkdir(parents=True, exist_ok=True)
            ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
            cleanup.callback(ckpt.close)
            state, pos, record = _restore_or_init(S, ckpt, resume, workdir, echo, resume_from, allow_change)
            run_dirs = [S.run_dir(workdir, r) for r in range(S.R)]
            started = True
            if record["saves"] == 0 and primary:  # a fresh run: nothing of an earlier one stays
                _clear_outputs(workdir)
            writers = [logs.Writer(d, tensorboard=config.log.tensorboard) if primary else logs.NullWriter()
                       for d in run_dirs]
            for w in writers:
                cleanup.callback(w.close)
            hooks = _Hooks(S, ckpt, record, t_start, record["wall_s"], writers, workdir, echo)
            cleanup.callback(hooks.stop_trace)  # a run that ends or dies while tracing stops its trace
            resumed_logs = record.get("logs")  # None: a fresh run, or a checkpoint older than log offsets
            for r, w in enumerate(writers):
                w.start(resumed_logs["offsets"][r] if resumed_logs else None)
            if resumed_logs:
                hooks.logger.window = [list(w) for w in resumed_logs["window"]]
                hooks.logger.first = list(resumed_logs["first"])

            if record["runs"][0]["initial_accuracy"] is None:
                for rr, acc in zip(record["runs"], evaluate(S, state)):
                    rr["initial_accuracy"] = acc
            for t in range(pos.task, S.num_tasks):
                state = train_task(S, state, t, pos, record, hooks)
                rows = evaluate(S, state)
                step = np.atleast_1d(distributed.fetch(state.step))
                for r, row in enumerate(rows):
                    record["runs"][r]["accuracy_matrix"].append(row)
                    writers[r].write("eval", int(step[r]), task=t, accuracy=row, mean_seen=float(np.mean(row[: t + 1])))
                seen = np.mean([np.mean(row[: t + 1]) for row in rows])
                echo(f"after task {t + 1}/{S.num_tasks}: accuracy on seen tasks {100 * seen:.2f}%"
                     + (f" (mean of {S.R} runs)" if S.multi else
                        f"  [{' '.join(f'{100 * a:.1f}' for a in rows[0])}]"))
                pos = Position(t + 1, 0, 0, 0)
                hooks.save(state, pos)
            record["wall_s"] = hooks.wall_before + time.perf_counter() - t_start
            results = _write_results(S, state, record, workdir, run_dirs, writers)
            if primary:
                (workdir / FAILED).unlink(missing_ok=True)  # an earlier failure no longer describes it
            return results
    except BaseException as e:
        if primary:
            _after_failure(workdir, created, started, e)
        raise


FAILED = "FAILED.txt"
# What a run writes in its workdir and in each run's folder (seed_<k>/, a sweep setting's).
_OUTPUTS = (FAILED, "results.json", "summary.json", "metrics.jsonl", "accuracy_matrix.png", "task_accuracy.png",
            "tensorboard", "profile")


def _clear_outputs(workdir: Path) -> None:
    """Remove what an earlier run that left no checkpoint wrote in ``workdir`` (its logs,
    FAILED.txt, its seed and setting folders), so that the workdir describes this run only.
    Only jaxcl's own file names are touched."""
    def clear(d: Path, depth: int) -> None:
        for name in _OUTPUTS:
            p = d / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        if depth == 0:
            return
        for sub in [p for p in d.iterdir() if p.is_dir() and (p.name.startswith("seed_") or "=" in p.name)]:
            clear(sub, depth - 1)
            if not any(sub.iterdir()):
                sub.rmdir()

    clear(workdir, 2)


def _after_failure(workdir: Path, created: bool, started: bool, e: BaseException) -> None:
    """The workdir of a run that failed says so: one it created and that holds nothing
    is removed; a refusal before the run began leaves the workdir as it was; otherwise
    FAILED.txt says why it stopped and whether its checkpoints can be continued."""
    if not workdir.exists():
        return
    if created and not any(f.is_file() and f.stat().st_size for f in workdir.rglob("*")):
        shutil.rmtree(workdir, ignore_errors=True)
        return
    if not started:
        return
    kept = any((workdir / "checkpoints").glob("[0-9]*"))
    (workdir / FAILED).write_text(
        f"this run stopped {'after' if kept else 'before'} its first checkpoint:\n{type(e).__name__}: {e}\n"
        + ("its checkpoints are kept: continue with --resume (see the error above for which one)\n" if kept else ""))


def _all_run_results(S: Setup, state, record: dict) -> list[dict]:
    """Every run's results, on every process. When each process holds whole runs (its
    run groups lie in it: ``mesh.runs`` over processes), each makes the results of its
    own runs from its own shards and the small results are exchanged, not the states."""
    lo, hi, of = S.feed.rows_of or (0, 1, 1)
    if jax.process_count() == 1 or S.R == 1 or (lo, hi) != (0, of) or len(S.feed.local_runs) == S.R:
        return [run_results(S, state, r, record["runs"][r], record) for r in range(S.R)]
    mine = [(r, run_results(S, state, r, record["runs"][r], record, one=_local_run(state, r)))
            for r in S.feed.local_runs]
    out = dict(pair for part in distributed.allgather_json(mine) for pair in part)
    return [out[r] for r in range(S.R)]


def _local_run(state, r: int):
    """Run ``r``'s slice of ``state`` (leading run axis) from this process's own shards."""
    def one(a):
        out = None
        for sh in a.addressable_shards:
            first = sh.index[0] if sh.index else slice(None)
            start, stop = first.start or 0, a.shape[0] if first.stop is None else first.stop
            if start <= r < stop:
                out = np.empty(a.shape[1:], a.dtype) if out is None else out
                out[tuple(sh.index[1:])] = np.asarray(sh.data)[r - start]
        return out

    return jax.tree_util.tree_map(one, state)


def _write_results(S: Setup, state, record: dict, workdir: Path, run_dirs: list, writers) -> dict:
    cfg = S.config
    title = f"{cfg.benchmark} / {cfg.method.name} ({cfg.scenario}-incremental)"
    runs = []
    every = _all_run_results(S, state, record)
    for r, d in enumerate(run_dirs):
        res = every[r]
        runs.append(res)
        if not distributed.is_primary():
            continue
        report.save_results(d, res)
        if cfg.log.plots:
            report.plot(d, res["accuracy_matrix"], title + (f" {S.run_words(r)[:-2]}" if S.multi else ""))
        writers[r].write("results", res["train_steps"], acc=res["acc"], bwt=res["bwt"], fwt=res["fwt"],
                         forgetting=res["forgetting"])
    if not S.multi:
        return runs[0]
    groups = list(dict.fromkeys(config_lib.setting_name(st) for st in S.settings))
    per_setting = []
    for g in groups:  # mean and spread over the seeds of each setting
        members = [x for x in runs if config_lib.setting_name(x["setting"]) == g]
        out = summary(members)
        where = workdir / g if g else workdir
        if not distributed.is_primary():
            per_setting.append(out)
            continue
        if g and cfg.seeds:
            report.save_results(where, out, name="summary.json")
        if cfg.log.plots and len(members) > 1:
            report.plot(where, out["accuracy_matrix"], f"{title} {g}, mean of {len(members)} seeds",
                        band=[x["accuracy_matrix"] for x in members])
        per_setting.append(out)
    if not cfg.sweep:
        out = per_setting[0]
        if distributed.is_primary():
            report.save_results(workdir, out, name="summary.json")
        return {**out, "runs": runs}
    top = {k: runs[0][k] for k in ("method", "benchmark", "scenario", "num_tasks", "model", "data_path",
                                   "steps_per_call", "runs_in_program", "devices", "state_bytes", "config")}
    top.update(wall_s=record["wall_s"], train_s=record["train_s"], sweep=list(cfg.sweep),
               seeds=list(config_lib.run_seeds(cfg)), settings=per_setting)
    if distributed.is_primary():
        report.save_results(workdir, top, name="summary.json")
    return {**top, "runs": runs}
