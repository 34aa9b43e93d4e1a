"""W6 of ../shared/peers/WORKLOADS.md: L2P on a frozen ViT-Ti/16 at 224x224, batch 16.

jaxcl's ``vit_ti16`` (jaxcl.models.vit, frozen) with a minimal L2P prompt pool written on
its token interface, exactly W6's work: a pool of M=10 prompts of L=5 tokens with keys
(uniform(-1, 1)), the query = the frozen ViT's cls feature on the un-prompted image (no
gradient), top N=5 keys by cosine similarity, the prompted pass (tokens [cls, N*L prompts,
patches], position embedding on cls and patches only) with the input gradient flowing
through every frozen block, representation = mean of the final LayerNorm output over the
prompt positions, a Linear(D, 100) head masked to classes 10..19, loss = CE + 0.1 * mean(1 -
sim of the selected keys), Adam lr 0.03 on prompts, keys and head. (The ``l2p`` method of
issue 21 replaces this pool.) The backbone's weights are constants of the step: no weight
gradient is computed for them.

Measures train steps/s (5 blocks of 2 steps over 4 pre-made batches, 2 warm-up steps)
and eval samples/s (query pass + prompted pass, 2 batches of 16 per pass, 5 passes); then
the PyTorch peer in the same command; one JSON line with ratios and each rate's share of
the fp32 matmul peak (FLOP per unit from ../shared/peers/flops.jsonl, attention included).

    python benchmarks/w6_l2p_vit.py [--no-peer] [--model vit_ti16] [--dtype float32]
"""
from __future__ import annotations

import functools
import sys
import time

import devices  # noqa: F401  (--devices N, before jax starts)
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common

from jaxcl import models

BATCH, IMG, NCLS = 16, 224, 100
POOL, PLEN, TOPN, PULL, LR = 10, 5, 5, 0.1, 0.03
TASK_CLASSES = range(10, 20)
TRAIN_WARMUP, TRAIN_REPEATS, ITERS_PER_BLOCK = 2, 5, 2
EVAL_BATCHES, EVAL_REPEATS = 2, 5


def l2p(model):
    """(init, loss, predict) of the minimal prompt pool on the frozen ``model`` (its
    variables an argument of each, never differentiated)."""
    d = model.width
    mask = jnp.full((NCLS,), -jnp.inf).at[jnp.asarray(list(TASK_CLASSES))].set(0.0)

    def init(rng):
        k1, k2, k3 = jax.random.split(rng, 3)
        bound = 1.0 / np.sqrt(d)
        return {"prompt": jax.random.uniform(k1, (POOL, PLEN, d), minval=-1, maxval=1),
                "key": jax.random.uniform(k2, (POOL, d), minval=-1, maxval=1),
                "head": {"kernel": jax.random.uniform(k3, (d, NCLS), minval=-bound, maxval=bound),
                         "bias": jnp.zeros((NCLS,))}}

    def forward(p, vit_vars, x):
        q = jax.lax.stop_gradient(model.apply(vit_vars, x, features=True))  # the cls feature, no prompts
        unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # noqa: E731
        sim = unit(q) @ unit(p["key"]).T  # [B, M]
        top, idx = jax.lax.top_k(sim, TOPN)
        prompts = p["prompt"][idx].reshape(x.shape[0], TOPN * PLEN, d)
        z = model.apply(vit_vars, x, prompts=prompts, pool="prompt", features=True)
        return z @ p["head"]["kernel"] + p["head"]["bias"] + mask, jnp.mean(1.0 - top)

    def loss(p, vit_vars, x, y):
        logits, pull = forward(p, vit_vars, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + PULL * pull

    return init, loss, lambda p, vit_vars, x: forward(p, vit_vars, x)[0]


def run_jaxcl(name: str, dtype: str) -> dict:
    info_shape = (IMG, IMG, 3)
    model = models._MODELS[name](num_outputs=NCLS, image_size=info_shape[:2], dtype=dtype)
    # random weights drawn on the host (compiling the init of 12 blocks costs minutes here); the
    # pool has its own head
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + info_shape))["params"]
    host = np.random.default_rng(0)
    vit_vars = {"params": jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape) if path[-1].key == "scale" else
        jnp.asarray(host.normal(0.0, 0.02, s.shape), jnp.float32), {k: v for k, v in shapes.items() if k != "head"})}
    init, loss, predict = l2p(model)
    tx = optax.adam(LR)
    params = init(jax.random.PRNGKey(1))
    state = (params, tx.init(params))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, vit_vars, x, y):
        p, o = state
        value, g = jax.value_and_grad(loss)(p, vit_vars, x, y)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), value

    rng = np.random.default_rng(1)
    lo = TASK_CLASSES.start
    batches = [(jnp.asarray(rng.standard_normal((BATCH,) + info_shape, np.float32)),
                jnp.asarray(rng.integers(lo, lo + len(TASK_CLASSES), BATCH, dtype=np.int32))) for _ in range(4)]
    box = {"state": state, "i": 0}

    def train_one():
        x, y = batches[box["i"] % len(batches)]
        box["state"], value = step(box["state"], vit_vars, x, y)
        box["i"] += 1
        return value

    t0 = time.perf_counter()
    jax.block_until_ready(train_one())
    print(f"[w6] jaxcl: first train step (compile included) {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ttimes = common.time_repeats(train_one, warmup=TRAIN_WARMUP, repeats=TRAIN_REPEATS, inner=ITERS_PER_BLOCK)
    assert np.isfinite(float(train_one()))
    pred = jax.jit(predict)
    xs = [jnp.asarray(rng.standard_normal((BATCH,) + info_shape, np.float32)) for _ in range(EVAL_BATCHES)]
    p = box["state"][0]
    print(f"[w6] jaxcl: train blocks {[round(t, 2) for t in ttimes]} s", file=sys.stderr)
    etimes = common.time_repeats(lambda: [pred(p, vit_vars, x) for x in xs], warmup=1, repeats=EVAL_REPEATS, inner=1)
    print(f"[w6] jaxcl: eval passes {[round(t, 2) for t in etimes]} s", file=sys.stderr)
    n_backbone = sum(a.size for a in jax.tree_util.tree_leaves(vit_vars))
    n_train = sum(a.size for a in jax.tree_util.tree_leaves(params))
    return {"train_steps_per_s": common.rate_stats(ttimes, ITERS_PER_BLOCK),
            "eval_samples_per_s": common.rate_stats(etimes, EVAL_BATCHES * BATCH),
            "backbone_params": n_backbone, "trainable_params": n_train}


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
           "config": {"model": f"{args.model} frozen ({args.dtype}), L2P pool {POOL} x {PLEN} tokens, top {TOPN}",
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
