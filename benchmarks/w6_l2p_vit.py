"""W6 of ../shared/peers/WORKLOADS.md: L2P on a frozen ViT-Ti/16 at 224x224, batch 16.

jaxcl's ``l2p`` method (jaxcl.methods.l2p, the one ``jaxcl run ptm_cifar100:method=l2p``
trains) on ``vit_ti16`` (frozen), at W6's settings: a pool of M=10 prompts of L=5 tokens
with keys, the query = the frozen ViT's cls feature on the un-prompted image (no
gradient), top N=5 keys by cosine similarity per image (no batch-wise vote), the prompted
pass with the input gradient flowing through every frozen block, representation = mean of
the prompt tokens' outputs, one head over 100 classes masked to task 1's classes 10..19,
loss = CE - 0.1 x the chosen keys' similarity, Adam lr 0.03 on prompts, keys and head.
The step is the library's (``train.make_train_step``), as every W1-W5 script times it.
The backbone is random (no pretrained weights here): the work is the same.

Measures train steps/s (5 blocks of 2 steps over 4 pre-made batches, 2 warm-up steps)
and eval samples/s (the method's prediction: query pass + prompted pass, 2 batches of 16
per pass, 5 passes); then the PyTorch peer in the same command; one JSON line with
ratios and each rate's share of the fp32 matmul peak (FLOP per unit from
../shared/peers/flops.jsonl, attention included).

    python benchmarks/w6_l2p_vit.py [--no-peer] [--model vit_ti16] [--dtype float32]
"""
from __future__ import annotations

import sys
import time
import warnings

import devices  # noqa: F401  (--devices N, before jax starts)
import jax
import jax.numpy as jnp
import numpy as np

import common

import jaxcl
from jaxcl import config as config_lib
from jaxcl import data, methods, models, optim, train, xla

BATCH, IMG, NCLS = 16, 224, 100
POOL, PLEN, TOPN, PULL, LR = 10, 5, 5, 0.1, 0.03
TASK_CLASSES = range(10, 20)
TRAIN_WARMUP, TRAIN_REPEATS, ITERS_PER_BLOCK = 2, 5, 2
EVAL_BATCHES, EVAL_REPEATS = 2, 5


def run_jaxcl(name: str, dtype: str) -> dict:
    c = config_lib.override(jaxcl.get_config("ptm_cifar100:method=l2p"), [
        f"model.name={name}", f"model.dtype={dtype}", f"batch_size={BATCH}", "num_tasks=10",
        "data.classes_per_task=10", f"method.pool_size={POOL}", f"method.length={PLEN}", f"method.top_k={TOPN}",
        "method.batchwise_prompt=false", f"method.pull={PULL}", "optimizer.name=adam", f"optimizer.lr={LR}",
        "optimizer.momentum=0.0", "optimizer.grad_clip=0.0"])
    info = data.StreamInfo(10, "class", (IMG, IMG, 3), 1, NCLS, (NCLS,), (10,) * 10)
    with warnings.catch_warnings():  # the random backbone is the point here (no weights to download)
        warnings.simplefilter("ignore", methods.base.UntrainedBackboneWarning)
        m = methods.build(c, models.build(c.model, info), info)
    tx = optim.make(c.optimizer)
    state = m.init(jax.random.PRNGKey(0), jnp.zeros((1, IMG, IMG, 3)))  # op by op: no compile of 12 blocks' init
    state = state.replace(opt_state=tx.init(state.params))
    task = jnp.int32(1)  # classes 10..19
    rng = np.random.default_rng(1)
    lo = TASK_CLASSES.start
    batches = [{"x": jnp.asarray(rng.standard_normal((BATCH, IMG, IMG, 3), np.float32)),
                "y": jnp.asarray(rng.integers(lo, lo + len(TASK_CLASSES), BATCH, dtype=np.int32)),
                "task": jnp.ones(BATCH, jnp.int32), "mask": jnp.ones(BATCH, jnp.float32)} for _ in range(4)]
    step = xla.jit(train.make_train_step(m, tx, augment=False), donate_argnums=0, static_argnums=3)
    call = common.StepCycle(step, state, batches, task, m.phases(1)[0].name)
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    print(f"[w6] jaxcl: first train step (compile included) {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ttimes = common.time_repeats(call, warmup=TRAIN_WARMUP, repeats=TRAIN_REPEATS, inner=ITERS_PER_BLOCK)
    assert np.isfinite(float(call()))
    print(f"[w6] jaxcl: train blocks {[round(t, 2) for t in ttimes]} s", file=sys.stderr)
    pred, st = xla.jit(m.predict), call.state
    xs = [jnp.asarray(rng.standard_normal((BATCH, IMG, IMG, 3), np.float32)) for _ in range(EVAL_BATCHES)]
    etimes = common.time_repeats(lambda: [pred(st, x, task) for x in xs], warmup=1, repeats=EVAL_REPEATS, inner=1)
    print(f"[w6] jaxcl: eval passes {[round(t, 2) for t in etimes]} s", file=sys.stderr)
    n_all = sum(a.size for a in jax.tree_util.tree_leaves(st.params))
    n_train = common.trainable_count(st)
    return {"train_steps_per_s": common.rate_stats(ttimes, ITERS_PER_BLOCK),
            "eval_samples_per_s": common.rate_stats(etimes, EVAL_BATCHES * BATCH),
            "backbone_params": n_all - n_train, "trainable_params": n_train}


def main(argv=None) -> int:
    ap = common.workload_parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_ti16", choices=["vit_ti16", "vit_s16", "vit_b16"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    ours = run_jaxcl(args.model, args.dtype)
    peer = None if args.no_peer else common.run_peer("w6_l2p_vit.py", {"W6_MODEL": args.model})
    fl = common.flops("w6_l2p_vit") if args.model == "vit_ti16" else {}
    peak, jax_peak = common.peak_gflops(), common.jax_matmul_gflops()
    per_sample = (fl.get("eval_pass_32") or 0) / (EVAL_BATCHES * BATCH) or None
    rec = {"workload": "W6_l2p_vit",
           "config": {"model": f"{args.model} frozen ({args.dtype}), jaxcl.methods.l2p, pool {POOL} x {PLEN} tokens, top {TOPN}",
                      "batch": BATCH, "image": IMG, "lr": LR, "optimizer": "adam", "pull": PULL,
                      "peak_gflops": peak, "jax_matmul_gflops": jax_peak, "jax_devices": jax.device_count()},
           "jaxcl": ours,
           "share_of_peak": {
               "train": common.share_of_peak(ours["train_steps_per_s"]["median"], fl.get("train_step"), peak),
               "eval": common.share_of_peak(ours["eval_samples_per_s"]["median"], per_sample, peak)}}
    if peer:
        pt = {k: peer[k] for k in ("train_steps_per_s", "eval_samples_per_s")}
        rec["plain_torch"] = pt
        rec["ratios"] = {"train_vs_torch": common.ratio(ours, pt, "train_steps_per_s"),
                         "eval_vs_torch": common.ratio(ours, pt, "eval_samples_per_s")}
        rec["share_of_peak"]["torch_train"] = common.share_of_peak(pt["train_steps_per_s"]["median"],
                                                                   fl.get("train_step"), peak)
        rec["share_of_peak"]["torch_eval"] = common.share_of_peak(pt["eval_samples_per_s"]["median"], per_sample,
                                                                  peak)
        rec["peer_config"], rec["peer_env"] = peer.get("config"), peer.get("env")
    common.emit(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
