"""Several processes as one run (jax.distributed over gloo on localhost), and state
sharded along ``fsdp``: the same results as one process, only process 0 writes, and a
job that loses a process stops, names it, and resumes to the same results."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import jaxcl
from jaxcl import distributed

METHODS = {  # small runs of the four kinds of state: regulariser, owner index, replay memory, calibration
    "ewc": [],
    "packnet": [],
    "er": ["online=true", "batch_size=8"],
    "nccl": ["online=true", "batch_size=8", "method.inner_steps=2"],
}
COMMON = ["num_tasks=2", "epochs=1", "log.progress=false", "log.plots=false", "log.tensorboard=false"]

# Runs every method in one job; argv: out_dir, mesh settings..., then (appended by the
# launcher, when launched) --coordinator ... --num-processes ... --process-id ...
JOB = textwrap.dedent("""
    import json, sys
    args = sys.argv[1:]
    dist = {}
    if "--coordinator" in args:
        i = args.index("--coordinator")
        dist = dict(coordinator=args[i + 1], num_processes=int(args[i + 3]), process_id=int(args[i + 5]))
        args = args[:i]
    from jaxcl import distributed
    distributed.initialize(**dist, heartbeat_s=10)
    import jaxcl
    from jaxcl import config as C
    out, only, mesh = args[0], args[1].split(","), args[2:]
    methods = {k: v for k, v in json.loads(%r).items() if k in only}
    for name, sets in methods.items():
        c = C.override(jaxcl.get_config(f"split_digits:method={name}"), %r + sets + mesh)
        r = jaxcl.run(c, f"{out}/{name}", echo=lambda s: None)
        if distributed.is_primary():
            print("RESULT " + json.dumps({"method": name, "R": r["accuracy_matrix"], "bwt": r["bwt"],
                                          "state_bytes": r["state_bytes"], "devices": r["devices"]}), flush=True)
""") % (json.dumps(METHODS), COMMON)


def _results(stdout: str) -> dict:
    return {x["method"]: x for x in (json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT "))}


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Every method on one device, in this process."""
    out = {}
    for name, sets in METHODS.items():
        c = jaxcl.config.override(jaxcl.get_config(f"split_digits:method={name}"), COMMON + sets)
        wd = tmp_path_factory.mktemp(name)
        out[name] = {**jaxcl.run(c, wd, echo=lambda s: None), "workdir": str(wd)}
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every method in one job of 2 processes x 1 device."""
    out = tmp_path_factory.mktemp("mp")
    script = out / "job.py"
    script.write_text(JOB)
    logs = out / "logs"
    logs.mkdir()
    stdout = out / "stdout.txt"
    with open(stdout, "w") as f:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from jaxcl import distributed
            sys.exit(distributed.launch_local(2, [sys.executable, {str(script)!r}, {str(out / 'runs')!r},
                                                  {",".join(METHODS)!r}]))
        """)], env=dict(_env(1), JAXCL_LAUNCH_LOGS=str(logs)), stdout=f, stderr=subprocess.STDOUT, timeout=900)
    text = stdout.read_text()
    assert proc.returncode == 0, text[-3000:] + (logs / "process_1.log").read_text()[-3000:]
    return out, _results(text)


def _close(a, b, test_sizes):
    """Accuracy matrices within one test sample per entry."""
    tol = 1.01 / np.asarray(test_sizes)[None, :]
    assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= tol), (a, b)


def test_two_processes_give_the_results_of_one_process(single, two_processes):
    _, multi = two_processes
    assert set(multi) == set(METHODS)
    for name, r in single.items():
        assert multi[name]["devices"]["processes"] == 2 and multi[name]["devices"]["count"] == 2
        _close(multi[name]["R"], r["accuracy_matrix"], r["stream"]["test_sizes"])
    assert multi["packnet"]["bwt"] == 0.0


def test_only_process_zero_writes(single, two_processes):
    out, _ = two_processes
    lines = [json.loads(x) for x in (out / "runs" / "ewc" / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["kind"] == "eval" for x in lines) == 2 and sum(x["kind"] == "results" for x in lines) == 1
    one = (Path(single["ewc"]["workdir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(one) == len(lines)  # one writer: no line twice
    assert "RESULT" not in (out / "logs" / "process_1.log").read_text()  # process 1 said nothing of its own


def test_one_process_with_two_devices_and_fsdp_agree_with_one_device(single, tmp_path):
    """In one process of 8 virtual devices: mesh.data=2 (1 process x 2 devices), and
    mesh.fsdp=4 (every big leaf of the state split in four)."""
    res = {}
    for what, only, mesh in (("data2", ",".join(METHODS), ["mesh.data=2"]),
                             ("fsdp4", "ewc,packnet", ["mesh.data=2", "mesh.fsdp=4", "mesh.min_shard_bytes=4096"])):
        proc = subprocess.run([sys.executable, "-c", JOB, str(tmp_path / what), only, *mesh], env=_env(8),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res[what] = _results(proc.stdout)
    for what in res:
        for name, r in res[what].items():
            _close(r["R"], single[name]["accuracy_matrix"], single[name]["stream"]["test_sizes"])
    assert set(res["data2"]) == set(METHODS) and res["fsdp4"]["packnet"]["bwt"] == 0.0
    ewc = res["fsdp4"]["ewc"]
    assert ewc["devices"]["count"] == 8 and ewc["devices"]["mesh"] == {"runs": 1, "data": 2, "fsdp": 4}
    b = ewc["state_bytes"]
    # parameters, their optimizer state, importances and anchors are split in four; the small rest is not
    assert b["per_device_max"] < 0.3 * b["total"], b
    assert res["data2"]["ewc"]["state_bytes"]["per_device_max"] == res["data2"]["ewc"]["state_bytes"]["total"]


def _pid_of_process(index: int, workdir: Path) -> int | None:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(workdir).encode() in cmd and b"--process-id" in cmd and cmd[cmd.index(b"--process-id") + 1] == \
                    str(index).encode():
                return int(p.name)
    return None


def test_a_two_process_run_that_loses_a_process_stops_naming_it_and_resumes(single, tmp_path):
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxcl.cli", "launch", "--local", "2", "--grace", "5", "split_digits:method=ewc",
           "--workdir", str(wd), "--heartbeat-timeout", "5", *sum((["--set", s] for s in COMMON), []),
           "--set", "checkpoint.every_steps=5", "--set", "loop.steps_per_call=5"]
    env = dict(_env(1), JAXCL_LAUNCH_LOGS=str(tmp_path))
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (wd / "checkpoints" / "2").exists():
        time.sleep(0.2)
    assert (wd / "checkpoints" / "2").exists(), "no checkpoint was written"
    victim = _pid_of_process(1, wd)
    os.kill(victim, signal.SIGKILL)
    start = time.time()
    out, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and time.time() - start < 60
    assert "process 1 of 2 was killed by signal 9" in out
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from" in resumed.stdout
    r = json.loads((wd / "results.json").read_text())
    _close(r["accuracy_matrix"], single["ewc"]["accuracy_matrix"], single["ewc"]["stream"]["test_sizes"])


def test_an_unreachable_coordinator_is_a_named_error():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from jaxcl import distributed
        try:
            distributed.initialize("localhost:1", 2, 1, timeout_s=3)
        except distributed.DistributedError as e:
            print("ERR", e)
    """)], env=_env(1), capture_output=True, text=True, timeout=120)
    assert "ERR could not join the coordinator at localhost:1 within 3 s as process 1 of 2" in proc.stdout, \
        proc.stdout + proc.stderr[-2000:]


def test_a_mesh_that_does_not_fit_is_a_named_error():
    from jaxcl import sharding

    with pytest.raises(sharding.ShardingError, match="mesh.fsdp=3 does not divide the 1 devices"):
        sharding.make_mesh(-1, 3)
