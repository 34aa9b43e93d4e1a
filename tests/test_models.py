import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import models
from jaxcl.models import layers
from jaxcl.models import _MODELS


def n_params(model, shape):
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
    return sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))


@pytest.mark.parametrize("name,classes,shape,expected", [
    # figures from ../shared/peers/WORKLOADS.md and torchvision
    ("reduced_resnet18", 10, (1, 32, 32, 3), 1_094_750),
    ("resnet18_cifar", 10, (1, 32, 32, 3), 11_168_832 + 5_130),
    ("resnet18", 1000, (1, 224, 224, 3), 11_689_512),
    ("resnet50", 1000, (1, 224, 224, 3), 25_557_032),
    ("mlp", 10, (1, 28, 28, 1), 784 * 400 + 400 + 400 * 400 + 400 + 4010),
])
def test_parameter_counts_match_the_reference_architectures(name, classes, shape, expected):
    assert n_params(_MODELS[name](num_outputs=classes), shape) == expected


def test_resnet_layout_and_names():
    v = jax.eval_shape(lambda: _MODELS["reduced_resnet18"]().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    p = v["params"]
    assert p["stem"]["conv"]["kernel"].shape == (3, 3, 3, 20)
    assert "shortcut" not in p["layer1_0"] and p["layer2_0"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 20, 40)
    assert p["layer4_1"]["conv2"]["conv"]["kernel"].shape == (3, 3, 160, 160)
    assert v["batch_stats"]["stem"]["norm"]["bn"]["mean"].shape == (20,)
    convs = [k for k in jax.tree_util.tree_flatten_with_path(p)[0] if "conv" in jax.tree_util.keystr(k[0])
             and k[0][-1].key == "kernel"]
    assert len(convs) == 20  # 17 3x3 convs + 3 shortcuts


def test_heads_mixed_batch_equals_per_task_and_masks_extra_classes():
    m = models.MLP(hidden=(16,), num_heads=3, num_outputs=4, classes_per_head=(2, 4, 3))
    v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 8))
    t = jnp.array([0, 1, 2, 2, 1, 0])
    mixed = m.apply(v, x, t)
    per = jnp.concatenate([m.apply(v, x[i:i + 1], t[i]) for i in range(6)])
    np.testing.assert_allclose(mixed, per, rtol=1e-6, atol=1e-6)
    assert (mixed[0, 2:] < -1e8).all() and (mixed[2, 3] < -1e8) and (mixed[1] > -1e8).all()
    jitted = jax.jit(m.apply)  # the task id is traced: one compile serves every task
    for k in range(3):
        jitted(v, x, jnp.int32(k))
    assert jitted._cache_size() == 1


def test_torch_style_init_bounds():
    m = models.MLP(hidden=(50,), num_outputs=3)
    p = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 200)))["params"]
    bound = 1 / np.sqrt(200)
    w = np.asarray(p["fc1"]["kernel"])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert np.abs(np.asarray(p["fc1"]["bias"])).max() <= bound
    f = models.MLP(hidden=(50,), num_outputs=3, weight_init="flax").init(jax.random.PRNGKey(0), jnp.zeros((1, 200)))
    assert np.abs(np.asarray(f["params"]["fc1"]["bias"])).max() == 0.0


class ScaledConv(layers.Conv):
    """A method-style extension: a per-channel gain in its own collection."""

    def post(self, y, task):
        g = self.variable("extra", "gain", lambda: jnp.full((self.features,), 2.0))
        return y * g.value


def test_layers_take_extra_collections_without_copying_the_model():
    base = _MODELS["reduced_resnet18"]()
    ext = base.clone(conv=ScaledConv)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    vb = base.init(jax.random.PRNGKey(1), x)
    ve = ext.init(jax.random.PRNGKey(1), x)
    assert ve["extra"]["stem"]["conv"]["gain"].shape == (20,)
    assert len(jax.tree_util.tree_leaves(ve["extra"])) == 20  # one per conv
    # the plain model's parameters keep their names and shapes in the extended one
    assert jax.tree_util.tree_structure(ve["params"]) == jax.tree_util.tree_structure(vb["params"])
    # so plain weights load into it; with gain 1 it computes exactly what the plain model does
    ones = jax.tree_util.tree_map(jnp.ones_like, ve["extra"])
    out = ext.apply({"params": vb["params"], "batch_stats": vb["batch_stats"], "extra": ones}, x)
    np.testing.assert_array_equal(out, base.apply(vb, x))
    twos = ext.apply({"params": vb["params"], "batch_stats": vb["batch_stats"], "extra": ve["extra"]}, x)
    assert not np.allclose(twos, out)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    m = _MODELS["reduced_resnet18"](dtype="bfloat16")
    v = m.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v["params"]))
    assert m.apply(v, jnp.ones((2, 32, 32, 3))).dtype == jnp.float32


@pytest.mark.parametrize("train", [True, False])
def test_norm_and_task_norm_compute_what_flax_batchnorm_computes(train):
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 4)) * 3 + 1
    ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    vr = ref.init(jax.random.PRNGKey(0), x)
    vr = {"params": {"scale": jnp.arange(4.0) + 1, "bias": jnp.ones(4) * 0.5},
          "batch_stats": {"mean": jnp.ones(4) * 0.2, "var": jnp.ones(4) * 1.5}}
    yr, sr = ref.apply(vr, x, mutable=["batch_stats"])
    ours = layers.Norm()
    vo = {"params": {"bn": vr["params"]}, "batch_stats": {"bn": vr["batch_stats"]}}
    yo, so = ours.apply(vo, x, None, train, mutable=["batch_stats"])
    np.testing.assert_array_equal(yo, yr)
    jax.tree_util.tree_map(np.testing.assert_array_equal, so["batch_stats"]["bn"], sr["batch_stats"])
    tn = layers.TaskNorm(3)
    row = lambda v: jnp.stack([v * 0, v, v * 0])  # noqa: E731  task 1 holds the values
    vt = {"params": {"task_scale": row(vr["params"]["scale"]), "task_bias": row(vr["params"]["bias"])},
          "batch_stats": {"task_mean": row(vr["batch_stats"]["mean"]), "task_var": row(vr["batch_stats"]["var"])}}
    yt, st = tn.apply(vt, x, jnp.int32(1), train, mutable=["batch_stats"])
    np.testing.assert_array_equal(yt, yr)
    np.testing.assert_array_equal(st["batch_stats"]["task_mean"][1], sr["batch_stats"]["mean"])
    np.testing.assert_array_equal(st["batch_stats"]["task_mean"][0], vt["batch_stats"]["task_mean"][0])


@pytest.mark.parametrize("k", [1, 3])
def test_depthwise_matches_xla_grouped_convolution_and_its_gradients(k):
    b, h, c = 16, 6, 5
    y = jax.random.normal(jax.random.PRNGKey(0), (b, h, h, c))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, k, 1, c))
    r = jax.random.normal(jax.random.PRNGKey(2), (b, h, h, c))

    def ref(y, w):
        return jax.lax.conv_general_dilated(y, w, (1, 1), [(k // 2, k // 2)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)

    np.testing.assert_allclose(layers.depthwise(y, w), ref(y, w), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda y, w: jnp.sum(layers.depthwise(y, w) * r), (0, 1))(y, w)
    g_ref = jax.grad(lambda y, w: jnp.sum(ref(y, w) * r), (0, 1))(y, w)
    for a, b_ in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-4)
    per_sample = jax.random.normal(jax.random.PRNGKey(3), (b, k, k, 1, c))
    want = jax.vmap(lambda yy, kk: ref(yy[None], kk)[0])(y, per_sample)
    np.testing.assert_allclose(layers.depthwise(y, per_sample), want, rtol=1e-5, atol=1e-5)
    ident = jnp.zeros((k, k, 1, c)).at[k // 2, k // 2].set(1.0)
    np.testing.assert_array_equal(layers.depthwise(y, ident), y)  # identity kernel: bit for bit


def test_depthwise_gradient_chunks_the_batch_to_the_same_result():
    y = jax.random.normal(jax.random.PRNGKey(0), (64, 32, 32, 64))  # large enough to be chunked
    assert layers._chunk(64, (34 * 34 * 64 + 32 * 32 * 64) * 4) < 64
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 64))
    r = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    g = jax.jit(jax.grad(lambda w: jnp.sum(layers.depthwise(y, w) * r)))(w)
    yp = jnp.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = jnp.stack([jnp.sum(yp[:, i:i + 32, j:j + 32] * r, axis=(0, 1, 2)) for i in range(3) for j in range(3)])
    np.testing.assert_allclose(g.reshape(9, 64), want, rtol=1e-4, atol=1e-3)


def test_heads_all_returns_every_head():
    m = models.MLP(hidden=(8,), num_heads=3, num_outputs=4, classes_per_head=(2, 4, 3))
    v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 5))
    every = m.apply(v, x, "all")
    assert every.shape == (6, 3, 4)
    for k in range(3):
        np.testing.assert_allclose(every[:, k], m.apply(v, x, jnp.int32(k)), rtol=1e-6, atol=1e-6)
