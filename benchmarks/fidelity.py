"""Fidelity table: jaxcl against published figures, on the real data of ../shared/data.

Each row runs one benchmark config with the exact settings of the reference and prints
our figure, the reference figure and whether ours is within tolerance. The ContinualAI
continual-learning-baselines check is one-sided (it fails only below target - 0.03), and
so is ours.

    python benchmarks/fidelity.py                 # every row
    python benchmarks/fidelity.py ewc_pmnist      # one row
    python benchmarks/fidelity.py agem_pmnist --seeds 0 1 2   # mean over seeds
Options: --data-dir DIR (default ../shared/data or $JAXCL_DATA_DIR), --workdir DIR,
--seeds S [S ...] (each row's ACC is the mean over these seeds; default: the config's).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import common

# name: (config spec, --set overrides, reference figure, tolerance, source)
CAI = "ContinualAI continual-learning-baselines (experiments/, target_results.csv)"
HSU = "Hsu et al. 2018, Re-evaluating Continual Learning Scenarios, Table 2 (GT-RIPL/Continual-Learning-Benchmark scripts)"
ROWS = {
    "ewc_pmnist": (
        "permuted_mnist:method=ewc",
        [],  # the config is the reference setting: 10 tasks, MLP 784-512-10, SGD 1e-3, batch 256, 10 epochs, lambda 1
        0.83, 0.03, CAI + ", EWC Permuted-MNIST",
    ),
    "si_smnist": (
        "split_mnist:method=si",
        # multi-head MLP 2x256, Adam 1e-3, batch 64, 10 epochs, lambda 1, xi 0.1; Avalanche's
        # SynapticIntelligence clips Omega at 0.001 (its clip_to), so this row does too
        ["model.hidden=(256,256)", "batch_size=64", "epochs=10", "method.si_lambda=1.0", "method.xi=0.1",
         "method.omega_max=0.001"],
        0.97, 0.02, CAI + ", SI Split-MNIST task-incremental",
    ),
    "lwf_smnist": (
        "split_mnist:method=lwf",
        ["scenario=class", "model.hidden=(200,)", "model.activation=tanh", "optimizer.name=sgd", "optimizer.lr=0.001",
         "batch_size=128", "epochs=21", "method.temperature=2.0", "method.alpha=(0.0,0.5,1.333,2.25,3.2)"],
        0.23, 0.03, CAI + ", LwF Split-MNIST class-incremental",
    ),
    "agem_pmnist": (
        "permuted_mnist:method=agem",
        ["num_tasks=17", "online=true", "batch_size=10", "model.hidden=(256,256)", "optimizer.lr=0.1",
         "method.patterns_per_task=250", "method.sample_size=256"],
        0.81, 0.03, CAI + ", A-GEM online Permuted-MNIST",
    ),
    "er_smnist": (
        "split_mnist:method=er",
        # Avalanche's SimpleMLP(10): 1x512, dropout 0.5; OnlineNaive, batch 10, SGD 0.1,
        # ReplayPlugin (replay batch 10) over a ClassBalancedBuffer(1000, adaptive)
        ["scenario=class", "online=true", "batch_size=10", "model.hidden=(512,)", "model.dropout=0.5",
         "optimizer.name=sgd", "optimizer.lr=0.1", "method.memory=balanced", "method.memory_size=1000",
         "method.replay_batch=10"],
        0.92, 0.03, CAI + ", ER (online replay) Split-MNIST class-incremental",
    ),
    # Hsu et al.: MLP 2x400, Adam 1e-3, batch 128, 4 epochs (the split_mnist config);
    # EWC's coefficient from their scripts (100 task-, 600 class-incremental), Fisher per sample
    "hsu_ewc_task": (
        "split_mnist:method=ewc", ["method.ewc_lambda=100.0", "method.fisher=empirical"],
        0.977, 0.02, HSU + ", EWC incremental task",
    ),
    "hsu_ewc_class": (
        "split_mnist:method=ewc", ["scenario=class", "method.ewc_lambda=600.0", "method.fisher=empirical"],
        0.198, 0.03, HSU + ", EWC incremental class",
    ),
    "hsu_none_task": (
        "split_mnist:method=finetune", [],
        0.935, 0.02, HSU + ", Adam (no method) incremental task",
    ),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="*", default=list(ROWS))
    ap.add_argument("--data-dir", default=common.DATA_DIR)
    ap.add_argument("--workdir", default="runs/fidelity")
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    args = ap.parse_args(argv)
    out = []
    for name in args.rows:
        spec, sets, target, tol, source = ROWS[name]
        accs, bwts = [], []
        t0 = time.perf_counter()
        for seed in args.seeds or [None]:
            seed_set = [] if seed is None else [f"seed={seed}"]
            r = common.run_config(spec, [f"data.dir={args.data_dir}", "log.progress=false", *sets, *seed_set],
                                  Path(args.workdir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
            accs.append(r["acc"])
            bwts.append(r["bwt"])
        acc = float(np.mean(accs))
        ok = acc >= target - tol
        row = {"row": name, "command": f"jaxcl run {spec}" + "".join(f" --set {s}" for s in sets),
               "acc": round(acc, 4), "target": target, "tolerance": tol, "within": ok,
               "bwt": round(float(np.mean(bwts)), 4), "wall_s": round(time.perf_counter() - t0, 1), "source": source}
        if args.seeds:
            row.update(seeds=args.seeds, acc_per_seed=[round(a, 4) for a in accs], acc_std=round(float(np.std(accs)), 4))
        out.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'row':<14} {'ours':>7} {'reference':>10} {'within':>7}   ({platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')})")
    for row in out:
        print(f"{row['row']:<14} {row['acc']:>7.3f} {row['target']:>6.3f}+-{row['tolerance']:.2f} "
              f"{'yes' if row['within'] else 'NO':>7}")
    return 0 if all(r["within"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
