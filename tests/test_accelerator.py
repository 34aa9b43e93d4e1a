"""The accelerator subset: ``pytest -m accelerator``, which benchmarks/accelerator.py runs on
a lent GPU/TPU. Every method trains two tasks there, the host and device input paths train
on the same numbers there, and bfloat16 steps stay finite there. On CPU they repeat what
test_methods and test_loop already check, so they are skipped on CPU unless
JAXCL_ACCELERATOR_TESTS=1 (the accelerator script's dry run sets it for one of them)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcl
from jaxcl import methods, optim, train

pytestmark = [
    pytest.mark.accelerator,
    pytest.mark.skipif(jax.default_backend() == "cpu" and not os.environ.get("JAXCL_ACCELERATOR_TESTS"),
                       reason="accelerator subset: on CPU test_methods/test_loop cover it "
                              "(JAXCL_ACCELERATOR_TESTS=1 runs it)"),
]

NEEDS = {"clr": {"model__name": "cnn", "model__width": 8}}  # settings a method needs to be built at all


def quiet(s):
    return None


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


# the prompt/PTM methods need a pretrained ViT to learn: tests/test_prompts.py pretrains one
@pytest.mark.parametrize("name", [n for n in methods.available() if n not in methods.on_a_vit()])
def test_every_method_trains_two_tasks_on_the_device(make_config, tmp_path, name):
    c = make_config(f"split_digits:method={name}", num_tasks=2, epochs=1, **NEEDS.get(name, {}))
    r = jaxcl.run(c, tmp_path, echo=quiet)
    assert r["devices"]["platform"] == jax.default_backend()
    R = np.asarray(r["accuracy_matrix"])
    assert R.shape == (2, 2) and np.isfinite(R).all()
    assert R[0, 0] > 0.6 and R[1, 1] > 0.6, R  # each task learned (2 classes: chance is 0.5)
    assert r["train_steps"] > 0 and np.isfinite(_losses(tmp_path)).all()


def test_host_and_device_paths_train_on_the_same_numbers_on_the_device(make_config, tmp_path):
    runs = {}
    for where in ("false", "true"):
        c = make_config("split_digits:method=ewc", num_tasks=2, data__on_device=where, log__every_steps=2)
        runs[where] = jaxcl.run(c, tmp_path / where, echo=quiet)
    assert runs["false"]["data_path"] == "host" and runs["true"]["data_path"] == "device"
    # two programs (batches passed in, or gathered inside): their float sums may be fused
    # differently, so the losses agree to rounding and the matrices to one test image
    np.testing.assert_allclose(_losses(tmp_path / "true"), _losses(tmp_path / "false"), rtol=1e-4, atol=1e-5)
    diff = np.abs(np.asarray(runs["true"]["accuracy_matrix"]) - np.asarray(runs["false"]["accuracy_matrix"]))
    assert diff.max() <= 1 / min(runs["true"]["stream"]["test_sizes"]) + 1e-9


def test_a_bfloat16_run_trains_with_finite_losses(make_config, tmp_path):
    c = make_config("split_digits:method=finetune", num_tasks=2, epochs=1, model__dtype="bfloat16",
                    log__every_steps=1)
    r = jaxcl.run(c, tmp_path, echo=quiet)
    losses = _losses(tmp_path)
    assert losses and np.isfinite(losses).all()
    R = np.asarray(r["accuracy_matrix"])
    assert R[0, 0] > 0.6 and R[1, 1] > 0.6, R


def test_a_bfloat16_resnet_step_is_finite_and_keeps_float32_params(method_setup):
    c, stream, m, state, batch = method_setup("finetune", model__name="reduced_resnet18", model__dtype="bfloat16")
    tx = optim.make(c.optimizer)
    state = state.replace(opt_state=tx.init(state.params))
    before = jax.device_get(state.params)
    step = jax.jit(train.make_train_step(m, tx, augment=False), static_argnums=3)
    for _ in range(3):
        state, metrics = step(state, batch, jnp.int32(0), "train")
        assert np.isfinite(float(metrics["loss"]))
    leaves = jax.tree_util.tree_leaves(state.params)
    assert all(a.dtype == jnp.float32 and np.isfinite(np.asarray(a)).all() for a in leaves)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before), leaves)]
    assert any(moved)


@pytest.mark.parametrize("name", methods.on_a_vit())
def test_a_bfloat16_vit_step_of_every_prompt_method_is_finite_and_keeps_the_trunk(name):
    """The prompt/PTM methods on a bfloat16 ViT: a train step (the training ones; SimpleCIL
    and RanPAC with their first-session adaptation) and the statistics pass stay finite,
    the float32 trunk keeps its bits."""
    from jaxcl.models import vit

    model = vit.variant("vit_cifar")(num_heads=1, num_outputs=4, classes_per_head=(4,), depth=2, dtype="bfloat16")
    rng = np.random.default_rng(0)
    batch = {"x": rng.uniform(size=(8, 32, 32, 3)).astype(np.float32), "y": rng.integers(0, 2, 8).astype(np.int32),
             "mask": np.ones(8, np.float32)}
    settings = {"dualprompt": {"g_layers": (0,), "e_layers": (1,)}, "coda_prompt": {"layers": (0, 1)},
                "simplecil": {"adapt_epochs": 1}, "ranpac": {"adapt_epochs": 1, "projection": 64}}
    m = jaxcl.method(name, model, batch, num_tasks=2, scenario="class", **settings.get(name, {}))
    loop = jaxcl.trainer(m, optax.adam(1e-3), check_values=False)
    state = loop.begin_task(loop.init(jax.random.PRNGKey(0), batch["x"]), 0)
    trunk = [np.asarray(a) for a in jax.tree_util.tree_leaves(state.params["params"]["blocks_0"])]
    for phase in m.phases(0):
        for _ in range(phase.epochs and 2):
            state, metrics = loop.step(state, batch, 0, phase.name)
            assert np.isfinite(float(metrics["loss"])), (name, phase.name)
        state = loop.end_phase(state, 0, phase, [batch])
    assert all(np.isfinite(np.asarray(a, np.float32)).all() for a in jax.tree_util.tree_leaves(state.extra))
    assert np.isfinite(np.asarray(loop.predict(state, batch["x"], 0), np.float32)[:, :2]).all()
    after = [np.asarray(a) for a in jax.tree_util.tree_leaves(state.params["params"]["blocks_0"])]
    assert all(a.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(after, trunk))
