"""Your own loop (jaxcl.method + jaxcl.trainer): nothing goes wrong without a word.

Labels and task ids outside the stream are refused by name, a loss gone NaN stops the
loop at end_phase naming the step, models taking ``train`` by keyword are accepted and
models without it refused with their signature, ResCL says what it needs of a model,
a frozen backbone never trained is warned about, a method switched by assignment is
refused by name, and the config error lives in the layer that raises it.
"""
import ast
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcl
from jaxcl import config as config_lib
from jaxcl import methods
from jaxcl.checkpoint import Checkpointer
from jaxcl.methods import base
from jaxcl.models import Heads, layers, torch_weights

ROOT = Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    heads: int = 2
    outputs: int = 2

    @nn.compact
    def __call__(self, x, task=None, train=False):
        h = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return Heads(self.heads, self.outputs, name="head")(h, task)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    return {"x": x, "y": (x.mean((1, 2, 3)) > 0).astype(np.int32)}


@pytest.fixture(scope="module")
def loop():
    """finetune on MLP, 2 tasks of 2 classes (task scenario): one compiled step shared."""
    m = jaxcl.method("finetune", MLP(), data(), num_tasks=2)
    return jaxcl.trainer(m, optax.sgd(0.1))


def fresh(loop, task=0):
    return loop.begin_task(loop.init(jax.random.PRNGKey(0), data()["x"]), task)


# ----------------------------------------------------------------------------- labels and task ids


@pytest.mark.parametrize("change,msg", [
    (lambda b: {**b, "y": np.full(32, -1, np.int32)}, r"batch\['y'\]: label -1 \(sample 0, task 0\) is not one of "
                                                        r"the task's classes 0 \.\. 1"),
    (lambda b: {**b, "y": np.where(np.arange(32) == 5, 2, b["y"]).astype(np.int32)},
     r"batch\['y'\]: label 2 \(sample 5, task 0\) is not one of the task's classes 0 \.\. 1"),
    (lambda b: {**b, "task": np.full(32, 5, np.int32)}, r"batch\['task'\]: task id 5 \(sample 0\) is not a task of "
                                                          r"this stream \(num_tasks=2"),
    (lambda b: {k: jnp.asarray(v) for k, v in {**b, "y": np.full(32, 7, np.int32)}.items()},  # on the device too
     r"batch\['y'\]: label 7"),
])
def test_step_refuses_labels_and_task_ids_outside_the_stream(loop, change, msg):
    state = fresh(loop)
    with pytest.raises(ValueError, match=msg):
        loop.step(state, change(data()), 0)


@pytest.mark.parametrize("call", ["step", "begin_task", "end_phase", "predict"])
@pytest.mark.parametrize("task", [2, -1])
def test_a_task_id_outside_the_stream_is_refused_by_every_call(loop, call, task):
    state, batch = fresh(loop), data()
    args = {"step": (state, batch, task), "begin_task": (state, task), "end_phase": (state, task),
            "predict": (state, batch["x"], task)}[call]
    with pytest.raises(ValueError, match=rf"{call}: task {task} is not a task of this stream \(num_tasks=2: task "
                                         r"ids 0 \.\. 1\)"):
        getattr(loop, call)(*args)
    with pytest.raises(ValueError, match=r"predict: task: task id 9 \(sample 3\)"):
        loop.predict(state, batch["x"], np.where(np.arange(32) == 3, 9, 0))


def test_padding_labels_are_not_read_and_the_check_can_be_switched_off(loop):
    batch = data()
    mask = (np.arange(32) < 30).astype(np.float32)
    padded = {**batch, "mask": mask, "y": np.where(mask > 0, batch["y"], 99).astype(np.int32)}
    state, metrics = loop.step(fresh(loop), padded, 0)
    assert np.isfinite(float(metrics["loss"]))  # an out-of-range label in a padding row would make it NaN
    # the class scenario: labels are stream-wide, task 1's classes are 2 and 3
    m = jaxcl.method("finetune", MLP(heads=1, outputs=4), data(), num_tasks=2, scenario="class")
    cls = jaxcl.trainer(m, optax.sgd(0.1))
    state = cls.begin_task(cls.init(jax.random.PRNGKey(0), batch["x"]), 1)
    cls.step(state, {**batch, "y": batch["y"] + 2}, 1)
    with pytest.raises(ValueError, match=r"label 0 \(sample \d+, task 1\) is not one of the task's classes 2 \.\. 3 "
                                         r"\(labels are stream-wide in the class scenario"):
        cls.step(state, batch, 1)
    # check_values=False: what the check costs is measured in benchmarks/own_loop_checks.py
    unchecked = jaxcl.trainer(m, optax.sgd(0.1), check_values=False)
    state = unchecked.begin_task(unchecked.init(jax.random.PRNGKey(0), batch["x"]), 1)
    unchecked.step(state, batch, 1)


# ----------------------------------------------------------------------------- a loss gone NaN


def test_a_nan_loss_stops_the_loop_at_end_phase_naming_the_step(loop):
    from jaxcl.train import NonFiniteLossError

    assert NonFiniteLossError is jaxcl.NonFiniteLossError
    batch, state = data(), fresh(loop)
    for i in range(4):  # step 2 sees a NaN input; the steps after it carry the NaN on
        x = np.full_like(batch["x"], np.nan) if i == 2 else batch["x"]
        state, _ = loop.step(state, {**batch, "x": x}, 0)
    assert int(state.bad_step) == 2
    with pytest.raises(NonFiniteLossError, match=r"not finite \(NaN or inf\) at global step 2 \(state.bad_step; "
                                                 r"task 0, phase 'train', state.step 4\)"):
        loop.end_phase(state, 0)
    with pytest.raises(NonFiniteLossError, match="global step 2"):
        loop.predict(state, batch["x"], 0)
    good, _ = loop.step(fresh(loop), batch, 0)
    assert int(good.bad_step) == -1
    loop.predict(loop.end_phase(good, 0), batch["x"], 0)


# ----------------------------------------------------------------------------- the model protocol


class KeywordOnly(nn.Module):  # train keyword-only, no task: batch norm shows which mode it was called in
    @nn.compact
    def __call__(self, x, *, train):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x.reshape(x.shape[0], -1)))
        return nn.Dense(2)(nn.relu(h))


class KeywordTrain(nn.Module):  # task positional, train keyword-only, a head per task
    @nn.compact
    def __call__(self, x, task=None, *, train=False):
        return Heads(2, 2, name="head")(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))), task)


class NoTrain(nn.Module):
    @nn.compact
    def __call__(self, x, task=None):
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


class Pair(nn.Module):
    @nn.compact
    def __call__(self, x, task=None, train=False):
        h = nn.Dense(2)(x.reshape(x.shape[0], -1))
        return h, h


def test_models_taking_train_by_keyword_train_and_predict():
    batch = data()
    m = jaxcl.method("finetune", KeywordOnly(), batch, num_tasks=2, scenario="domain")
    loop = jaxcl.trainer(m, optax.sgd(0.1))
    state = loop.begin_task(loop.init(jax.random.PRNGKey(0), batch["x"]), 0)
    assert set(state.params["params"]) == {"BatchNorm_0", "Dense_0", "Dense_1"}  # the model's own names, not nested
    before = jax.device_get(state.model_state)
    state, metrics = loop.step(state, batch, 0)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.model_state))
    assert all(jax.tree_util.tree_leaves(moved))  # train=True reached the model: batch statistics updated
    p1, p2 = loop.predict(state, batch["x"], 0), loop.predict(state, batch["x"], 0)
    np.testing.assert_array_equal(p1, p2)  # train=False: running averages, no update
    # task by position, train by keyword: PackNet finds its per-task heads through the adapter
    m = jaxcl.method("packnet", KeywordTrain(), batch, num_tasks=2)
    loop = jaxcl.trainer(m, optax.sgd(0.1))
    state = loop.begin_task(loop.init(jax.random.PRNGKey(0), batch["x"]), 1)
    for phase in m.phases(1):
        state = loop.end_phase(loop.step(state, batch, 1, phase)[0], 1, phase)
    assert loop.predict(state, batch["x"], 1).shape == (32, 2)


def test_a_model_breaking_the_protocol_is_refused_with_its_signature():
    with pytest.raises(base.ModelError, match=r"NoTrain breaks the model protocol, __call__\(self, x, task=None, "
                                              r"train=False\) .*: its __call__\(self, x, task=None\) takes no train"):
        jaxcl.method("finetune", NoTrain(), data(), num_tasks=2, scenario="domain")
    with pytest.raises(ValueError, match=r"Pair must return logits \[batch, outputs\] .* it returned "
                                         r"\('float32\[1, 2\]', 'float32\[1, 2\]'\)") as e:
        jaxcl.method("finetune", Pair(), data(), num_tasks=2, scenario="domain")
    assert "{" not in str(e.value)


# ----------------------------------------------------------------------------- ResCL's needs


class DirectUnits(nn.Module):  # jaxcl's ConvNorm called directly: ResCL cannot reach it
    @nn.compact
    def __call__(self, x, task=None, train=False):
        h = nn.relu(layers.ConvNorm(4, 3, 1, name="conv1")(x, task, train))
        return Heads(2, 2, name="head")(h.reshape(h.shape[0], -1), task)


class PlainWithNorm(nn.Module):
    @nn.compact
    def __call__(self, x, task=None, train=False):
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        return Heads(2, 2, name="head")(h.reshape(h.shape[0], -1), task)


class UnitCNN(nn.Module):  # what the README shows: the fields ResCL swaps
    unit: Any = layers.ConvNorm
    dense: Any = layers.Dense

    @nn.compact
    def __call__(self, x, task=None, train=False):
        h = nn.relu(self.unit(4, 3, 1, name="conv1")(x, task, train))
        h = nn.relu(self.dense(16, name="fc")(h.reshape(h.shape[0], -1), task))
        return Heads(2, 2, name="head")(h, task)


@pytest.mark.parametrize("model,msg", [(DirectUnits(), "ResCL found no layer to re-parameterise in DirectUnits"),
                                       (PlainWithNorm(), "ResCL cannot fold the batch norm of PlainWithNorm")])
def test_rescl_says_what_it_needs_of_a_model(model, msg):
    with pytest.raises(base.ModelError, match=msg) as e:
        jaxcl.method("rescl", model, data(), num_tasks=2)
    text = str(e.value)
    assert "`unit: ModuleDef = jaxcl.models.layers.ConvNorm`" in text and "jaxcl.models.resnet.ResNet" in text
    assert "build the model of jaxcl.models.layers ConvNorm units" not in text  # the old circular advice


def test_rescl_trains_a_user_model_built_with_a_unit_field():
    batch = data()
    m = jaxcl.method("rescl", UnitCNN(), batch, num_tasks=2)
    loop = jaxcl.trainer(m, optax.sgd(0.1))
    state = loop.init(jax.random.PRNGKey(0), batch["x"])
    assert set(state.params["rescl"]) == {"conv1", "fc"}  # both reached through the fields
    for t in range(2):
        state = loop.begin_task(state, t)
        for phase in m.phases(t):
            state = loop.end_phase(loop.step(state, batch, t, phase)[0], t, phase)
    assert np.isfinite(np.asarray(loop.predict(state, batch["x"], 1))).all()


# ----------------------------------------------------------------------------- a backbone never trained


def test_a_frozen_backbone_never_pretrained_is_warned_about(make_config, tmp_path):
    from jaxcl import data as data_lib
    from jaxcl import models

    # the command line: the config names no model.pretrained
    c = make_config("split_digits:method=sgd_ll", scenario="class")
    stream = data_lib.build(c)
    with pytest.warns(base.UntrainedBackboneWarning, match="method sgd_ll trains only on top of a frozen backbone "
                                                           "and model.pretrained is empty"):
        methods.build(c, models.build(c.model, stream.info), stream.info)
    c = make_config("split_digits:method=sgd_ll", scenario="class", model__pretrained="runs/trunk")
    with warnings.catch_warnings():
        warnings.simplefilter("error", base.UntrainedBackboneWarning)
        methods.build(c, models.build(c.model, stream.info), stream.info)

    # your own loop: warned at the first step when the trunk is still init's, once
    batch = data()
    m = jaxcl.method("sgd_ll", MLP(heads=1), batch, num_tasks=2, scenario="domain")  # no warning yet
    loop = jaxcl.trainer(m, optax.sgd(0.1))
    state = loop.begin_task(loop.init(jax.random.PRNGKey(0), batch["x"]), 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            state, _ = loop.step(state, batch, 0)
    assert [str(w.message)[:60] for w in caught if w.category is base.UntrainedBackboneWarning] == \
        ["method sgd_ll trains on a frozen backbone, and this state's "]
    assert "state.params['params']['Dense_0']['kernel'] is as init made it" in str(caught[0].message)

    # the README's way: a trunk trained earlier (here by finetune, saved as a run saves), loaded into the state
    pre = jaxcl.trainer(jaxcl.method("finetune", MLP(heads=1), batch, num_tasks=2, scenario="domain"),
                        optax.sgd(0.1))
    trained = pre.begin_task(pre.init(jax.random.PRNGKey(1), batch["x"]), 0)
    for _ in range(3):
        trained, _ = pre.step(trained, batch, 0)
    ck = Checkpointer(tmp_path / "checkpoints")
    ck.save(0, jax.device_get(trained), {})
    ck.close()
    state = loop.begin_task(loop.init(jax.random.PRNGKey(0), batch["x"]), 0)
    params, stats, n_params, _ = torch_weights.load_pretrained(state.params, state.model_state, str(tmp_path))
    state = state.replace(params=params, model_state=stats)
    assert n_params == 2  # the trunk's kernel and bias; the head is left alone
    with warnings.catch_warnings():
        warnings.simplefilter("error", base.UntrainedBackboneWarning)
        state, _ = loop.step(state, batch, 0)
    np.testing.assert_array_equal(state.params["params"]["Dense_0"]["kernel"],
                                  trained.params["params"]["Dense_0"]["kernel"])  # frozen: as loaded


# ----------------------------------------------------------------------------- configs and layers


def test_a_method_switched_by_assignment_is_refused_naming_its_settings(tmp_path):
    c = jaxcl.get_config("split_digits:method=ewc")
    c.method.name = "si"
    with pytest.raises(jaxcl.ConfigError, match=r"method.name: 'si', but config.method is not si's \(it lacks si's "
                                                r"setting\(s\) .*method.si_lambda.*; it holds method.ewc_lambda.*\): "
                                                r"switch methods with jaxcl.config.set_method\(config, 'si'\)"):
        jaxcl.run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written
    config_lib.set_method(c, "si")
    config_lib.validate(c)


def imports(path: str) -> set:
    """Every module ``jaxcl/<path>`` imports, at its top or inside a function."""
    tree = ast.parse((ROOT / "jaxcl" / path).read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_imports_run_one_way():
    # the config error lives in the lowest layer that raises it (a method's validate)
    assert config_lib.ConfigError is base.ConfigError is jaxcl.ConfigError
    assert "jaxcl.config" not in imports("methods/base.py") and "jaxcl" not in imports("methods/base.py")
    # the grain pipeline builds on the memory feed, never the other way
    assert "jaxcl.data.feed" in imports("data/pipeline.py")
    assert "jaxcl.data.pipeline" not in imports("data/feed.py")
