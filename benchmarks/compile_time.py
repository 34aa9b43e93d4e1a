"""Compile time of test-size programs under XLA settings, side by side (issue 18).

Each variant runs in a fresh process with no compilation cache: four small ``jaxcl.run``s
(finetune on the MLP, PackNet on a 2-block ViT, NCCL, finetune on the CNN; the embedded
digits, 2 tasks, 1 epoch), the kinds of program the test suite compiles. It prints one
JSON line per variant: CPU seconds in XLA compiles (JAX's
``/jax/core/compile/backend_compile_duration``), tracing, lowering and the wall time of
the runs, and their ratio to the first variant's compile seconds. ``--repeats`` alternates
the variants. The default variants are the test session's choice (tests/conftest.py)
against XLA's default, with most optimisations off and on:

    python benchmarks/compile_time.py [--repeats 2] [--variant 'NAME|DISABLE_MOST|XLA_FLAGS' ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SPECS = [("split_digits:method=finetune", []),
         ("split_digits:method=packnet", ["model.name=vit_cifar", "model.width=16", "model.depth=2"]),
         ("split_digits:method=nccl", []),
         ("split_digits:method=finetune", ["model.name=cnn"])]
VARIANTS = ["default, most optimisations off|1|",
            "elemental emitters, most optimisations off (the suite)|1|--xla_cpu_use_fusion_emitters=false",
            "default, optimisations on|0|",
            "elemental emitters, optimisations on|0|--xla_cpu_use_fusion_emitters=false"]


def child() -> None:
    """The runs of one variant in this process; prints the totals as one JSON line."""
    import jax
    from jax import monitoring

    import jaxcl
    from jaxcl import config as config_lib

    ev = {"compile": 0.0, "trace": 0.0, "lower": 0.0}
    names = {"/jax/core/compile/backend_compile_duration": "compile",
             "/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}

    def duration(event, secs, **kw):
        if event in names:
            ev[names[event]] += secs

    monitoring.register_event_duration_secs_listener(duration)
    quiet = ["log.progress=false", "log.plots=false", "log.tensorboard=false", "checkpoint.every_steps=0",
             "epochs=1", "num_tasks=2"]
    t0 = time.perf_counter()
    for spec, sets in SPECS:
        c = config_lib.override(jaxcl.get_config(spec), quiet + sets)
        jaxcl.run(c, tempfile.mkdtemp(), echo=lambda s: None)
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 2), **{f"{k}_s": round(v, 2) for k, v in ev.items()},
                      "jax": jax.__version__}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variant", action="append", help="NAME|JAX_DISABLE_MOST_OPTIMIZATIONS|XLA_FLAGS")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child()
        return 0
    variants = [v.split("|", 2) for v in (args.variant or VARIANTS)]
    first = {}
    for r in range(args.repeats):
        for name, disable, flags in variants:
            env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS=disable, XLA_FLAGS=flags,
                       JAX_COMPILATION_CACHE_DIR="", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
            p = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
            if p.returncode:
                print(json.dumps({"variant": name, "repeat": r, "error": p.stderr.strip().splitlines()[-1:]}))
                continue
            rec = json.loads(p.stdout.strip().splitlines()[-1])
            base = first.setdefault((r, disable), rec["compile_s"])
            print(json.dumps({"variant": name, "repeat": r, "most_optimisations_off": disable == "1",
                              "xla_flags": flags, **rec,
                              "compile_vs_default": round(rec["compile_s"] / base, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
