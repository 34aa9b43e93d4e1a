"""The seed methods and the baselines on a Vision Transformer (vit_cifar, width 16, 2 blocks
(``model.depth``; every layer kind and a block after the first), on the embedded 8x8
digits: a 2x2 grid of 4-pixel patches): PackNet prunes every dense kernel, NCCL calibrates
every dense layer, ResCL combines dense layers and LayerNorms and merges exactly, CLR
refuses a ViT by name, every baseline trains; seeds, a sweep and a resume in one program;
fsdp splits every dense kernel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import api, data, methods, models, optim, sharding
from jaxcl.config import ConfigError
from jaxcl.methods import nccl, rescl

DEPTH = 2  # vit_cifar has 4: the blocks are alike, 2 show that every one is reached, not only the first
VIT = {"model__name": "vit_cifar", "model__width": 16, "model__depth": DEPTH}
DENSE = ["patch_embed/proj"] + [f"blocks_{i}/{m}" for i in range(DEPTH) for m in ("attn/qkv", "attn/proj", "mlp/fc1",
                                                                                  "mlp/fc2")]
NORMS = ["norm"] + [f"blocks_{i}/norm{j}" for i in range(DEPTH) for j in (1, 2)]


def node(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def built(make_config, name, **sets):
    c = make_config(f"split_digits:method={name}", **{**VIT, **sets})
    stream = data.build(c)
    m = methods.build(c, models.build(c.model, stream.info), stream.info)
    batch = next(data.batches(data.pool(stream, 0), 16))
    return c, stream, m, batch


# ----------------------------------------------------------------------------- PackNet


@pytest.fixture(scope="module")
def packnet_run(tmp_path_factory):
    from conftest import _quiet

    from jaxcl import config as config_lib

    sets = dict(num_tasks=3, epochs=1, optimizer__momentum=0.9, optimizer__weight_decay=0.01,
                method__prune=(0.75, 0.75, -1), checkpoint__keep=5, **VIT)
    c = config_lib.override(jaxcl.get_config("split_digits:method=packnet"),
                            _quiet(**{k.replace("__", "."): v for k, v in sets.items()}))
    wd = tmp_path_factory.mktemp("packnet_vit")
    return c, wd, jaxcl.run(c, wd, echo=lambda s: None)


def test_packnet_prunes_every_dense_kernel_of_a_vit_and_freezes_the_rest_after_task_0(packnet_run):
    """What is a ViT's own: every dense kernel (the patch embedding's included) is owned
    weight by weight, the LayerNorms, biases, cls token and position embedding are frozen
    after task 0. That old tasks' predictions stay bit-exact under later tasks is
    test_packnet.py::test_old_tasks_are_bitwise_untouched_by_later_tasks (an MLP and two
    ResNets: the same method code)."""
    from test_packnet import restore_all

    c, wd, r = packnet_run
    R = np.asarray(r["accuracy_matrix"])
    assert r["bwt"] == 0.0 and (R[1:, 0] == R[0, 0]).all() and R[2, 1] == R[1, 1]
    assert np.diag(R).min() > 0.6, R  # learned, not just frozen
    stream, m, states = restore_all(c, wd)
    owner = states[-1].extra["owner"]["params"]
    for path in DENSE:  # every dense kernel, the patch embedding included, is owned weight by weight
        o = np.asarray(node(owner, path)["kernel"])
        assert o.ndim == 2 and set(np.unique(o)) <= {0, 1, 2, 3} and (o == 1).mean() > 0.1, path
    for path in NORMS:  # LayerNorms, biases, cls token, position embedding: trained on task 0, frozen after
        assert node(owner, path)["scale"].ndim == 0
    for s in states[1:]:  # the weights themselves (numpy on the checkpoints: no compile)
        for (path, w0), w, o in zip(jax.tree_util.tree_flatten_with_path(states[0].params)[0],
                                    jax.tree_util.tree_leaves(s.params),
                                    jax.tree_util.tree_leaves(states[0].extra["owner"])):
            w0, w = np.asarray(w0), np.asarray(w)
            if o.ndim:
                keep = np.asarray(o) == 1
                np.testing.assert_array_equal(w[keep].view(np.uint32), w0[keep].view(np.uint32))
            elif not models.layers.is_per_task(path):
                np.testing.assert_array_equal(w.view(np.uint32), w0.view(np.uint32), err_msg=str(path))


def test_packnet_per_task_norm_is_refused_on_a_vit(make_config):
    with pytest.raises(ValueError, match="method.task_norm needs a model with batch norm; vit_cifar has none"):
        built(make_config, "packnet", method__task_norm=True)


# ----------------------------------------------------------------------------- NCCL


def test_nccl_calibrates_every_dense_layer_and_starts_as_the_plain_vit(make_config):
    c, stream, m, batch = built(make_config, "nccl")
    state = m.init(jax.random.PRNGKey(0), batch["x"])
    calib = state.params["calib"]
    for path in DENSE:
        width = node(state.params["params"], path)["kernel"].shape[1]
        assert {k: v.shape for k, v in node(calib, path).items()} == {"psi": (width,), "b": (width,),
                                                                       "lam": (width,)}, path
    plain = models.build(c.model, stream.info)
    x, t = jnp.asarray(batch["x"]), jnp.int32(0)
    np.testing.assert_allclose(nccl.calibrated(plain).apply(state.params, x, t, False),
                               plain.apply({"params": state.params["params"]}, x, t, False), atol=1e-6)
    # a perturbed calibration changes the output: it really acts on the layers
    moved = {**state.params, "calib": jax.tree_util.tree_map(lambda a: a * 1.1 + 0.01, calib)}
    assert np.abs(nccl.calibrated(plain).apply(moved, x, t, False)
                  - plain.apply({"params": state.params["params"]}, x, t, False)).max() > 1e-3


# ----------------------------------------------------------------------------- ResCL


def test_rescl_merge_on_a_vit_is_exact_with_layernorms_combined(make_config):
    c, stream, m, batch = built(make_config, "rescl", scenario="task")
    x = jnp.asarray(batch["x"])
    state = m.init(jax.random.PRNGKey(0), x)
    ks = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
    state = state.replace(params=jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(next(ks), a.shape),
                                                        state.params))
    for path in DENSE + NORMS:  # every dense layer and LayerNorm has its combination
        assert set(node(state.params["rescl"], path)) == {"a_s", "a_t"}, path
    for path in NORMS:
        assert set(node(state.params["params"], path)) == {"scale", "bias", "target_scale", "target_bias"}
    comb = rescl._clone(models.build(c.model, stream.info), "combined", (0.0, 0.0))
    t = jnp.int32(1)
    before = comb.apply(state.params, x, t, False)
    merged = jax.jit(m.after_phase, static_argnums=2)(state, t, "combine")
    after = m.predict(merged, x, t)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(jnp.abs(before).max()))
    assert float(jnp.abs(before).max()) > 1.0
    # the merged network is the plain ViT, of exactly its size
    plain = models.build(c.model, stream.info)
    n_plain = sum(a.size for a in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x))["params"]))
    assert rescl.param_report(merged.params)["merged_network"] == n_plain
    # a LayerNorm's merged affine is the combination of its two
    n0, a0 = node(state.params["params"], "blocks_0/norm1"), node(state.params["rescl"], "blocks_0/norm1")
    np.testing.assert_allclose(node(merged.params["params"], "blocks_0/norm1")["scale"],
                               (1 + a0["a_s"]) * n0["scale"] + a0["a_t"] * n0["target_scale"], rtol=1e-6)


# ----------------------------------------------------------------------------- CLR


def test_clr_refuses_a_vit_by_name(make_config):
    with pytest.raises(ConfigError, match="model.name=vit_cifar: CLR reprograms the feature maps of convolutions"):
        built(make_config, "clr", scenario="task")


# ----------------------------------------------------------------------------- every method trains


BASELINES = ["finetune", "joint", "ewc", "online_ewc", "si", "lwf", "er", "agem", "derpp", "sgd_ll", "packnet",
             "rescl", "nccl"]


@pytest.mark.parametrize("name", BASELINES)
def test_every_method_trains_a_vit(make_config, name):
    """Eight steps on one batch of task 0 (the first phase) of a 1-block vit_cifar (a
    quarter of the compile; every layer kind is still there): the loss falls and the
    parameters move."""
    sets = {"scenario": "task"} if name == "rescl" else {}
    if name == "nccl":
        sets.update({"method__inner_steps": 2, "online": True, "batch_size": 8})
    c, stream, m, batch = built(make_config, name, optimizer__name="adam", optimizer__lr=3e-3,
                               **{**sets, "model__depth": 1})
    tr = api.trainer(m, optim.make(c.optimizer))
    state = tr.begin_task(tr.init(jax.random.PRNGKey(0), batch["x"]), 0)
    before = jax.tree_util.tree_map(np.asarray, state.params)  # the step donates its state

    def ce(state):  # the model's own cross-entropy on the batch (NCCL's step loss is its outer objective)
        logits = tr.predict(state, batch["x"], batch["task"])
        return float(-jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(batch["y"])), batch["y"]]))

    first = ce(state)
    phase = m.phases(0)[0].name
    losses = []
    for _ in range(8):
        state, met = tr.step(state, batch, 0, phase)
        losses.append(float(met["loss"]))
    assert np.isfinite(losses).all(), losses
    assert ce(state) < first, (first, ce(state))
    moved = [bool(jnp.any(a != b)) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                   jax.tree_util.tree_leaves(state.params))]
    assert any(moved)
    assert tr.predict(state, batch["x"], batch["task"]).shape == (len(batch["y"]), stream.info.num_outputs)


# ----------------------------------------------------------------------------- seeds, sweep, resume, fsdp


def test_seeds_and_a_sweep_in_one_program_resume_to_the_same_results(make_config, tmp_path, crash_at_save):
    c = make_config("split_digits:method=finetune", num_tasks=2, epochs=1, seeds=(0, 1),
                    sweep=("optimizer.lr=0.005,0.01",), checkpoint__every_steps=5, **VIT)
    full = jaxcl.run(c, tmp_path / "full", echo=lambda s: None)
    assert len(full["runs"]) == 4
    Rs = [np.asarray(r["accuracy_matrix"]) for r in full["runs"]]
    assert all(R.shape == (2, 2) for R in Rs) and len({R.tobytes() for R in Rs}) == 4  # four different runs
    crash_at_save(lambda: jaxcl.run(c, tmp_path / "cut", echo=lambda s: None), 3)
    resumed = jaxcl.run(c, tmp_path / "cut", resume=True, echo=lambda s: None)
    assert [r["accuracy_matrix"] for r in resumed["runs"]] == [r["accuracy_matrix"] for r in full["runs"]]


def test_fsdp_splits_every_dense_kernel_of_a_vit_state(make_config):
    """What mesh.fsdp does to a ViT's state, read from jaxcl.sharding's rules on the state of
    an abstract init (no devices, no compile): every dense kernel, the patch embedding's
    included, and every tree that shadows it (the optimizer's trace, EWC's importance,
    accumulator and anchor) is split in two, so a device holds well under the whole. That
    such a placed state trains to the results of one device is
    test_distributed.py::test_data_parallel_and_fsdp_agree_with_one_device (ewc, packnet on
    8 virtual devices; what this file ran for a ViT until now, in its own process), and that
    the bytes of an abstract state are those of the placed one is
    test_sharding.py::test_bytes_of_an_abstract_state_are_those_of_the_placed_state."""
    c, stream, m, batch = built(make_config, "ewc", num_tasks=2)
    tx = optim.make(c.optimizer)

    def init(rng):  # the state a run places (train.setup: the method's init and the optimizer's)
        s = m.init(rng, batch["x"])
        return s.replace(opt_state=tx.init(s.params))

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    mesh = jax.sharding.AbstractMesh((1, 1, 2), sharding.MESH_AXES)  # mesh.data=1 x mesh.fsdp=2
    shardings = sharding.state_shardings(abstract, mesh, min_bytes=1024)  # mesh.min_shard_bytes=1024
    split, total, per_device = {}, 0, 0
    for (path, a), sh in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree_util.tree_leaves(shardings)):
        path, size = sharding._path(path), np.dtype(a.dtype).itemsize
        total += int(np.prod(a.shape)) * size
        per_device += int(np.prod(sh.shard_shape(a.shape))) * size
        for d in DENSE:
            if path.endswith(f"/{d}/kernel") and a.ndim:  # (a scalar leaf there: its trainable flag)
                split.setdefault(d, []).append((path.split("/")[0], "fsdp" in sh.spec))
    for d in DENSE:  # the parameter, the optimizer's trace and EWC's three trees: all split
        assert sorted(split[d]) == [("extra", True)] * 3 + [("opt_state", True), ("params", True)], (d, split[d])
    assert per_device < 0.6 * total, (per_device, total)  # the dense kernels, their moments and EWC's trees split
