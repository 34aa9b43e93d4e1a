"""The continual-learning loop: one jitted train step for every task.

Sections: set-up (stream, model, method, mesh, optimizer), compiled functions, state
(fresh or restored), evaluation, the task loop, results. For each task:

    begin_task -> epochs of the train step (task id traced: no recompilation when the
    task changes) -> consolidation pass (if the method has one) -> after_phase
    (per phase) -> evaluate every task, seen and unseen -> one row of the accuracy
    matrix -> checkpoint -> log

A non-finite loss stops the run with :class:`NonFiniteLossError` naming the task and
step; the checkpoints written before it are kept, so nothing is lost.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import platform
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcl import checkpoint as ckpt_lib
from jaxcl import config as config_lib
from jaxcl import data, logs, methods, metrics, models, optim, report, sharding
from jaxcl.methods.base import State

# How many times each compiled function was traced (a new trace means a recompile);
# read by the tests that check that changing task does not recompile.
TRACES: collections.Counter = collections.Counter()


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class RunError(RuntimeError):
    """The run cannot start as asked (workdir state, resume)."""


@dataclasses.dataclass
class Position:
    """Where the stream is: the next batch to train on."""

    task: int = 0
    phase: int = 0
    epoch: int = 0
    batch: int = 0


# ----------------------------------------------------------------------------- compiled steps


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


def make_eval_step(method: methods.Method) -> Callable:
    """``(state, batch, task) -> number of correct predictions`` (padding excluded)."""

    def eval_step(state: State, batch: dict, task: jax.Array):
        TRACES["eval_step"] += 1
        logits = method.predict(state, batch["x"], task)
        hit = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return jnp.sum(hit * batch["mask"])

    return eval_step


# ----------------------------------------------------------------------------- the run


def _load_pretrained(state: State, path: str, sharding_, echo) -> State:
    """Initialise the trunk (every parameter but the heads, and the batch statistics)
    from the newest checkpoint of the jaxcl run in ``path``."""
    src = ckpt_lib.load_state(path)
    params, n_params = ckpt_lib.graft(state.params, src.get("params", {}))
    model_state, n_stats = ckpt_lib.graft(state.model_state, src.get("model_state", {}))
    if n_params == 0:
        raise ckpt_lib.CheckpointError(f"model.pretrained={path}: no parameter of this model found in it")
    echo(f"initialised {n_params} parameter arrays and {n_stats} statistics arrays from {path}")
    return jax.device_put(state.replace(params=params, model_state=model_state), sharding_)


def run(config, workdir: str | Path, *, resume: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run ``config`` in ``workdir`` and return the results dict (also ``results.json``).

    With ``resume``, continue from the newest checkpoint in ``workdir``; the continued
    run ends with the same results as one never interrupted.
    """
    t_start = time.perf_counter()
    config_lib.validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as cleanup:  # checkpointer and writer are closed on any exit
        # -- set-up
        stream = data.build(config)
        info = stream.info
        model = models.build(config.model, info)
        method = methods.build(config, model, info)
        mesh = sharding.make_mesh(config.mesh.data)
        sharding.check_batch(config.batch_size, mesh, "batch_size")
        sharding.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
        replicated = sharding.replicated(mesh)
        tx = optim.make(config.optimizer)
        num_tasks = len(stream)
        smallest = min(len(t.x_train) for t in stream.tasks)
        if smallest < config.batch_size:
            raise data.DataError(f"batch_size={config.batch_size} is larger than the smallest task's "
                                 f"{smallest} training samples; lower batch_size")

        # -- compiled functions (one each; the task id is an argument, never a constant)
        train_step = jax.jit(make_train_step(method, tx, config.data.augment), donate_argnums=0, static_argnums=3,
                             out_shardings=replicated)
        eval_step = jax.jit(make_eval_step(method), out_shardings=replicated)
        begin_task = jax.jit(method.begin_task, donate_argnums=0, out_shardings=replicated)
        after_phase = jax.jit(method.after_phase, donate_argnums=0, static_argnums=2, out_shardings=replicated)
        consolidate = (jax.jit(method.consolidate, donate_argnums=0, static_argnums=3, out_shardings=replicated)
                       if method.consolidate is not None else None)
        reset_opt = jax.jit(tx.init, out_shardings=replicated)

        sample = next(data.batches(data.pool(stream, 0, normalize=config.data.normalize), config.batch_size))

        def init(rng):
            state = method.init(rng, sample["x"])
            return state.replace(opt_state=tx.init(state.params))

        init_fn = jax.jit(init, out_shardings=replicated)
        key = jax.random.PRNGKey(config.seed)

        # -- state: fresh or restored
        ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
        cleanup.callback(ckpt.close)
        fingerprint = config_lib.fingerprint(config)
        if ckpt.latest() is not None:
            if not resume:
                raise RunError(f"{workdir} already holds checkpoints; pass --resume to continue that run "
                               "or choose another --workdir")
            abstract = jax.tree_util.tree_map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), jax.eval_shape(init_fn, key))
            state, meta = ckpt.restore(abstract, fingerprint)
            pos, record = Position(**meta["position"]), meta["record"]
            echo(f"resuming from {ckpt.directory / str(ckpt.latest())}: task {pos.task}, phase {pos.phase}, "
                 f"epoch {pos.epoch}, batch {pos.batch}")
        else:
            if resume:
                echo(f"no checkpoint in {workdir}; starting from the beginning")
            state = init_fn(key)
            if config.model.pretrained:
                state = _load_pretrained(state, config.model.pretrained, replicated, echo)
            pos = Position()
            record = {"accuracy_matrix": [], "initial_accuracy": None, "wall_s": 0.0, "train_s": 0.0,
                      "saves": 0, "task_start_step": 0}
        wall_before = record["wall_s"]
        writer = logs.Writer(workdir, tensorboard=config.log.tensorboard)
        cleanup.callback(writer.close)

        def check(state, at: Position, phase_name: str) -> None:
            bad = int(jax.device_get(state.bad_step))
            if bad >= 0:
                raise NonFiniteLossError(
                    f"the loss is not finite (NaN or inf) at task {at.task}, phase {phase_name!r}, epoch {at.epoch}: "
                    f"global step {bad} (step {bad - record['task_start_step']} of the task). The checkpoints in "
                    f"{ckpt.directory} hold the state from before it; lower optimizer.lr or check the data, then "
                    "resume with --resume")

        clock = {"phase": None}  # start of the training time not yet added to record["train_s"]

        def bank_train_time() -> None:
            if clock["phase"] is not None:
                now = time.perf_counter()
                record["train_s"] += now - clock["phase"]
                clock["phase"] = now

        def save(state, at: Position, phase_name: str) -> None:
            check(state, at, phase_name)  # never checkpoint a state that has seen a NaN
            bank_train_time()
            record["wall_s"] = wall_before + time.perf_counter() - t_start
            index = record["saves"]
            record["saves"] += 1  # the number the next save (after a resume too) will take
            meta = {"config": fingerprint, "position": dataclasses.asdict(at), "record": record}
            ckpt.save(index, state, meta)

        test_pools = [data.pool(stream, j, "test", config.data.normalize) for j in range(num_tasks)]

        def evaluate(state) -> list[float]:
            accs = []
            for j, p in enumerate(test_pools):
                tid = jnp.int32(j)
                hits = [eval_step(state, sharding.shard_batch(b, mesh), tid)
                        for b in data.batches(p, config.eval_batch_size)]
                accs.append(float(np.sum(jax.device_get(hits))) / len(p))
            return accs

        if record["initial_accuracy"] is None:
            record["initial_accuracy"] = evaluate(state)

        # -- the task loop
        every_log = max(config.log.every_steps, 1)
        every_ckpt = config.checkpoint.every_steps
        step = int(jax.device_get(state.step))  # host copy of state.step: no sync per step
        for t in range(pos.task, num_tasks):
            task_id = jnp.int32(t)
            if pos == Position(t, 0, 0, 0):
                shapes = jax.tree_util.tree_map(jnp.shape, state)
                state = begin_task(state, task_id)
                if jax.tree_util.tree_map(jnp.shape, state) != shapes:
                    raise RuntimeError(f"method {method.name}: begin_task changed the shapes of the State; "
                                       "init must allocate every array at its final shape")
                if config.optimizer.reset_per_task and t > 0:
                    state = state.replace(opt_state=reset_opt(state.params))
                record["task_start_step"] = step
            train_pool = data.pool(stream, range(t + 1) if method.data == "cumulative" else t, "train",
                                   config.data.normalize)
            per_epoch = data.num_batches(len(train_pool), config.batch_size, drop_last=True)
            phases = method.phases(t)
            for p in range(pos.phase if pos.task == t else 0, len(phases)):
                phase = phases[p]
                phase_name, epochs = phase.name, phase.epochs
                resumed_here = (pos.task, pos.phase) == (t, p)
                if p > 0 and not resumed_here and config.optimizer.reset_per_task:
                    state = state.replace(opt_state=reset_opt(state.params))  # fresh optimizer per phase
                first_epoch = pos.epoch if resumed_here else 0
                bar = tqdm(total=(epochs - first_epoch) * per_epoch, desc=f"task {t + 1}/{num_tasks} {phase_name}",
                           unit="step", leave=False, dynamic_ncols=True,
                           disable=None if config.log.progress else True)  # None: only on a terminal
                clock["phase"] = time.perf_counter()
                for e in range(first_epoch, epochs):
                    if hasattr(state.opt_state, "hyperparams"):
                        lr = optim.lr_at(config.optimizer, e, epochs, phase)
                        state = state.replace(opt_state=jax.device_put(optim.with_lr(state.opt_state, lr), replicated))
                    start = pos.batch if pos == Position(t, p, e, pos.batch) else 0
                    order = data.epoch_order(len(train_pool), config.seed, t, p, e)
                    window = []
                    for b, batch in enumerate(data.batches(train_pool, config.batch_size, order, drop_last=True,
                                                           start=start), start):
                        state, m = train_step(state, sharding.shard_batch(batch, mesh), task_id, phase_name)
                        step += 1
                        window.append(m)
                        if len(window) == every_log or b == per_epoch - 1:
                            check(state, Position(t, p, e, b + 1), phase_name)
                            means = {k: float(np.mean([w[k] for w in jax.device_get(window)])) for k in window[0]}
                            writer.write("train", step, task=t, phase=phase_name, epoch=e, **means)
                            bar.set_postfix(loss=f"{means['loss']:.4f}", epoch=e + 1)
                            bar.update(len(window))
                            window = []
                        if every_ckpt and step % every_ckpt == 0:
                            save(state, Position(t, p, e, b + 1), phase_name)
                bar.close()
                jax.block_until_ready(state)
                bank_train_time()
                clock["phase"] = None
                if consolidate is not None:
                    for batch in data.batches(data.pool(stream, t, "train", config.data.normalize), config.batch_size):
                        state = consolidate(state, sharding.shard_batch(batch, mesh), task_id, phase_name)
                state = after_phase(state, task_id, phase_name)
            row = evaluate(state)
            record["accuracy_matrix"].append(row)
            seen = float(np.mean(row[: t + 1]))
            writer.write("eval", step, task=t, accuracy=row, mean_seen=seen)
            echo(f"after task {t + 1}/{num_tasks}: accuracy on seen tasks {100 * seen:.2f}%  "
                 f"[{' '.join(f'{100 * a:.1f}' for a in row)}]")
            pos = Position(t + 1, 0, 0, 0)
            save(state, pos, "end of task")

        # -- results
        record["wall_s"] = wall_before + time.perf_counter() - t_start
        R = record["accuracy_matrix"]
        results = {
            "method": config.method.name,
            "benchmark": config.benchmark,
            "scenario": config.scenario,
            "num_tasks": num_tasks,
            "model": config.model.name,
            "stream": {"name": stream.name, "tasks": [t.name for t in stream.tasks],
                       "train_sizes": [len(t.x_train) for t in stream.tasks],
                       "test_sizes": [len(t.x_test) for t in stream.tasks]},
            "accuracy_matrix": R,
            "initial_accuracy": record["initial_accuracy"],
            **metrics.summary(R, record["initial_accuracy"]),
            "params": metrics.param_counts(state.params, num_tasks, info.num_heads),
            "method_report": jax.tree_util.tree_map(
                lambda v: v.tolist() if hasattr(v, "tolist") else v,
                jax.device_get(method.report(state))) if method.report else {},
            "wall_s": record["wall_s"],
            "train_s": record["train_s"],
            "train_steps": step,
            "steps_per_s": metrics.steps_per_second(step, record["train_s"]),
            "devices": {"count": int(mesh.devices.size), "platform": jax.devices()[0].platform,
                        "kind": jax.devices()[0].device_kind},
            "versions": {"jax": jax.__version__, "python": platform.python_version()},
            "config": config.to_dict(),
        }
        report.save_results(workdir, results)
        if config.log.plots:
            report.plot(workdir, R, f"{config.benchmark} / {config.method.name} ({config.scenario}-incremental)")
        writer.write("results", step, acc=results["acc"], bwt=results["bwt"],
                     fwt=results["fwt"], forgetting=results["forgetting"])
        return results
