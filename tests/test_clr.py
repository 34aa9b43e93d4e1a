import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import config as config_lib
from jaxcl import data, methods, models
from jaxcl.checkpoint import graft, load_state
from jaxcl.methods import clr
from jaxcl.models import layers

from _small_resnet import TINY, TINY_3X3_CHANNELS, TINY_SETS, TINY_ALL_CHANNELS, TINY_CONVS, make_tiny
from test_packnet import restore_all


@pytest.mark.parametrize("model,shape,outputs", [("resnet18_cifar", (32, 32, 3), 10), ("resnet18", (224, 224, 3), 1000)])
def test_exact_reprogramming_parameter_counts_on_resnet18(model, shape, outputs):
    assert clr.count_for(model, "reduced", outputs, shape)["clr_per_task"] == 35_136
    assert clr.count_for(model, "full", outputs, shape)["clr_per_task"] == 43_200
    assert clr.count_for(model, "reduced_v2", outputs, shape)["clr_per_task"] == 36_032
    assert clr.count_for(model, "head", outputs, shape)["clr_per_task"] == 0


def test_resnet50_counts_and_shares():
    r = {v: clr.count_for("resnet50", v, 1000, (224, 224, 3)) for v in ("reduced", "full", "reduced_v2")}
    assert r["full"]["backbone"] == 23_508_032  # convs + batch norm, no fc
    assert (r["reduced"]["clr_per_task"], r["full"]["clr_per_task"], r["reduced_v2"]["clr_per_task"]) == \
        (34_560, 239_040, 57_280)
    assert r["full"]["clr_pct_of_backbone"] == pytest.approx(1.0168, abs=1e-4)


@pytest.mark.parametrize("variant", ["reduced", "full", "reduced_v2"])
def test_at_initialisation_clr_computes_exactly_what_the_backbone_computes(variant):
    # any ResNet: a 3x3 conv, a strided block, a 1x1 shortcut (reprogrammed by `full` and
    # `reduced_v2` only) and batch norm; the reduced ResNet-18's sizes: the count tests above
    plain = make_tiny(num_heads=3, num_outputs=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 3))
    vp = plain.init(jax.random.PRNGKey(1), x)
    vp = {"params": vp["params"], "batch_stats": jax.tree_util.tree_map(lambda s: s + 0.3, vp["batch_stats"])}
    wrapped = plain.clone(conv=functools.partial(clr.CLRConv, num_tasks=3, variant=variant),
                          norm=functools.partial(layers.TaskNorm, 3))
    vw = wrapped.init(jax.random.PRNGKey(2), x)
    params, n = graft({"params": vw["params"]}, {"params": vp["params"]}, skip=())
    stats, _ = graft({"batch_stats": vw["batch_stats"]}, {"batch_stats": vp["batch_stats"]})
    assert n > 0 and "clr" in vw
    for t in range(3):
        a = wrapped.apply({**params, "clr": vw["clr"], **stats}, x, jnp.int32(t))
        b = plain.apply(vp, x, jnp.int32(t))
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def clr_run(tmp_path_factory):
    """A trunk pretrained on all 10 digits, then CLR over 3 tasks (Adam, L2-norm penalty):
    (config, workdir, results, pretrained workdir, and restore_all's stream, method and
    states, read by both tests below)."""
    from conftest import _quiet

    pre = tmp_path_factory.mktemp("pre")
    arch = TINY_SETS  # the model of test_l2_penalty...
    cp = config_lib.override(jaxcl.get_config("split_digits:method=finetune"), _quiet(
        **{"num_tasks": 1, "data.classes_per_task": 10, "scenario": "class", "epochs": 3}) + arch)
    jaxcl.run(cp, pre, echo=lambda s: None)
    wd = tmp_path_factory.mktemp("clr")
    c = config_lib.override(jaxcl.get_config("split_digits:method=clr"), _quiet(
        **{"num_tasks": 3, "epochs": 2, "optimizer.name": "adam", "optimizer.lr": 3e-3, "method.l2": 1e-3,
           "model.pretrained": str(pre), "checkpoint.keep": 5}) + arch)
    r = jaxcl.run(c, wd, echo=lambda s: None)
    return (c, wd, r, pre) + restore_all(c, wd)


def test_old_tasks_bitwise_and_backbone_bitwise_unchanged(clr_run):
    c, wd, r, pre, stream, m, states = clr_run
    R = np.asarray(r["accuracy_matrix"])
    assert r["bwt"] == 0.0 and (R[1:, 0] == R[0, 0]).all() and np.diag(R).min() > 0.9
    predict = jax.jit(m.predict)
    x = jnp.asarray(next(data.batches(data.pool(stream, 0, "test"), 64))["x"])
    first = np.asarray(predict(states[0], x, jnp.int32(0)))
    for s in states[1:]:
        np.testing.assert_array_equal(np.asarray(predict(s, x, jnp.int32(0))).view(np.uint32), first.view(np.uint32))
    # the backbone: every conv kernel bit for bit the pretrained one, after all tasks
    src = load_state(pre)["params"]["params"]
    final = states[-1].params["params"]
    convs = [(p, w) for p, w in jax.tree_util.tree_flatten_with_path(final)[0] if p[-1].key == "kernel"
             and p[0].key != "head"]
    assert len(convs) == TINY_CONVS
    for p, w in convs:
        ref = src
        for k in p:
            ref = ref[k.key]
        np.testing.assert_array_equal(np.asarray(w).view(np.uint32), np.asarray(ref).view(np.uint32))
    # task 0's rows of the per-task collections never moved after task 0
    for a, b in zip(jax.tree_util.tree_leaves(states[0].params["clr"]), jax.tree_util.tree_leaves(states[-1].params["clr"])):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
    rep = r["method_report"]
    # a 3x3 depthwise kernel after every 3x3 conv, none after the 1x1 shortcut; a scale and a
    # bias per channel of every batch norm
    assert rep["variant"] == "reduced" and rep["clr_per_task"] == 9 * TINY_3X3_CHANNELS
    assert rep["bn_per_task"] == 2 * TINY_ALL_CHANNELS


def test_mixed_task_batch_equals_per_task_predictions(clr_run):
    c, wd, _, _, stream, m, states = clr_run
    p = data.pool(stream, [0, 1, 2], "test")
    b = next(data.batches(p, 48, data.epoch_order(len(p), 0, 3)))
    x, task = jnp.asarray(b["x"]), jnp.asarray(b["task"])
    predict = jax.jit(m.predict)
    mixed = np.asarray(predict(states[-1], x, task))
    for k in range(3):
        sel = b["task"] == k
        alone = np.asarray(predict(states[-1], x[sel], jnp.int32(k)))
        np.testing.assert_allclose(mixed[sel], alone, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(mixed[sel].argmax(-1), alone.argmax(-1))


def test_l2_penalty_is_the_sum_of_the_tasks_tensor_norms(make_config):
    c = make_config("split_digits:method=clr", **TINY, method__l2=0.5)
    stream = data.build(c)
    m = methods.build(c, models.build(c.model, stream.info), stream.info)
    batch = next(data.batches(data.pool(stream, 1), 16))
    s = m.init(jax.random.PRNGKey(0), batch["x"])
    s = s.replace(params=jax.tree_util.tree_map(lambda w: w + 0.01, s.params))
    t = jnp.int32(1)
    loss_fn = jax.jit(m.loss, static_argnums=5)
    loss, aux = loss_fn(s.params, s, batch, t, jax.random.PRNGKey(0), "train")
    want = 0.0
    for p, w in jax.tree_util.tree_flatten_with_path(s.params)[0]:
        keys = [k.key for k in p]
        if keys[0] == "clr" or "head" in keys or keys[-1].startswith("task_"):
            want += float(np.linalg.norm(np.asarray(w[1]).ravel()))
    assert float(aux["metrics"]["l2_norm_penalty"]) == pytest.approx(want, rel=1e-5)
    assert float(loss) == pytest.approx(float(aux["metrics"]["ce"]) + 0.5 * want, rel=1e-5)
    g = jax.jit(jax.grad(lambda p: m.loss(p, s, batch, t, jax.random.PRNGKey(0), "train")[0]))(s.params)
    assert all(np.abs(np.asarray(x)).sum() == 0 for p, x in jax.tree_util.tree_flatten_with_path(g["params"])[0]
               if p[-1].key == "kernel" and p[0].key != "head")  # no gradient reaches the backbone


def test_bad_settings_are_refused(make_config):
    for sets, msg in [({"method__variant": "wide"}, "method.variant: 'wide' is not one of"),
                      ({"model__name": "mlp"}, "CLR reprograms convolutions"),
                      ({"model__name": "cnn", "scenario": "class"}, "needs one head per task")]:
        c = make_config("split_digits:method=clr", **sets)
        stream = data.build(c)
        with pytest.raises(ValueError, match=msg):
            methods.build(c, models.build(c.model, stream.info), stream.info)
