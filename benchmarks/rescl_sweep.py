"""ResCL's fair-comparison view (Lee et al. 2020, sec. 4): sweep lambda, the weight of the
L1 decay on the combination, and read the trade-off between source and target accuracy.

Task 0 (the source) and stage 1 (the fine-tuned target) are learned once; stage 2 then
runs for every lambda at the same time: lambda sits in the method's state, the states
for all lambdas are stacked on a leading axis, and one ``vmap``-ed train step updates
all of them on each batch. Each is merged and evaluated on both tasks. Prints a table and
the maximum achievable average accuracy, and draws source vs target accuracy.

    python benchmarks/rescl_sweep.py                       # Split-MNIST 0-4 -> 5-9, MLP 2x400
    python benchmarks/rescl_sweep.py --lambdas 0,1e-4,1e-3,1e-2,0.1,1 --epochs 2
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import common
import jaxcl
from jaxcl import config as config_lib
from jaxcl import data, methods, models, optim, train



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="split_mnist:method=rescl")
    ap.add_argument("--set", action="append", default=[], help="config overrides, as `jaxcl run --set`")
    ap.add_argument("--lambdas", default="0,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,0.1,1")
    ap.add_argument("--data-dir", default=common.DATA_DIR)
    ap.add_argument("--out", default="runs/rescl_sweep")
    args = ap.parse_args(argv)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    c = config_lib.override(jaxcl.get_config(args.config), [
        "num_tasks=2", "data.classes_per_task=5", f"data.dir={args.data_dir}", *args.set])
    stream = data.build(c)
    model = models.build(c.model, stream.info)
    m = methods.build(c, model, stream.info)
    tx = optim.make(c.optimizer)
    t0 = time.perf_counter()

    def train_phase(step, state, task, phase, epochs):
        pool = data.pool(stream, task, "train", c.data.normalize)
        for e in range(epochs):
            order = data.epoch_order(len(pool), c.seed, task, 0 if phase == "train" else 1, e)
            for b in data.batches(pool, c.batch_size, order, drop_last=True):
                state, _ = step(state, b, jnp.int32(task), phase)
        return state

    step = jax.jit(train.make_train_step(m, tx, augment=False), static_argnums=3)
    state = m.init(jax.random.PRNGKey(c.seed), jnp.zeros((c.batch_size,) + stream.info.input_shape))
    state = state.replace(opt_state=tx.init(state.params))
    state = m.begin_task(state, jnp.int32(0))
    state = train_phase(step, state, 0, "train", c.epochs)
    state = m.begin_task(state, jnp.int32(1))
    state = state.replace(opt_state=tx.init(state.params))
    state = train_phase(step, state, 1, "finetune", c.epochs)
    state = m.after_phase(state, jnp.int32(1), "finetune")
    state = state.replace(opt_state=tx.init(state.params))

    # stage 2 for every lambda at once: states stacked on a leading axis
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a] * len(lambdas)), state)
    stacked = stacked.replace(extra={**stacked.extra, "lambda": jnp.asarray(lambdas, jnp.float32)})
    vstep = jax.jit(jax.vmap(functools.partial(train.make_train_step(m, tx, augment=False), phase="combine"),
                             in_axes=(0, None, None)))
    pool = data.pool(stream, 1, "train", c.data.normalize)
    epochs = c.method.combine_epochs or c.epochs
    for e in range(epochs):
        for b in data.batches(pool, c.batch_size, data.epoch_order(len(pool), c.seed, 1, 1, e), drop_last=True):
            stacked, _ = vstep(stacked, b, jnp.int32(1))
    merged = jax.vmap(lambda s: m.after_phase(s, jnp.int32(1), "combine"))(stacked)

    def accuracy(task):
        p = data.pool(stream, task, "test", c.data.normalize)
        hits = np.zeros(len(lambdas))
        for b in data.batches(p, 500):
            logits = jax.vmap(lambda s: m.predict(s, b["x"], jnp.int32(task)))(merged)
            hits += ((np.asarray(logits).argmax(-1) == b["y"]) * b["mask"]).sum(-1)
        return hits / len(p)

    src, tgt = accuracy(0), accuracy(1)
    avg = (src + tgt) / 2
    best = int(np.argmax(avg))
    l1 = [float(sum(jnp.abs(a[i]).sum() for a in jax.tree_util.tree_leaves(stacked.params["rescl"])))
          for i in range(len(lambdas))]
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"lambda": lam, "source_acc": round(float(s), 4), "target_acc": round(float(t), 4),
             "average": round(float(a), 4), "l1_of_combination": round(v, 3)}
            for lam, s, t, a, v in zip(lambdas, src, tgt, avg, l1)]
    summary = {"config": args.config, "sets": args.set, "max_average_accuracy": rows[best]["average"],
               "at_lambda": lambdas[best], "rows": rows, "wall_s": round(time.perf_counter() - t0, 1),
               "stream": [t.name for t in stream.tasks]}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    _plot(out / "source_vs_target.png", src, tgt, lambdas, best)
    print(f"{'lambda':>8} {'source':>8} {'target':>8} {'average':>8} {'L1(a)':>9}")
    for r in rows:
        print(f"{r['lambda']:>8g} {r['source_acc']:>8.4f} {r['target_acc']:>8.4f} {r['average']:>8.4f} "
              f"{r['l1_of_combination']:>9.2f}")
    print(f"maximum achievable average accuracy {rows[best]['average']:.4f} at lambda {lambdas[best]:g}; "
          f"plot {out / 'source_vs_target.png'} ({summary['wall_s']} s)")
    return 0


def _plot(path, src, tgt, lambdas, best):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot(tgt, src, "o-")
    for lam, x, y in zip(lambdas, tgt, src):
        ax.annotate(f"{lam:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([tgt[best]], [src[best]], "r*", ms=12, label=f"max average {(src[best] + tgt[best]) / 2:.3f}")
    ax.set_xlabel("target (new task) accuracy")
    ax.set_ylabel("source (old task) accuracy")
    ax.set_title("ResCL: lambda sweep", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
