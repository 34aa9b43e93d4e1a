"""W3 of ../shared/peers/WORKLOADS.md: CLR on the CIFAR ResNet-18 (width 64), a per-task
identity-initialised depthwise 3x3 after every conv (20), backbone frozen with batch norm
in inference mode (``method.variant=full``, ``method.task_bn=false``), batch 64, SGD lr
0.01 on the task's CLR kernels and head (48,330 parameters). Train steps/s (blocks of 2
steps cycling 4 batches) and eval samples/s (passes of 4 x 64), jaxcl then the PyTorch
peer, one JSON line with ratios and shares of the fp32 matmul peak.

    python benchmarks/w3_clr_resnet.py [--no-peer] [--devices N]
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

BATCH, LR, TASKS = 64, 0.01, 2


def run_jaxcl() -> dict:
    c = config_lib.override(jaxcl.get_config("split_cifar10:method=clr"), [
        f"num_tasks={TASKS}", "model.name=resnet18_cifar", "method.variant=full", "method.task_bn=false",
        "optimizer.name=sgd", f"optimizer.lr={LR}", "optimizer.momentum=0", "optimizer.schedule=constant",
        f"batch_size={BATCH}", "data.augment=false"])
    info = data.StreamInfo(TASKS, "task", (32, 32, 3), TASKS, 10, (10,) * TASKS, (10,) * TASKS)
    m = methods.build(c, models.build(c.model, info), info)
    tx = optim.make(c.optimizer)
    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    rng = np.random.default_rng(1)

    def batch():
        return sharding.shard_batch({
            "x": rng.standard_normal((BATCH, 32, 32, 3), np.float32),
            "y": rng.integers(0, 10, BATCH, dtype=np.int32), "task": np.ones(BATCH, np.int32),
            "mask": np.ones(BATCH, np.float32)}, mesh)

    state = m.init(jax.random.PRNGKey(0), jnp.zeros((BATCH, 32, 32, 3)))
    state = sharding.replicate(state.replace(opt_state=tx.init(state.params)), mesh)
    t1 = jnp.int32(1)
    state = jax.jit(m.begin_task, out_shardings=rep)(state, t1)
    trainable = common.trainable_count(state)
    step = xla.jit(train.make_train_step(m, tx, augment=False), donate_argnums=0, static_argnums=3, out_shardings=rep)
    predict = xla.jit(m.predict)
    batches = [batch() for _ in range(4)]
    train_one = common.StepCycle(step, state, batches, t1, "train")
    times = common.time_repeats(train_one, warmup=2, repeats=5, inner=2)
    state = train_one.state
    etimes = common.time_repeats(lambda: [predict(state, b["x"], t1) for b in batches], warmup=1, repeats=5, inner=1)
    report = m.report(state)
    return {"train_steps_per_s": common.rate_stats(times, 2), "eval_samples_per_s": common.rate_stats(etimes, 4 * BATCH),
            "trainable_params": trainable, "clr_params_one_task": report["clr_per_task"],
            "backbone_params_no_fc": report["backbone"]}


def main(argv=None) -> int:
    args = common.workload_parser(__doc__.splitlines()[0]).parse_args(argv)
    ours = run_jaxcl()
    peer = None if args.no_peer else common.run_peer("w3_clr_resnet.py")
    fl, peak, jax_peak = common.flops("w3_clr_resnet"), common.peak_gflops(), common.jax_matmul_gflops()
    per_sample = (fl.get("eval_pass_256") or 0) / 256 or None
    rec = {"workload": "W3_clr_resnet",
           "config": {"model": "CIFAR ResNet-18 nf=64, CLR dw3x3 after every conv", "batch": BATCH, "lr": LR,
                      "peak_gflops": peak, "jax_matmul_gflops": jax_peak, "jax_devices": jax.device_count()},
           "jaxcl": ours,
           "share_of_peak": {
               "train": common.share_of_peak(ours["train_steps_per_s"]["median"], fl.get("train_step"), peak),
               "eval": common.share_of_peak(ours["eval_samples_per_s"]["median"], per_sample, peak),
               "train_of_jax_matmul_peak": common.share_of_peak(ours["train_steps_per_s"]["median"],
                                                                fl.get("train_step"), jax_peak)}}
    if peer:
        pt = peer["plain_torch"]
        rec["plain_torch"] = pt
        rec["ratios"] = {"train_vs_torch": common.ratio(ours, pt, "train_steps_per_s"),
                         "eval_vs_torch": common.ratio(ours, pt, "eval_samples_per_s")}
        rec["share_of_peak"]["torch_train"] = common.share_of_peak(pt["train_steps_per_s"]["median"],
                                                                   fl.get("train_step"), peak)
        rec["share_of_peak"]["torch_eval"] = common.share_of_peak(pt["eval_samples_per_s"]["median"], per_sample, peak)
        rec["peer_config"] = peer.get("config")
        rec["peer_env"] = peer.get("env")
    common.emit(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
