"""Methods side by side on one stream, on the real data of ../shared/data: several seeds,
mean and spread of ACC and BWT. The setting is a benchmark config name (every method
with that config's settings and its per-method defaults, e.g. ``split_mnist`` for ResCL
next to finetune, LwF and joint) or one of the presets below (NCCL next to ER and A-GEM
at equal memory, online):

* ``pmnist``: online Permuted-MNIST (La-MAML/NCCL setting: 20 tasks of 1000 training
  samples, MLP 2x100, batch 10, one pass, domain-incremental), memory 200 samples in all
  (A-GEM: 10 per task, the same 200), SGD lr 0.1 for every method (NCCL: inner and outer);
* ``cifar10``: online Split-CIFAR-10 (reduced ResNet-18, batch 10, one pass,
  task-incremental), memory 200; ``--train-limit`` samples per task (the full stream is
  5 x 10,000 bilevel calls: hours on 2 CPU cores).

    python benchmarks/compare.py pmnist --seeds 0 1 2
    python benchmarks/compare.py cifar10 --seeds 0 --train-limit 200
    python benchmarks/compare.py split_mnist --methods rescl finetune lwf joint --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import common

SETTINGS = {
    "pmnist": ("permuted_mnist", ["num_tasks=20", "online=true", "batch_size=10", "data.train_limit=1000",
                                  "model.hidden=(100,100)", "optimizer.name=sgd", "optimizer.lr=0.1",
                                  "optimizer.momentum=0.0"], 200, 20),
    "cifar10": ("split_cifar10", ["online=true", "batch_size=10", "scenario=task", "optimizer.name=sgd",
                                  "optimizer.lr=0.1", "optimizer.momentum=0.0", "optimizer.weight_decay=0.0",
                                  "optimizer.schedule=constant", "data.augment=false"], 200, 5),
}


def method_sets(name: str, memory: int, tasks: int) -> list[str]:
    if not memory:  # a plain benchmark config: its own per-method settings
        return []
    if name == "er":
        return [f"method.memory_size={memory}", "method.replay_batch=10"]
    if name == "agem":
        return [f"method.patterns_per_task={memory // tasks}", "method.sample_size=256"]
    if name == "nccl":
        return [f"method.memory_size={memory}", "method.replay_batch=10", "method.inner_lr=0.1"]
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("setting", help=f"a preset ({', '.join(SETTINGS)}) or a benchmark config name")
    ap.add_argument("--methods", nargs="+", default=["nccl", "er", "agem", "finetune"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--train-limit", type=int, default=0)
    ap.add_argument("--data-dir", default=common.DATA_DIR)
    ap.add_argument("--workdir", default="runs/compare")
    ap.add_argument("--set", action="append", default=[], help="extra --set for every run")
    args = ap.parse_args(argv)
    bench, sets, memory, tasks = SETTINGS.get(args.setting, (args.setting, [], 0, 1))
    if args.train_limit:
        sets = sets + [f"data.train_limit={args.train_limit}"]
    table = {}
    for name in args.methods:
        accs, bwts = [], []
        for seed in args.seeds:
            all_sets = [f"data.dir={args.data_dir}", "log.progress=false", "log.plots=false", "log.tensorboard=false",
                        f"seed={seed}", *sets, *method_sets(name, memory, tasks), *args.set]
            r = common.run_config(f"{bench}:method={name}", all_sets,
                                  Path(args.workdir) / f"{args.setting}-{name}-s{seed}-{time.strftime('%H%M%S')}",
                                  echo=lambda s: None)
            accs.append(r["acc"])
            bwts.append(r["bwt"])
            print(json.dumps({"setting": args.setting, "method": name, "seed": seed, "acc": round(r["acc"], 4),
                              "bwt": round(r["bwt"], 4), "wall_s": round(r["wall_s"], 1),
                              "command": f"jaxcl run {bench}:method={name} " + " ".join(f"--set {s}" for s in all_sets[1:])}),
                  flush=True)
        table[name] = (np.mean(accs), np.std(accs), np.mean(bwts), np.std(bwts))
    print(f"\n{args.setting}, seeds {args.seeds}" + (f", memory {memory}:" if memory else ":"))
    print(f"{'method':<10} {'ACC':>16} {'BWT':>16}")
    for name, (a, sa, b, sb) in table.items():
        print(f"{name:<10} {a:>8.4f} +- {sa:.4f} {b:>8.4f} +- {sb:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
