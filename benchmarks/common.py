"""Timing helpers shared by the benchmark scripts, with the semantics of the PyTorch
peers in ../shared/peers (common.py): an untimed warm-up that includes compilation, then
R timed blocks of N units, rate = units / block time, median over blocks; one-off
operations timed call by call from an identical state. Every timed block ends with
``jax.block_until_ready``.

Side by side: ``run_peer`` runs the matching PyTorch script in the same invocation, and
``share_of_peak`` puts each rate next to the machine's fp32 matmul peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax

PEERS = Path(os.environ.get("JAXCL_PEERS_DIR", Path(__file__).resolve().parents[2] / "shared" / "peers"))
PEERS_PYTHON = os.environ.get("JAXCL_PEERS_PYTHON", "/tmp/peersvenv/bin/python")
# the real datasets of the accuracy scripts (--data-dir's default)
DATA_DIR = os.environ.get("JAXCL_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def time_repeats(fn: Callable[[], object], *, warmup: int, repeats: int, inner: int) -> list[float]:
    out = None
    for _ in range(warmup):
        out = fn()
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return times


def time_calls(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 9) -> list[float]:
    """One-off operation: each call timed on its own (from the same inputs)."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def rate_stats(block_times: Sequence[float], units_per_block: float) -> dict:
    rates = [units_per_block / t for t in block_times]
    return {"median": round(statistics.median(rates), 4), "min": round(min(rates), 4),
            "max": round(max(rates), 4), "n_repeats": len(rates)}


def time_stats_ms(times: Sequence[float]) -> dict:
    ms = [1e3 * t for t in times]
    return {"median_ms": round(statistics.median(ms), 4), "min_ms": round(min(ms), 4),
            "max_ms": round(max(ms), 4), "n_repeats": len(ms)}


def flops(workload: str) -> dict:
    """FLOP per unit of a workload, from the peers' flops.jsonl."""
    path = PEERS / "flops.jsonl"
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if d["workload"] == workload:
            return d["flop_per_unit"]
    return {}


def peak_gflops() -> float | None:
    """This machine's fp32 matmul peak with 2 threads: the peers' peak.py when its venv
    exists (the figure the comparison is defined with), else numpy's best median."""
    if Path(PEERS_PYTHON).exists() and (PEERS / "peak.py").exists():
        out = subprocess.run([PEERS_PYTHON, "peak.py"], cwd=PEERS, capture_output=True, text=True)
        if out.returncode == 0:
            return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_gflops"])
    import numpy as np

    best = 0.0
    for n in (1024, 2048):
        a = np.random.rand(n, n).astype(np.float32)
        a @ a
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ a
            ts.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / statistics.median(ts) / 1e9)
    return round(best, 1)


def jax_matmul_gflops() -> float:
    """The best fp32 matmul rate XLA reaches here (square 1024/2048): on CPUs whose wide
    vector units the peers' BLAS libraries do not use fully (seen: AMD Zen 5, where this
    is ~1.8x peak.py's figure), this is the closer estimate of the hardware peak."""
    import jax.numpy as jnp

    best = 0.0
    for n in (1024, 2048):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
        f = jax.jit(lambda a: a @ a)
        jax.block_until_ready(f(a))
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a))
            ts.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / statistics.median(ts) / 1e9)
    del jnp
    return round(best, 1)


def run_config(spec: str, sets, workdir, **run_kw) -> dict:
    """``jaxcl run SPEC --set ...`` in this process; its results with ``wall_s`` added."""
    import jaxcl
    from jaxcl import config as config_lib

    config = config_lib.override(jaxcl.get_config(spec), list(sets))
    t0 = time.perf_counter()
    r = jaxcl.run(config, workdir, **run_kw)
    r["wall_s"] = time.perf_counter() - t0
    return r


def workload_parser(description: str) -> argparse.ArgumentParser:
    """The options every W-workload script takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--no-peer", action="store_true", help="time jaxcl only")
    ap.add_argument("--devices", type=int, default=1,
                    help="XLA host devices to split each batch over (read by devices.py before jax starts)")
    return ap


class StepCycle:
    """A zero-argument callable for ``time_repeats``: one ``step(state, batch, task,
    phase)`` on the next of ``batches`` (cycling), keeping the newest state in ``.state``
    (the step may donate its input); returns the step's loss to block on."""

    def __init__(self, step, state, batches, task, phase: str):
        self.step, self.state, self.batches, self.task, self.phase, self.i = step, state, batches, task, phase, 0

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batches[self.i % len(self.batches)], self.task, self.phase)
        self.i += 1
        return metrics["loss"]


def trainable_count(state) -> int:
    """Parameters the state's ``trainable`` tree lets move (scalar masks broadcast)."""
    import jax.numpy as jnp
    import numpy as np

    return sum(int(np.asarray(jnp.broadcast_to(t, p.shape)).sum()) for t, p in zip(
        jax.tree_util.tree_leaves(state.trainable), jax.tree_util.tree_leaves(state.params)))


def ratio(ours: dict, theirs: dict, key: str) -> float:
    """ours / theirs for one figure: medians of rates, or median milliseconds of one-off
    operations (so above 1 means slower there)."""
    stat = "median" if "median" in ours[key] else "median_ms"
    return round(ours[key][stat] / theirs[key][stat], 3)


def share_of_peak(rate_per_s: float, flop_per_unit: float | None, peak: float | None) -> float | None:
    if not (flop_per_unit and peak):
        return None
    return round(rate_per_s * flop_per_unit / (peak * 1e9), 4)


def run_peer(script: str, env_extra: dict | None = None) -> dict | None:
    """The PyTorch peer's JSON line (None when the peers or their venv are absent)."""
    if not (Path(PEERS_PYTHON).exists() and (PEERS / script).exists()):
        print(f"[bench] peer {script} not run: {PEERS_PYTHON} or {PEERS / script} missing", file=sys.stderr)
        return None
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONHASHSEED="0", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([PEERS_PYTHON, script], cwd=PEERS, capture_output=True, text=True, env=env, timeout=1200)
    if out.returncode != 0:
        print(f"[bench] peer {script} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def env_info() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    d = jax.devices()[0]
    return {"jax": jax.__version__, "python": platform.python_version(), "cpu": cpu, "nproc": os.cpu_count(),
            "device": f"{d.platform}:{d.device_kind}", "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "date": time.strftime("%Y-%m-%d")}


def emit(record: dict) -> None:
    record = dict(record, env=env_info())
    print(json.dumps(record), flush=True)

