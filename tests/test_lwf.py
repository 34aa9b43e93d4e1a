import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import data, methods, models
from jaxcl.methods import lwf


def built(make_config, **sets):
    c = make_config("split_digits:method=lwf", **sets)
    stream = data.build(c)
    m = methods.build(c, models.build(c.model, stream.info), stream.info)
    batch = next(data.batches(data.pool(stream, 1), 16))
    return c, stream, m, m.init(jax.random.PRNGKey(0), batch["x"]), batch


def test_kd_is_zero_against_itself_and_positive_against_another_network(make_config):
    c, stream, m, s, b = built(make_config, method__alpha=(0.0, 2.0, 2.0, 2.0, 2.0))
    rng, t = jax.random.PRNGKey(0), jnp.int32(1)
    s = m.after_phase(s, jnp.int32(0), "train")  # the old network is the current one
    loss, aux = m.loss(s.params, s, b, t, rng, "train")
    assert abs(float(aux["metrics"]["kd"])) < 1e-6
    moved = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.sign(p), s.params)
    loss2, aux2 = m.loss(moved, s, b, t, rng, "train")
    assert float(aux2["metrics"]["kd"]) > 1e-4
    assert float(loss2) == pytest.approx(float(aux2["metrics"]["ce"]) + 2.0 * float(aux2["metrics"]["kd"]), rel=1e-5)
    # at the first task there is no old network: alpha_0 weighs nothing
    loss0, aux0 = m.loss(moved, s, b, jnp.int32(0), rng, "train")
    assert float(loss0) == pytest.approx(float(aux0["metrics"]["ce"]), rel=1e-6)


def test_task_incremental_kd_covers_old_heads_only(make_config):
    c, stream, m, s, b = built(make_config)
    s = m.after_phase(s, jnp.int32(0), "train")
    s = s.replace(extra={**s.extra, "old_params": jax.tree_util.tree_map(lambda p: p * 0.9, s.params)})
    g = jax.grad(lambda p: m.loss(p, s, b, jnp.int32(2), jax.random.PRNGKey(0), "train")[1]["metrics"]["kd"])(s.params)
    head = np.asarray(g["params"]["head"]["kernel"])
    assert np.abs(head[:2]).sum() > 0 and np.abs(head[2:]).sum() == 0  # heads 0 and 1 distilled, not 2..4


def test_class_incremental_kd_uses_the_units_seen_before(make_config):
    c, stream, m, s, b = built(make_config, scenario="class")
    s = m.after_phase(s, jnp.int32(0), "train")
    assert np.asarray(s.extra["seen"]).tolist() == [True, True] + [False] * 8
    z_old = jax.random.normal(jax.random.PRNGKey(1), (4, 10))
    z = z_old.at[:, 2:].add(3.0)  # differences outside the seen units do not count
    np.testing.assert_allclose(lwf.kl(z_old, z, 2.0, s.extra["seen"]), 0.0, atol=1e-6)
    assert float(lwf.kl(z_old, z, 2.0).mean()) > 0.01


def test_alpha_schedule_length_is_checked(make_config):
    c = make_config("split_digits:method=lwf", method__alpha=(0.0, 1.0))
    stream = data.build(c)
    with pytest.raises(ValueError, match="2 weights for 5 tasks"):
        methods.build(c, models.build(c.model, stream.info), stream.info)
