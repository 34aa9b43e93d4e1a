"""The accelerator-native loop: the stream on the device, K steps per compiled call,
several seeds in one program. Each equality here is against the plain single run."""
import json

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxcl
from jaxcl import train
from jaxcl.checkpoint import Checkpointer
from jaxcl.data import feed as feed_lib


def quiet(s):
    return None


def _final_state(workdir):
    ck = Checkpointer(workdir / "checkpoints")
    return ocp.StandardCheckpointer().restore(ck.directory / str(ck.latest()) / "state")


def _train_rows(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "time"} for x in lines if x["kind"] == "train"]


@pytest.mark.parametrize("spec,sets", [
    ("split_digits:method=ewc", {}),
    ("split_digits:method=finetune", {"data__augment": "true"}),  # on-device augmentation, same draws
    ("split_digits:method=joint", {}),  # cumulative pools: a range of the resident stream
])
def test_host_and_device_paths_train_on_the_same_numbers(make_config, tmp_path, spec, sets):
    runs = {}
    for where in ("false", "true"):
        c = make_config(spec, data__on_device=where, log__every_steps=3, num_tasks=2, epochs=1, **sets)
        runs[where] = jaxcl.run(c, tmp_path / where, echo=quiet)
    assert runs["false"]["data_path"] == "host" and runs["true"]["data_path"] == "device"
    chex.assert_trees_all_close(runs["true"]["accuracy_matrix"], runs["false"]["accuracy_matrix"], atol=1e-6)
    chex.assert_trees_all_close(_final_state(tmp_path / "true")["params"], _final_state(tmp_path / "false")["params"],
                                atol=1e-5, rtol=1e-5)


def test_steps_per_call_changes_neither_results_nor_logs(make_config, tmp_path):
    """K steps per call is the same computation as K calls: the same accuracy matrix,
    bit for bit, and the same logged losses at the same steps."""
    out = {}
    for k in ("1", "5", "auto"):
        c = make_config("split_digits:method=ewc", loop__steps_per_call=k, log__every_steps=4,
                        checkpoint__every_steps=27, num_tasks=2)  # a save cuts a chunk short; 2 saves a run
        out[k] = jaxcl.run(c, tmp_path / k, echo=quiet)
    assert out["1"]["steps_per_call"] == 1 and out["5"]["steps_per_call"] == 5 and out["auto"]["steps_per_call"] > 5
    for k in ("5", "auto"):
        assert out[k]["accuracy_matrix"] == out["1"]["accuracy_matrix"]
        a, b = _train_rows(tmp_path / k), _train_rows(tmp_path / "1")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-6)


def test_the_nan_check_names_the_exact_step_inside_a_chunk(make_config, tmp_path):
    steps = []
    for k in ("1", "7"):
        c = make_config("split_digits:method=finetune", optimizer__lr=1e30, loop__steps_per_call=k)
        with pytest.raises(train.NonFiniteLossError, match="no checkpoint had been written yet") as e:
            jaxcl.run(c, tmp_path / k, echo=quiet)
        steps.append(str(e.value).split("global step ")[1].split(" ")[0])
    assert steps[0] == steps[1]


def _seed_matrices(summary):
    return {r["seed"]: r["accuracy_matrix"] for r in summary["runs"]}


@pytest.mark.parametrize("spec,sets", [
    ("split_digits:method=ewc", {}),
    ("split_digits:method=packnet", {}),  # per-seed pruning
    ("split_digits:method=er", {"data__stream": "permuted", "scenario": "domain", "data__classes_per_task": 10,
                                "num_tasks": 2, "online": "true", "batch_size": 10}),  # per-seed stream, replay
])
def test_each_seed_of_a_multi_seed_run_equals_its_single_run(make_config, tmp_path, spec, sets):
    seeds = (0, 3)
    sets = {"epochs": 1, "num_tasks": 2, **sets}
    multi = jaxcl.run(make_config(spec, seeds=str(seeds), **sets), tmp_path / "multi", echo=quiet)
    assert multi["seeds"] == list(seeds) and multi["runs_in_program"] == 2
    for s in seeds:
        single = jaxcl.run(make_config(spec, seed=s, **sets), tmp_path / f"single{s}", echo=quiet)
        chex.assert_trees_all_close(_seed_matrices(multi)[s], single["accuracy_matrix"], atol=0.005)
        saved = json.loads((tmp_path / "multi" / f"seed_{s}" / "results.json").read_text())
        assert saved["accuracy_matrix"] == _seed_matrices(multi)[s] and saved["seed"] == s
    assert _seed_matrices(multi)[0] != _seed_matrices(multi)[3]  # the seeds really differ
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    accs = [r["acc"] for r in multi["runs"]]
    assert summary["acc"] == pytest.approx(np.mean(accs)) and summary["acc_std"] == pytest.approx(np.std(accs))
    assert (tmp_path / "multi" / "seed_3" / "metrics.jsonl").exists()


def test_a_killed_multi_seed_run_resumes_to_the_same_results(make_config, tmp_path, crash_at_save):
    c = make_config("split_digits:method=si", num_tasks=2, epochs=1, data__classes_per_task=3, seeds="(1, 2)",
                    checkpoint__every_steps=7, loop__steps_per_call=3)  # 7 saves a run, mid-chunk
    full = jaxcl.run(c, tmp_path / "full", echo=quiet)
    crash_at_save(lambda: jaxcl.run(c, tmp_path / "cut", echo=quiet), 4)
    resumed = jaxcl.run(c, tmp_path / "cut", resume=True, echo=quiet)
    assert _seed_matrices(resumed) == _seed_matrices(full)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _final_state(tmp_path / "full"),
                           _final_state(tmp_path / "cut"))


def test_report_reads_multi_seed_workdirs(make_config, tmp_path, capsys):
    from jaxcl import cli

    jaxcl.run(make_config("split_digits:method=finetune", seeds="(0, 1)", epochs=1, num_tasks=2, log__plots="true"),
              tmp_path / "m", echo=quiet)
    for d in ("m", "m/seed_0", "m/seed_1"):
        assert (tmp_path / d / "accuracy_matrix.png").stat().st_size > 1000
        assert (tmp_path / d / "task_accuracy.png").stat().st_size > 1000
    assert cli.main(["report", str(tmp_path / "m")]) == 0
    assert " +- " in capsys.readouterr().out  # mean +- std over the seeds


def test_bad_loop_settings_are_refused_by_name(make_config, tmp_path, monkeypatch, capsys):
    from jaxcl import cli

    for sets, message in ((["seeds=(1, 1)"], "seeds: [1] given more than once"),
                          (["loop.steps_per_call=0"], "loop.steps_per_call: expected auto or an integer >= 1"),
                          (["data.on_device=maybe"], "data.on_device: 'maybe' is not one of")):
        with pytest.raises(jaxcl.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            jaxcl.config.validate(jaxcl.config.override(make_config(), sets))
    assert cli.main(["run", "split_digits", "--seeds", "--workdir", str(tmp_path / "x")]) == 2
    assert "--seeds: give at least one seed" in capsys.readouterr().err
    monkeypatch.setattr(feed_lib, "device_budget", lambda: (1000, "a test budget"))
    with pytest.raises(jaxcl.DataError, match=r"data.on_device=true: the stream takes 0.1 MiB .* budget is 0.0 MiB"):
        jaxcl.run(make_config(data__on_device="true"), tmp_path / "y", echo=quiet)
    assert not (tmp_path / "y").exists()  # refused before anything was written
    r = jaxcl.run(make_config(data__on_device="auto", epochs=1), tmp_path / "z", echo=quiet)
    assert r["data_path"] == "host"  # auto: it does not fit this budget


def test_each_setting_of_a_sweep_equals_its_single_run(make_config, tmp_path):
    sweep = "('optimizer.lr=0.05,0.01', 'method.ewc_lambda=1,1000')"
    res = jaxcl.run(make_config("split_digits:method=ewc", epochs=1, sweep=sweep), tmp_path / "sweep", echo=quiet)
    assert res["runs_in_program"] == 4 and len(res["settings"]) == 4
    by = {(r["setting"]["optimizer.lr"], r["setting"]["method.ewc_lambda"]): r["accuracy_matrix"] for r in res["runs"]}
    for lr, lam in ((0.05, 1000.0), (0.01, 1.0)):
        single = jaxcl.run(make_config("split_digits:method=ewc", epochs=1, optimizer__lr=lr, method__ewc_lambda=lam),
                           tmp_path / f"{lr}-{lam}", echo=quiet)
        chex.assert_trees_all_close(by[(lr, lam)], single["accuracy_matrix"], atol=0.005)
        saved = json.loads((tmp_path / "sweep" / f"optimizer.lr={lr:g},method.ewc_lambda={lam:g}" / "results.json")
                           .read_text())
        assert saved["config"]["optimizer"]["lr"] == lr and saved["config"]["method"]["ewc_lambda"] == lam
    assert by[(0.05, 1000.0)] != by[(0.05, 1.0)]  # the swept lambda really enters the computation
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text())["sweep"] == list(eval(sweep))


@pytest.mark.parametrize("entry,message", [
    ("batch_size=16,32", "batch_size is structural"),
    ("method.fisher=1,2", "method.fisher is structural"),
    ("model.dropout=0.1,0.2", "model.dropout is structural"),
    ("optimizer.lr=0.1,fast", "'fast' is not a number"),
    ("optimizer.lr=0.1,0.1", "given more than once"),
    ("method.ewc_lamda=1,2", "unknown config key 'method.ewc_lamda'"),
    ("optimizer.grad_clip=1,2", "uses optimizer.grad_clip as a Python value"),  # found by tracing, before training
])
def test_a_sweep_the_program_cannot_take_is_refused_by_name(make_config, tmp_path, entry, message):
    with pytest.raises(jaxcl.ConfigError, match=message):
        jaxcl.run(make_config("split_digits:method=ewc", epochs=1, sweep=f"('{entry}',)"), tmp_path / "w", echo=quiet)
    assert not (tmp_path / "w").exists()


def test_a_nan_in_one_run_of_many_names_that_run(make_config, tmp_path):
    c = make_config("split_digits:method=finetune", epochs=1, seeds="(0, 1)", sweep="('optimizer.lr=0.01,1e30',)")
    with pytest.raises(train.NonFiniteLossError,
                       match=r"not finite .* at optimizer.lr=1e\+30 seed 0, task 0, phase 'train', epoch 0: global step 1 "):
        jaxcl.run(c, tmp_path, echo=quiet)


def _batches_agree(stream):
    from jaxcl.data.batches import _make, pool

    f = feed_lib.Feed([stream], [0], normalize=True, resident=True)
    src, idx = f.src("train"), np.arange(128) % len(stream.tasks[0].x_train)
    dev = jax.jit(feed_lib.gather)(src, idx, np.ones(128, bool))
    host = _make(pool(stream, range(len(stream)), "train"), idx, 128)
    chex.assert_trees_all_equal(jax.device_get(dev), host)  # bit for bit


def test_a_batch_gathered_on_the_device_is_the_host_batch_bit_for_bit(make_config):
    from jaxcl import data

    _batches_agree(data.build(make_config("split_digits")))


def test_real_mnist_batches_agree_bit_for_bit(make_config, shared_data):
    from jaxcl import data

    _batches_agree(data.build(make_config("split_mnist", data__dir=str(shared_data), data__train_limit=2000)))
