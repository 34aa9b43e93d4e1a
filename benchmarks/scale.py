"""Issue 13: scale-out side by side in one run: the same short `jaxcl run` at four mesh
layouts, and the per-device state bytes of ResNet-50 states with and without fsdp.

Workloads (whole runs of split_cifar10 from ../shared/data, 2 tasks, few samples):

* ``w2``: PackNet on the reduced ResNet-18 (width 20), batch 32, SGD lr 0.01, prune 0.5 +
  1 retraining epoch (the W2 model and optimiser; batch norm frozen from task 2 on);
* ``w3``: CLR (``variant=full``, ``task_bn=false``) on the CIFAR ResNet-18 (width 64),
  SGD lr 0.01 (the W3 model and optimiser; backbone random, not pretrained: speed and
  layout agreement do not depend on it), batch ``--w3-batch`` (W3's 64 is 144 GFLOP a
  step, too slow for a few minutes on 2 cores).

Layouts (each a fresh subprocess, so that XLA sees its own device count):

* ``data1``:   1 process x 1 device;
* ``data2``:   1 process x 2 devices, ``mesh.data=2`` (each batch split in two);
* ``data2_2p``: 2 processes x 1 device (``jaxcl launch --local 2``, jax.distributed over
  gloo on localhost), ``mesh.data=2``;
* ``fsdp2``:   1 process x 2 devices, ``mesh.data=1 mesh.fsdp=2`` (every leaf of the state
  of at least ``mesh.min_shard_bytes`` split in two, the batch too).

On CPU the devices are XLA's virtual host devices: they share the same cores, so a
2-device layout cannot be faster than 1 device by more than what splitting a batch into
two smaller ops saves; 2 processes on 2 cores compete for them (and for the cores other
developers use), which is what the "2 processes within 15% of 1 process x 2 devices"
target measures. On a GPU host, a layout needs as many GPUs as it has devices; the ones
that do not fit are skipped and said so.

Figures, per workload and layout, from the run's own files:

* ``steady_steps_per_s``: train steps between the first and the last logged chunk of each
  (task, phase), over the time between those lines of ``metrics.jsonl``
  (``log.every_steps = loop.steps_per_call``: one line per compiled call, written after
  the call's outputs reached the host), summed over phases: compile time excluded
  (every phase's first call, which compiles, is left out);
* ``run_steps_per_s``: ``results.json``'s ``steps_per_s`` (train steps / ``train_s``,
  compilation included, as a user sees a run this short);
* ``state_bytes``: ``results.json``'s per-device maximum and total;
* ``max_abs_acc_diff``: the largest |difference| between an entry of a layout's
  accuracy matrix and ``data1``'s (``acc_diff_in_test_samples``: the same in test samples
  of the smallest task); ``max_abs_logged_loss_diff``: the same for every logged training
  loss (mean of each call's steps), the finer check on runs this short;
* each steady rate's share of the fp32 matmul peak (``benchmarks/common.peak_gflops``)
  with the FLOP per step of ``../shared/peers/flops.jsonl`` (W3's, measured at batch 64,
  scaled to the batch used).

ResNet-50 state bytes (``--no-bytes`` to skip): the State of ``split_cifar10`` with
``model.name=resnet50`` for EWC (5 tasks) and for CLR with 10 tasks (a task-incremental
permuted CIFAR-10 stream: 10 heads of 10 classes),
built abstractly (``jax.eval_shape`` of the run's init, nothing trained or allocated) in
a subprocess with 2 virtual devices, placed by ``sharding.state_shardings`` on a
``data=2`` mesh (replicated) and on a ``fsdp=2`` mesh; per-device bytes summed from every
leaf's ``sharding.shard_shape``. Target: fsdp=2 at most 0.55x of replicated.

    python benchmarks/scale.py [--workloads w2 w3] [--layouts data1 data2 data2_2p fsdp2] [--no-bytes]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "log.plots=false", "log.tensorboard=false"]
LAYOUTS = {  # name -> (processes, devices per process, mesh settings)
    "data1": (1, 1, ["mesh.data=1", "mesh.fsdp=1"]),
    "data2": (1, 2, ["mesh.data=2", "mesh.fsdp=1"]),
    "data2_2p": (2, 1, ["mesh.data=2", "mesh.fsdp=1"]),
    "fsdp2": (1, 2, ["mesh.data=1", "mesh.fsdp=2"]),
}


def workloads(args) -> dict:
    """name -> (config spec, --set list, flops key, FLOP per step scale)."""
    k = args.steps_per_call
    base = [f"data.dir={common.DATA_DIR}", *QUIET, "num_tasks=2", "data.augment=false",
            f"loop.steps_per_call={k}", f"log.every_steps={k}", "optimizer.name=sgd", "optimizer.lr=0.01",
            "optimizer.momentum=0", "optimizer.schedule=constant", f"epochs={args.epochs}"]
    return {
        "w2": ("split_cifar10:method=packnet",
               [*base, "model.name=reduced_resnet18", f"batch_size={args.w2_batch}", "method.prune=(0.5,)",
                f"method.retrain_epochs={args.retrain_epochs}", f"data.train_limit={args.w2_train}",
                f"data.test_limit={args.w2_test}", f"eval_batch_size={args.w2_test}"],
               "w2_packnet_resnet", args.w2_batch / 32),
        "w3": ("split_cifar10:method=clr",
               [*base, "model.name=resnet18_cifar", "method.variant=full", "method.task_bn=false", "method.l2=0.0",
                f"batch_size={args.w3_batch}", f"data.train_limit={args.w3_train}",
                f"data.test_limit={args.w3_test}", f"eval_batch_size={args.w3_test}"],
               "w3_clr_resnet", args.w3_batch / 64),
    }


def _env(devices: int, platform: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    else:
        env["XLA_FLAGS"] = flags
        env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(devices)))
    return env


def run_layout(spec: str, sets: list[str], layout: str, workdir: Path, platform: str, timeout: int) -> dict:
    procs, per, mesh = LAYOUTS[layout]
    args = [spec, *sum((["--set", s] for s in [*sets, *mesh]), []), "--workdir", str(workdir)]
    if procs == 1:
        cmd = [sys.executable, "-m", "jaxcl.cli", "run", *args]
        env = _env(per, platform)
    else:
        cmd = [sys.executable, "-m", "jaxcl.cli", "launch", "--local", str(procs), "--devices-per-process", str(per),
               *args]
        env = dict(_env(per, platform), JAXCL_LAUNCH_LOGS=str(workdir.parent / f"{workdir.name}_logs"))
        Path(env["JAXCL_LAUNCH_LOGS"]).mkdir(parents=True, exist_ok=True)
        if platform != "cpu":
            env.pop("CUDA_VISIBLE_DEVICES", None)  # launch_local gives each process its own GPUs
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        logs = "".join(p.read_text()[-1500:] for p in Path(env.get("JAXCL_LAUNCH_LOGS", "/nonexistent")).glob("*.log")
                       ) if procs > 1 else ""
        raise RuntimeError(f"{layout}: {' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-2000:]}\n"
                           f"{out.stderr[-3000:]}\n{logs}")
    res = json.loads((workdir / "results.json").read_text())
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    return {"results": res, "steady": steady_rate(lines), "losses": losses, "process_wall_s": wall,
            "command": " ".join(cmd)}


def steady_rate(lines: list[dict]) -> dict:
    """Steps/s between the first and last train line of every (task, phase): each phase's
    first call (the one that compiles) left out."""
    groups: dict = {}
    for x in lines:
        if x["kind"] == "train":
            groups.setdefault((x["task"], x["phase"]), []).append((x["step"], x["time"]))
    steps = secs = 0.0
    for pts in groups.values():
        if len(pts) >= 2:
            steps += pts[-1][0] - pts[0][0]
            secs += pts[-1][1] - pts[0][1]
    return {"steps": int(steps), "seconds": round(secs, 3),
            "steps_per_s": round(steps / secs, 4) if secs > 0 else None}


BYTES_JOB = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import jaxcl
    from jaxcl import config as C, sharding, train
    out = {}
    for name, spec, sets in json.loads(sys.argv[1]):
        c = C.override(jaxcl.get_config(spec), sets + ["mesh.data=1", "mesh.fsdp=2"])
        S = train.setup(c)
        abstract = jax.eval_shape(S.lift(train._make_init(S), (0,)), train._keys(S))
        row = {"num_tasks": S.num_tasks, "model": c.model.name, "method": c.method.name}
        for what, mesh in (("replicated", sharding.make_mesh(2, 1)), ("fsdp2", sharding.make_mesh(1, 2))):
            row[what] = sharding.bytes_per_device(
                abstract, sharding.state_shardings(abstract, mesh, min_bytes=c.mesh.min_shard_bytes))
        row["ratio_fsdp2_over_replicated"] = round(row["fsdp2"]["per_device_max"]
                                                   / row["replicated"]["per_device_max"], 4)
        out[name] = row
    print("BYTES " + json.dumps(out))
""")


def resnet50_bytes(timeout: int) -> dict:
    small = [f"data.dir={common.DATA_DIR}", *QUIET, "model.name=resnet50", "data.train_limit=200",
             "data.test_limit=200", "batch_size=16", "eval_batch_size=16", "data.on_device=false"]
    jobs = [("ewc_resnet50", "split_cifar10:method=ewc", small),
            ("clr_resnet50_10_tasks", "split_cifar10:method=clr",
             [*small, "num_tasks=10", "data.stream=permuted", "scenario=task"])]
    out = subprocess.run([sys.executable, "-c", BYTES_JOB, json.dumps(jobs)], cwd=ROOT, env=_env(2, "cpu"),
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"state bytes job exited {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("BYTES "))[6:])


def device_count(platform: str) -> int:
    if platform == "cpu":
        return 1 << 30
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], env=dict(os.environ),
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def bench(name: str, spec: str, sets: list[str], fkey: str, fscale: float, layouts: list[str], args,
          peak: float | None, tmp: Path) -> dict:
    rows, skipped = {}, {}
    have = device_count(args.platform)
    load = [float(open("/proc/loadavg").read().split()[0])]
    for lay in layouts:
        procs, per, _ = LAYOUTS[lay]
        if procs * per > have:
            skipped[lay] = f"needs {procs * per} devices, {have} visible"
            continue
        print(f"[scale] {name} {lay} ...", file=sys.stderr, flush=True)
        rows[lay] = run_layout(spec, sets, lay, tmp / f"{name}_{lay}", args.platform, args.timeout)
    load.append(float(open("/proc/loadavg").read().split()[0]))
    fl = common.flops(fkey).get("train_step")
    fps = fl * fscale if fl else None
    ref = rows.get("data1") or next(iter(rows.values()))
    R0 = np.asarray(ref["results"]["accuracy_matrix"])
    tests = min(ref["results"]["stream"]["test_sizes"])
    steady = {k: v["steady"]["steps_per_s"] for k, v in rows.items()}
    run_rate = {k: round(v["results"]["steps_per_s"], 4) for k, v in rows.items()}
    diffs = {k: float(np.max(np.abs(np.asarray(v["results"]["accuracy_matrix"]) - R0))) for k, v in rows.items()}
    L0 = np.asarray(ref["losses"])
    loss_diffs = {k: float(np.max(np.abs(np.asarray(v["losses"]) - L0))) if len(v["losses"]) == len(L0) else None
                  for k, v in rows.items()}

    def ratio(d, a, b):
        return round(d[a] / d[b], 3) if d.get(a) and d.get(b) else None

    return {
        "workload": name,
        "command": f"jaxcl run {spec} " + " ".join(f"--set {s}" for s in sets),
        "layouts": {k: {"processes": v["results"]["devices"]["processes"], "devices": v["results"]["devices"]["count"],
                        "mesh": v["results"]["devices"]["mesh"], "platform": v["results"]["devices"]["platform"]}
                    for k, v in rows.items()},
        "skipped": skipped,
        "steady_steps_per_s": steady,
        "steady_steps_timed": {k: v["steady"]["steps"] for k, v in rows.items()},
        "run_steps_per_s_incl_compile": run_rate,
        "train_steps": {k: v["results"]["train_steps"] for k, v in rows.items()},
        "process_wall_s": {k: round(v["process_wall_s"], 1) for k, v in rows.items()},
        "ratios_steady": {"data2_over_data1": ratio(steady, "data2", "data1"),
                          "data2_2p_over_data2": ratio(steady, "data2_2p", "data2"),
                          "fsdp2_over_data2": ratio(steady, "fsdp2", "data2"),
                          "fsdp2_over_data1": ratio(steady, "fsdp2", "data1")},
        "ratios_run": {"data2_over_data1": ratio(run_rate, "data2", "data1"),
                       "data2_2p_over_data2": ratio(run_rate, "data2_2p", "data2"),
                       "fsdp2_over_data2": ratio(run_rate, "fsdp2", "data2")},
        "flop_per_step": fps,
        "peak_gflops": peak,
        "share_of_peak_steady": {k: common.share_of_peak(v, fps, peak) if v else None for k, v in steady.items()},
        "state_bytes": {k: v["results"]["state_bytes"] for k, v in rows.items()},
        "state_bytes_per_device_fsdp2_over_data2": (
            round(rows["fsdp2"]["results"]["state_bytes"]["per_device_max"]
                  / rows["data2"]["results"]["state_bytes"]["per_device_max"], 4)
            if "fsdp2" in rows and "data2" in rows else None),
        "max_abs_acc_diff_vs_data1": diffs,
        "acc_diff_in_test_samples": {k: round(v * tests, 2) for k, v in diffs.items()},
        "max_abs_logged_loss_diff_vs_data1": loss_diffs,
        "logged_losses": len(L0),
        "accuracy_matrix_data1": R0.round(4).tolist(),
        "load_1min": load,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["w2", "w3"], choices=["w2", "w3"])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps-per-call", type=int, default=2)
    ap.add_argument("--retrain-epochs", type=int, default=0, help="PackNet's retraining epochs (W2)")
    ap.add_argument("--w2-batch", type=int, default=16)
    ap.add_argument("--w2-train", type=int, default=64, help="training samples per task (W2)")
    ap.add_argument("--w2-test", type=int, default=50, help="test samples per task (W2)")
    ap.add_argument("--w3-batch", type=int, default=16)
    ap.add_argument("--w3-train", type=int, default=64, help="training samples per task (W3)")
    ap.add_argument("--w3-test", type=int, default=50, help="test samples per task (W3)")
    ap.add_argument("--platform", default="cpu", choices=["cpu", "gpu"],
                    help="gpu: run the layouts on GPUs (a layout with more devices than GPUs is skipped)")
    ap.add_argument("--no-bytes", action="store_true", help="skip the ResNet-50 state bytes")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per layout run")
    args = ap.parse_args(argv)
    peak = common.peak_gflops() if args.platform == "cpu" else None
    wl = workloads(args)
    tmp = Path(tempfile.mkdtemp(prefix="jaxcl_scale_"))
    try:
        if not args.no_bytes:
            b = resnet50_bytes(args.timeout)
            common.emit({"workload": "resnet50_state_bytes", "target_ratio_at_most": 0.55, **b})
        for name in args.workloads:
            spec, sets, fkey, fscale = wl[name]
            common.emit(bench(name, spec, sets, fkey, fscale, args.layouts, args, peak, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
