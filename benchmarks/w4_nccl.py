"""W4 of ../shared/peers/WORKLOADS.md: one NCCL online call on the reduced ResNet-18
(100-way head, every conv calibrated): 5 inner SGD steps on theta (step 1 on the
incoming 10 images, steps 2-5 on them plus 10 replayed, one forward of 20), kept as a
second-order graph, then the outer step on the calibration parameters (KD + the EWC-style
term with the last inner step's weight gradient, graph kept), theta <- fast weights.
Memory: 200 prefilled samples, read-only. jaxcl's method (jaxcl.methods.nccl,
``ewc_grad=last_inner``, ``inner_clip=0``, ``update_memory=false``) and train step: the
whole bilevel call is one compiled program. Calls/s (blocks of 3 calls), jaxcl then the
PyTorch peer, one JSON line with the ratio and shares of the fp32 matmul peak.

    python benchmarks/w4_nccl.py [--no-peer] [--devices N]
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
from jaxcl.methods import _memory

B, MEM, CLASSES = 10, 200, 100


def run_jaxcl() -> dict:
    c = config_lib.override(jaxcl.get_config("split_mnist:method=nccl"), [
        "num_tasks=1", "scenario=class", "model.name=reduced_resnet18", "optimizer.name=sgd", "optimizer.lr=0.01",
        "optimizer.momentum=0", f"batch_size={B}", "online=true", "method.inner_steps=5", "method.inner_lr=0.01",
        "method.inner_clip=0.0", "method.gamma=1.0", "method.reg=1.0", "method.temperature=2.0",
        "method.reg_ewc=1.0", "method.ewc_grad=last_inner", "method.update_memory=false",
        f"method.memory_size={MEM}", f"method.replay_batch={B}"])
    info = data.StreamInfo(1, "class", (32, 32, 3), 1, CLASSES, (CLASSES,), (CLASSES,))
    model = models.build(c.model, info)
    m = methods.build(c, model, info)
    tx = optim.make(c.optimizer)
    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    rng = np.random.default_rng(1)
    state = m.init(jax.random.PRNGKey(0), jnp.zeros((B, 32, 32, 3)))
    q = jax.nn.softmax(jnp.asarray(rng.standard_normal((MEM, CLASSES), np.float32)))
    mem = _memory.reservoir_insert(state.extra["memory"], rng.standard_normal((MEM, 32, 32, 3), np.float32),
                                rng.integers(0, CLASSES, MEM), np.zeros(MEM, np.int32), q, np.ones(MEM),
                                jax.random.PRNGKey(1))
    state = state.replace(extra={**state.extra, "memory": mem}, opt_state=tx.init(state.params))
    state = sharding.replicate(state, mesh)
    calib = sum(a.size for a in jax.tree_util.tree_leaves(state.params["calib"]))
    theta = sum(a.size for a in jax.tree_util.tree_leaves(state.params["params"]))
    batches = [sharding.shard_batch({"x": rng.standard_normal((B, 32, 32, 3), np.float32),
                                     "y": rng.integers(0, CLASSES, B).astype(np.int32),
                                     "task": np.zeros(B, np.int32), "mask": np.ones(B, np.float32)}, mesh)
               for _ in range(8)]
    step = xla.jit(train.make_train_step(m, tx, augment=False), donate_argnums=0, static_argnums=3, out_shardings=rep)
    call = common.StepCycle(step, state, batches, jnp.int32(0), "train")

    times = common.time_repeats(call, warmup=2, repeats=5, inner=3)
    last = call()
    return {"calls_per_s": common.rate_stats(times, 3),
            "incoming_samples_per_s": common.rate_stats(times, 3 * B),
            "theta_params": theta, "phi_params": calib, "last_outer_loss": float(last)}


def main(argv=None) -> int:
    args = common.workload_parser(__doc__.splitlines()[0]).parse_args(argv)
    ours = run_jaxcl()
    peer = None if args.no_peer else common.run_peer("w4_nccl.py")
    fl, peak, jax_peak = common.flops("w4_nccl"), common.peak_gflops(), common.jax_matmul_gflops()
    rec = {"workload": "W4_nccl",
           "config": {"model": "reduced ResNet-18 nf=20, calibrated convs (psi, calib_b, lambda)", "incoming_batch": B,
                      "memory": MEM, "inner_steps": 5, "peak_gflops": peak, "jax_matmul_gflops": jax_peak,
                      "jax_devices": jax.device_count()},
           "jaxcl": ours,
           "share_of_peak": {
               "call": common.share_of_peak(ours["calls_per_s"]["median"], fl.get("online_call"), peak),
               "call_of_jax_matmul_peak": common.share_of_peak(ours["calls_per_s"]["median"], fl.get("online_call"),
                                                               jax_peak)}}
    if peer:
        pt = peer["plain_torch"]
        rec["plain_torch"] = pt
        rec["ratios"] = {"calls_vs_torch": common.ratio(ours, pt, "calls_per_s")}
        rec["share_of_peak"]["torch_call"] = common.share_of_peak(pt["calls_per_s"]["median"], fl.get("online_call"),
                                                                  peak)
        rec["peer_config"], rec["peer_env"] = peer.get("config"), peer.get("env")
    common.emit(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
