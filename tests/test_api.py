"""jaxcl inside your own JAX code: methods from keywords, the Trainer, plain Flax models."""
import importlib.util
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcl
from jaxcl import methods
from jaxcl.methods import base, rescl
from jaxcl.models import Heads

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


class PlainMLP(nn.Module):  # flax.linen layers only, a head per task
    heads: int = 2

    @nn.compact
    def __call__(self, x, task=None, train=False):
        h = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return Heads(self.heads, 2, name="head")(h, task)


class PlainCNN(nn.Module):
    @nn.compact
    def __call__(self, x, task=None, train=False):
        h = nn.relu(nn.Conv(4, (3, 3))(x))
        h = nn.relu(nn.Dense(16)(h.reshape(x.shape[0], -1)))
        return Heads(2, 2, name="head")(h, task)


class SharedHead(nn.Module):
    @nn.compact
    def __call__(self, x, task=None, train=False):
        return nn.Dense(2, name="head")(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    return {"x": x, "y": (x.mean((1, 2, 3)) > 0).astype(np.int32)}


def run_two_tasks(name, model, **settings):
    batch = data()
    m = jaxcl.method(name, model, batch, num_tasks=2, **settings)
    loop = jaxcl.trainer(m, optax.sgd(0.05))
    state = loop.init(jax.random.PRNGKey(0), batch["x"])
    assert state.opt_state is not None  # ready to train
    states = []
    for t in range(2):
        state = loop.begin_task(state, t)
        for phase in m.phases(t):
            state, metrics = loop.step(state, batch, t, phase)
            assert np.isfinite(float(metrics["loss"]))
            state = loop.end_phase(state, t, phase, [batch])
        states.append(jax.device_get(state))
    assert loop.predict(state, batch["x"], jnp.asarray(batch["y"])).shape == (32, 2)  # one task per sample
    return m, loop, states


def test_example_trains_two_methods_on_a_user_model_data_and_loop():
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules["own_loop"] = example  # flax dataclasses look their module up
    spec.loader.exec_module(example)
    results = example.main(epochs=1)
    assert set(results) == {"packnet", "ewc"}
    R = results["packnet"]
    assert np.diag(R).min() > 0.8
    for j in range(len(R)):  # PackNet: a learned task never changes
        assert np.all(R[j:, j] == R[j, j])


# CLR and SGD-LL need a conv/pretrained trunk; the prompt and pretrained-model methods a ViT
# (tests/test_prompts.py runs them from jaxcl.method on one)
NOT_ON_A_PLAIN_MLP = ("clr", "sgd_ll", *methods.on_a_vit())


@pytest.mark.parametrize("name", [n for n in methods.available() if n not in NOT_ON_A_PLAIN_MLP])
def test_every_method_from_keywords_on_a_plain_flax_model(name):
    run_two_tasks(name, PlainMLP(), **FEWER_STEPS.get(name, {}))


# one inner step of NCCL's meta-learning loop, not 5: the contract does not depend on it
FEWER_STEPS = {"nccl": {"inner_steps": 1}}


@pytest.mark.parametrize("name,settings,collection", [("clr", {"task_bn": False}, "clr"),
                                                      ("nccl", FEWER_STEPS["nccl"], "calib"),
                                                      ("rescl", {}, "rescl")])
def test_layer_methods_attach_their_variables_to_plain_flax_layers(name, settings, collection):
    m, loop, states = run_two_tasks(name, PlainCNN(), **settings)
    attached = states[-1].params[collection]
    assert {"Conv_0"} <= set(attached)  # found through interception, named as the plain layers
    if name != "clr":
        assert "Dense_0" in attached


def test_rescl_merge_on_plain_layers_is_exact():
    batch = data()
    m = jaxcl.method("rescl", PlainMLP(), batch, num_tasks=2)
    loop = jaxcl.trainer(m, optax.sgd(0.1))
    state = loop.init(jax.random.PRNGKey(0), batch["x"])
    state = loop.end_phase(loop.step(loop.begin_task(state, 0), batch, 0, "train")[0], 0, "train")
    state = loop.begin_task(state, 1)
    state = loop.end_phase(loop.step(state, batch, 1, "finetune")[0], 1, "finetune")
    for _ in range(3):
        state, _ = loop.step(state, batch, 1, "combine")
    combined = rescl._clone(PlainMLP(), "combined", (0.0, 0.0))
    want = base.apply(combined, state.params, state.model_state, batch["x"], 1, train=False)[0]
    assert float(jnp.abs(state.params["rescl"]["Dense_0"]["a_t"]).max()) > 0  # the combination moved
    merged = loop.end_phase(state, 1, "combine")
    np.testing.assert_allclose(loop.predict(merged, batch["x"], 1), want, rtol=1e-5, atol=1e-5)


def test_packnet_refuses_a_model_without_per_task_heads_and_trains_each_tasks_own():
    with pytest.raises(ValueError, match=r"PackNet keeps one head per task .* \['head'\]\['kernel'\] without a "
                                         r"leading axis of 2: end the model in jaxcl.models.Heads"):
        jaxcl.method("packnet", SharedHead(), data(), num_tasks=2)
    jaxcl.method("packnet", SharedHead(), data(), num_tasks=2, scenario="domain")  # one head, pruned like the trunk
    m, loop, states = run_two_tasks("packnet", PlainMLP())
    head0, head1 = (s.params["params"]["head"]["kernel"] for s in states)
    assert not np.array_equal(head0[1], head1[1])  # task 2 trained its head ...
    np.testing.assert_array_equal(head0[0], head1[0])  # ... and left task 1's alone


def test_clr_on_a_plain_model_says_what_it_needs():
    with pytest.raises(ValueError, match="pass task_bn=False"):
        jaxcl.method("clr", PlainCNN(), data(), num_tasks=2)
    with pytest.raises(ValueError, match="CLR reprograms convolutions"):
        jaxcl.method("clr", PlainMLP(), data(), num_tasks=2, task_bn=False)


def test_settings_are_checked_by_name():
    with pytest.raises(jaxcl.ConfigError, match="did you mean 'method.prune'"):
        jaxcl.method("packnet", PlainMLP(), data(), num_tasks=2, prun=0.5)
    with pytest.raises(jaxcl.ConfigError, match="method.memory_size: must be >= 1"):
        jaxcl.method("er", PlainMLP(), data(), num_tasks=2, memory_size=-4)
    with pytest.raises(jaxcl.ConfigError, match="method.prune: 3 fractions given for 2 tasks"):
        jaxcl.method("packnet", PlainMLP(), data(), num_tasks=2, prune=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("change,msg", [
    (lambda b: {**b, "label": b["y"]}, "unknown key.*'label'"),
    (lambda b: {"x": b["x"]}, "missing 'y'"),
    (lambda b: {**b, "x": (b["x"] * 10).astype(np.uint8)}, r"batch\['x'\]: dtype uint8"),
    (lambda b: {**b, "y": b["y"].astype(np.float32)}, r"batch\['y'\]: dtype float32"),
    (lambda b: {**b, "y": b["y"][:3]}, r"batch\['y'\]: shape \(3,\), expected \(32,\)"),
    (lambda b: {**b, "x": b["x"][:, :4]}, r"batch\['x'\]: shape \(32, 4, 6, 1\), expected \[B, 6, 6, 1\]"),
    (lambda b: {**b, "mask": np.ones(32, np.int32)}, r"batch\['mask'\]: dtype int32"),
])
def test_bad_batches_are_refused_by_name(change, msg):
    batch = data()
    loop = jaxcl.trainer(jaxcl.method("finetune", PlainMLP(), batch, num_tasks=2), optax.sgd(0.1))
    state = loop.init(jax.random.PRNGKey(0), batch["x"])
    with pytest.raises(ValueError, match=msg):
        loop.step(state, change(batch), 0, "train")


def test_phases_and_consolidation_are_checked():
    batch = data()
    loop = jaxcl.trainer(jaxcl.method("ewc", PlainMLP(), batch, num_tasks=2), optax.sgd(0.1))
    state = loop.init(jax.random.PRNGKey(0), batch["x"])
    with pytest.raises(ValueError, match="phase 'retrain' is not a phase of task 0 for ewc"):
        loop.step(state, batch, 0, "retrain")
    with pytest.raises(ValueError, match="pass the task's training batches to end_phase"):
        loop.end_phase(state, 0, "train")
