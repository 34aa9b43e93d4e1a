"""What the tests that start jobs share (test_distributed.py, test_runs_axis.py): the
environment of a process with N virtual CPU devices, the preamble of a job script that
joins a launched job, a local launch of N processes, and reading the RESULT lines.

Every fresh process pays the jax import (~5 CPU s) and its own compiles: a test file
runs as many checks as it can in each process it starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

# The first lines of a job script: joins the job when the launcher appended
# --coordinator ... --num-processes ... --process-id ...; leaves the script's own
# arguments in ``args`` and ``emit(**kw)`` prints one RESULT line.
PREAMBLE = textwrap.dedent("""
    import json, sys
    args = sys.argv[1:]
    dist = {}
    if "--coordinator" in args:
        i = args.index("--coordinator")
        dist = dict(coordinator=args[i + 1], num_processes=int(args[i + 3]), process_id=int(args[i + 5]))
        args = args[:i]
    from jaxcl import distributed
    distributed.initialize(**dist, heartbeat_s=10)

    def emit(**kw):
        print("RESULT " + json.dumps(kw), flush=True)

    # run() with Checkpointer.save raising at its n-th call (every process alike), as
    # conftest's crash_at_save fixture does in the test process; or, given ``when``, at
    # the n-th call whose meta ``when(meta)`` accepts. Returns the saves attempted. A run
    # that never reaches that save fails the job.
    def die_at_save(n, run, when=None):
        from jaxcl.checkpoint import Checkpointer

        class Died(Exception):
            pass

        real, calls, hits = Checkpointer.save, [0], [0]

        def dying(self, index, state, meta, *a, **k):
            calls[0] += 1
            hits[0] += when is None or bool(when(meta))
            if hits[0] == n:
                raise Died()
            return real(self, index, state, meta, *a, **k)

        Checkpointer.save = dying
        try:
            run()
        except Died:
            return calls[0]
        finally:
            Checkpointer.save = real
        raise AssertionError(f"the run did not reach save {n}")
""")


def env(devices: int, optimized: bool = False, **more) -> dict:
    """This environment (the test session's compile cache included) on ``devices``
    virtual CPU devices; ``optimized``: compiling with XLA's full optimisation
    (conftest.optimized_env)."""
    from conftest import optimized_env, xla_flags_without_devices

    base = optimized_env() if optimized else dict(os.environ)
    flags = f"{xla_flags_without_devices(base.get('XLA_FLAGS', ''))} --xla_force_host_platform_device_count={devices}"
    return dict(base, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", **more)


def results(text: str) -> list[dict]:
    return [json.loads(x[7:]) for x in text.splitlines() if x.startswith("RESULT ")]


def run_script(body: str, argv: list[str], devices: int, timeout: int = 1500, optimized: bool = False) -> list[dict]:
    """PREAMBLE + ``body`` in one process of ``devices`` devices; its RESULT lines."""
    proc = subprocess.run([sys.executable, "-c", PREAMBLE + textwrap.dedent(body), *argv],
                          env=env(devices, optimized), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return results(proc.stdout)


def launch(n: int, body: str, argv: list[str], tmp: Path, grace_s: float = 10,
           timeout: int = 1500) -> tuple[int, list[dict], Path]:
    """PREAMBLE + ``body`` as a local job of ``n`` processes x 1 device: (exit code,
    the RESULT lines of every process, the folder of the launcher's logs)."""
    script = tmp / "job.py"
    script.write_text(PREAMBLE + textwrap.dedent(body))
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from jaxcl import distributed
        sys.exit(distributed.launch_local({n}, [sys.executable, {str(script)!r}, *{argv!r}], grace_s={grace_s}))
    """)], env=env(1, JAXCL_LAUNCH_LOGS=str(logs)), capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + "".join((logs / f"process_{i}.log").read_text() for i in range(1, n)
                                 if (logs / f"process_{i}.log").exists())
    if proc.returncode != 0:
        print(text[-4000:] + proc.stderr[-3000:])
    return proc.returncode, results(text), logs


def close(a, b, test_sizes):
    """Accuracy matrices within one test sample per entry (another layout sums in
    another order)."""
    tol = 1.01 / np.asarray(test_sizes)[None, :]
    assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= tol), (a, b)
