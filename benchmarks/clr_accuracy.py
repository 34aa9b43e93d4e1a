"""CLR between its bounds, on real data: one backbone pretrained on CIFAR-10, then the
stream of ``multi_dataset:method=clr`` (MNIST and Fashion-MNIST, 2 tasks of 5 classes
each), learned by

* CLR (``method=clr``, variant ``reduced``): per-task reprogramming, batch norm and head;
* the linear probe (``method.variant=head``): a per-task head on the frozen backbone;
* SGD-LL (``method=sgd_ll``): the frozen backbone and one last layer shared by every task
  (the CLR paper's baseline);
* fine-tuning (``method=finetune``): the whole network trained task after task;
* per-task full fine-tuning: a separate copy of the backbone fine-tuned on each task
  alone (one single-task run per task): the upper bound, at a whole network per task.

All with the same data, epochs and optimiser. Prints one JSON line per run and a table.

    python benchmarks/clr_accuracy.py --pretrained runs/pretrain-c10
    python benchmarks/clr_accuracy.py            # pretrains first (jaxcl run pretrain, 15 epochs)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import common



def run(spec, sets, workdir):
    return common.run_config(spec, sets, workdir, echo=lambda s: print("   ", s, file=sys.stderr))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", default="", help="workdir of a `jaxcl run pretrain` (default: pretrain now)")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--data-dir", default=common.DATA_DIR)
    ap.add_argument("--workdir", default="runs/clr_accuracy")
    args = ap.parse_args(argv)
    root = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    base_sets = [f"data.dir={args.data_dir}", "log.progress=false"]
    pre = args.pretrained
    if not pre:
        pre = str(root / "pretrain")
        r = run("pretrain", base_sets + [f"epochs={args.pretrain_epochs}"], pre)
        print(json.dumps({"run": "pretrain", "acc": r["acc"], "wall_s": round(r["wall_s"], 1)}), flush=True)
    stream = base_sets + [f"model.pretrained={pre}"]
    rows = {}
    rows["clr (reduced)"] = run("multi_dataset:method=clr", stream, root / "clr")
    rows["linear probe"] = run("multi_dataset:method=clr", stream + ["method.variant=head"], root / "probe")
    rows["sgd_ll"] = run("multi_dataset:method=clr", stream + ["method.name=sgd_ll"], root / "sgd_ll")
    rows["finetune"] = run("multi_dataset:method=clr", stream + ["method.name=finetune"], root / "finetune")
    # per-task full fine-tuning: each task alone (data.tasks=(k,)), from the pretrained backbone
    accs, walls = [], 0.0
    for k in range(len(rows["clr (reduced)"]["stream"]["tasks"])):
        r = run("multi_dataset:method=clr", stream + ["method.name=finetune", f"data.tasks=({k},)", "num_tasks=1"],
                root / f"alone-{k}")
        accs.append(r["accuracy_matrix"][0][0])
        walls += r["wall_s"]
    table = []
    for name, r in rows.items():
        rep = r.get("method_report") or {}
        per_task_params = (rep.get("clr_per_task", 0) + rep.get("bn_per_task", 0) + rep.get("head_per_task", 0)
                           if rep else r["params"]["backbone"] + r["params"]["head_per_task"])
        if name == "sgd_ll":  # one trainable layer, shared by every task
            per_task_params = r["params"]["heads_total"]
        table.append({"run": name, "acc": round(r["acc"], 4), "bwt": round(r["bwt"], 4),
                      "per_task_params": int(per_task_params), "diag": [round(x, 4) for x in np.diag(r["accuracy_matrix"])],
                      "wall_s": round(r["wall_s"], 1)})
    table.append({"run": "per-task full fine-tuning", "acc": round(float(np.mean(accs)), 4), "bwt": 0.0,
                  "per_task_params": int(rows["finetune"]["params"]["backbone"] + rows["finetune"]["params"]["head_per_task"]),
                  "diag": [round(a, 4) for a in accs], "wall_s": round(walls, 1)})
    for row in table:
        print(json.dumps(row), flush=True)
    print(f"\nbackbone pretrained on CIFAR-10 ({pre}); stream {[t for t in rows['clr (reduced)']['stream']['tasks']]}")
    print(f"{'run':<26} {'ACC':>7} {'BWT':>8} {'params/task':>12}")
    for row in table:
        print(f"{row['run']:<26} {row['acc']:>7.4f} {row['bwt']:>+8.4f} {row['per_task_params']:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
