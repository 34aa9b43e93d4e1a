"""Several devices and several processes as one run: data parallel over 8 virtual devices
and over 2 processes (jax.distributed over gloo on localhost), state sharded along
``fsdp``, all with the results of one device; only process 0 writes; a job that loses a
process stops and names it; and a run killed on one layout (2 devices, 2 processes)
resumes on another (1 device of 1 process) with the uninterrupted run's results (the
checkpoint holds global arrays; the sample order is a function of the seed, not of the
layout).

The layouts run in few fresh processes (each pays the jax import and its own compiles):
one of 8 virtual devices runs every several-device check of one process (every method
on 8 devices), one 2-process job packnet and l2p (the other state kinds run on 2 processes in
the killed job below and in test_runs_axis.py's 2-process job, and on several devices
in the 8-device process)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _jobs import close, env, launch, run_script

import jaxcl
from jaxcl import checkpoint, distributed

# l2p below trains prompts on a random trunk (the layouts, not the accuracy, are tested)
pytestmark = pytest.mark.filterwarnings("ignore:method l2p trains only on top of a frozen backbone")

METHODS = {  # small runs of the four kinds of state: regulariser, owner index, replay memory, calibration
    "ewc": ["loop.steps_per_call=5"],  # CUT's K: the killed runs resume on one device with this program
    "packnet": [],
    "er": ["online=true", "batch_size=8"],
    "nccl": ["online=true", "batch_size=8", "method.inner_steps=2"],
    # a prompt method: a frozen trunk (stop_gradient) beside the prompt pool and keys
    "l2p": ["model.name=vit_cifar", "model.width=16", "model.depth=2"],
}
COMMON = ["num_tasks=2", "epochs=1", "log.progress=false", "log.plots=false", "log.tensorboard=false"]
CUT = ["checkpoint.every_steps=5", "loop.steps_per_call=5"]  # the runs that are killed and resumed (ewc)
FSDP = ["mesh.data=2", "mesh.fsdp=4", "mesh.min_shard_bytes=4096"]

# argv: out dir, then (launched) the launcher's arguments; runs the methods of argv[1]
# (comma-separated) on the mesh of argv[2:], process 0 prints their RESULT lines
RUN = """
    import jaxcl
    from jaxcl import config as C
    METHODS, COMMON = %r, %r

    def params(workdir):  # the parameters of the run's last checkpoint
        import jax, numpy as np, orbax.checkpoint as ocp
        from jaxcl.checkpoint import Checkpointer
        ck = Checkpointer(f"{workdir}/checkpoints")
        st = ocp.StandardCheckpointer().restore(ck.directory / str(ck.latest()) / "state")
        return [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(st["params"])]

    def run(what, name, mesh, with_params=False):
        c = C.override(jaxcl.get_config(f"split_digits:method={name}"), COMMON + METHODS[name] + mesh)
        r = jaxcl.run(c, f"{out}/{what}/{name}", echo=lambda s: None)
        if distributed.is_primary():
            emit(case=what, method=name, R=r["accuracy_matrix"], bwt=r["bwt"], state_bytes=r["state_bytes"],
                 devices=r["devices"], params=params(f"{out}/{what}/{name}") if with_params else None)
""" % (METHODS, COMMON)

# In one process of 8 virtual devices: the batch split, mesh.data=8 (ewc, with its
# parameters), mesh.data=2 (the methods no other layout here runs), mesh.data=2 x mesh.fsdp=4
# (every big leaf of the state split in four), and an ewc run of mesh.data=2 that dies
# at its 3rd save (the test resumes it on one device).
EIGHT = RUN + """
    import jax, numpy as np
    from jaxcl import sharding
    assert jax.device_count() == 8, jax.devices()
    out = args[0]
    b = sharding.shard_batch({"x": np.zeros((16, 3))}, sharding.make_mesh(8))
    try:
        sharding.check_batch(12, sharding.make_mesh(8))
        error = None
    except sharding.ShardingError as e:
        error = str(e)
    emit(case="batch", shard=list(b["x"].sharding.shard_shape(b["x"].shape)), error=error)
    run("data8", "ewc", ["mesh.data=8"], with_params=True)
    for name in ("er", "nccl"):  # many small steps: on 2 devices (8 cost 8 device programs a step)
        run("data2", name, ["mesh.data=2"])
    for name in ("ewc", "packnet", "l2p"):
        run("fsdp4", name, %r)
    cut = C.override(jaxcl.get_config("split_digits:method=ewc"), COMMON + %r + ["mesh.data=2"])
    saves = die_at_save(3, lambda: jaxcl.run(cut, f"{out}/cut", echo=lambda s: None))  # dies at its 3rd save
    emit(case="cut", workdir=f"{out}/cut", saves=saves)
""" % (FSDP, CUT)

# argv: out dir, methods; then the launcher's arguments; packnet also traces 2 steps
# (log.profile_steps: each process writes a trace of its own)
PROFILE = ["log.profile_steps=2", "log.profile_after=0"]
TWO = RUN + """
    out = args[0]
    for name in args[1].split(","):
        run("mp", name, %r if name == "packnet" else [])
""" % PROFILE
# ewc, er and nccl run on several devices in EIGHT (mesh.data=8), ewc on 2 processes in the test
# of the killed job below, er (replay memory fed per process) in test_runs_axis.py's 2-process job;
# l2p (a prompt method on a ViT) here and under fsdp in EIGHT
TWO_METHODS = ("packnet", "l2p")


def _by(rows, case):
    return {x["method"]: x for x in rows if x["case"] == case}


def _last_params(workdir) -> list:
    import jax
    import orbax.checkpoint as ocp

    from jaxcl.checkpoint import Checkpointer

    ck = Checkpointer(f"{workdir}/checkpoints")
    st = ocp.StandardCheckpointer().restore(ck.directory / str(ck.latest()) / "state")
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(st["params"])]


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
def eight(tmp_path_factory):
    return run_script(EIGHT, [str(tmp_path_factory.mktemp("eight"))], devices=8)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """packnet (its pruning masks) and l2p (a frozen ViT trunk, its prompt pool and keys)
    in one job of 2 processes x 1 device."""
    out = tmp_path_factory.mktemp("mp")
    code, rows, logs = launch(2, TWO, [str(out / "runs"), ",".join(TWO_METHODS)], out, timeout=900)
    assert code == 0
    return out, _by(rows, "mp"), logs


def _resume_here(workdir, echo=lambda s: None):
    c = jaxcl.config.override(jaxcl.get_config("split_digits:method=ewc"), COMMON + CUT + ["mesh.data=-1"])
    return jaxcl.run(c, workdir, resume=True, echo=echo)


def test_two_processes_give_the_results_of_one_process(single, two_processes):
    _, multi, _ = two_processes
    assert set(multi) == set(TWO_METHODS)
    for name in TWO_METHODS:
        r = single[name]
        assert multi[name]["devices"]["processes"] == 2 and multi[name]["devices"]["count"] == 2
        close(multi[name]["R"], r["accuracy_matrix"], r["stream"]["test_sizes"])
    assert multi["packnet"]["bwt"] == 0.0


def test_only_process_zero_writes(single, two_processes):
    out, _, logs = two_processes
    lines = [json.loads(x) for x in (out / "runs" / "mp" / "packnet" / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["kind"] == "eval" for x in lines) == 2 and sum(x["kind"] == "results" for x in lines) == 1
    one = (Path(single["packnet"]["workdir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(one) == len(lines)  # one writer: no line twice
    assert "RESULT" not in (logs / "process_1.log").read_text()  # process 1 said nothing of its own


def test_each_process_of_a_job_writes_its_own_profile(two_processes):
    out, _, _ = two_processes
    profile = out / "runs" / "mp" / "packnet" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["process_0", "process_1"]
    for d in profile.iterdir():
        assert len(list(d.rglob("*.xplane.pb"))) == 1, d


def test_one_process_of_eight_devices_splits_the_batch_and_its_errors_name_the_problem(eight):
    (b,) = [x for x in eight if x["case"] == "batch"]
    assert b["shard"] == [2, 3]  # 16 samples on 8 devices: really split along the batch
    assert b["error"] and "batch_size=12 is not divisible by the 8 devices" in b["error"]


def test_data_parallel_and_fsdp_agree_with_one_device(single, eight):
    """In one process of 8 virtual devices: mesh.data=8 (ewc) or 2 (er, nccl), and
    mesh.data=2 x mesh.fsdp=4 (ewc, packnet, l2p: every big leaf of the state split in four)."""
    data, fsdp = {**_by(eight, "data8"), **_by(eight, "data2")}, _by(eight, "fsdp4")
    assert set(data) == {"ewc", "er", "nccl"} and set(fsdp) == {"ewc", "packnet", "l2p"}
    assert {x["devices"]["mesh"]["data"] for x in _by(eight, "data2").values()} == {2}
    for res in (data, fsdp):
        for name, r in res.items():
            close(r["R"], single[name]["accuracy_matrix"], single[name]["stream"]["test_sizes"])
    assert data["ewc"]["devices"]["count"] == 8 and data["ewc"]["devices"]["mesh"]["data"] == 8
    # the same parameters as one device, up to the order of float sums
    one = _last_params(single["ewc"]["workdir"])
    assert len(one) == len(data["ewc"]["params"])
    for a, b in zip(one, data["ewc"]["params"]):
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-4, atol=1e-5)
    assert fsdp["packnet"]["bwt"] == 0.0
    ewc = fsdp["ewc"]
    assert ewc["devices"]["count"] == 8 and ewc["devices"]["mesh"] == {"runs": 1, "data": 2, "fsdp": 4}
    b = ewc["state_bytes"]
    # parameters, their optimizer state, importances and anchors are split in four; the small rest is not
    assert b["per_device_max"] < 0.3 * b["total"], b
    assert data["ewc"]["state_bytes"]["per_device_max"] == data["ewc"]["state_bytes"]["total"]  # replicated


def test_a_two_device_run_resumes_on_one_device(single, eight, tmp_path):
    (cut,) = [x for x in eight if x["case"] == "cut"]
    assert cut["saves"] == 3
    wd = tmp_path / "run"
    shutil.copytree(cut["workdir"], wd)
    assert (wd / "checkpoints" / "1").exists() and not (wd / "results.json").exists()
    r = _resume_here(wd)
    assert r["devices"]["count"] == 1
    close(r["accuracy_matrix"], single["ewc"]["accuracy_matrix"], single["ewc"]["stream"]["test_sizes"])


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


def test_a_two_process_run_that_loses_a_process_stops_naming_it_and_resumes_in_one_process(single, tmp_path):
    """``jaxcl launch`` of ewc; process 1 killed after the 2nd checkpoint: the job stops
    within a minute and names it, and ``--resume`` continues on 1 device of 1 process
    to the results of one device. (A 2-process job killed at a save and resumed on 2
    processes: test_runs_axis.py's test_two_processes_killed_at_a_save_resume_exactly.)"""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxcl.cli", "launch", "--local", "2", "--grace", "5", "split_digits:method=ewc",
           "--workdir", str(wd), "--heartbeat-timeout", "5", *sum((["--set", s] for s in COMMON + CUT), [])]
    job = subprocess.Popen(cmd, env=env(1, JAXCL_LAUNCH_LOGS=str(tmp_path)), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    # killed once the 2nd checkpoint is whole (its checksum manifest is written after the
    # save): a kill before it would resume from an unverified checkpoint, with a warning
    written = wd / "checkpoints" / "2" / checkpoint.MANIFEST
    deadline = time.time() + 300
    while time.time() < deadline and not written.exists():
        time.sleep(0.2)
    assert written.exists(), "no checkpoint was written"
    victim = _pid_of_process(1, wd)
    os.kill(victim, signal.SIGKILL)
    start = time.time()
    out, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and time.time() - start < 60
    assert "process 1 of 2 was killed by signal 9" in out
    said = []
    r = _resume_here(wd, echo=said.append)
    assert any(s.startswith("resuming from") for s in said), said
    assert r["devices"]["processes"] == 1 and r["devices"]["count"] == 1
    close(r["accuracy_matrix"], single["ewc"]["accuracy_matrix"], single["ewc"]["stream"]["test_sizes"])


def test_an_unreachable_coordinator_is_a_named_error():
    # process 1 waits for the coordinator's port before jax is touched: safe in this process
    with pytest.raises(distributed.DistributedError,
                       match=r"could not join the coordinator at localhost:1 within 3 s as process 1 of 2"):
        distributed.initialize("localhost:1", 2, 1, timeout_s=3)


def test_a_mesh_that_does_not_fit_is_a_named_error():
    from jaxcl import sharding

    with pytest.raises(sharding.ShardingError, match="mesh.fsdp=3 does not divide the 1 devices"):
        sharding.make_mesh(-1, 3)
