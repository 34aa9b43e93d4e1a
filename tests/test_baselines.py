"""Issue 7's baselines: online EWC, SI, DER++, SGD-LL and ER's class-balanced memory.
Each: a jitted step on a tiny model, finite losses, its defining property, and one
compiled train step for every task."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import data, methods, models, train
from jaxcl.methods import _memory

tmap = jax.tree_util.tree_map
leaves = jax.tree_util.tree_leaves




def jit_step(m, tx):
    return jax.jit(train.make_train_step(m, tx, False), static_argnums=3)


@pytest.mark.parametrize("name", ["online_ewc", "si", "derpp", "sgd_ll", "er", "lwf", "agem"])
def test_one_compiled_step_serves_every_task(make_config, tmp_path, name):
    sets = {"method__memory": "balanced"} if name == "er" else {}
    train.TRACES.clear()
    # 3 tasks, not 5: the first and later tasks (memories filled, anchors set) are all there
    r = jaxcl.run(make_config(f"split_digits:method={name}", epochs=1, num_tasks=3, **sets), tmp_path,
                  echo=lambda s: None)
    assert train.TRACES["train_chunk"] == 1, train.TRACES  # one compiled call of K steps for every task
    assert np.isfinite(r["acc"]) and r["acc"] > 0.3


def test_online_ewc_decays_the_importance_and_anchors_at_the_last_task(make_config, method_setup):
    c, stream, m, s, b = method_setup("online_ewc", method__decay=0.5)
    # jitted: one compile each instead of op-by-op dispatch (a compile per op on a cold cache)
    m = m._replace(loss=jax.jit(m.loss, static_argnums=5), consolidate=jax.jit(m.consolidate, static_argnums=3),
                   after_phase=jax.jit(m.after_phase, static_argnums=2))
    t0, t1 = jnp.int32(0), jnp.int32(1)
    s = m.consolidate(s, b, t0, "train")
    f0 = tmap(lambda a: a / s.extra["count"], s.extra["acc"])
    s = m.after_phase(s, t0, "train")
    tmap(np.testing.assert_allclose, s.extra["importance"], f0)
    # the penalty vanishes at the anchor and grows away from it
    assert float(m.loss(s.params, s, b, t1, jax.random.PRNGKey(0), "train")[1]["metrics"]["ewc_penalty"]) == 0.0
    moved = tmap(lambda p: p + 0.1, s.params)
    assert float(m.loss(moved, s, b, t1, jax.random.PRNGKey(0), "train")[1]["metrics"]["ewc_penalty"]) > 0.0
    s = s.replace(params=moved)
    s = m.consolidate(s, b, t1, "train")
    f1 = tmap(lambda a: a / s.extra["count"], s.extra["acc"])
    s = m.after_phase(s, t1, "train")
    tmap(lambda got, a, b_: np.testing.assert_allclose(got, 0.5 * a + b_, rtol=1e-6, atol=1e-12),
         s.extra["importance"], f0, f1)
    tmap(np.testing.assert_array_equal, s.extra["anchor"], moved)


def test_si_importance_is_the_path_integral_of_the_task_loss(make_config, method_setup):
    """Omega after a task equals sum over steps of -g_task * delta, over (Delta^2 + xi),
    recomputed here step by step from the task loss alone (without the SI penalty)."""
    c, stream, m, s, b = method_setup("si", method__si_lambda=3.0)
    import optax

    tx = optax.sgd(0.1)
    s = s.replace(opt_state=tx.init(s.params))
    step = jit_step(m, tx)
    plain = methods.base.classification_loss(models.build(c.model, stream.info))
    xi = c.method.xi

    def run_task(s, task, batches):
        s = m.begin_task(s, task)
        start, omega = s.params, tmap(jnp.zeros_like, s.params)
        for bt in batches:
            g = jax.grad(lambda p: plain(p, s, bt, task, None, "train")[0])(s.params)
            prev = s.params
            s, metrics = step(s, bt, task, "train")
            omega = tmap(lambda w, gi, new, old: w - gi * (new - old), omega, g, s.params, prev)
            assert np.isfinite(float(metrics["loss"]))
        return s, start, omega

    batches0 = list(data.batches(data.pool(stream, 0), 16))[:5]
    s, start, omega = run_task(s, jnp.int32(0), batches0)
    tmap(lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9), s.extra["omega"], omega)
    s = m.after_phase(s, jnp.int32(0), "train")
    want = tmap(lambda w, p, st: w / ((p - st) ** 2 + xi), omega, s.params, start)
    tmap(lambda got, w: np.testing.assert_allclose(got, w, rtol=2e-4, atol=1e-9), s.extra["big_omega"], want)
    assert sum(float(jnp.sum(o)) for o in leaves(s.extra["big_omega"])) > 0  # learning lowered the loss
    # task 1: the penalty is zero at the anchor; the task-loss gradient excludes it (so the
    # path integral is the task's own), while the step's loss includes it
    batches1 = list(data.batches(data.pool(stream, 1), 16))[:3]
    _, aux = m.loss(s.params, s, batches1[0], jnp.int32(1), jax.random.PRNGKey(0), "train")
    assert float(aux["metrics"]["si_penalty"]) == 0.0
    s1, _, omega1 = run_task(s, jnp.int32(1), batches1)
    tmap(lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-8), s1.extra["omega"], omega1)
    assert float(m.loss(s1.params, s1, batches1[0], jnp.int32(1), jax.random.PRNGKey(0), "train")[1]["metrics"][
        "si_penalty"]) > 0.0


def test_si_clips_omega_only_when_asked(make_config, method_setup):
    _, _, m, s, b = method_setup("si", method__omega_max=1e-3)
    big = tmap(lambda p: jnp.full_like(p, 5.0), s.params)
    s = s.replace(extra={**s.extra, "big_omega": big, "anchor": tmap(lambda p: p - 1.0, s.params)})
    pen = float(m.loss(s.params, s, b, jnp.int32(1), jax.random.PRNGKey(0), "train")[1]["metrics"]["si_penalty"])
    n = sum(p.size for p in leaves(s.params))
    np.testing.assert_allclose(pen, 0.5 * 1e-3 * n, rtol=1e-5)


def test_derpp_stores_logits_and_distils_them(make_config, method_setup):
    c, stream, m, s, b = method_setup("derpp", method__memory_size=24, method__replay_batch=8,
                               method__alpha=1.0, method__beta=0.0)
    t, key = jnp.int32(0), jax.random.PRNGKey(0)
    loss0, aux = m.loss(s.params, s, b, t, key, "train")
    assert float(aux["metrics"]["der_mse"]) == 0.0 and float(aux["metrics"]["ce_replay"]) == 0.0  # empty memory
    s = m.after_step(s, aux, b, t, key, "train")
    mem = s.extra["memory"]
    assert int(mem["filled"].sum()) == 16
    # the stored targets are the logits the network gave each sample
    z = m.predict(s, mem["x"][:16], t)
    np.testing.assert_allclose(mem["q"][:16], z, rtol=1e-5, atol=1e-5)
    # same network: the logit-matching term is zero; another network: positive
    _, aux = m.loss(s.params, s, b, t, key, "train")
    assert float(aux["metrics"]["der_mse"]) < 1e-8
    other = tmap(lambda p: p * 1.5, s.params)
    _, aux = m.loss(other, s, b, t, key, "train")
    assert float(aux["metrics"]["der_mse"]) > 1e-3
    # reservoir bound
    for i in range(3):
        s = m.after_step(s, aux, b, t, jax.random.PRNGKey(i + 1), "train")
    assert int(s.extra["memory"]["filled"].sum()) == 24 and int(s.extra["memory"]["seen"]) == 64


def test_sgd_ll_trains_only_the_shared_last_layer(make_config, method_setup):
    import optax

    c, stream, m, s, b = method_setup("sgd_ll")
    total = sum(stream.info.task_classes)
    assert s.params["params"]["head"]["kernel"].shape[-1] == total  # one layer over every class
    tx = optax.sgd(0.5)
    s = s.replace(opt_state=tx.init(s.params))
    step = jit_step(m, tx)
    s2, _ = step(s, b, jnp.int32(0), "train")
    b1 = next(data.batches(data.pool(stream, 1), 16))
    s3, _ = step(s2, b1, jnp.int32(1), "train")
    for path, before in jax.tree_util.tree_flatten_with_path(s.params)[0]:
        after = s3.params
        for k in path:
            after = after[k.key]
        if "head" in [k.key for k in path]:
            assert not np.array_equal(before, after), path
        else:
            np.testing.assert_array_equal(before, after)
    # task t's logits are its classes' columns of the shared layer
    z = m.predict(s3, b1["x"], jnp.int32(1))
    full = models.build(c.model, stream.info, num_heads=1, num_outputs=total, classes_per_head=(total,)).apply(
        s3.params, b1["x"], jnp.int32(0), False)
    np.testing.assert_allclose(z[:, :2], full[:, 2:4], rtol=1e-6)
    # task-incremental: a task's loss sees only its own columns, so task 1 leaves task 0's alone
    k2, k3 = s2.params["params"]["head"]["kernel"], s3.params["params"]["head"]["kernel"]
    np.testing.assert_array_equal(k3[..., :2], k2[..., :2])
    assert not np.array_equal(k3[..., 2:4], k2[..., 2:4])


def test_sgd_ll_shares_one_layer_across_tasks_in_class_incremental(make_config, method_setup):
    import optax

    c, stream, m, s, b = method_setup("sgd_ll", scenario="class")
    tx = optax.sgd(0.5)
    s = s.replace(opt_state=tx.init(s.params))
    b1 = next(data.batches(data.pool(stream, 1), 16))
    s1, _ = jit_step(m, tx)(s, b1, jnp.int32(1), "train")
    k0, k1 = s.params["params"]["head"]["kernel"], s1.params["params"]["head"]["kernel"]
    assert not np.array_equal(k1[..., :2], k0[..., :2])  # task 1's step moves task 0's classes' weights too


def _cbrs(labels, size, num_classes, seed=0, chunk=10):
    mem = _memory.balanced_init(size, (1,), 1, num_classes)
    ins = jax.jit(_memory.balanced_insert)
    n = len(labels)
    for i in range(0, n, chunk):
        y = jnp.asarray(labels[i:i + chunk], jnp.int32)
        x = jnp.asarray(np.arange(i, i + len(y)), jnp.float32)[:, None]
        k = len(y)
        mem = ins(mem, x, y, jnp.zeros(k, jnp.int32), jnp.zeros((k, 1)), jnp.ones(k), y,
                  jax.random.fold_in(jax.random.PRNGKey(seed), i))
    return mem


def test_class_balanced_memory_keeps_its_bound_and_balances_classes():
    # an imbalanced stream: class 0 x 300, then class 1 x 60, then class 2 x 200
    labels = [0] * 300 + [1] * 60 + [2] * 200
    mem = _cbrs(labels, 90, 3)
    counts = np.bincount(np.asarray(mem["cls"])[np.asarray(mem["filled"])], minlength=3)
    assert counts.sum() == 90 and int(mem["seen"]) == len(labels)
    assert list(counts) == [30, 30, 30]
    # minority classes are kept whole while the majority gives way
    labels = [0] * 200 + [1] * 10
    mem = _cbrs(labels, 50, 2)
    counts = np.bincount(np.asarray(mem["cls"]), minlength=2)
    assert list(counts) == [40, 10]


def test_class_balanced_memory_keeps_a_uniform_sample_of_each_class():
    # within a class every sample seen is kept with equal probability: first and second
    # halves of class 0's stream end up equally represented, over seeds
    labels = [0] * 100 + [1] * 100
    first = []
    for seed in range(30):
        mem = _cbrs(labels, 20, 2, seed=seed)
        x = np.asarray(mem["x"][:, 0])[np.asarray(mem["cls"]) == 0]
        assert len(x) == 10
        first.append(np.mean(x < 50))
    assert abs(np.mean(first) - 0.5) < 0.1


@pytest.mark.parametrize("name,sets,msg", [
    ("si", {"method__xi": 0.0}, "method.xi"),
    ("online_ewc", {"method__decay": 1.5}, "method.decay"),
    ("online_ewc", {"method__fisher": "exact"}, "method.fisher"),
    ("derpp", {"method__replay_batch": 0}, "method.replay_batch"),
    ("er", {"method__memory": "fifo"}, "method.memory"),
    ("agem", {"method__projection": "layer"}, "method.projection"),
])
def test_bad_settings_are_refused_by_name(make_config, name, sets, msg):
    c = make_config(f"split_digits:method={name}", **sets)
    stream = data.build(c)
    with pytest.raises(ValueError, match=msg):
        methods.build(c, models.build(c.model, stream.info), stream.info)
