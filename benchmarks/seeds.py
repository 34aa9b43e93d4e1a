"""Issue 12: several seeds in one program against the same seeds run one after another.

Workloads (one JSON line each): 8 seeds of ``split_mnist:method=ewc`` and of
``permuted_mnist:method=packnet``, kept short with ``data.train_limit``, epochs and
num_tasks; ``resnet``: the reduced ResNet-18 of split_cifar10 (W2's model, finetune;
issue 18), where ``loop.run_axis=auto`` runs the seeds one after another inside the
program on CPU (``map``) instead of ``vmap``-ing them; ``l2p``: L2P on a frozen
``vit_cifar`` (issue 21). ``--set KEY=VALUE`` adds
overrides to every run (say ``loop.run_axis=vmap`` to time the other choice).

In this process: first ``seeds=(0,...,7)`` (one ``jaxcl.run``, every seed
vmapped), then ``seed=0`` ... ``seed=7`` as 8 whole runs. Figures: wall-clock ratio
(program / sum of the sequential runs' wall; each wall is the whole ``jaxcl.run``, compile
and evaluation included, as a user waits for it), the same ratio of ``train_s``, and the
largest absolute difference between each seed's accuracy matrix in the program and in its
own run.

``--memory``: peak memory of the device-resident ``split_cifar10`` (the full stream, every
task resident) for 1 seed and for 8 seeds (one copy of the stream: it does not depend on
the seed), and the host path for 1 seed as a reference; each variant in a fresh
subprocess that sets the run up, initialises the state, runs one compiled train call of
``loop.steps_per_call`` steps and one evaluation call (the working set every later call
of the run repeats). On CPU the figure is the process's peak RSS (``getrusage``); on a GPU
``memory_stats()['peak_bytes_in_use']`` is printed too. ``stream_bytes`` is the resident
stream's images.

    python benchmarks/seeds.py [--workloads ewc packnet resnet l2p] [--seeds 8] [--set KEY=VALUE ...]
    python benchmarks/seeds.py --memory

``--runs-axis`` (issue 22): 8 seeds in one program on one device against the same
program with ``mesh.runs=2`` on 2 virtual CPU devices (4 seeds per device, no
communication), for the EWC MLP, the PackNet MLP and a reduced ResNet-18 on
split_cifar10. Both variants run side by side in one child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (the one-device variant sets
``mesh.data=1``); figures: wall and train-time ratios (runs axis / one device), the
largest per-seed difference of the accuracy matrices, the state bytes per device. Then
the same seeds as 2 processes of one device each (``jaxcl launch --local 2 --set
mesh.runs=2``, 4 seeds a process; ``--no-processes`` skips it): the wall and train time
of process 0's run against the one-device program's, and whether every seed's matrix is
the one-device program's.

    python benchmarks/seeds.py --runs-axis [--runs-workloads ewc packnet resnet] [--seeds 8] [--no-processes]
                                           [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

QUIET = ["log.progress=false", "log.plots=false", "log.tensorboard=false"]
WORKLOADS = {
    "ewc": ("split_mnist:method=ewc", ["data.train_limit=2000", "data.test_limit=500", "epochs=2"]),
    "packnet": ("permuted_mnist:method=packnet",
                ["data.train_limit=2000", "data.test_limit=500", "num_tasks=3", "epochs=2",
                 "method.retrain_epochs=1"]),
    "resnet": ("split_cifar10:method=finetune",
               ["num_tasks=2", "epochs=1", "data.train_limit=256", "data.test_limit=128"]),
    # issue 21: L2P on the CPU-size ViT (a random, frozen vit_cifar: the work is the same)
    "l2p": ("split_cifar10:method=l2p",
            ["model.name=vit_cifar", "scenario=class", "num_tasks=2", "epochs=1", "data.train_limit=256",
             "data.test_limit=128"]),
}
DEFAULT_WORKLOADS = ("ewc", "packnet")
MEMORY = ("split_cifar10:method=finetune", ["loop.steps_per_call=8"])
RUNS_AXIS = {  # --runs-axis: the MLP workloads above and a small conv one
    **WORKLOADS,
    "resnet": ("split_cifar10:method=finetune", ["data.train_limit=1000", "data.test_limit=200", "num_tasks=2",
                                                 "epochs=1", "eval_batch_size=200"]),
}


def bench_workload(name: str, n_seeds: int, sets=()) -> dict:
    spec, extra = WORKLOADS[name]
    extra = [*extra, *sets]
    base = [f"data.dir={common.DATA_DIR}", *QUIET, *extra]
    seeds = tuple(range(n_seeds))
    load = [float(open("/proc/loadavg").read().split()[0])]
    with tempfile.TemporaryDirectory(prefix="jaxcl_seeds_") as tmp:
        tmp = Path(tmp)
        prog = common.run_config(spec, [*base, f"seeds={seeds}"], tmp / "program", echo=lambda s: None)
        seq = [common.run_config(spec, [*base, f"seed={s}"], tmp / f"seed_{s}", echo=lambda s: None)
               for s in seeds]
    load.append(float(open("/proc/loadavg").read().split()[0]))
    by_seed = {r["seed"]: r for r in prog["runs"]}
    diffs = {s: float(np.max(np.abs(np.asarray(by_seed[s]["accuracy_matrix"]) - np.asarray(seq[i]["accuracy_matrix"]))))
             for i, s in enumerate(seeds)}
    wall_seq = sum(r["wall_s"] for r in seq)
    train_seq = sum(r["train_s"] for r in seq)
    return {
        "workload": name,
        "command": f"jaxcl run {spec} --set " + " --set ".join(extra) + f" --seeds {' '.join(map(str, seeds))}",
        "seeds": list(seeds),
        "runs_in_program": prog["runs_in_program"],
        "data_path": prog["data_path"],
        "steps_per_call": prog["steps_per_call"],
        "loop_chunk": prog["runs"][0].get("loop_chunk"),
        "run_axis": prog["runs"][0].get("run_axis"),
        "wall_s_program": round(prog["wall_s"], 2),
        "wall_s_sequential": round(wall_seq, 2),
        "wall_ratio": round(prog["wall_s"] / wall_seq, 3),
        "train_s_program": round(prog["train_s"], 2),
        "train_s_sequential": round(train_seq, 2),
        "train_s_ratio": round(prog["train_s"] / train_seq, 3),
        "train_steps_per_seed": [r["train_steps"] for r in prog["runs"]],
        "acc_program": round(prog["acc"], 4),
        "acc_sequential_mean": round(float(np.mean([r["acc"] for r in seq])), 4),
        "max_abs_diff_accuracy_matrix": max(diffs.values()),
        "max_abs_diff_per_seed": diffs,
        "load_1min": load,
    }


def memory_child(variant: str) -> dict:
    """One variant's set-up, state, one train call and one eval call; peak memory."""
    import jax
    import jax.numpy as jnp

    import jaxcl
    from jaxcl import train
    from jaxcl.data import feed as feed_lib

    spec, extra = MEMORY
    sets = [f"data.dir={common.DATA_DIR}", *QUIET, *extra]
    sets += {"device_1": ["data.on_device=true"], "device_8": ["data.on_device=true", "seeds=(0,1,2,3,4,5,6,7)"],
             "host_1": ["data.on_device=false"]}[variant]
    config = jaxcl.config.override(jaxcl.get_config(spec), sets)
    jaxcl.config.validate(config)
    S = train.setup(config)
    state = train._init_fn(S)(train._keys(S))
    B, K, t = config.batch_size, S.steps_per_call, 0
    n = [S.feed.size(r, "train", 0) for r in range(S.R)]
    orders = [jaxcl.data.epoch_order(m, S.seeds[r], t, 0, 0) for r, m in enumerate(n)]
    phase = S.method.phases(t)[0].name
    xs = S.feed.train_items(0, orders, range(0, K), B, K)
    state, out = S.fns["train"](phase)(state, S.src.get("train"), train._items(S, xs, 2 if S.R > 1 else 1),
                                       jnp.int32(t))
    jax.block_until_ready(out)
    item = next(S.feed.pass_items("test", 0, config.eval_batch_size))
    hits = S.fns["eval"](state, S.src.get("test"), train._items(S, item, 1 if S.feed.per_run else 0), jnp.int32(0))
    jax.block_until_ready(hits)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return {
        "variant": variant,
        "runs_in_program": S.R,
        "data_path": "device" if S.feed.resident else "host",
        "steps_per_call": K,
        "stream_bytes": sum(feed_lib.stream_bytes(s) for s in S.streams),
        "resident_src_bytes": sum(a.nbytes for a in jax.tree_util.tree_leaves(S.src)),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "device": f"{dev.platform}:{dev.device_kind}",
        "peak_bytes_in_use": (stats or {}).get("peak_bytes_in_use"),
    }


def bench_memory() -> dict:
    out = {"workload": "memory", "command": f"jaxcl run {MEMORY[0]} --set " + " --set ".join(MEMORY[1]),
           "variants": {}}
    for v in ("host_1", "device_1", "device_8"):
        p = subprocess.run([sys.executable, __file__, "--memory-child", v], capture_output=True, text=True)
        if p.returncode != 0:
            out["variants"][v] = {"error": p.stderr[-2000:]}
            continue
        out["variants"][v] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def runs_axis_child(name: str, n_seeds: int, sets=()) -> dict:
    """Both layouts of one workload in this process (2 virtual devices)."""
    import jax

    spec, extra = RUNS_AXIS[name]
    extra = [*extra, *sets]
    base = [f"data.dir={common.DATA_DIR}", *QUIET, *extra, f"seeds={tuple(range(n_seeds))}"]
    load = [float(open("/proc/loadavg").read().split()[0])]
    out = {}
    with tempfile.TemporaryDirectory(prefix="jaxcl_runs_") as tmp:
        for variant, mesh in (("one_device", ["mesh.runs=1", "mesh.data=1"]), ("runs2", ["mesh.runs=2", "mesh.data=1"])):
            out[variant] = common.run_config(spec, [*base, *mesh], Path(tmp) / variant, echo=lambda s: None)
    load.append(float(open("/proc/loadavg").read().split()[0]))
    one, two = out["one_device"], out["runs2"]
    m1 = {r["seed"]: np.asarray(r["accuracy_matrix"]) for r in one["runs"]}
    m2 = {r["seed"]: np.asarray(r["accuracy_matrix"]) for r in two["runs"]}
    return {
        "workload": f"runs_axis_{name}",
        "command": f"jaxcl run {spec} --set " + " --set ".join(extra) + f" --seeds 0..{n_seeds - 1} "
                   "--set mesh.runs=2 (vs mesh.runs=1 mesh.data=1)",
        "devices_visible": jax.device_count(),
        "mesh": {"one_device": one["devices"]["mesh"], "runs2": two["devices"]["mesh"]},
        "steps_per_call": [one["steps_per_call"], two["steps_per_call"]],
        "wall_s": [round(one["wall_s"], 2), round(two["wall_s"], 2)],
        "wall_ratio": round(two["wall_s"] / one["wall_s"], 3),
        "train_s": [round(one["train_s"], 2), round(two["train_s"], 2)],
        "train_s_ratio": round(two["train_s"] / one["train_s"], 3),
        "state_bytes_per_device": [one["state_bytes"]["per_device_max"], two["state_bytes"]["per_device_max"]],
        "max_abs_diff_per_seed": {s: float(np.max(np.abs(m1[s] - m2[s]))) for s in m1},
        "identical_matrices": all(np.array_equal(m1[s], m2[s]) for s in m1),
        "load_1min": load,
        "_matrices": {str(s): m.tolist() for s, m in m1.items()},  # for the 2-process variant
    }


def bench_runs_axis(name: str, n_seeds: int, processes: bool = True, sets=()) -> dict:
    import os
    import time

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, __file__, "--runs-axis-child", name, "--seeds", str(n_seeds),
                        *[a for kv in sets for a in ("--set", kv)]], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"workload": f"runs_axis_{name}", "error": p.stderr[-2000:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if not processes:
        return out
    # the same 8 seeds as 2 processes of 1 device (jaxcl launch --local 2), 4 seeds each
    spec, extra = RUNS_AXIS[name]
    sets = [f"data.dir={common.DATA_DIR}", *QUIET, *extra, *sets, "mesh.runs=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    with tempfile.TemporaryDirectory(prefix="jaxcl_runs2p_") as tmp:
        cmd = [sys.executable, "-m", "jaxcl.cli", "launch", "--local", "2", spec, "--workdir", tmp,
               "--seeds", *map(str, range(n_seeds))] + [a for kv in sets for a in ("--set", kv)]
        t0 = time.perf_counter()
        q = subprocess.run(cmd, capture_output=True, text=True, env=env)
        outer = time.perf_counter() - t0
        if q.returncode != 0:
            out["two_processes"] = {"error": q.stderr[-2000:]}
            return out
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        runs = {int(d.name.split("_")[1]): json.loads((d / "results.json").read_text())
                for d in Path(tmp).glob("seed_*")}
    one_wall, one_train = out["wall_s"][0], out["train_s"][0]
    ref = out.pop("_matrices")
    out["two_processes"] = {
        "command": "jaxcl launch --local 2 ... --set mesh.runs=2",
        "mesh": runs[0]["devices"]["mesh"], "processes": runs[0]["devices"]["processes"],
        "wall_s": round(summary["wall_s"], 2), "wall_with_process_start_s": round(outer, 2),
        "train_s": round(summary["train_s"], 2),
        "wall_ratio_vs_one_device": round(summary["wall_s"] / one_wall, 3),
        "train_s_ratio_vs_one_device": round(summary["train_s"] / one_train, 3),
        "identical_matrices": all(np.array_equal(np.asarray(runs[s]["accuracy_matrix"]), np.asarray(ref[str(s)]))
                                  for s in runs),
        "load_1min": float(open("/proc/loadavg").read().split()[0]),
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--memory", action="store_true", help="peak memory of split_cifar10, 1 and 8 seeds")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--runs-axis", action="store_true", help="one device vs mesh.runs=2 on 2 virtual devices")
    ap.add_argument("--runs-workloads", nargs="+", default=list(RUNS_AXIS), choices=list(RUNS_AXIS))
    ap.add_argument("--runs-axis-child", help=argparse.SUPPRESS)
    ap.add_argument("--no-processes", action="store_true", help="--runs-axis without the 2-process variant")
    args = ap.parse_args(argv)
    if args.runs_axis_child:
        print(json.dumps(runs_axis_child(args.runs_axis_child, args.seeds, args.set)), flush=True)
        return 0
    if args.runs_axis:
        for name in args.runs_workloads:
            common.emit(bench_runs_axis(name, args.seeds, not args.no_processes, args.set))
        return 0
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)), flush=True)
        return 0
    if args.memory:
        common.emit(bench_memory())
        return 0
    for name in args.workloads:
        common.emit(bench_workload(name, args.seeds, args.set))
    return 0


if __name__ == "__main__":
    sys.exit(main())
