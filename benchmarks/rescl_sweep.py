"""ResCL's fair-comparison view (Lee et al. 2020, sec. 4): sweep lambda, the weight of the
L1 decay on the combination, and read the trade-off between source and target accuracy.

One ``jaxcl.run`` with ``sweep=("method.l1=...",)``: every lambda is a run of the same
program (states stacked on a leading axis, every step ``vmap``-ed), so the whole sweep
compiles once and shares each batch. Task 0 is the source, task 1 the target; each
lambda's run is merged and evaluated on both. Prints a table and the maximum achievable
average accuracy, and draws source vs target accuracy.

    python benchmarks/rescl_sweep.py                       # Split-MNIST 0-4 -> 5-9, MLP 2x400
    python benchmarks/rescl_sweep.py --lambdas 0,1e-4,1e-3,1e-2,0.1,1 --set epochs=2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import common
import jaxcl
from jaxcl import config as config_lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="split_mnist:method=rescl")
    ap.add_argument("--set", action="append", default=[], help="config overrides, as `jaxcl run --set`")
    ap.add_argument("--lambdas", default="0,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,0.1,1")
    ap.add_argument("--data-dir", default=common.DATA_DIR)
    ap.add_argument("--out", default="runs/rescl_sweep")
    args = ap.parse_args(argv)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    c = config_lib.override(jaxcl.get_config(args.config), [
        "num_tasks=2", "data.classes_per_task=5", f"data.dir={args.data_dir}", "log.progress=false",
        "log.tensorboard=false", f"sweep=('method.l1={','.join(map(repr, lambdas))}',)", *args.set])
    t0 = time.perf_counter()
    res = jaxcl.run(c, out, echo=lambda s: None)
    by_lambda = {r["setting"]["method.l1"]: r for r in res["runs"]}
    src = np.asarray([by_lambda[lam]["accuracy_matrix"][1][0] for lam in lambdas])
    tgt = np.asarray([by_lambda[lam]["accuracy_matrix"][1][1] for lam in lambdas])
    avg = (src + tgt) / 2
    best = int(np.argmax(avg))
    rows = [{"lambda": lam, "source_acc": round(float(s), 4), "target_acc": round(float(t), 4),
             "average": round(float(a), 4)} for lam, s, t, a in zip(lambdas, src, tgt, avg)]
    summary = {"config": args.config, "sets": args.set, "max_average_accuracy": rows[best]["average"],
               "at_lambda": lambdas[best], "rows": rows, "wall_s": round(time.perf_counter() - t0, 1),
               "runs_in_program": res["runs_in_program"], "stream": res["runs"][0]["stream"]["tasks"]}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    _plot(out / "source_vs_target.png", src, tgt, lambdas, best)
    print(f"{'lambda':>8} {'source':>8} {'target':>8} {'average':>8}")
    for r in rows:
        print(f"{r['lambda']:>8g} {r['source_acc']:>8.4f} {r['target_acc']:>8.4f} {r['average']:>8.4f}")
    print(f"maximum achievable average accuracy {rows[best]['average']:.4f} at lambda {lambdas[best]:g}; "
          f"plot {out / 'source_vs_target.png'} ({summary['wall_s']} s, {res['runs_in_program']} runs in one program)")
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
