"""Command line: ``jaxcl run | report | list``.

    jaxcl run [CONFIG[:ARG]] [--set KEY=VALUE ...] [--seeds S ...] [--sweep KEY=v1,v2 ...] [--workdir DIR]
              [--resume | --resume-from N] [--allow-change KEY ...] [--devices N|auto]
              [--coordinator HOST:PORT --num-processes N --process-id I | --distributed]
    jaxcl launch --local N [--devices-per-process D] [CONFIG] [run options]
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
    from jaxcl import distributed

    import jaxcl  # imports JAX without starting its backend: the devices are still to be chosen
    from jaxcl import config as config_lib

    config = _run_config(args)
    if args.devices == "auto":
        distributed.cpu_devices_for_runs(len(config_lib.sweep_settings(config)) * len(config_lib.run_seeds(config)))
    elif args.devices is not None:
        try:
            n = int(args.devices)
        except ValueError:
            raise distributed.DistributedError(f"--devices: expected a number of devices or auto, got "
                                               f"{args.devices!r}") from None
        distributed.cpu_devices(n)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
                           heartbeat_s=args.heartbeat_timeout)
    import jax

    resume = args.resume or args.resume_from is not None
    if jax.process_count() > 1 and not args.workdir:
        raise config_lib.ConfigError("a multi-process run needs --workdir (the same folder for every process)")
    workdir = Path(args.workdir) if args.workdir else _workdir_for(config, resume)
    primary = jax.process_index() == 0
    if primary:
        print(f"jaxcl: {config.benchmark} / {config.method.name} ({config.scenario}-incremental) -> {workdir}"
              + (f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""), flush=True)
    results = jaxcl.run(config, workdir, resume=resume, resume_from=args.resume_from,
                        allow_change=tuple(args.allow_change), echo=print if primary else (lambda s: None))
    if primary:
        print()
        print(jaxcl.report.summary_table(results))
        print(f"\nresults: {workdir / ('summary.json' if 'seeds' in results else 'results.json')}")
    return 0


def _run_config(args):
    """The run's config from CONFIG, --set, --seeds and --sweep, validated."""
    import jaxcl
    from jaxcl import config as config_lib

    config = jaxcl.get_config(args.config)
    if args.set:
        config = config_lib.override(config, args.set)
    if args.seeds is not None:
        if not args.seeds:
            raise config_lib.ConfigError("--seeds: give at least one seed, e.g. --seeds 0 1 2")
        negative = [s for s in args.seeds if s < 0]
        if negative:
            raise config_lib.ConfigError(f"--seeds: seeds are integers >= 0, got {' '.join(map(str, negative))}")
        config = config_lib.override(config, [f"seeds={tuple(args.seeds)!r}"])
    if args.sweep:
        config = config_lib.override(config, [f"sweep={tuple(args.sweep)!r}"])
    config_lib.validate(config)
    return config


def cmd_launch(args, rest: list[str]) -> int:
    """``jaxcl run`` as N processes on this host, one workdir for all."""
    from jaxcl import distributed

    if args.local < 1 or args.devices_per_process < 1:
        raise SystemExit("jaxcl launch: --local and --devices-per-process must be >= 1")
    if "--workdir" not in rest and not any(a.startswith("--workdir=") for a in rest):
        import jaxcl

        config = jaxcl.get_config(next((a for a in rest if not a.startswith("-")), None))
        rest = rest + ["--workdir", str(_workdir_for(config, "--resume" in rest))]
    command = [sys.executable, "-m", "jaxcl.cli", "run", *rest]
    return distributed.launch_local(args.local, command, devices_per_process=args.devices_per_process,
                                    grace_s=args.grace)


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
    r.add_argument("--resume-from", type=int, default=None, metavar="N",
                   help="continue from checkpoint N (e.g. the newest intact one; newer ones are set aside)")
    r.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="on resume, accept a new value of KEY (optimizer.lr after a NaN); recorded in results.json")
    r.add_argument("--devices", default=None, metavar="N|auto",
                   help="CPU: run on N virtual devices (the runs of --seeds/--sweep spread over them, mesh.runs "
                        "auto; or a batch split, mesh.data); auto: as many as the cores and the runs allow, 1 for "
                        "a single run; sets XLA's host device count before JAX starts")
    g = r.add_argument_group("several processes (jax.distributed)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--distributed", action="store_true",
                   help="join the job jax.distributed.initialize() detects (TPU pod, SLURM, Open MPI, ...)")
    g.add_argument("--heartbeat-timeout", type=int, default=30, metavar="S",
                   help="seconds after which a silent process counts as dead and the others stop")
    r.set_defaults(fn=cmd_run)
    la = sub.add_parser("launch", help="run `jaxcl run` as several processes on this host",
                        description="jaxcl launch --local N [--devices-per-process D] [CONFIG] [run options]")
    la.add_argument("--local", type=int, required=True, metavar="N", help="processes to start on this host")
    la.add_argument("--devices-per-process", type=int, default=1, metavar="D",
                    help="CPU: virtual devices per process; GPU: GPUs per process")
    la.add_argument("--grace", type=float, default=30.0, metavar="S",
                    help="seconds the others get to stop by themselves after one process fails")
    la.set_defaults(fn=cmd_launch)
    rep = sub.add_parser("report", help="compare finished runs")
    rep.add_argument("workdirs", nargs="+")
    rep.set_defaults(fn=cmd_report)
    ls = sub.add_parser("list", help="list methods, benchmarks and models")
    ls.set_defaults(fn=cmd_list)
    return p


def _one_line_warnings() -> None:
    """jaxcl's own warnings (an untrained frozen backbone, an unverified checkpoint) as one
    line on stderr, as its errors are; other libraries' warnings keep Python's form."""
    import warnings

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("jaxcl"):
            print(f"jaxcl: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv=None) -> int:
    _one_line_warnings()
    args, rest = parser().parse_known_args(argv)
    if rest and args.fn is not cmd_launch:
        parser().parse_args(argv)  # the usual message for an unknown option
    from jaxcl.checkpoint import CheckpointError
    from jaxcl.distributed import DistributedError
    from jaxcl.train import NonFiniteLossError, RunError

    try:
        return args.fn(args, rest) if args.fn is cmd_launch else args.fn(args)
    except (ValueError, CheckpointError, NonFiniteLossError, RunError, DistributedError) as e:
        # ConfigError, DataError and ShardingError are ValueErrors: a setting or input
        # the run cannot use, said in one line
        print(f"jaxcl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
