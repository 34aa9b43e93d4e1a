import jax
import jax.numpy as jnp
import numpy as np

import jaxcl
from jaxcl import data
from jaxcl.methods import _memory



def with_memory(state, stream, task=0, n=40):
    p = data.pool(stream, task)
    b = next(data.batches(p, n))
    mem = _memory.insert(state.extra["memory"], b, jnp.int32(task), jnp.zeros((n, stream.info.num_outputs)),
                         jax.random.PRNGKey(0))
    return state.replace(extra={**state.extra, "memory": mem})


def test_agem_projection_never_points_against_the_memory_gradient(make_config, method_setup):
    c, stream, m, s, b = method_setup("agem", method__sample_size=32)
    s = with_memory(s, stream, task=0)
    t, rng = jnp.int32(1), jax.random.PRNGKey(4)
    g = jax.grad(lambda p: m.loss(p, s, b, t, rng, "train")[0])(s.params)
    g_ref, have = jax.jit(lambda st: _ref(m, st, t, rng))(s)
    flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    # make the incoming gradient conflict with the memory's, then project
    conflict = jax.tree_util.tree_map(lambda a, r: a - 3.0 * r, g, g_ref)
    assert float(flat(conflict) @ flat(g_ref)) < 0
    out = m.transform_grads(conflict, s, b, t, rng, "train")
    assert float(flat(out) @ flat(g_ref)) >= -1e-5 * float(flat(g_ref) @ flat(g_ref))
    # an agreeing gradient passes untouched
    agree = jax.tree_util.tree_map(lambda a, r: a + 3.0 * r, g, g_ref)
    same = m.transform_grads(agree, s, b, t, rng, "train")
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, agree)
    # with no earlier task in memory there is nothing to project on
    none = m.transform_grads(conflict, s, b, jnp.int32(0), rng, "train")
    jax.tree_util.tree_map(np.testing.assert_array_equal, none, conflict)


def test_agem_per_tensor_projection_makes_each_tensor_agree_with_its_reference(make_config, method_setup):
    c, stream, m, s, b = method_setup("agem", method__sample_size=32, method__projection="per_tensor")
    s = with_memory(s, stream, task=0)
    t, rng = jnp.int32(1), jax.random.PRNGKey(4)
    g = jax.grad(lambda p: m.loss(p, s, b, t, rng, "train")[0])(s.params)
    g_ref, _ = jax.jit(lambda st: _ref(m, st, t, rng))(s)
    # conflict in some tensors only: those get projected, the others pass untouched
    signs = {i: (-3.0 if i % 2 else 3.0) for i in range(len(jax.tree_util.tree_leaves(g)))}
    flat_g, tdef = jax.tree_util.tree_flatten(g)
    flat_r = jax.tree_util.tree_leaves(g_ref)
    mixed = tdef.unflatten([a + signs[i] * r for i, (a, r) in enumerate(zip(flat_g, flat_r))])
    out = jax.tree_util.tree_leaves(m.transform_grads(mixed, s, b, t, rng, "train"))
    for i, (o, x, r) in enumerate(zip(out, jax.tree_util.tree_leaves(mixed), flat_r)):
        if float(jnp.vdot(x, r)) < 0:
            assert float(jnp.vdot(o, r)) >= -1e-5 * float(jnp.vdot(r, r)), i
        else:
            np.testing.assert_array_equal(o, x)


def _ref(m, s, t, rng):
    # the reference gradient A-GEM computes inside transform_grads (same key)
    mem = s.extra["memory"]
    rep, have = _memory.memory_sample(mem, jax.random.fold_in(rng, 1), 32, mem["task"] < t)
    return jax.grad(lambda p: m.loss(p, s, dict(x=rep["x"], y=rep["y"], task=rep["task"],
                                               mask=jnp.ones(32)), rep["task"], rng, "train")[0])(s.params), have


def test_er_trains_on_incoming_and_replayed_samples_and_stores_the_batch(make_config, method_setup):
    c, stream, m, s, b = method_setup("er", method__memory_size=20, method__replay_batch=8)
    _, aux = m.loss(s.params, s, b, jnp.int32(1), jax.random.PRNGKey(0), "train")
    assert float(aux["metrics"]["ce_replay"]) == 0.0  # empty memory: nothing replayed
    s2 = with_memory(s, stream)
    _, aux = m.loss(s2.params, s2, b, jnp.int32(1), jax.random.PRNGKey(0), "train")
    assert float(aux["metrics"]["ce_replay"]) > 0.0
    s3 = m.after_step(s, aux, b, jnp.int32(1), jax.random.PRNGKey(1), "train")
    mem = s3.extra["memory"]
    assert int(mem["seen"]) == 16 and int(mem["filled"].sum()) == 16
    s4 = m.after_step(s3, aux, b, jnp.int32(1), jax.random.PRNGKey(2), "train")
    assert int(s4.extra["memory"]["filled"].sum()) == 20  # the bound holds


def test_er_reduces_forgetting_in_class_incremental_split_digits(make_config, tmp_path):
    sets = dict(scenario="class", epochs=3)
    ft = jaxcl.run(make_config("split_digits:method=finetune", **sets), tmp_path / "ft", echo=lambda s: None)
    er = jaxcl.run(make_config("split_digits:method=er", method__memory_size=100, method__replay_batch=16, **sets),
                   tmp_path / "er", echo=lambda s: None)
    assert er["acc"] > ft["acc"] + 0.3


def test_memory_sample_draws_uniformly_among_filled_allowed_slots():
    mem = _memory.memory_init(12, (1,), 1)
    filled = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    allowed = jnp.asarray([1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], bool)  # usable: 0, 3, 5, 8, 10
    mem = {**mem, "filled": filled, "x": jnp.arange(12, dtype=jnp.float32)[:, None]}
    pick, ok = jax.jit(lambda k: _memory.memory_sample(mem, k, 50_000, allowed))(jax.random.PRNGKey(0))
    assert bool(ok)
    got = np.bincount(np.asarray(pick["x"][:, 0], int), minlength=12)
    usable = [0, 3, 5, 8, 10]
    assert set(np.nonzero(got)[0]) == set(usable)
    np.testing.assert_allclose(got[usable] / 50_000, 0.2, atol=0.01)
    _, ok = _memory.memory_sample(mem, jax.random.PRNGKey(1), 4, jnp.zeros(12, bool))
    assert not bool(ok)


def test_memory_insert_follows_the_memory_kind():
    b = {"x": jnp.arange(6, dtype=jnp.float32)[:, None], "y": jnp.asarray([0, 1, 0, 1, 0, 1]),
         "mask": jnp.ones(6)}
    q = jnp.zeros((6, 2))
    ring = _memory.insert(_memory.new("ring", 2, (1,), 2, num_tasks=3), b, jnp.int32(1), q, jax.random.PRNGKey(0))
    assert np.asarray(ring["filled"]).tolist() == [False, False, True, True, False, False]  # task 1's two slots
    res = _memory.insert(_memory.new("reservoir", 4, (1,), 2), b, jnp.int32(1), q, jax.random.PRNGKey(0))
    assert int(res["filled"].sum()) == 4 and int(res["seen"]) == 6
    bal = _memory.insert(_memory.new("balanced", 4, (1,), 2, num_classes=2), b, jnp.int32(0), q,
                         jax.random.PRNGKey(0), lambda y, t: y)
    assert np.bincount(np.asarray(bal["cls"]), minlength=2).tolist() == [2, 2]
    with np.testing.assert_raises_regex(ValueError, "method.memory"):
        _memory.new("fifo", 4, (1,), 2)
