import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import config as config_lib
from jaxcl import data, methods, models
from jaxcl.checkpoint import Checkpointer
from jaxcl.methods import packnet

from _small_resnet import TINY


def restore_all(config, workdir):
    """Every checkpoint of a finished run as a State (checkpoint i: after task i)."""
    stream = data.build(config)
    model = models.build(config.model, stream.info)
    m = methods.build(config, model, stream.info)
    x = next(data.batches(data.pool(stream, 0), config.batch_size))["x"]

    def init(rng):
        s = m.init(rng, x)
        return s.replace(opt_state=jaxcl.optim.make(config.optimizer).init(s.params))

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    ck = Checkpointer(workdir / "checkpoints")
    states = [ck.restore(abstract, config_lib.fingerprint(config), i)[0] for i in sorted(ck.manager.all_steps())]
    ck.close()
    return stream, m, states


def test_reference_prune_rule_with_ties_and_rounding():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 30)).astype(np.float32)
    w[0, :7] = 0.5  # a tie group
    w[1, :3] = -0.5
    w[2, :5] = 0.0
    w[2, 5] = -0.0
    owner = rng.integers(0, 4, size=w.shape).astype(np.uint8)
    for who, frac in ((2, 0.5), (1, 0.3), (3, 0.0), (2, 0.01), (2, 0.97)):
        got_w, got_o = jax.jit(packnet.prune_layer)(w, owner, jnp.uint8(who), jnp.float32(frac))
        # the reference: cutoff = kthvalue(|w| of owned, round(frac * n)); remove owned & |w| <= cutoff
        owned = owner == who
        k = int(np.floor(frac * owned.sum() + 0.5))
        remove = np.zeros_like(owned)
        if k > 0:
            cutoff = np.sort(np.abs(w[owned]))[k - 1]
            remove = owned & (np.abs(w) <= cutoff)
        np.testing.assert_array_equal(np.asarray(got_o), np.where(remove, 0, owner))
        np.testing.assert_array_equal(np.asarray(got_w), np.where(remove, 0, w))
        if k:
            assert remove.sum() >= k  # ties with the cutoff go too


def test_tie_exactly_at_the_cutoff_removes_the_whole_tie_group():
    w = np.array([[0.1, 0.2, 0.2, 0.2, 0.9, 1.0]], np.float32)
    owner = np.ones_like(w, np.uint8)
    got_w, got_o = packnet.prune_layer(w, owner, jnp.uint8(1), jnp.float32(0.3))  # k = round(1.8) = 2
    np.testing.assert_array_equal(np.asarray(got_o), [[0, 0, 0, 0, 1, 1]])


def test_schedule_parsing():
    np.testing.assert_allclose(packnet.schedule((0.5,), 3), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(packnet.schedule((0.75, 0.75, -1), 3), [0.75, 0.75, -1])
    with pytest.raises(ValueError, match="2 fractions given for 3 tasks"):
        packnet.schedule((0.5, 0.5), 3)
    with pytest.raises(ValueError, match="must be < 1"):
        packnet.schedule((1.0,), 3)


# the ResNet: _small_resnet.py's 2-stage one (its 6 convs with strides, a 1x1 shortcut and
# batch norm are what pruning and per-task batch norm touch; it compiles ~3x faster than
# the reduced ResNet-18), 2 epochs a task (1 leaves its last task unlearned)
MODELS = {
    "mlp": {"model__name": "mlp"},
    "resnet-shared-bn": {**TINY, "epochs": 2},
    "resnet-task-bn": {**TINY, "epochs": 2, "method__task_norm": "true"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 3-task PackNet run per model (SGD with momentum and weight decay), shared by
    the tests below: (config, workdir, results, restore_all's stream, method and states).
    One epoch a task for the MLP: every task is still learned (the diagonal is checked > 0.8)."""
    import jaxcl.configs
    from conftest import _quiet

    done = {}

    def get(name):
        if name not in done:
            sets = dict(num_tasks=3, epochs=1, optimizer__momentum=0.9, optimizer__weight_decay=0.01,
                        method__prune=(0.75, 0.75, -1), checkpoint__keep=5)
            sets.update(MODELS[name])
            c = config_lib.override(jaxcl.configs.get_config("split_digits:method=packnet"),
                                    _quiet(**{k.replace("__", "."): v for k, v in sets.items()}))
            wd = tmp_path_factory.mktemp(name)
            r = jaxcl.run(c, wd, echo=lambda s: None)
            done[name] = (c, wd, r) + restore_all(c, wd)  # restored once for both tests that read them
        return done[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_old_tasks_are_bitwise_untouched_by_later_tasks(runs, name):
    model_sets = MODELS[name]
    c, tmp_path, r, stream, m, states = runs(name)
    R = np.asarray(r["accuracy_matrix"])
    assert r["bwt"] == 0.0 and (R[1:, 0] == R[0, 0]).all() and R[2, 1] == R[1, 1]
    assert np.diag(R).min() > 0.8  # the tasks are learned, not just frozen
    assert len(states) == 3
    predict = jax.jit(m.predict)
    for task in (0, 1):
        x = jnp.asarray(next(data.batches(data.pool(stream, task, "test"), 64))["x"])
        after = [np.asarray(predict(s, x, jnp.int32(task))) for s in states[task:]]
        for later in after[1:]:
            np.testing.assert_array_equal(later.view(np.uint32), after[0].view(np.uint32))
    # the weights themselves: task 0's kernels, biases and batch norm never moved again
    for s in states[1:]:
        for (path, w0), w, o in zip(jax.tree_util.tree_flatten_with_path(states[0].params)[0],
                                    jax.tree_util.tree_leaves(s.params),
                                    jax.tree_util.tree_leaves(states[0].extra["owner"])):
            w0, w = np.asarray(w0), np.asarray(w)
            if o.ndim:
                keep = np.asarray(o) == 1
                np.testing.assert_array_equal(w[keep].view(np.uint32), w0[keep].view(np.uint32))
            elif not models.layers.is_per_task(path):
                np.testing.assert_array_equal(w.view(np.uint32), w0.view(np.uint32), err_msg=str(path))
    if "model__name" in model_sets and model_sets["model__name"] != "mlp" and "method__task_norm" not in model_sets:
        jax.tree_util.tree_map(np.testing.assert_array_equal, states[0].model_state, states[-1].model_state)


def test_owner_indices_partition_the_weights_as_the_schedule_says(make_config, tmp_path):
    sched = (0.75, 0.5, 0.5, -1.0)
    c = make_config("split_digits:method=packnet", num_tasks=4, data__classes_per_task=2, epochs=2,
                    method__prune=sched, model__hidden=(64, 64), checkpoint__keep=5)
    r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    stream, m, states = restore_all(c, tmp_path)
    for t, s in enumerate(states):
        for w, o in zip(jax.tree_util.tree_leaves(s.params), jax.tree_util.tree_leaves(s.extra["owner"])):
            if not o.ndim:
                continue
            o, w = np.asarray(o), np.asarray(w)
            assert o.max() <= t + 1  # every weight has one owner among the tasks so far, or is free
            assert (w[o == 0] == 0).all()  # freed weights are exactly zero
            left = o.size
            for k in range(t + 1):  # the fraction of each task, layer by layer, as scheduled
                keep = left - int(np.floor(sched[k] * left + 0.5)) if sched[k] > 0 else left
                assert (o == k + 1).sum() == keep, (t, k)
                left -= keep
            assert (o == 0).sum() == left
    rep = r["method_report"]
    assert rep["owner_index_bytes"] == rep["prunable_weights"]  # one uint8 per weight, for all tasks
    np.testing.assert_allclose(rep["fraction_owned"], [0.25, 0.375, 0.1875, 0.1875], atol=0.01)
    assert rep["fraction_free"] == 0.0
    assert rep["bytes_per_added_task"] == (64 * 2 + 2) * 4  # the head only


@pytest.mark.parametrize("name", ["mlp", "resnet-task-bn"])
def test_mixed_task_batch_equals_per_task_predictions(runs, name):
    c, tmp_path, _, stream, m, states = runs(name)
    s = states[-1]
    p = data.pool(stream, [0, 1, 2], "test")
    b = next(data.batches(p, 48, data.epoch_order(len(p), 0, 9)))
    x, task = jnp.asarray(b["x"]), jnp.asarray(b["task"])
    assert len(set(b["task"].tolist())) == 3
    predict = jax.jit(m.predict)  # m is shared with the test above: count this test's compiles only
    compiled_before = predict._cache_size()
    mixed = np.asarray(predict(s, x, task))
    for k in range(3):
        alone = np.asarray(predict(s, x, jnp.int32(k)))
        sel = b["task"] == k
        np.testing.assert_array_equal(mixed[sel].view(np.uint32), alone[sel].view(np.uint32))
    assert predict._cache_size() == compiled_before + 2  # one compile for a scalar id, one for a vector


def test_pretrained_trunk_is_loaded_and_heads_are_not(make_config, tmp_path):
    pre = make_config("split_digits:method=finetune", num_tasks=1, data__classes_per_task=10, scenario="class",
                      epochs=3)
    jaxcl.run(pre, tmp_path / "pre", echo=lambda s: None)
    src = jaxcl.checkpoint.load_state(tmp_path / "pre")
    c = make_config("split_digits:method=packnet", num_tasks=2, epochs=1, model__pretrained=str(tmp_path / "pre"))
    S = jaxcl.train.setup(c)
    state = jaxcl.train._init_fn(S)(jax.random.PRNGKey(5))
    msgs = []
    loaded = jaxcl.train._load_pretrained(S, state, str(tmp_path / "pre"), msgs.append)
    assert "initialised 4 parameter arrays" in msgs[0]  # fc1 and fc2 kernels and biases
    np.testing.assert_array_equal(loaded.params["params"]["fc1"]["kernel"], src["params"]["params"]["fc1"]["kernel"])
    np.testing.assert_array_equal(loaded.params["params"]["head"]["kernel"], state.params["params"]["head"]["kernel"])
    r = jaxcl.run(c, tmp_path / "pk", echo=msgs.append)
    assert any("initialised 4 parameter arrays" in s for s in msgs) and r["bwt"] == 0.0
    with pytest.raises(jaxcl.CheckpointError, match="no jaxcl checkpoint found"):
        jaxcl.checkpoint.load_state(tmp_path / "nothing")


def test_graft_fills_every_task_row_of_a_task_norm_from_a_plain_norm():
    src = {"conv": {"kernel": np.ones((3, 3, 1, 2))}, "norm": {"bn": {"scale": np.array([2.0, 3.0]),
                                                                        "bias": np.array([0.5, 0.25])}}}
    dst = {"conv": {"kernel": np.zeros((3, 3, 1, 2))},
           "norm": {"task_scale": np.zeros((4, 2)), "task_bias": np.zeros((4, 2))}}
    out, n = jaxcl.checkpoint.graft(dst, src)
    assert n == 3
    np.testing.assert_array_equal(out["norm"]["task_scale"], np.tile([2.0, 3.0], (4, 1)))
    with pytest.raises(jaxcl.CheckpointError, match="has shape"):
        jaxcl.checkpoint.graft({"conv": {"kernel": np.zeros((1, 1, 1, 2))}}, src)


def test_task_norm_needs_a_model_with_batch_norm(make_config):
    c = make_config("split_digits:method=packnet", method__task_norm="true")
    stream = data.build(c)
    with pytest.raises(ValueError, match="method.task_norm needs a model with batch norm"):
        methods.build(c, models.build(c.model, stream.info), stream.info)


def test_superclass_tasks_group_fine_classes():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 12
    coarse = y // 3  # 4 superclasses of 3 classes
    x = rng.integers(0, 255, (120, 4, 4, 3), dtype=np.uint8)
    ds = data.checked("toy100", x, y, x, y, num_classes=12, coarse=(coarse, coarse))
    s = data.split(ds, 4, 99, superclasses=True)
    assert [t.classes for t in s.tasks] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
    with pytest.raises(data.DataError, match="has no superclass labels"):
        data.split(data.checked("plain", x, y, x, y), 4, 3, superclasses=True)


@pytest.mark.parametrize("scenario", ["domain", "class"])
def test_a_shared_head_is_pruned_like_the_trunk_so_nothing_is_forgotten(make_config, tmp_path, scenario):
    c = make_config("split_digits:method=packnet", num_tasks=3, epochs=2, scenario=scenario,
                    method__prune=(0.6, 0.5, -1))
    r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    R = np.asarray(r["accuracy_matrix"])
    assert (R[1:, 0] == R[0, 0]).all() and R[2, 1] == R[1, 1]
    outputs = 2 if scenario == "domain" else 6
    assert r["method_report"]["prunable_weights"] == 64 * 128 + 128 * 128 + 128 * outputs  # head included
