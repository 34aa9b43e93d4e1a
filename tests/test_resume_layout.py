"""--resume on another layout: a run of 2 devices (mesh.data=2) or of 2 processes,
killed, continues on 1 device of 1 process and ends with the uninterrupted run's
accuracy matrix (the checkpoint holds global arrays; the sample order is a function of
the seed, not of the layout)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jaxcl
from jaxcl import config as config_lib

SETS = ["num_tasks=2", "epochs=1", "checkpoint.every_steps=5", "loop.steps_per_call=5", "log.progress=false",
        "log.plots=false", "log.tensorboard=false"]

# argv: workdir, the save at which to die, --set strings...; then what the launcher appends
JOB = textwrap.dedent("""
    import sys
    args = sys.argv[1:]
    dist = {}
    if "--coordinator" in args:
        i = args.index("--coordinator")
        dist = dict(coordinator=args[i + 1], num_processes=int(args[i + 3]), process_id=int(args[i + 5]))
        args = args[:i]
    from jaxcl import distributed
    distributed.initialize(**dist, heartbeat_s=10)
    import os
    import jaxcl
    from jaxcl import checkpoint, config as C
    workdir, stop, sets = args[0], int(args[1]), args[2:]
    real, calls = checkpoint.Checkpointer.save, [0]

    def dying(self, *a, **k):  # the job dies at its stop-th save, every process alike
        calls[0] += 1
        if calls[0] == stop:
            sys.stdout.flush()
            os._exit(3)
        return real(self, *a, **k)

    checkpoint.Checkpointer.save = dying
    jaxcl.run(C.override(jaxcl.get_config("split_digits:method=ewc"), sets), workdir, echo=lambda s: None)
""")


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The run never interrupted, on this process's one device."""
    c = config_lib.override(jaxcl.get_config("split_digits:method=ewc"), SETS)
    return jaxcl.run(c, tmp_path_factory.mktemp("whole"), echo=lambda s: None)


def _resume_here(workdir):
    c = config_lib.override(jaxcl.get_config("split_digits:method=ewc"), SETS + ["mesh.data=-1"])
    return jaxcl.run(c, workdir, resume=True, echo=lambda s: None)


def _close(a, b, test_sizes):
    """Accuracy matrices within one test sample per entry (another layout sums in another order)."""
    tol = 1.01 / np.asarray(test_sizes)[None, :]
    assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= tol), (a, b)


def test_a_two_device_run_resumes_on_one_device(whole, tmp_path):
    wd = tmp_path / "run"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    proc = subprocess.run([sys.executable, str(script), str(wd), "3", *SETS, "mesh.data=2"], env=_env(2),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (wd / "checkpoints" / "1").exists() and not (wd / "results.json").exists()
    r = _resume_here(wd)
    assert r["devices"]["count"] == 1
    _close(r["accuracy_matrix"], whole["accuracy_matrix"], whole["stream"]["test_sizes"])


def test_a_two_process_run_resumes_in_one_process(whole, tmp_path):
    wd = tmp_path / "run"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    logs = tmp_path / "logs"
    logs.mkdir()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from jaxcl import distributed
        sys.exit(distributed.launch_local(2, [sys.executable, {str(script)!r}, {str(wd)!r}, "3", *{SETS!r}],
                                          grace_s=5))
    """)], env=dict(_env(1), JAXCL_LAUNCH_LOGS=str(logs)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (wd / "checkpoints" / "1").exists() and not (wd / "results.json").exists()
    r = _resume_here(wd)
    assert r["devices"]["processes"] == 1
    _close(r["accuracy_matrix"], whole["accuracy_matrix"], whole["stream"]["test_sizes"])
