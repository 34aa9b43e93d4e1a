"""Several JAX processes as one run: joining a job, the one process that writes, reading
global arrays on the host, and a local launcher.

jaxcl builds on JAX's multi-controller runtime: every process runs the same program on
global ``jax.Array`` s (:mod:`jaxcl.sharding`); each makes only its own rows of every
batch (``jax.make_array_from_process_local_data``); Orbax saves and restores collectively.

* :func:`initialize` joins a job, from explicit flags (``--coordinator HOST:PORT
  --num-processes N --process-id I``) or from what ``jax.distributed.initialize()``
  detects (TPU pods, SLURM, Open MPI, ...). On CPU the collectives use gloo.
* :func:`is_primary`: only process 0 writes results, logs, plots and the console.
* :func:`launch_local` starts N processes on this host (``jaxcl launch --local N``) and
  stops them all, naming the one that failed, when one dies.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np


class DistributedError(RuntimeError):
    """A multi-process job cannot start or lost a process."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False, timeout_s: int = 60, heartbeat_s: int = 30) -> None:
    """Join a multi-process job (explicit coordinator, or ``auto`` detection)."""
    if not (coordinator or auto):
        return
    if coordinator and (num_processes is None or process_id is None):
        raise DistributedError("--coordinator needs --num-processes and --process-id")
    if coordinator and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id {process_id} is not in 0..{num_processes - 1}")
    if coordinator and process_id != 0:
        _wait_for(coordinator, timeout_s, process_id, num_processes)  # the runtime would abort, not raise
    # CPU processes exchange through gloo (shipped with jaxlib); GPUs and TPUs use their own
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_s)
    except Exception as e:  # the runtime's own errors are long C++ reprs
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = f"the coordinator at {coordinator}" if coordinator else "the job's coordinator (auto-detected)"
        raise DistributedError(f"could not join {where} within {timeout_s} s as process {process_id} of "
                               f"{num_processes}: {first}") from None


def _wait_for(coordinator: str, timeout_s: float, process_id, num_processes) -> None:
    """Wait until the coordinator accepts connections, or raise a named error."""
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(f"could not join the coordinator at {coordinator} within {timeout_s:g} s as "
                                       f"process {process_id} of {num_processes}: {e.strerror or e}") from None
            time.sleep(0.5)


def is_primary() -> bool:
    return jax.process_index() == 0


def fetch(tree):
    """Global arrays -> numpy on every process: replicated arrays from the local copy,
    sharded ones gathered (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    def one(a):
        if not isinstance(a, jax.Array):
            return np.asarray(a)
        if a.is_fully_addressable:
            return np.asarray(jax.device_get(a))
        if a.sharding.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree_util.tree_map(one, tree)


def allgather_json(obj) -> list:
    """``obj`` (JSON-able) of every process, in process order, on every process (a
    collective); for small things such as per-run results."""
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
                         .encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(every[i, :int(n)]).decode()) for i, n in enumerate(sizes)]


def with_cpu_devices(flags: str, n: int) -> str:
    """``flags`` (an XLA_FLAGS value) asking XLA's host platform for ``n`` devices."""
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


def cpu_devices(n: int) -> None:
    """Give this process ``n`` virtual CPU devices (``jaxcl run --devices N``): one
    process spreads seeds (``mesh.runs``) or a batch (``mesh.data``) over the CPU's cores.
    XLA reads the count when JAX starts its backend, so this must come first."""
    from jax._src import xla_bridge

    if n < 1:
        raise DistributedError(f"--devices: must be >= 1, got {n}")
    if xla_bridge._backends:  # noqa: SLF001 (no public way to ask whether the backend started)
        raise DistributedError(f"--devices {n}: JAX's backend has already started in this process; "
                               f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before it starts")
    os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), n)
    if jax.default_backend() != "cpu":
        raise DistributedError(f"--devices {n}: virtual devices are CPU devices, and this process runs on "
                               f"{jax.default_backend()}; choose accelerators with CUDA_VISIBLE_DEVICES (GPU) or "
                               "the job's topology (TPU)")


def cpu_devices_for_runs(n_runs: int) -> int:
    """``jaxcl run --devices auto``: as many virtual CPU devices as this process's cores
    and the ``n_runs`` runs allow (the most that divides the runs), so that ``mesh.runs``
    (auto) gives each device its own runs; none for a single run. Sets XLA's host device
    count only, so a GPU or TPU process is unaffected. Returns the count chosen."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(d for d in range(1, min(cores, n_runs) + 1) if n_runs % d == 0)
    if n > 1:
        from jax._src import xla_bridge

        if xla_bridge._backends:  # noqa: SLF001
            raise DistributedError("--devices auto: JAX's backend has already started in this process")
        os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), n)
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_local(n: int, command: list[str], *, devices_per_process: int = 1, grace_s: float = 30.0,
                 echo=print) -> int:
    """Run ``command`` (it receives ``--coordinator``, ``--num-processes`` and
    ``--process-id`` appended) as ``n`` processes on this host; CPU processes get
    ``devices_per_process`` virtual devices, GPU processes that many GPUs each. Every
    process's output goes to ``process_<i>.log`` in the logs folder (``JAXCL_LAUNCH_LOGS``,
    default a temporary folder); process 0's is also shown as it comes, until another
    process fails. When one fails, the others get ``grace_s`` to stop by themselves, then
    are terminated, and what the user sees is the launcher's line naming the process that
    failed first, that process's own last error line, and where the logs are (not the
    errors the others print as they lose it)."""
    import tempfile
    import threading

    port = free_port()
    logs = os.environ.get("JAXCL_LAUNCH_LOGS") or tempfile.mkdtemp(prefix="jaxcl-launch-")
    procs, files = [], []
    live = threading.Event()  # process 0's output is shown while no other process has failed
    live.set()
    for i in range(n):
        env = dict(os.environ)
        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), devices_per_process)
        if "CUDA_VISIBLE_DEVICES" not in os.environ and _gpu_count():
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * devices_per_process + k) for k in range(devices_per_process))
        env["PYTHONUNBUFFERED"] = "1"  # the logs (and process 0's console) follow as it happens
        args = command + ["--coordinator", f"localhost:{port}", "--num-processes", str(n), "--process-id", str(i)]
        out = open(os.path.join(logs, f"process_{i}.log"), "w")
        files.append(out)
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE if i == 0 else out,
                                      stderr=subprocess.STDOUT, text=i == 0, bufsize=1 if i == 0 else -1))

    def others_failed() -> bool:
        return any(p.poll() not in (None, 0) for p in procs[1:])

    def pump() -> None:  # process 0's output: to its log always, to the console while live
        for line in procs[0].stdout:
            files[0].write(line)
            files[0].flush()
            if live.is_set() and others_failed():
                live.clear()
            if live.is_set():
                sys.stdout.write(line)
                sys.stdout.flush()

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    failed, deadline = None, None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if failed is None and p.poll() not in (None, 0):
                    failed = (i, p.returncode)
                    if i != 0:
                        live.clear()
                    deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                time.sleep(1)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    finally:
        pumper.join(timeout=10)
        for f in files:
            f.close()
    if failed is None:
        failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    if failed is not None:
        i, code = failed
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        last = last_error_line(os.path.join(logs, f"process_{i}.log"))
        echo(f"jaxcl launch: process {i} of {n} {how}; the others were stopped\n"
             f"  its last error: {last or 'none in its log (stopped from outside: a signal, the OOM killer)'}\n"
             f"  full logs of every process: {logs}\n"
             "  continue with the same command and --resume")
        return code if code > 0 else 1
    return 0


# What a process's last error line looks like: ours, a Python exception, an XLA fatal check.
_ERROR_LINE = re.compile(r"^(jaxcl(?: launch)?: error:|[\w.]*(Error|Exception|Interrupt)\b.*:|[\w.]*Error$|F\d{4} |"
                         r"Fatal Python error|Killed)")


def last_error_line(path: str, tail: int = 200) -> str:
    """The last line of a process's log that reports an error ("" when none does)."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()[-tail:]
    except OSError:
        return ""
    hits = [x.strip() for x in lines if _ERROR_LINE.match(x.strip())]
    return hits[-1][:400] if hits else ""


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return len(out.stdout.splitlines()) if out.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired):
        return 0
