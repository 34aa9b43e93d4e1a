import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import data, methods, models
from jaxcl.methods import rescl

from _small_resnet import TINY


def built(make_config, **sets):
    c = make_config("split_digits:method=rescl", **sets)
    stream = data.build(c)
    m = methods.build(c, models.build(c.model, stream.info), stream.info)
    x = jnp.asarray(next(data.batches(data.pool(stream, 0), 16))["x"])
    return c, stream, m, x


def randomised(state, key):
    """Trained-looking parameters: random weights, combination and batch-norm statistics."""
    ks = iter(jax.random.split(key, 1000))
    params = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(next(ks), a.shape), state.params)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.abs(a + jax.random.normal(next(ks), a.shape)) + 0.2 if p[-1].key == "var"
        else a + 0.5 * jax.random.normal(next(ks), a.shape), state.model_state)
    return state.replace(params=params, model_state=stats)


# resnet-bn: _small_resnet.py's 2-stage ResNet (its strided block, 1x1 shortcut and batch norms
# are what the merge folds; it compiles ~3x faster than the reduced ResNet-18)
@pytest.mark.parametrize("model_sets", [{"model__name": "mlp"}, {**TINY, "model__width": 4},
                                        {"model__name": "cnn", "model__width": 4},
                                        {"model__name": "wrn28_2", "model__width": 4}],
                         ids=["mlp", "resnet-bn", "cnn", "wrn-preact"])
def test_merged_network_computes_what_the_combined_network_computes(make_config, model_sets):
    c, stream, m, x = built(make_config, **model_sets)
    state = randomised(m.init(jax.random.PRNGKey(0), x), jax.random.PRNGKey(1))
    comb = rescl._clone(models.build(c.model, stream.info), "combined", (0.0, 0.0))
    t = jnp.int32(1)
    before = comb.apply({**state.params, **state.model_state}, x, t, False)  # inference mode: both batch norms
    merged = jax.jit(m.after_phase, static_argnums=2)(state, t, "combine")
    after = m.predict(merged, x, t)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(jnp.abs(before).max()))
    assert float(jnp.abs(before).max()) > 1.0  # not trivially small
    # the merged network is the plain architecture, of exactly its size
    plain = models.build(c.model, stream.info)
    n_plain = sum(a.size for a in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x))["params"]))
    rep = rescl.param_report(merged.params)
    heads = sum(a.size for a in jax.tree_util.tree_leaves(merged.params["params"]["head"]))
    assert rep["merged_network"] == n_plain
    assert rep["target_branch"] == n_plain - heads  # the unmerged network holds a second trunk
    assert rep["unmerged_network"] == rep["merged_network"] + rep["target_branch"] + rep["combination"]


def test_with_zero_combination_the_combined_network_is_the_source(make_config):
    c, stream, m, x = built(make_config, **{**TINY, "model__width": 4}, method__a_init=(0.0, 0.0))
    state = randomised(m.init(jax.random.PRNGKey(0), x), jax.random.PRNGKey(2))
    zero = jax.tree_util.tree_map(jnp.zeros_like, state.params["rescl"])
    params = {**state.params, "rescl": zero}
    comb = rescl._clone(models.build(c.model, stream.info), "combined", (0.0, 0.0))
    src = rescl._clone(models.build(c.model, stream.info), "source", (0.0, 0.0))
    t = jnp.int32(0)
    np.testing.assert_array_equal(comb.apply({**params, **state.model_state}, x, t, False),
                                  src.apply({**params, **state.model_state}, x, t, False))


def test_source_branch_keeps_the_plain_model_names(make_config):
    c, stream, m, x = built(make_config, **{**TINY, "model__width": 4})
    state = m.init(jax.random.PRNGKey(0), x)
    plain = jax.eval_shape(lambda: models.build(c.model, stream.info).init(jax.random.PRNGKey(0), x))["params"]
    source = {k: v for k, v in state.params["params"].items()}
    jax.tree_util.tree_map(lambda a, b: None, plain, jax.tree_util.tree_map(  # same structure once target_* is dropped
        lambda a: a, _drop_target(source)))


def _drop_target(tree):
    return {k: _drop_target(v) if isinstance(v, dict) else v for k, v in tree.items() if not k.startswith("target_")}


def test_a_large_l1_drives_the_combination_to_zero_and_recovers_the_source(make_config, tmp_path):
    # start from the average of source and target (a_t = 0.5): a large lambda must pull a_t back to 0
    c = make_config("split_digits:method=rescl", num_tasks=2, epochs=3, method__l1=2.0, optimizer__lr=0.01,
                    optimizer__momentum=0.0, method__a_init=(-0.5, 0.5), checkpoint__keep=3)
    r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    from test_packnet import restore_all

    stream, m, states = restore_all(c, tmp_path)
    a_t = np.concatenate([np.ravel(a) for p, a in jax.tree_util.tree_flatten_with_path(states[-1].params["rescl"])[0]
                          if p[-1].key == "a_t"])
    assert np.abs(a_t).max() < 0.05  # from 0.5 to (within a few subgradient steps of) zero
    lines = [__import__("json").loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    l1 = [x["l1"] for x in lines if x.get("phase") == "combine"]
    assert l1[-1] < 0.05 * l1[0]
    R = np.asarray(r["accuracy_matrix"])
    assert R[1, 0] >= R[0, 0] - 0.02  # so the source task is kept
    assert r["method_report"]["merged_network"] < r["method_report"]["unmerged_network"] / 1.9


def test_stream_of_three_tasks_learns_each_with_lwf_keeping_old_ones(make_config, tmp_path):
    # the default MLP: the three phases over a stream are model-agnostic, and the merge of a
    # batch-norm ResNet is checked exactly above (test_merged_network...[resnet-bn]); a
    # reduced ResNet here cost 129 CPU s
    c = make_config("split_digits:method=rescl", num_tasks=3, epochs=4, method__l1=1e-3)
    r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    R = np.asarray(r["accuracy_matrix"])
    assert np.diag(R).min() > 0.85 and r["bwt"] > -0.1
    phases = {x.get("phase") for x in map(__import__("json").loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert {"train", "finetune", "combine"} <= phases


def test_bad_settings_are_refused(make_config):
    for sets, msg in [({"method__target_loss": "mse"}, "method.target_loss"),
                      ({"scenario": "class"}, "needs scenario=task")]:
        c = make_config("split_digits:method=rescl", **sets)
        stream = data.build(c)
        with pytest.raises(ValueError, match=msg):
            methods.build(c, models.build(c.model, stream.info), stream.info)
