"""The seed methods and the baselines on a Vision Transformer (vit_cifar, width 16, on the
embedded 8x8 digits: a 2x2 grid of 4-pixel patches): PackNet prunes every dense kernel and
keeps old tasks bit-exact, NCCL calibrates every dense layer, ResCL combines dense layers
and LayerNorms and merges exactly, CLR refuses a ViT by name, every baseline trains;
seeds, a sweep and a resume in one program, fsdp."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import api, data, methods, models, optim
from jaxcl.config import ConfigError
from jaxcl.methods import nccl, rescl

VIT = {"model__name": "vit_cifar", "model__width": 16}
DENSE = ["patch_embed/proj"] + [f"blocks_{i}/{m}" for i in range(4) for m in ("attn/qkv", "attn/proj", "mlp/fc1",
                                                                              "mlp/fc2")]
NORMS = ["norm"] + [f"blocks_{i}/norm{j}" for i in range(4) for j in (1, 2)]


def node(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def built(make_config, name, model_kw=None, **sets):
    c = make_config(f"split_digits:method={name}", **{**VIT, **sets})
    stream = data.build(c)
    m = methods.build(c, models.build(c.model, stream.info, **(model_kw or {})), stream.info)
    batch = next(data.batches(data.pool(stream, 0), 16))
    return c, stream, m, batch


# ----------------------------------------------------------------------------- PackNet


@pytest.fixture(scope="module")
def packnet_run(tmp_path_factory):
    from conftest import _quiet

    from jaxcl import config as config_lib

    sets = dict(num_tasks=3, epochs=2, optimizer__momentum=0.9, optimizer__weight_decay=0.01,
                method__prune=(0.75, 0.75, -1), checkpoint__keep=5, **VIT)
    c = config_lib.override(jaxcl.get_config("split_digits:method=packnet"),
                            _quiet(**{k.replace("__", "."): v for k, v in sets.items()}))
    wd = tmp_path_factory.mktemp("packnet_vit")
    return c, wd, jaxcl.run(c, wd, echo=lambda s: None)


def test_packnet_prunes_every_dense_kernel_of_a_vit_and_keeps_old_tasks_bit_exact(packnet_run):
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
    predict = jax.jit(m.predict)
    for task in (0, 1):
        x = jnp.asarray(next(data.batches(data.pool(stream, task, "test"), 64))["x"])
        after = [np.asarray(predict(s, x, jnp.int32(task))) for s in states[task:]]
        for later in after[1:]:
            np.testing.assert_array_equal(later.view(np.uint32), after[0].view(np.uint32))
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
    c, stream, m, batch = built(make_config, name, {"depth": 1}, optimizer__name="adam", optimizer__lr=3e-3, **sets)
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


FSDP_JOB = textwrap.dedent("""
    import json, sys
    import jax, jaxcl
    from jaxcl import config as C
    out = {}
    for mesh in (["mesh.data=1"], ["mesh.data=1", "mesh.fsdp=2", "mesh.min_shard_bytes=1024"]):
        c = C.override(jaxcl.get_config("split_digits:method=ewc"),
                       ["num_tasks=2", "epochs=1", "model.name=vit_cifar", "model.width=16", "log.progress=false",
                        "log.plots=false", "log.tensorboard=false", *mesh])
        r = jaxcl.run(c, sys.argv[1] + "/" + "-".join(mesh), echo=lambda s: None)
        out[len(mesh)] = {"R": r["accuracy_matrix"], "bytes": r["state_bytes"], "mesh": r["devices"]["mesh"]}
    print("RESULT" + json.dumps(out))
""")


def test_fsdp_splits_a_vit_state_and_gives_the_same_results(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", FSDP_JOB, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])
    one, fsdp = out["1"], out["3"]
    assert fsdp["mesh"] == {"runs": 1, "data": 1, "fsdp": 2}
    np.testing.assert_allclose(np.asarray(one["R"]), np.asarray(fsdp["R"]), atol=1.5 / 72)  # at most a sample
    b = fsdp["bytes"]
    assert b["per_device_max"] < 0.6 * b["total"], b  # the dense kernels, their moments and EWC's trees split
