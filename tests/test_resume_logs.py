"""Logs across a kill and --resume: metrics.jsonl and the TensorBoard scalars of a
resumed run are those of a run never interrupted, row for row (timing fields aside)."""
from __future__ import annotations

import json
import struct

import pytest

import jaxcl
from jaxcl import train


def _rows(workdir):
    return [{k: v for k, v in json.loads(x).items() if k != "time"}
            for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _scalars(workdir):
    """Every (tag, step, value) of the TensorBoard event files under ``workdir``."""
    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted((workdir / "tensorboard").glob("events.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return sorted(out)


@pytest.fixture(scope="module")
def config():
    from jaxcl import config as config_lib

    return config_lib.override(jaxcl.get_config("split_digits:method=ewc"), [
        "epochs=2", "num_tasks=2", "checkpoint.every_steps=7", "log.every_steps=5", "log.progress=false",
        "log.plots=false", "log.tensorboard=true"])


def test_logs_after_kill_and_resume_equal_the_uninterrupted_runs(config, tmp_path, crash_at_save):
    whole = tmp_path / "whole"
    train.run(config, whole, echo=lambda s: None)
    cut = tmp_path / "cut"
    # dies at its 3rd save (slot 21): rows at steps 15 and 18 (end of epoch) were logged after the 2nd
    # save (slot 14), whose window held steps 11..14
    crash_at_save(lambda: train.run(config, cut, echo=lambda s: None), 3)
    before = _rows(cut)
    assert [r["step"] for r in before if r["kind"] == "train"][-2:] == [15, 18]
    train.run(config, cut, resume=True, echo=lambda s: None)
    assert _rows(cut) == _rows(whole)
    assert _scalars(cut) == _scalars(whole)
    assert not (cut / "FAILED.txt").exists()


def test_a_fresh_run_in_a_failed_workdir_starts_its_logs_anew(config, tmp_path, crash_at_save):
    from jaxcl import config as config_lib

    c = config_lib.override(config, ["log.tensorboard=false", "checkpoint.every_steps=0", "num_tasks=1"])
    crash_at_save(lambda: train.run(c, tmp_path, echo=lambda s: None), 1)  # dies before any checkpoint
    assert (tmp_path / "FAILED.txt").exists() and _rows(tmp_path)
    train.run(c, tmp_path, echo=lambda s: None)
    fresh = tmp_path / "fresh"
    train.run(c, fresh, echo=lambda s: None)
    assert not (tmp_path / "FAILED.txt").exists()
    assert _rows(tmp_path) == _rows(fresh)
