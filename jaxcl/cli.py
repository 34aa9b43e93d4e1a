"""Command line: ``jaxcl run | report | list``.

    jaxcl run [CONFIG[:ARG]] [--set KEY=VALUE ...] [--seeds S ...] [--sweep KEY=v1,v2 ...] [--workdir DIR] [--resume]
    jaxcl report WORKDIR [WORKDIR ...]
    jaxcl list
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

RUNS_DIR = Path("runs")


def _workdir_for(config, resume: bool) -> Path:
    """Default workdir: runs/<benchmark>-<method>-<time>; with --resume, the newest such."""
    prefix = f"{config.benchmark}-{config.method.name}-"
    if resume:
        found = sorted(RUNS_DIR.glob(prefix + "*")) if RUNS_DIR.exists() else []
        if not found:
            raise SystemExit(f"jaxcl: --resume: no earlier run {RUNS_DIR}/{prefix}* to continue; give --workdir")
        return found[-1]
    return RUNS_DIR / (prefix + time.strftime("%Y%m%d-%H%M%S"))


def cmd_run(args) -> int:
    import jaxcl
    from jaxcl import config as config_lib

    config = jaxcl.get_config(args.config)
    if args.set:
        config = config_lib.override(config, args.set)
    if args.seeds is not None:
        if not args.seeds:
            raise config_lib.ConfigError("--seeds: give at least one seed, e.g. --seeds 0 1 2")
        config = config_lib.override(config, [f"seeds={tuple(args.seeds)!r}"])
    if args.sweep:
        config = config_lib.override(config, [f"sweep={tuple(args.sweep)!r}"])
    config_lib.validate(config)
    workdir = Path(args.workdir) if args.workdir else _workdir_for(config, args.resume)
    print(f"jaxcl: {config.benchmark} / {config.method.name} ({config.scenario}-incremental) -> {workdir}",
          flush=True)
    results = jaxcl.run(config, workdir, resume=args.resume)
    print()
    print(jaxcl.report.summary_table(results))
    print(f"\nresults: {workdir / ('summary.json' if 'seeds' in results else 'results.json')}")
    return 0


def cmd_report(args) -> int:
    from jaxcl import report

    runs = []
    for w in args.workdirs:
        try:
            runs.append((w, report.load_results(w)))
        except (FileNotFoundError, ValueError) as e:
            print(f"jaxcl report: {e}", file=sys.stderr)
            return 2
    print(report.compare_table(runs))
    return 0


def cmd_list(args) -> int:
    from jaxcl import configs, methods, models

    print("methods:")
    for m in methods.available():
        print(f"  {m:<18} {methods.describe(m)}")
    print("benchmarks (configs):")
    for b in configs.list_benchmarks():
        doc = importlib.import_module(f"jaxcl.configs.{b}").__doc__
        print(f"  {b:<18} {methods.first_sentence(doc)}")
    print("models:")
    for m in models.available():
        print(f"  {m:<18} {models.DESCRIPTIONS.get(m, '')}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxcl", description="Continual learning in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train a method on a benchmark stream")
    r.add_argument("config", nargs="?", default=None,
                   help="benchmark name or config .py path, optionally :method=NAME (default: split_digits)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.lr=0.1 (repeatable)")
    r.add_argument("--seeds", nargs="*", type=int, default=None, metavar="S",
                   help="train these seeds at once in one program (per-seed results and a summary)")
    r.add_argument("--sweep", action="append", default=[], metavar="KEY=v1,v2",
                   help="train every value of a numeric hyperparameter at once in one program (repeatable: a grid)")
    r.add_argument("--workdir", default=None, help="where results and checkpoints go (default: runs/...)")
    r.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")
    r.set_defaults(fn=cmd_run)
    rep = sub.add_parser("report", help="compare finished runs")
    rep.add_argument("workdirs", nargs="+")
    rep.set_defaults(fn=cmd_report)
    ls = sub.add_parser("list", help="list methods, benchmarks and models")
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from jaxcl.checkpoint import CheckpointError
    from jaxcl.config import ConfigError
    from jaxcl.data import DataError
    from jaxcl.sharding import ShardingError
    from jaxcl.train import NonFiniteLossError, RunError

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError, RunError, ShardingError) as e:
        print(f"jaxcl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
