"""W1 and W2 of ../shared/peers/WORKLOADS.md: PackNet with jaxcl's own method
(jaxcl.methods.packnet) and train step (jaxcl.train.make_train_step), on synthetic data
held on the device. State: task 1 trained (untimed), pruned 50 % per layer and frozen;
task 2 being trained. Measures (a) task-2 train steps/s, (b) one prune call (50 % of task
2's weights per layer, from the same state every call), (c) task-1 eval samples/s with
task 1's mask applied inside every call. ``w1_packnet_mlp.py`` and
``w2_packnet_resnet.py`` run it with each workload's shapes, then the PyTorch peer, and
print one JSON line with the peer's keys plus ratios and shares of the fp32 peak.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

import common

import jaxcl
from jaxcl import config as config_lib
from jaxcl import data, methods, models, optim, sharding, train, xla


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str  # as the peer's JSON
    peer_script: str
    flops_key: str
    model_sets: tuple  # --set strings for the model
    input_shape: tuple
    batch: int
    task1_steps: int
    iters: int  # steps per timed block (distinct batches)
    warmup: int
    train_repeats: int
    eval_batches: int
    eval_flops_key: str
    description: str
    image: bool = False


def setup(w: Workload):
    c = config_lib.override(jaxcl.get_config("split_mnist:method=packnet"), [
        "num_tasks=2", "optimizer.name=sgd", "optimizer.lr=0.01", "optimizer.momentum=0",
        "method.prune=(0.5,)", f"batch_size={w.batch}", *w.model_sets])
    info = data.StreamInfo(num_tasks=2, scenario="task", input_shape=w.input_shape, num_heads=2, num_outputs=10,
                           classes_per_head=(10, 10), task_classes=(10, 10))
    m = methods.build(c, models.build(c.model, info), info)
    tx = optim.make(c.optimizer)
    rng = np.random.default_rng(1)

    def batch(task):
        shape = (w.batch,) + w.input_shape
        x = rng.standard_normal(shape, np.float32) if w.image else rng.random(shape, np.float32)
        return {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, 10, w.batch, dtype=np.int32)),
                "task": jnp.full((w.batch,), task, jnp.int32), "mask": jnp.ones((w.batch,), jnp.float32)}

    state = m.init(jax.random.PRNGKey(0), jnp.zeros((w.batch,) + w.input_shape))
    return m, tx, state.replace(opt_state=tx.init(state.params)), batch


def masked_leaves(state, which):
    return [np.asarray(a) for a, o in zip(jax.tree_util.tree_leaves(which), jax.tree_util.tree_leaves(
        state.extra["owner"])) if o.ndim]


def run_jaxcl(w: Workload) -> dict:
    """On every visible device: one by default; ``--devices N`` (XLA's virtual host
    devices) splits each batch along the mesh's data axis, as ``jaxcl run`` does."""
    m, tx, state, make_batch = setup(w)
    mesh = sharding.make_mesh()
    state = sharding.replicate(state, mesh)

    def batch(task):
        return sharding.shard_batch(make_batch(task), mesh)

    rep = sharding.replicated(mesh)
    step = xla.jit(train.make_train_step(m, tx, augment=False), donate_argnums=0, static_argnums=3,
                   out_shardings=rep)
    begin = jax.jit(m.begin_task)
    prune = jax.jit(m.after_phase, static_argnums=2)
    predict = xla.jit(m.predict)
    t0, t1 = jnp.int32(0), jnp.int32(1)

    state = begin(state, t0)  # task 1: batch norm in train mode, then prune 50 % and freeze
    for b in [batch(0) for _ in range(w.task1_steps)]:
        state, _ = step(state, b, t0, m.phases(0)[0].name)
    state = prune(state, t0, m.phases(0)[0].name)
    state = begin(state, t1)
    state = state.replace(opt_state=jax.jit(tx.init, out_shardings=rep)(state.params))
    frozen = [o == 1 for o in masked_leaves(state, state.extra["owner"])]
    before = masked_leaves(state, state.params)

    batches = [batch(1) for _ in range(w.iters)]  # (a) task 2
    phase = m.phases(1)[0].name  # task 2's training phase (batch norm frozen, if the model has it)
    train_one = common.StepCycle(step, state, batches, t1, phase)
    times = common.time_repeats(train_one, warmup=w.warmup, repeats=w.train_repeats, inner=w.iters)
    state = train_one.state
    after = masked_leaves(state, state.params)
    assert all((a[f] == b[f]).all() for a, b, f in zip(before, after, frozen)), "frozen weights moved"

    ptimes = common.time_calls(lambda: prune(state, t1, phase), warmup=2, repeats=9)  # (b)
    owners = masked_leaves(state, state.extra["owner"])
    pruned = prune(state, t1, phase)
    owners_after = masked_leaves(pruned, pruned.extra["owner"])
    free = int(sum((o == 2).sum() for o in owners))
    n_pruned = int(sum(((a == 2) & (b == 0)).sum() for a, b in zip(owners, owners_after)))

    xs = [batch(0)["x"] for _ in range(w.eval_batches)]  # (c) task 1, mask applied in every call
    etimes = common.time_repeats(lambda: [predict(state, x, t0) for x in xs], warmup=1, repeats=5, inner=1)
    return {
        "train_steps_per_s": common.rate_stats(times, w.iters),
        "prune_step": dict(common.time_stats_ms(ptimes), free_weights=free, pruned_weights=n_pruned),
        "eval_samples_per_s": common.rate_stats(etimes, w.eval_batches * w.batch),
    }


def main(w: Workload, argv=None) -> int:
    args = common.workload_parser(w.description).parse_args(argv)
    ours = run_jaxcl(w)
    peer = None if args.no_peer else common.run_peer(w.peer_script)
    fl = common.flops(w.flops_key)
    peak = common.peak_gflops()
    jax_peak = common.jax_matmul_gflops()
    per_sample_eval = (fl.get(w.eval_flops_key) or 0) / (w.eval_batches * w.batch) or None
    rec = {"workload": w.name,
           "config": {"model": w.description, "batch": w.batch, "lr": 0.01, "prune_fraction": 0.5,
                      "peak_gflops": peak, "jax_matmul_gflops": jax_peak, "jax_devices": jax.device_count()},
           "jaxcl": ours,
           "share_of_peak": {
               "train": common.share_of_peak(ours["train_steps_per_s"]["median"], fl.get("train_step"), peak),
               "eval": common.share_of_peak(ours["eval_samples_per_s"]["median"], per_sample_eval, peak),
               "train_of_jax_matmul_peak": common.share_of_peak(ours["train_steps_per_s"]["median"],
                                                                fl.get("train_step"), jax_peak)}}
    if peer:
        pt = peer["plain_torch"]
        rec["plain_torch"] = pt
        rec["ratios"] = {"train_vs_torch": common.ratio(ours, pt, "train_steps_per_s"),
                         "prune_time_vs_torch": common.ratio(ours, pt, "prune_step"),
                         "eval_vs_torch": common.ratio(ours, pt, "eval_samples_per_s")}
        rec["share_of_peak"]["torch_train"] = common.share_of_peak(pt["train_steps_per_s"]["median"],
                                                                   fl.get("train_step"), peak)
        rec["share_of_peak"]["torch_eval"] = common.share_of_peak(pt["eval_samples_per_s"]["median"],
                                                                  per_sample_eval, peak)
        for k in ("avalanche", "avalanche_no_metrics", "avalanche_shared_head"):
            if peer.get(k):
                rec[k] = peer[k]
                rec["ratios"][f"train_vs_{k}"] = round(
                    ours["train_steps_per_s"]["median"] / peer[k]["train_steps_per_s"]["median"], 3)
        rec["peer_env"] = peer.get("env")
    common.emit(rec)
    return 0


W1 = Workload(
    name="W1_packnet_mlp", peer_script="w1_packnet_mlp.py", flops_key="w1_packnet_mlp",
    model_sets=("model.name=mlp", "model.hidden=(400, 400)"), input_shape=(784,), batch=128, task1_steps=20,
    iters=50, warmup=50, train_repeats=6, eval_batches=50, eval_flops_key="eval_pass_6400",
    description="MLP 784-400-400, 2 heads Linear(400,10), batch 128, SGD lr 0.01")
W2 = Workload(
    name="W2_packnet_resnet", peer_script="w2_packnet_resnet.py", flops_key="w2_packnet_resnet",
    model_sets=("model.name=reduced_resnet18",), input_shape=(32, 32, 3), batch=32, task1_steps=10,
    iters=20, warmup=10, train_repeats=7, eval_batches=20, eval_flops_key="eval_pass_640", image=True,
    description="reduced ResNet-18 nf=20, 2 heads Linear(160,10), batch 32, SGD lr 0.01, BN frozen on task 2")

if __name__ == "__main__":
    sys.exit(main({"w1": W1, "w2": W2}[sys.argv[1]], sys.argv[2:]))
