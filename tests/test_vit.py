"""The Vision Transformers (jaxcl.models.vit): timm's sizes and names, the token interface
prompt methods use, training end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import models, train
from jaxcl.models import vit


def abstract(name, size=224, **kw):
    m = models._MODELS[name](num_heads=1, num_outputs=10, image_size=(size, size), **kw)
    return m, jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))


def backbone_size(shapes):
    return sum(a.size for p, a in jax.tree_util.tree_flatten_with_path(shapes["params"])[0] if p[0].key != "head")


@pytest.mark.parametrize("name,count", [("vit_ti16", 5_524_416), ("vit_s16", 21_665_664), ("vit_b16", 85_798_656),
                                        ("vit_l16", 303_301_632)])
def test_parameter_counts_are_timms_without_the_head(name, count):
    # timm's vit_*_patch16_224 with num_classes=0 (counted in the peers venv)
    assert backbone_size(abstract(name)[1]) == count


def test_parameter_names_follow_timms_keys():
    _, s = abstract("vit_ti16")
    p = s["params"]
    assert set(p) == {"patch_embed", "cls_token", "pos_embed", "norm", "head"} | {f"blocks_{i}" for i in range(12)}
    assert jax.tree_util.tree_map(jnp.shape, p["blocks_3"]) == {
        "norm1": {"scale": (192,), "bias": (192,)}, "norm2": {"scale": (192,), "bias": (192,)},
        "attn": {"qkv": {"kernel": (192, 576), "bias": (576,)}, "proj": {"kernel": (192, 192), "bias": (192,)}},
        "mlp": {"fc1": {"kernel": (192, 768), "bias": (768,)}, "fc2": {"kernel": (768, 192), "bias": (192,)}}}
    assert p["patch_embed"]["proj"]["kernel"].shape == (16 * 16 * 3, 192)
    assert p["pos_embed"].shape == (1, 197, 192) and p["cls_token"].shape == (1, 1, 192)


def test_layer_norms_written_out_gradient_is_autodiffs_of_the_formula():
    """vit.normalise's custom backward (first order, and the second order NCCL's nested
    gradients take) against JAX's autodiff of the plain formula."""
    def plain(x):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, (4, 5, 16)), jnp.float32)
    g, w = (jnp.asarray(rng.normal(size=(4, 5, 16)), jnp.float32) for _ in range(2))
    mine, ref = (jax.vjp(f, x)[1](g)[0] for f in (lambda x: vit.normalise(x, 1e-6), plain))
    np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(ref).max()) > 0.1  # a gradient worth comparing

    def second(f):  # d/dx of <grad_x <f(x), w>, g>
        return jax.grad(lambda x: jnp.vdot(jax.grad(lambda x: jnp.vdot(f(x), w))(x), g))(x)

    np.testing.assert_allclose(second(lambda x: vit.normalise(x, 1e-6)), second(plain), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def small():
    # jitted, here and in the tests below: op by op, every primitive is a compile of its own
    m = vit.ViT(num_heads=2, num_outputs=5, image_size=(8, 8), patch=4, width=16, depth=2, heads=2)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 3)), jnp.float32)

    @jax.jit
    def init(x):
        v = m.init(jax.random.PRNGKey(0), x)
        return jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape), v)

    return m, init(x), x


def reference_block(p, x, pk=None, pv=None, heads=2):
    """One pre-norm block written out with jnp (no flax), prefix keys/values prepended."""
    def ln(x, q):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * q["scale"] + q["bias"]

    def dense(x, q):
        return x @ q["kernel"] + q["bias"]

    b, t, d = x.shape
    qkv = dense(ln(x, p["norm1"]), p["attn"]["qkv"]).reshape(b, t, 3, heads, d // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if pk is not None:
        k = jnp.concatenate([pk.reshape(b, -1, heads, d // heads), k], 1)
        v = jnp.concatenate([pv.reshape(b, -1, heads, d // heads), v], 1)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), -1)
    y = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, d)
    x = x + dense(y, p["attn"]["proj"])
    h = jax.nn.gelu(dense(ln(x, p["norm2"]), p["mlp"]["fc1"]), approximate=False)
    return x + dense(h, p["mlp"]["fc2"])


def test_encode_with_prefixes_is_prefix_tuned_attention(small):
    m, v, x = small
    rng = np.random.default_rng(3)
    pk, pv = (jnp.asarray(rng.normal(size=(3, 2, 16)), jnp.float32) for _ in range(2))

    @jax.jit
    def both(v, x, pk, pv):
        p = v["params"]
        t = m.apply(v, x, method=m.tokens)
        out = m.apply(v, t, False, [None, (pk, pv[0])], method=m.encode)  # [Lp, D] broadcasts over the batch
        ref = reference_block(p["blocks_1"], reference_block(p["blocks_0"], t), pk, jnp.broadcast_to(pv[0], pv.shape))
        return t, out, m.apply(v, ref, method=lambda mod, h: mod.norm(h))

    t, out, ref = both(v, x, pk, pv)
    assert t.shape == (3, 5, 16)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert out.shape == t.shape  # queries and output length unchanged


def test_prompts_go_after_cls_and_pools_pick_their_tokens(small):
    m, v, x = small
    P = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16)), jnp.float32)

    @jax.jit
    def outputs(v, x, P):
        t = m.apply(v, x, method=m.tokens)
        seq = jnp.concatenate([t[:, :1], jnp.broadcast_to(P, (3, 2, 16)), t[:, 1:]], 1)
        out = m.apply(v, seq, method=m.encode)
        feats = {pool: m.apply(v, x, prompts=P, pool=pool, features=True) for pool in ("cls", "prompt", "mean")}
        logits = (m.apply(v, x, jnp.int32(1), prompts=P, pool="prompt"),
                  m.apply(v, out[:, 1:3].mean(1), jnp.int32(1), method=m.classify))
        plain = (m.apply(v, x, jnp.int32(0)),
                 m.apply(v, m.apply(v, t, method=m.encode)[:, 0], jnp.int32(0), method=m.classify))
        return out, feats, logits, m.apply(v, x, "all"), plain

    out, feats, logits, every_head, plain = outputs(v, x, P)
    for pool, want in (("cls", out[:, 0]), ("prompt", out[:, 1:3].mean(1)), ("mean", out[:, 3:].mean(1))):
        np.testing.assert_allclose(feats[pool], want, atol=1e-6)
    np.testing.assert_allclose(*logits, atol=1e-6)
    assert every_head.shape == (3, 2, 5)
    # no prompts, no prefixes: the plain model
    np.testing.assert_array_equal(*plain)


def test_images_off_the_grid_are_refused_by_name(small):
    m, v, _ = small
    with pytest.raises(ValueError, match="do not fit its 2x2 grid"):
        m.apply(v, jnp.zeros((1, 12, 12, 3)))


def test_vit_cifar_trains_on_digits_in_float32_and_bfloat16(make_config, tmp_path):
    # the embedded 8x8 digits: a 2x2 grid of 4-pixel patches; width 16 and 1 block
    # (model.depth; every layer kind is there), 2 epochs: the dtype is what is tested, not the
    # size (the diagonal is >= 0.95 at two seeds, each dtype)
    for dtype in ("float32", "bfloat16"):
        c = make_config("split_digits:method=finetune", model__name="vit_cifar", model__dtype=dtype, num_tasks=2,
                        optimizer__name="adam", optimizer__lr=3e-3, model__width=16, model__depth=1)
        res = train.run(c, tmp_path / dtype, echo=lambda s: None)
        acc = np.asarray(res["accuracy_matrix"])
        assert acc[0, 0] > 0.8 and acc[1, 1] > 0.8, (dtype, acc)


def test_model_depth_sets_a_vits_blocks_and_is_refused_elsewhere():
    import jaxcl
    from jaxcl import config as config_lib
    from jaxcl import data, models

    c = config_lib.override(jaxcl.get_config("split_digits"), ["model.name=vit_cifar", "model.depth=2",
                                                                 "data.image_size=32"])
    config_lib.validate(c)
    info = data.StreamInfo(5, "task", (32, 32, 1), 5, 10, (2,) * 5, (2,) * 5)
    model = models.build(c.model, info)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))["params"]
    assert sorted(k for k in shapes if k.startswith("blocks_")) == ["blocks_0", "blocks_1"]  # vit_cifar has 4
    with pytest.raises(config_lib.ConfigError, match="model.depth=3: only the ViTs"):
        config_lib.validate(config_lib.override(jaxcl.get_config("split_digits"), ["model.depth=3"]))
