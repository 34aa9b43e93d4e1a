"""The command line says what went wrong, or gets it right, never silently wrong:
refusals in one line with exit 2 before anything is written, every setting of a sweep
in `jaxcl report`, the device path on 8 virtual CPU devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
from conftest import xla_flags_without_devices

from jaxcl import data

QUIET = ["--set", "epochs=1", "--set", "num_tasks=2", "--set", "log.progress=false", "--set", "log.plots=false",
         "--set", "log.tensorboard=false"]


def jaxcl_cli(*args, env=None, timeout=600):
    """The command line in its own process (where the process is what is tested)."""
    return subprocess.run([sys.executable, "-m", "jaxcl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def cli_here(capsys, *args):
    """The command line in this process (``cli.main``, what the ``jaxcl`` entry point
    calls): its exit code and what it printed, without a new process's imports."""
    from jaxcl import cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["jaxcl", *map(str, args)], code, out, err)


def _refused(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("jaxcl: error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("sweep, words", [
    ("optimizer.lr=0.1,-1", ("--sweep optimizer.lr=-1", "optimizer.lr: must be > 0")),
    ("method.ewc_lambda=1,-100", ("--sweep method.ewc_lambda=-100", "method.ewc_lambda: must be >= 0")),
])
def test_swept_values_are_checked_like_set_values_before_anything_is_written(tmp_path, capsys, sweep, words):
    wd = tmp_path / "run"
    _refused(cli_here(capsys, "run", "split_digits:method=ewc", "--sweep", sweep, "--workdir", wd, *QUIET), *words)
    assert not wd.exists()


def test_a_negative_seed_is_refused_naming_seeds(tmp_path, capsys):
    wd = tmp_path / "run"
    _refused(cli_here(capsys, "run", "split_digits", "--seeds", "-1", "2", "--workdir", wd, *QUIET), "--seeds", "-1")
    assert not wd.exists()


def test_a_multi_stream_listing_a_dataset_twice_is_refused(make_config):
    c = make_config("split_digits:method=finetune", data__stream="multi", data__datasets="('digits', 'digits')",
                    num_tasks=2)
    with pytest.raises(data.DataError, match=r"data.datasets: 'digits' listed more than once"):
        data.build(c)


# ----------------------------------------------------------------------------- jaxcl report


LRS = ("0.01", "0.02", "0.05", "0.1")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """A sweep x seeds run and a sweep without seeds, through the command line: 2 x 2 and
    4 runs, one program (the learning rate is not compiled in)."""
    from jaxcl import cli

    out = tmp_path_factory.mktemp("sweeps")
    grid, plain = out / "grid", out / "plain"
    for wd, lrs, extra in ((grid, LRS[::2], ["--seeds", "0", "1"]), (plain, LRS, [])):
        assert cli.main(["run", "split_digits:method=ewc", "--sweep", "optimizer.lr=" + ",".join(lrs), *extra,
                         "--workdir", str(wd), *QUIET]) == 0
    return grid, plain


def _table(proc):
    assert proc.returncode == 0, proc.stderr
    head, *rows = proc.stdout.strip().splitlines()
    return head, rows


def test_report_lists_every_setting_of_a_sweep(sweeps, capsys):
    grid, plain = sweeps
    for wd, seeds, lrs in ((grid, (0, 1), LRS[::2]), (plain, (0,), LRS)):
        summary = json.loads((wd / "summary.json").read_text())
        _, rows = _table(cli_here(capsys, "report", wd))
        assert [r.split()[0] for r in rows] == [f"{wd}/optimizer.lr={lr}" for lr in lrs]
        for row, setting in zip(rows, summary["settings"]):
            assert setting["seeds"] == list(seeds)
            assert f"{100 * setting['acc']:.2f} +- {100 * setting['acc_std']:.2f}" in row  # mean +- std over seeds


def test_report_lists_a_mix_of_single_multi_seed_and_sweep_workdirs(sweeps, capsys):
    grid, plain = sweeps
    multi, single = grid / "optimizer.lr=0.01", grid / "optimizer.lr=0.01" / "seed_1"
    _, rows = _table(cli_here(capsys, "report", single, multi, plain))
    assert [r.split()[0] for r in rows] == [str(single), str(multi), *(f"{plain}/optimizer.lr={lr}" for lr in LRS)]
    acc = json.loads((single / "results.json").read_text())["acc"]
    assert f"{100 * acc:.2f}" in rows[0]


# ----------------------------------------------------------------------------- devices


def test_the_device_path_on_eight_virtual_cpu_devices_finishes(tmp_path):
    """The default path (the stream resident on the devices) through a whole task on 8
    virtual devices (``jaxcl run --devices 8``), EWC's consolidation pass a chain of 90 programs with an all-reduce
    each: XLA:CPU deadlocked (and aborted the process after 40 s) when the host ran that
    chain far ahead of the devices (see jaxcl.sharding.pace). Stays slow (~13 CPU s): the
    flag needs a fresh process, and the deadlock needs that much device work a link: with
    ``sharding.CPU_CHAIN_IN_FLIGHT`` set past the chain (no pacing) this run aborted at
    hidden (512, 512) 2 of 2 times (once beside a busy core) and at (256, 256) 3 of 3, never
    at (128, 128) or (64, 64); the hidden (1024, 1024) it had before cost ~35 CPU s."""
    wd = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags_without_devices()  # the 8 devices come from --devices
    proc = jaxcl_cli("run", "split_digits:method=ewc", "--devices", "8", "--workdir", wd, "--set", "mesh.data=8",
                     "--set", "epochs=1",
                     "--set", "num_tasks=1", "--set", "data.classes_per_task=10", "--set", "batch_size=16",
                     "--set", "method.fisher=empirical", "--set", "model.hidden=(512,512)",
                     "--set", "log.progress=false", "--set", "log.plots=false", "--set", "log.tensorboard=false",
                     env=env)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    r = json.loads((wd / "results.json").read_text())
    assert r["data_path"] == "device" and r["devices"]["count"] == 8
    assert r["accuracy_matrix"][0][0] > 0.5


# ----------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_without_manifest_warns_once(tiny_run, tmp_path):
    import shutil

    from jaxcl import checkpoint, train

    c, done, _ = tiny_run
    wd = tmp_path / "run"
    shutil.copytree(done, wd)
    for m in (wd / "checkpoints").glob(f"*/{checkpoint.MANIFEST}"):
        m.unlink()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train.run(c, wd, resume=True, echo=lambda s: None)
    unverified = [w for w in seen if issubclass(w.category, checkpoint.CheckpointWarning)]
    assert len(unverified) == 1, [str(w.message) for w in unverified]
    assert "restoring it unverified" in str(unverified[0].message)
