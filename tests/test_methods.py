import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import data, methods, models, optim, train
from jaxcl.methods import base


def setup(make_config, method, **sets):
    c = make_config(f"split_digits:method={method}", **sets)
    stream = data.build(c)
    model = models.build(c.model, stream.info)
    m = methods.build(c, model, stream.info)
    batch = next(data.batches(data.pool(stream, 0), 16))
    state = m.init(jax.random.PRNGKey(0), batch["x"])
    return c, stream, model, m, state, batch


NEEDS = {"clr": {"model__name": "cnn", "model__width": 8}}  # settings a method needs to be built at all
# the prompt and pretrained-model methods run on a ViT's token interface
# (2 blocks: the contract does not depend on depth, and each block is compile time)
NEEDS.update({n: {"model__name": "vit_cifar", "model__width": 32, "model__depth": 2} for n in methods.on_a_vit()})
NEEDS["coda_prompt"]["method__layers"] = "(0, 1)"  # the papers' layers are a 12-block ViT's
NEEDS["dualprompt"].update(method__g_layers="(0,)", method__e_layers="(1,)")
NEEDS["ranpac"]["method__projection"] = 64  # the paper's 10,000: ridge solves of 10^4 x 10^4 (minutes of CPU)


@pytest.mark.parametrize("name", methods.available())
def test_every_method_follows_the_contract(make_config, name):
    c, stream, model, m, state, batch = setup(make_config, name, **NEEDS.get(name, {}))
    assert isinstance(m, base.Method) and m.name == name
    for field in ("init", "begin_task", "loss", "after_step", "after_phase", "predict"):
        assert callable(getattr(m, field)), field
    assert m.consolidate is None or callable(m.consolidate)
    phases = m.phases(0)
    # a phase trains for epochs, or is a pass of statistics only (0 epochs: SimpleCIL's and
    # RanPAC's classifiers are built by the consolidation pass)
    assert phases and all(isinstance(ph, base.Phase) and (ph.epochs >= 1 or (ph.epochs == 0 and m.consolidate))
                          for ph in phases)
    assert m.data in ("current", "cumulative")
    # trainable: a bool tree with the structure of params
    assert jax.tree_util.tree_structure(state.trainable) == jax.tree_util.tree_structure(state.params)
    assert all(x.dtype == bool for x in jax.tree_util.tree_leaves(state.trainable))
    # everything is jittable with a traced task id, and the loss is finite
    t = jnp.int32(0)
    shapes = jax.tree_util.tree_map(jnp.shape, state)
    state = jax.jit(m.begin_task)(state, t)
    assert jax.tree_util.tree_map(jnp.shape, state) == shapes, "init must allocate the final shapes"
    loss, aux = jax.jit(m.loss, static_argnums=5)(state.params, state, batch, t, jax.random.PRNGKey(1), m.phases(0)[0].name)
    assert np.isfinite(loss)
    logits = jax.jit(m.predict)(state, batch["x"], batch["task"])
    assert logits.shape == (16, stream.info.num_outputs)
    after = jax.jit(m.after_phase, static_argnums=2)(state, t, m.phases(0)[0].name)
    assert jax.tree_util.tree_map(jnp.shape, after) == shapes


def test_masking_after_the_optimizer_keeps_frozen_weights_bit_exact(make_config):
    c, stream, model, m, state, batch = setup(make_config, "finetune", optimizer__momentum=0.9,
                                              optimizer__weight_decay=0.01)
    tx = optim.make(c.optimizer)
    state = state.replace(opt_state=tx.init(state.params))
    k = state.params["params"]["fc1"]["kernel"]
    mask = np.zeros(k.shape, bool)
    mask[:, ::2] = True  # per-element: half the columns trainable
    trainable = jax.tree_util.tree_map(lambda _: jnp.ones((), bool), state.params)
    trainable["params"]["fc1"]["kernel"] = jnp.asarray(mask)
    trainable["params"]["fc2"]["bias"] = jnp.zeros((), bool)  # whole leaf frozen
    state = state.replace(trainable=trainable)
    before = jax.device_get(state.params)
    step = jax.jit(train.make_train_step(m, tx, augment=False), static_argnums=3)
    for i in range(5):
        state, _ = step(state, batch, jnp.int32(0), "train")
    after = jax.device_get(state.params)
    k0, k1 = before["params"]["fc1"]["kernel"], after["params"]["fc1"]["kernel"]
    assert np.array_equal(k0[~mask].view(np.uint32), k1[~mask].view(np.uint32))
    assert not np.array_equal(k0[mask], k1[mask])
    assert np.array_equal(before["params"]["fc2"]["bias"].view(np.uint32), after["params"]["fc2"]["bias"].view(np.uint32))
    assert not np.array_equal(before["params"]["fc2"]["kernel"], after["params"]["fc2"]["kernel"])


# ----------------------------------------------------------------------------- EWC


def test_ewc_penalty_is_zero_at_the_anchor_and_is_the_sum_of_per_task_quadratics(make_config):
    c, stream, model, m, state, batch = setup(make_config, "ewc", method__ewc_lambda=10.0)
    t0, t1, t2 = jnp.int32(0), jnp.int32(1), jnp.int32(2)
    rng = jax.random.PRNGKey(0)
    # jitted: one compile each instead of op-by-op dispatch (a compile per op on a cold cache)
    m = m._replace(loss=jax.jit(m.loss, static_argnums=5), consolidate=jax.jit(m.consolidate, static_argnums=3),
                   after_phase=jax.jit(m.after_phase, static_argnums=2))
    fisher = lambda s: jax.tree_util.tree_map(lambda a: a / s.extra["count"], s.extra["acc"])  # noqa: E731
    # before any consolidated task the penalty is off, even away from the initial weights
    moved = jax.tree_util.tree_map(lambda p: p + 0.1, state.params)
    assert float(m.loss(moved, state, batch, t0, rng, "train")[1]["metrics"]["ewc_penalty"]) == 0.0
    s = m.consolidate(m.consolidate(state, batch, t0, "train"), batch, t0, "train")
    f0, a0 = fisher(s), s.params
    s = m.after_phase(s, t0, "train")
    assert float(s.extra["count"]) == 0.0  # accumulator reset for the next task
    _, aux = m.loss(s.params, s, batch, t1, rng, "train")
    assert abs(float(aux["metrics"]["ewc_penalty"])) < 1e-9  # zero at the anchor
    # a second task with another anchor: the closed form equals the per-task sum
    s = s.replace(params=jax.tree_util.tree_map(lambda p: p - 0.05 * jnp.sign(p), s.params))
    b2 = dict(batch, y=(batch["y"] + 1) % 2)
    s = m.consolidate(s, b2, t1, "train")
    f1, a1 = fisher(s), s.params
    s = m.after_phase(s, t1, "train")
    probe = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.cos(p * 37.0), state.params)
    want = sum(float(jnp.sum(f * (p - a) ** 2))
               for fk, ak in ((f0, a0), (f1, a1))
               for f, p, a in zip(jax.tree_util.tree_leaves(fk), jax.tree_util.tree_leaves(probe),
                                  jax.tree_util.tree_leaves(ak)))
    loss, aux = m.loss(probe, s, batch, t2, rng, "train")
    assert float(aux["metrics"]["ewc_penalty"]) == pytest.approx(want, rel=1e-4)
    assert float(loss) == pytest.approx(float(aux["metrics"]["ce"]) + 10.0 * want, rel=1e-4)
    # and so is its gradient: 2 sum_k F_k (theta - a_k)
    g = jax.jit(jax.grad(lambda p: m.loss(p, s, batch, t2, rng, "train")[1]["metrics"]["ewc_penalty"]))(probe)
    g_want = jax.tree_util.tree_map(lambda p, fa, aa, fb, ab: 2 * (fa * (p - aa) + fb * (p - ab)), probe, f0, a0, f1, a1)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-8), g, g_want)


def test_ewc_batch_fisher_is_the_mean_squared_batch_gradient(make_config):
    c, stream, model, m, state, batch = setup(make_config, "ewc")
    b2 = next(data.batches(data.pool(stream, 0), 16, np.arange(len(data.pool(stream, 0)))[::-1]))
    t = jnp.int32(0)
    consolidate = jax.jit(m.consolidate, static_argnums=3)
    s = jax.jit(m.after_phase, static_argnums=2)(consolidate(consolidate(state, batch, t, "train"), b2, t, "train"),
                                                 t, "train")

    def ce(params, b):
        logits = model.apply({**params, **state.model_state}, b["x"], t, False)
        return base.cross_entropy(logits, b["y"], b["mask"])

    g1, g2 = jax.jit(jax.grad(ce))(state.params, batch), jax.jit(jax.grad(ce))(state.params, b2)
    want = jax.tree_util.tree_map(lambda a, b: (a ** 2 + b ** 2) / 2, g1, g2)
    got = s.extra["importance"]  # after the first task: exactly F_0 ...
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), got, want)
    anchor = s.extra["anchor"]  # ... anchored where task 0 ended (where F_0 > 0)
    jax.tree_util.tree_map(lambda a, p, f: np.testing.assert_array_equal(a[f > 0], p[f > 0]), anchor, state.params, got)


def test_ewc_empirical_fisher_is_the_mean_of_per_sample_squared_gradients(make_config):
    c, stream, model, m, state, batch = setup(make_config, "ewc", method__fisher="empirical")
    batch = dict(batch, mask=np.r_[np.ones(12), np.zeros(4)].astype(np.float32))  # 4 padded samples
    t = jnp.int32(0)
    s = jax.jit(m.after_phase, static_argnums=2)(jax.jit(m.consolidate, static_argnums=3)(state, batch, t, "train"),
                                                 t, "train")

    def ce1(params, x, y):
        return base.cross_entropy(model.apply({**params, **state.model_state}, x[None], t, False), y[None])

    grad = jax.jit(jax.grad(ce1))
    gs = [grad(state.params, batch["x"][i], batch["y"][i]) for i in range(12)]
    want = jax.tree_util.tree_map(lambda *g: sum(x ** 2 for x in g) / 12, *gs)
    got = s.extra["importance"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-10), got, want)


def test_ewc_rejects_an_unknown_fisher_estimate(make_config):
    with pytest.raises(ValueError, match="method.fisher: 'exact' is not one of batch, empirical"):
        setup(make_config, "ewc", method__fisher="exact")


def test_joint_trains_on_mixed_task_batches_with_per_sample_heads(make_config):
    c, stream, model, m, state, batch = setup(make_config, "joint")
    assert m.data == "cumulative"
    mixed = next(data.batches(data.pool(stream, [0, 1, 2]), 64, data.epoch_order(len(data.pool(stream, [0, 1, 2])), 0, 1)))
    assert len(set(mixed["task"].tolist())) > 1
    g = jax.jit(jax.grad(lambda p: m.loss(p, state, mixed, jnp.int32(2), jax.random.PRNGKey(0), "train")[0]))(state.params)
    head = np.asarray(g["params"]["head"]["kernel"])
    used = sorted(set(mixed["task"].tolist()))
    assert all(np.abs(head[k]).sum() > 0 for k in used) and np.abs(head[3:]).sum() == 0


# ----------------------------------------------------------------------------- settings, refused when the config is built


@pytest.mark.parametrize("spec,sets,msg", [
    ("ewc", ["method.fisher=xyz"], "method.fisher: 'xyz' is not one of"),
    ("ewc", ["method.ewc_lambda=-5"], "method.ewc_lambda: must be >= 0"),
    ("packnet", ["method.prune=1.5"], "method.prune: fractions must be < 1"),
    ("packnet", ["method.prune=(0.5,0.5)"], "method.prune: 2 fractions given for 5 tasks"),
    ("er", ["method.memory_size=-4"], "method.memory_size: must be >= 1"),
    ("nccl", ["method.memory_size=0"], "method.memory_size: must be >= 1"),
    ("derpp", ["method.alpha=-1.0"], "method.alpha: must be >= 0"),
    ("si", ["method.si_lambda=-1.0"], "method.si_lambda: must be >= 0"),
    ("lwf", ["method.alpha=(1.0,-1.0,1.0,1.0,1.0)"], "method.alpha: weights must be >= 0"),
    ("rescl", ["method.l1=-0.1"], "method.l1: must be >= 0"),
    ("clr", ["scenario=class"], "scenario: CLR is task-incremental"),
])
def test_bad_method_settings_are_refused_by_name_when_the_config_is_validated(spec, sets, msg):
    import jaxcl
    from jaxcl import config as config_lib

    c = config_lib.override(jaxcl.get_config(f"split_digits:method={spec}"), sets)
    with pytest.raises(jaxcl.ConfigError, match=msg):
        config_lib.validate(c)


def test_per_task_defaults_follow_num_tasks():
    import jaxcl
    from jaxcl import config as config_lib
    from jaxcl.methods import packnet

    for n in (3, 5, 10):
        c = config_lib.override(jaxcl.get_config("permuted_mnist:method=packnet"), [f"num_tasks={n}"])
        config_lib.validate(c)
        fr = packnet.schedule(c.method.prune, n)
        assert len(fr) == n and fr[-1] < 0  # equal shares: the last task keeps what is left
        np.testing.assert_allclose(fr[:-1], [(n - 1 - t) / (n - t) for t in range(n - 1)])
