"""W5 of ../shared/peers/WORKLOADS.md: ResCL stage 2 on two reduced ResNet-18 branches
(20 conv+BN units), batch 32, SGD lr 0.01, a_s = a_t = 0 at the start, lambda 1e-3, loss
CE(new head) + LwF (T=2, against source logits recorded once before training) + L1.
jaxcl's own method (jaxcl.methods.rescl, ``target_loss=ce``) and train step. Measures
train steps/s (blocks of 10 steps over 10 batches), the merge (ms, one call at a time
from the same state) and eval samples/s of the unmerged (both batch norms in inference
mode) and merged networks (20 batches x 32). jaxcl then the PyTorch peer, one JSON line
with ratios and shares of the fp32 matmul peak.

    python benchmarks/w5_rescl.py [--no-peer] [--devices N]
"""
from __future__ import annotations

import sys

import devices  # noqa: F401  (--devices N, before jax starts)
import jax
import jax.numpy as jnp
import numpy as np

import common

import jaxcl
from jaxcl import config as config_lib
from jaxcl import data, methods, models, optim, sharding, train, xla
from jaxcl.methods import rescl

BATCH, LR = 32, 0.01


def run_jaxcl() -> dict:
    c = config_lib.override(jaxcl.get_config("split_mnist:method=rescl"), [
        "num_tasks=2", "model.name=reduced_resnet18", "optimizer.name=sgd", f"optimizer.lr={LR}",
        "optimizer.momentum=0", "method.l1=0.001", "method.a_init=(0.0, 0.0)", "method.target_loss=ce",
        f"batch_size={BATCH}"])
    info = data.StreamInfo(2, "task", (32, 32, 3), 2, 10, (10, 10), (10, 10))
    model = models.build(c.model, info)
    m = methods.build(c, model, info)
    tx = optim.make(c.optimizer)
    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    rng = np.random.default_rng(1)
    t1 = jnp.int32(1)

    state = m.init(jax.random.PRNGKey(0), jnp.zeros((BATCH, 32, 32, 3)))
    state = sharding.replicate(state.replace(opt_state=tx.init(state.params)), mesh)
    state = jax.jit(m.begin_task, out_shardings=rep)(state, t1)  # target = copy of the source, a = 0
    state = jax.jit(m.after_phase, static_argnums=2, out_shardings=rep)(state, t1, "finetune")  # stage-2 masks
    source = rescl._clone(model, "source", (0.0, 0.0))
    source_all = xla.jit(lambda s, x: source.apply({**s.params, **s.model_state}, x, "all", False))

    def batch():
        x = rng.standard_normal((BATCH, 32, 32, 3), np.float32)
        b = {"x": x, "y": rng.integers(0, 10, BATCH, dtype=np.int32), "task": np.ones(BATCH, np.int32),
             "mask": np.ones(BATCH, np.float32)}
        b["source_logits"] = np.asarray(source_all(state, jnp.asarray(x)))  # recorded once, untimed
        return sharding.shard_batch(b, mesh)

    batches = [batch() for _ in range(10)]
    step = xla.jit(train.make_train_step(m, tx, augment=False), donate_argnums=0, static_argnums=3, out_shardings=rep)
    train_one = common.StepCycle(step, state, batches, t1, "combine")
    times = common.time_repeats(train_one, warmup=5, repeats=7, inner=10)
    state = train_one.state
    # random a_s, a_t and batch-norm statistics for the merge check, as the peer
    k = iter(jax.random.split(jax.random.PRNGKey(3), 500))
    state = state.replace(
        params={**state.params, "rescl": jax.tree_util.tree_map(
            lambda a: jax.random.uniform(next(k), a.shape, minval=-0.5, maxval=0.5), state.params["rescl"])},
        model_state=jax.tree_util.tree_map_with_path(
            lambda p, a: a * jax.random.uniform(next(k), a.shape, minval=0.5, maxval=1.5) + (
                0.0 if p[-1].key == "var" else 0.1 * jax.random.normal(next(k), a.shape)), state.model_state))
    merge = jax.jit(m.after_phase, static_argnums=2)
    mtimes = common.time_calls(lambda: merge(state, t1, "combine"), warmup=2, repeats=5)
    merged = merge(state, t1, "combine")
    combined = rescl._clone(model, "combined", (0.0, 0.0))
    unmerged_fn = xla.jit(lambda s, x: combined.apply({**s.params, **s.model_state}, x, t1, False))
    merged_fn = xla.jit(m.predict)
    xs = [rng.standard_normal((BATCH, 32, 32, 3), np.float32) for _ in range(20)]
    xs = [sharding.shard_batch({"x": x}, mesh)["x"] for x in xs]
    diff = max(float(jnp.abs(unmerged_fn(state, x) - merged_fn(merged, x, t1)).max()) for x in xs[:2])
    scale = float(jnp.abs(unmerged_fn(state, xs[0])).max())
    e_un = common.time_repeats(lambda: [unmerged_fn(state, x) for x in xs], warmup=1, repeats=5, inner=1)
    e_mg = common.time_repeats(lambda: [merged_fn(merged, x, t1) for x in xs], warmup=1, repeats=5, inner=1)
    rep_counts = rescl.param_report(state.params)
    n_train = common.trainable_count(state)
    return {"train_steps_per_s": common.rate_stats(times, 10), "merge_time": common.time_stats_ms(mtimes),
            "eval_samples_per_s_unmerged": common.rate_stats(e_un, 20 * BATCH),
            "eval_samples_per_s_merged": common.rate_stats(e_mg, 20 * BATCH),
            "merge_max_abs_diff": diff, "merge_check_output_scale": scale, "trainable_params": n_train,
            "params_unmerged": rep_counts["unmerged_network"], "params_merged": rep_counts["merged_network"]}


def main(argv=None) -> int:
    args = common.workload_parser(__doc__.splitlines()[0]).parse_args(argv)
    ours = run_jaxcl()
    peer = None if args.no_peer else common.run_peer("w5_rescl.py")
    fl, peak, jax_peak = common.flops("w5_rescl"), common.peak_gflops(), common.jax_matmul_gflops()
    per = lambda key: (fl.get(key) or 0) / 640 or None  # noqa: E731  FLOP per eval sample
    rec = {"workload": "W5_rescl",
           "config": {"model": "2 x reduced ResNet-18 nf=20, ResCL unit per conv+BN pair", "batch": BATCH, "lr": LR,
                      "peak_gflops": peak, "jax_matmul_gflops": jax_peak, "jax_devices": jax.device_count()},
           "jaxcl": ours,
           "share_of_peak": {
               "train": common.share_of_peak(ours["train_steps_per_s"]["median"], fl.get("train_step"), peak),
               "eval_merged": common.share_of_peak(ours["eval_samples_per_s_merged"]["median"],
                                                   per("eval_pass_640_merged"), peak),
               "eval_unmerged": common.share_of_peak(ours["eval_samples_per_s_unmerged"]["median"],
                                                     per("eval_pass_640_unmerged"), peak)}}
    if peer:
        pt = peer["plain_torch"]
        rec["plain_torch"] = pt
        rec["ratios"] = {"train_vs_torch": common.ratio(ours, pt, "train_steps_per_s"),
                         "merge_time_vs_torch": common.ratio(ours, pt, "merge_time"),
                         "eval_merged_vs_torch": common.ratio(ours, pt, "eval_samples_per_s_merged"),
                         "eval_unmerged_vs_torch": common.ratio(ours, pt, "eval_samples_per_s_unmerged")}
        rec["share_of_peak"]["torch_train"] = common.share_of_peak(pt["train_steps_per_s"]["median"],
                                                                   fl.get("train_step"), peak)
        rec["share_of_peak"]["torch_eval_merged"] = common.share_of_peak(
            pt["eval_samples_per_s_merged"]["median"], per("eval_pass_640_merged"), peak)
        rec["peer_config"], rec["peer_env"] = peer.get("config"), peer.get("env")
    common.emit(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
