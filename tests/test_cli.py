import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxcl import cli

QUIET = ["--set", "log.progress=false", "--set", "log.plots=false", "--set", "log.tensorboard=false"]


def test_run_prints_the_results_table_and_report_compares(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["run", "split_digits:method=finetune", "--workdir", str(a), "--set", "epochs=1", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "accuracy matrix" in out and "ACC" in out and "BWT" in out and "FWT" in out and "forgetting" in out
    assert cli.main(["run", "split_digits:method=ewc", "--workdir", str(b), "--set", "epochs=1", *QUIET]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(a), str(b)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "benchmark", "method"]
    assert "finetune" in table[1] and "ewc" in table[2]
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2


def test_list_names_methods_benchmarks_and_models(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("finetune", "joint", "ewc", "split_digits", "permuted_mnist", "multi_dataset", "reduced_resnet18",
                 "resnet50", "mlp", "cnn"):
        assert name in out


@pytest.mark.parametrize("args,message", [
    (["run", "--set", "method.ewc_lamda=1"], "unknown config key 'method.ewc_lamda'"),
    (["run", "split_digits:method=nope"], "unknown method 'nope'"),
    (["run", "--set", "scenario=sideways"], "scenario: 'sideways' is not one of"),
    (["run", "--set", "data.name=nonexistent_dataset_xyz"], "unknown dataset 'nonexistent_dataset_xyz'"),
    # method settings and meshes the run cannot use: one line before training, never a traceback
    (["run", "split_digits:method=ewc", "--set", "method.fisher=xyz"], "method.fisher: 'xyz' is not one of"),
    (["run", "split_digits:method=ewc", "--set", "method.ewc_lambda=-5"], "method.ewc_lambda: must be >= 0"),
    (["run", "split_digits:method=packnet", "--set", "method.prune=1.5"], "method.prune"),
    (["run", "split_digits:method=packnet", "--set", "method.prune=(0.5,0.5)"], "method.prune: 2"),
    (["run", "split_digits:method=er", "--set", "method.memory_size=-4"], "method.memory_size: must be >= 1"),
    (["run", "--set", "mesh.data=0"], "mesh.data: must be -1 (all devices) or >= 1, got 0"),
    (["run", "--set", "mesh.fsdp=3"], "mesh.fsdp=3 does not divide the 1 devices"),
    (["run", "--resume-from", "3"], "--resume-from 3"),
    (["run", "--coordinator", "localhost:1"], "--coordinator needs --num-processes and --process-id"),
    (["run", "--devices", "0"], "--devices: must be >= 1, got 0"),
    # in this process JAX has started (test_cli_errors.py runs --devices 8 in a new process)
    (["run", "--devices", "2"], "--devices 2: JAX's backend has already started"),
])
def test_bad_input_exits_2_with_a_named_error(args, message, capsys, tmp_path):
    assert cli.main(args + ["--workdir", str(tmp_path / "w"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_resume_without_workdir_picks_the_newest_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "split_digits:method=finetune", "--set", "epochs=1", "--set", "num_tasks=2", *QUIET]) == 0
    runs = sorted(Path("runs").glob("split_digits-finetune-*"))
    assert len(runs) == 1 and (runs[0] / "results.json").exists()
    capsys.readouterr()
    # the run is complete: resuming it has nothing left to train and reproduces the results
    before = json.loads((runs[0] / "results.json").read_text())
    assert cli.main(["run", "split_digits:method=finetune", "--set", "epochs=1", "--set", "num_tasks=2", "--resume",
                     *QUIET]) == 0
    after = json.loads((runs[0] / "results.json").read_text())
    assert after["accuracy_matrix"] == before["accuracy_matrix"]


def _jaxcl(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxcl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_a_killed_run_resumes_to_the_results_of_an_uninterrupted_one(tmp_path):
    """SIGKILL the real command line mid-run, then --resume it."""
    sets = ["--set", "epochs=6", "--set", "num_tasks=3", "--set", "checkpoint.every_steps=20", *QUIET]
    # the uninterrupted reference in this process (no process boundary to test there; its
    # compiles land in the persistent cache the two commands below load)
    assert cli.main(["run", "split_digits:method=ewc", "--workdir", str(tmp_path / "full"), *sets]) == 0
    killed = _jaxcl("run", "split_digits:method=ewc", "--workdir", str(tmp_path / "cut"), *sets)
    ck = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ck.exists() and any(p.name.isdigit() and int(p.name) >= 3
                                                              for p in ck.iterdir())):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert not (tmp_path / "cut" / "results.json").exists(), "the run finished before it could be killed"
    resumed = _jaxcl("run", "split_digits:method=ewc", "--workdir", str(tmp_path / "cut"), "--resume", *sets)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["train_steps"] == b["train_steps"]
