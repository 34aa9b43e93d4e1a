import json
import shutil

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxcl
from jaxcl import train
from jaxcl.checkpoint import CheckpointError, Checkpointer


def test_end_to_end_writes_every_artifact(make_config, tmp_path):
    c = make_config("split_digits:method=ewc", log__plots="true", log__tensorboard="true", log__every_steps=5)
    r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("method", "benchmark", "scenario", "num_tasks", "accuracy_matrix", "acc", "bwt", "fwt", "forgetting",
                "params", "wall_s", "config", "initial_accuracy", "steps_per_s"):
        assert key in saved, key
    R = np.asarray(saved["accuracy_matrix"])
    assert R.shape == (5, 5) and ((0 <= R) & (R <= 1)).all()
    assert saved["acc"] == pytest.approx(R[-1].mean())
    assert saved["method"] == "ewc" and saved["benchmark"] == "split_digits" and saved["scenario"] == "task"
    assert saved["params"]["backbone"] == 64 * 128 + 128 + 128 * 128 + 128 and saved["params"]["head_per_task"] == 258
    assert saved["config"]["method"]["ewc_lambda"] == c.method.ewc_lambda
    assert r["acc"] > 0.9  # task-incremental digits is easy: the run really learns
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 1000
    assert (tmp_path / "task_accuracy.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = {x["kind"] for x in lines}
    assert kinds == {"train", "eval", "results"}
    assert sum(x["kind"] == "eval" for x in lines) == 5
    assert all(np.isfinite(x["loss"]) for x in lines if x["kind"] == "train")
    assert Checkpointer(tmp_path / "checkpoints").latest() is not None


@pytest.mark.parametrize("after, steps", [(0, "2-5"), (3, "4-7")])
def test_log_profile_steps_traces_whole_train_calls_after_the_first(make_config, tmp_path, after, steps):
    """log.profile_steps: a jax.profiler trace in WORKDIR/profile of the train calls from the
    first one past log.profile_after steps, never this process's first (compiling) call,
    until that many steps ran. K = 2 steps a call, 3 steps asked: two calls, from step 2
    (after 0: the call at step 0 compiles) or from step 4 (after 3)."""
    said = []
    c = make_config(num_tasks=2, loop__steps_per_call=2, log__profile_steps=3, log__profile_after=after)
    jaxcl.run(c, tmp_path, echo=said.append)
    assert f"profile of train steps {steps}: {tmp_path / 'profile'}" in said
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1
    spans = sorted((ev.start_ns, ev.start_ns + ev.duration_ns)
                   for plane in jax.profiler.ProfileData.from_file(str(traces[0])).planes
                   for line in plane.lines for ev in line.events if ev.name == "PjitFunction(train_chunk)")
    calls = [spans[0]]  # the jitted call's events, a nested one inside each outer one
    for a, b in spans[1:]:
        if a >= calls[-1][1]:
            calls.append((a, b))
    assert len(calls) == 2  # the two calls, no more


def test_a_trace_already_running_leaves_the_run_to_finish_without_one(make_config, tmp_path):
    said = []
    quiet = jax.profiler.ProfileOptions()
    quiet.python_tracer_level = 0  # the caller's own trace, without Python's calls (a slower run, a larger file)
    jax.profiler.start_trace(str(tmp_path / "mine"), profiler_options=quiet)
    try:
        r = jaxcl.run(make_config(num_tasks=2, loop__steps_per_call=2, log__profile_steps=3, log__profile_after=0),
                      tmp_path / "run", echo=said.append)
    finally:
        jax.profiler.stop_trace()
    assert len(r["accuracy_matrix"]) == 2
    assert any(s.startswith("log.profile_steps: no trace written") for s in said), said
    assert not (tmp_path / "run" / "profile").exists()


@pytest.mark.parametrize("on_device", ["true", "false"])
def test_changing_task_does_not_recompile(make_config, tmp_path, monkeypatch, on_device):
    # chex raises as soon as a wrapped function is traced a second time
    chex.clear_trace_counter()
    for name in ("make_train_chunk", "make_eval_step"):
        made = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, made=made: chex.assert_max_traces(made(*a), n=1))
    train.TRACES.clear()
    r = jaxcl.run(make_config("split_digits:method=ewc", epochs=2, data__on_device=on_device,
                              loop__steps_per_call=4), tmp_path, echo=lambda s: None)
    assert r["data_path"] == ("device" if on_device == "true" else "host")
    assert train.TRACES["train_chunk"] == 1 and train.TRACES["eval_step"] == 1, train.TRACES
    # traced once each, though the chunk asks for the step's output shapes (its padding
    # steps' metrics) and setup for init's (the state's shardings) before compiling them
    assert train.TRACES["train_step"] == 1 and train.TRACES["init"] == 1, train.TRACES


def test_finetune_forgets_in_class_incremental_while_joint_does_not(make_config, tmp_path):
    sets = dict(scenario="class", epochs=5)
    ft = jaxcl.run(make_config("split_digits:method=finetune", **sets), tmp_path / "ft", echo=lambda s: None)
    jt = jaxcl.run(make_config("split_digits:method=joint", **sets), tmp_path / "jt", echo=lambda s: None)
    R_ft = np.asarray(ft["accuracy_matrix"])
    assert R_ft[-1, :-1].max() < 0.2 and R_ft[-1, -1] > 0.9  # only the last task survives
    assert ft["acc"] < 0.3 and ft["forgetting"] > 0.7
    assert jt["acc"] > 0.9 and jt["forgetting"] < 0.1


def test_a_nan_loss_stops_the_run_naming_task_and_step(make_config, tmp_path):
    c = make_config("split_digits:method=finetune", optimizer__lr=1e30, log__every_steps=3)
    with pytest.raises(train.NonFiniteLossError, match=r"not finite .* at task 0, phase 'train', epoch 0: global step \d+"):
        jaxcl.run(c, tmp_path, echo=lambda s: None)


def test_resume_after_a_crash_ends_with_the_same_results(make_config, tmp_path, crash_at_save):
    # 1 epoch a task (~27 steps): ~12 saves a run (each ~0.3 s) instead of ~35, and the crash
    # at the 6th still lands mid-stream
    c = make_config("split_digits:method=ewc", num_tasks=3, data__classes_per_task=3, epochs=1,
                    checkpoint__every_steps=7, checkpoint__keep=3)
    full = jaxcl.run(c, tmp_path / "full", echo=lambda s: None)

    # dies mid-task: steps since the 5th checkpoint are lost
    crash_at_save(lambda: jaxcl.run(c, tmp_path / "cut", echo=lambda s: None), 6)
    meta = Checkpointer(tmp_path / "cut" / "checkpoints").read_meta()
    assert meta["position"]["task"] < 3 and len(meta["record"]["runs"][0]["accuracy_matrix"]) < 3  # really cut short
    with pytest.raises(train.RunError, match="already holds checkpoints; pass --resume"):
        jaxcl.run(c, tmp_path / "cut", echo=lambda s: None)
    messages = []
    resumed = jaxcl.run(c, tmp_path / "cut", resume=True, echo=messages.append)
    assert messages[0].startswith("resuming from")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["train_steps"] == full["train_steps"]
    a = ocp.StandardCheckpointer().restore(_last(tmp_path / "full"))
    b = ocp.StandardCheckpointer().restore(_last(tmp_path / "cut"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # bit-identical final state


def _last(workdir):
    ck = Checkpointer(workdir / "checkpoints")
    return ck.directory / str(ck.latest()) / "state"


def test_a_checkpoint_from_another_config_is_refused(tiny_run, tmp_path):
    c, done, _ = tiny_run
    shutil.copytree(done, tmp_path, dirs_exist_ok=True)
    other = jaxcl.config.override(c, ["optimizer.lr=0.5"])
    with pytest.raises(CheckpointError, match=r"different config:\n  optimizer.lr: 0.01 in the checkpoint, 0.5 now"):
        jaxcl.run(other, tmp_path, resume=True, echo=lambda s: None)
    # logging settings do not change results: resuming under them is allowed
    jaxcl.run(jaxcl.config.override(c, ["log.every_steps=3"]), tmp_path, resume=True, echo=lambda s: None)


# Orbax's tensorstore reader leaves an asyncio callback behind when a read fails; it is
# reported when garbage-collected, after our error was raised. Not ours to fix here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_is_refused_with_a_clear_message(tiny_run, tmp_path):
    c, done, _ = tiny_run
    shutil.copytree(done, tmp_path, dirs_exist_ok=True)
    ck = Checkpointer(tmp_path / "checkpoints")
    state_dir = ck.directory / str(ck.latest()) / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "d" in f.parent.name:
            f.write_bytes(b"\0garbage" * 16)
    with pytest.raises(CheckpointError, match="is damaged or unreadable"):
        jaxcl.run(c, tmp_path, resume=True, echo=lambda s: None)
    shutil.rmtree(ck.directory / str(ck.latest()) / "meta")
    with pytest.raises(CheckpointError, match="is damaged or unreadable"):
        jaxcl.run(c, tmp_path, resume=True, echo=lambda s: None)


def test_online_mode_makes_one_pass(make_config, tmp_path):
    c = make_config("split_digits:method=finetune", online="true", epochs=5, batch_size=10)
    r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    assert r["train_steps"] == sum(n // 10 for n in r["stream"]["train_sizes"])


def test_batch_larger_than_a_task_is_refused(make_config, tmp_path):
    with pytest.raises(jaxcl.DataError, match="batch_size=4096 is larger than the smallest task"):
        jaxcl.run(make_config(batch_size=4096), tmp_path, echo=lambda s: None)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_from_the_newest_intact_checkpoint_ends_with_the_same_results(make_config, tmp_path):
    c = make_config("split_digits:method=ewc", num_tasks=3, data__classes_per_task=3, checkpoint__keep=5)
    full = jaxcl.run(c, tmp_path / "full", echo=lambda s: None)
    jaxcl.run(c, tmp_path / "cut", echo=lambda s: None)
    ck = Checkpointer(tmp_path / "cut" / "checkpoints")
    newest = ck.directory / str(ck.latest())
    data = max((f for f in (newest / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)  # overwritten in place: same size
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"the newest intact one is .*/{ck.latest() - 1}: resume from it with "
                                              rf"--resume-from {ck.latest() - 1}"):
        jaxcl.run(c, tmp_path / "cut", resume=True, echo=lambda s: None)
    msgs = []
    resumed = jaxcl.run(c, tmp_path / "cut", resume_from=ck.latest() - 1, echo=msgs.append)
    assert any("moved the newer checkpoint" in m for m in msgs)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


def test_a_resume_may_change_the_learning_rate_on_purpose_only(make_config, tmp_path):
    c = make_config("split_digits:method=finetune", num_tasks=2, checkpoint__keep=5)
    jaxcl.run(c, tmp_path, echo=lambda s: None)
    lower = jaxcl.config.override(c, ["optimizer.lr=0.005"])
    with pytest.raises(CheckpointError, match="optimizer.lr: 0.01 in the checkpoint, 0.005 now"):
        jaxcl.run(lower, tmp_path, resume_from=0, echo=lambda s: None)
    with pytest.raises(train.RunError, match="--allow-change batch_size: only optimizer.lr"):
        jaxcl.run(lower, tmp_path, resume_from=0, allow_change=("batch_size",), echo=lambda s: None)
    msgs = []
    r = jaxcl.run(lower, tmp_path, resume_from=0, allow_change=("optimizer.lr",), echo=msgs.append)
    assert "resuming with optimizer.lr = 0.005 (the checkpoint's run had 0.01)" in msgs
    assert r["resumed_with_changes"][0]["key"] == "optimizer.lr" and r["resumed_with_changes"][0]["now"] == 0.005
    assert json.loads((tmp_path / "results.json").read_text())["resumed_with_changes"] == r["resumed_with_changes"]


def test_a_run_that_fails_on_its_data_leaves_no_workdir(make_config, tmp_path):
    with pytest.raises(jaxcl.DataError):
        jaxcl.run(make_config(batch_size=4096), tmp_path / "w", echo=lambda s: None)
    assert not (tmp_path / "w").exists()


def test_an_image_size_the_model_cannot_take_is_refused_by_name(make_config, tmp_path):
    with pytest.raises(jaxcl.DataError, match=r"model.name=vgg16 cannot take images of shape \(8, 8, 1\) .* too small"):
        jaxcl.run(make_config(model__name="vgg16"), tmp_path / "w", echo=lambda s: None)
