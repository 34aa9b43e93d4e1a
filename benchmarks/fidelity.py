"""Fidelity table: jaxcl against published figures, on the real data of ../shared/data.

Each row runs one benchmark config with the exact settings of the reference and prints
our figure, the reference figure and whether ours is within tolerance. The ContinualAI
continual-learning-baselines check is one-sided (it fails only below target - 0.03), and
so is ours.

    python benchmarks/fidelity.py                 # every row
    python benchmarks/fidelity.py ewc_pmnist      # one row
Options: --data-dir DIR (default ../shared/data or $JAXCL_DATA_DIR), --workdir DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jaxcl
from jaxcl import config as config_lib

HERE = Path(__file__).resolve().parent
# name: (config spec, --set overrides, reference figure, tolerance, source)
ROWS = {
    "ewc_pmnist": (
        "permuted_mnist:method=ewc",
        [],  # the config is the reference setting: 10 tasks, MLP 784-512-10, SGD 1e-3, batch 256, 10 epochs, lambda 1
        0.83, 0.03,
        "ContinualAI continual-learning-baselines, EWC on Permuted-MNIST (strategies/target_results.csv)",
    ),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="*", default=list(ROWS))
    ap.add_argument("--data-dir", default=os.environ.get("JAXCL_DATA_DIR", str(HERE.parents[1] / "shared" / "data")))
    ap.add_argument("--workdir", default="runs/fidelity")
    args = ap.parse_args(argv)
    out = []
    for name in args.rows:
        spec, sets, target, tol, source = ROWS[name]
        config = config_lib.override(jaxcl.get_config(spec), [f"data.dir={args.data_dir}", "log.progress=false",
                                                              *sets])
        t0 = time.perf_counter()
        r = jaxcl.run(config, Path(args.workdir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        ok = r["acc"] >= target - tol
        row = {"row": name, "command": f"jaxcl run {spec}" + "".join(f" --set {s}" for s in sets),
               "acc": round(r["acc"], 4), "target": target, "tolerance": tol, "within": ok,
               "bwt": round(r["bwt"], 4), "wall_s": round(time.perf_counter() - t0, 1), "source": source}
        out.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'row':<14} {'ours':>7} {'reference':>10} {'within':>7}   ({platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')})")
    for row in out:
        print(f"{row['row']:<14} {row['acc']:>7.3f} {row['target']:>6.2f}+-{row['tolerance']:.2f} "
              f"{'yes' if row['within'] else 'NO':>7}")
    return 0 if all(r["within"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
