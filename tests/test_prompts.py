"""The pretrained-model methods (L2P, DualPrompt, CODA-Prompt, SimpleCIL, RanPAC) on the
CPU-size ViT (``vit_cifar``).

* the arithmetic against NumPy: SimpleCIL's prototypes and RanPAC's ridge classifier
  (and its choice of lambda) from the same features, L2P's prompt selection;
* on real CIFAR-10 (../shared/data): a ``vit_cifar`` pretrained here on classes 0-4
  (``model.pretrained`` = its workdir), then each method class-incremental on classes
  5-8 (2 tasks, no task id at test): it trains, its trunk is bit-identical to the
  pretrained one after every task, and it forgets less than fine-tuning;
* the paper configs (``configs/ptm_*.py``) run end to end at ``runlocal`` size under
  ``tfds.testing.mock_data`` (CIFAR-100 through grain; ImageNet-R through its one split
  cut 80/20 by ``data.tfds_splits``).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jobs import run_script

import jaxcl
from jaxcl import checkpoint, methods
from jaxcl import config as config_lib
from jaxcl.methods import _ptm, ranpac
from jaxcl.models import vit

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PTM = tuple(methods.on_a_vit())
QUIET = ["log.progress=false", "log.plots=false", "log.tensorboard=false"]
# vit_cifar with 2 of its 4 blocks (model.depth), here and in every run below: the blocks are
# alike, 2 hold a G- and an E-prompt block (DualPrompt) and prompts on more than one block
# (CODA-Prompt); the runlocal layers of those two are fitted to it (LAYERS)
DEPTH = 2
LAYERS = {"dualprompt": {"method.g_layers": "(0,)", "method.e_layers": "(1,)"},
          "coda_prompt": {"method.layers": "(0, 1)"}}


# ----------------------------------------------------------------------------- against NumPy


def test_l2p_selection_is_numpy_top_k_of_cosine_similarities():
    rng = np.random.default_rng(0)
    keys, query = rng.normal(size=(10, 16)).astype(np.float32), rng.normal(size=(12, 16)).astype(np.float32)
    cos = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
    top = np.argsort(-cos, axis=1, kind="stable")[:, :4]
    idx, sim = _ptm.select(jnp.asarray(keys), jnp.asarray(query), 4, False)
    np.testing.assert_allclose(np.asarray(sim), cos, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx), top)
    # batchwise: the 4 ids chosen most often over the batch (ties to the lower id), for every
    # sample; a masked-out sample does not vote
    mask = np.ones(12, np.float32)
    mask[0] = 0
    counts = np.bincount(top[1:].ravel(), minlength=10)
    major = np.argsort(-counts, kind="stable")[:4]
    idx, _ = _ptm.select(jnp.asarray(keys), jnp.asarray(query), 4, True, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(idx), np.broadcast_to(major, (12, 4)))


@pytest.fixture(scope="module")
def features_setup():
    """A vit_cifar, two class-incremental tasks of 3 classes on random images, and the
    model's features of every image."""
    model = vit.variant("vit_cifar")(num_heads=1, num_outputs=6, classes_per_head=(6,), depth=DEPTH)
    rng = np.random.default_rng(0)
    tasks = []
    for t in range(2):
        x = rng.uniform(size=(96, 32, 32, 3)).astype(np.float32)
        y = (3 * t + rng.integers(0, 3, 96)).astype(np.int32)
        tasks.append([{"x": x[i:i + 32], "y": y[i:i + 32]} for i in range(0, 96, 32)])
    test_x = rng.uniform(size=(20, 32, 32, 3)).astype(np.float32)
    return model, tasks, test_x


def _through_tasks(method, loop, state, tasks):
    """Every task through the trainer (begin_task, each phase's epochs over the task's
    batches, end_phase); yields each task's index and the state after it."""
    for t, batches in enumerate(tasks):
        state = loop.begin_task(state, t)
        for phase in method.phases(t):
            for _ in range(phase.epochs):
                for b in batches:
                    state, _ = loop.step(state, b, t, phase.name)
            state = loop.end_phase(state, t, phase, batches)
        yield t, state


def _run_api(name, model, tasks, **settings):
    method = jaxcl.method(name, model, tasks[0][0], num_tasks=2, scenario="class", **settings)
    assert all(phase.epochs == 0 for t in range(len(tasks)) for phase in method.phases(t))  # nothing is trained
    loop = jaxcl.trainer(method, optax.sgd(0.1))
    state = loop.init(jax.random.PRNGKey(0), tasks[0][0]["x"])
    return loop, [state for _, state in _through_tasks(method, loop, state, tasks)]


_FEATS = {}


def _feats(model, state, x, prompts=None):
    """The model's feature of ``x`` (with ``prompts``: the prompted model's) in float64."""
    if model not in _FEATS:  # jitted: op by op, every primitive of the ViT is a compile of its own
        _FEATS[model] = jax.jit(lambda p, x, prompts: model.apply({"params": p}, x, None, False, features=True,
                                                                  prompts=prompts))
    return np.asarray(_FEATS[model](state.params["params"], x, prompts), np.float64)


def test_simplecil_predictions_are_numpys_cosine_to_class_means(features_setup):
    model, tasks, test_x = features_setup
    loop, states = _run_api("simplecil", model, tasks)
    for t, state in enumerate(states):
        seen = [b for task in tasks[:t + 1] for b in task]
        f = np.concatenate([_feats(model, state, b["x"]) for b in seen])
        y = np.concatenate([b["y"] for b in seen])
        protos = np.stack([f[y == c].mean(0) for c in range(3 * (t + 1))])
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        q = _feats(model, state, test_x)
        ref = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ protos.T
        got = np.asarray(loop.predict(state, test_x, t))
        np.testing.assert_allclose(got[:, :3 * (t + 1)], ref, atol=1e-5)
        assert (got[:, 3 * (t + 1):] <= _ptm.NEG).all()  # classes not seen yet are never predicted


def test_ranpac_predictions_are_numpys_ridge_solution(features_setup):
    model, tasks, test_x = features_setup
    m = 24
    loop, states = _run_api("ranpac", model, tasks, projection=m)
    w_rand = np.asarray(states[0].extra["w_rand"], np.float64)
    g, c = np.zeros((m, m)), np.zeros((m, 6))
    for t, state in enumerate(states):
        h = np.maximum(np.concatenate([_feats(model, state, b["x"]) for b in tasks[t]]) @ w_rand, 0)
        y = np.eye(6)[np.concatenate([b["y"] for b in tasks[t]])]
        g, c = g + h.T @ h, c + h.T @ y
        # the code's choice of lambda: fit on 4 of every 5 samples, squared error on the 5th
        val = np.arange(len(h)) % 5 == 4
        losses = []
        for r in ranpac.RIDGES:
            w = np.linalg.solve(h[~val].T @ h[~val] + r * np.eye(m), h[~val].T @ y[~val])
            losses.append(np.mean((h[val] @ w - y[val]) ** 2))
        lam = ranpac.RIDGES[int(np.argmin(losses))]
        assert float(state.extra["ridge"]) == pytest.approx(lam)
        w = np.linalg.solve(g + lam * np.eye(m), c)
        ref = np.maximum(_feats(model, state, test_x) @ w_rand, 0) @ w
        got = np.asarray(loop.predict(state, test_x, t))
        n = 3 * (t + 1)
        np.testing.assert_allclose(got[:, :n], ref[:, :n], atol=1e-5 * max(1.0, np.abs(ref).max()))
        assert (got[:, n:] <= _ptm.NEG).all()


@pytest.mark.filterwarnings("ignore::jaxcl.methods.base.UntrainedBackboneWarning")
def test_simplecil_adapted_on_the_first_task_is_numpys_cosine_to_concatenated_class_means(features_setup):
    """``adapt_epochs``: APER's first-session adaptation. Prompt tokens and head train on
    task 1 only, the trunk stays bit-identical, and the prototypes and features are the
    frozen model's feature next to the prompted model's."""
    model, tasks, test_x = features_setup
    method = jaxcl.method("simplecil", model, tasks[0][0], num_tasks=2, scenario="class", adapt_epochs=2,
                          adapt_tokens=3)
    assert [p.name for p in method.phases(0)] == ["adapt", "prototypes"] and method.phases(0)[0].epochs == 2
    assert [p.name for p in method.phases(1)] == ["prototypes"]
    loop = jaxcl.trainer(method, optax.sgd(0.5))
    state = loop.init(jax.random.PRNGKey(0), tasks[0][0]["x"])
    init_tokens = np.asarray(state.params["prompt"]["tokens"])
    trunk = _trunk({"params": state.params})
    for t, state in _through_tasks(method, loop, state, tasks):
        if t == 0:
            tokens = np.asarray(state.params["prompt"]["tokens"])
            assert not np.array_equal(tokens, init_tokens)  # adapted on task 1
        np.testing.assert_array_equal(np.asarray(state.params["prompt"]["tokens"]), tokens)  # then frozen
        after = _trunk({"params": state.params})
        for k in trunk:
            np.testing.assert_array_equal(after[k], trunk[k], err_msg=k)

        def f(x):
            return np.concatenate([_feats(model, state, x), _feats(model, state, x, state.params["prompt"]["tokens"])],
                                  1)

        seen = [b for task in tasks[:t + 1] for b in task]
        fx = np.concatenate([f(b["x"]) for b in seen])
        y = np.concatenate([b["y"] for b in seen])
        protos = np.stack([fx[y == c].mean(0) for c in range(3 * (t + 1))])
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        q = f(test_x)
        ref = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ protos.T
        got = np.asarray(loop.predict(state, test_x, t))
        np.testing.assert_allclose(got[:, :3 * (t + 1)], ref, atol=1e-5)


@pytest.mark.filterwarnings("ignore::jaxcl.methods.base.UntrainedBackboneWarning")
def test_ranpac_phase_one_adapts_on_the_first_task_and_solves_on_the_adapted_features(features_setup):
    """RanPAC's Phase 1 (``adapt_epochs``): the ridge classifier of the prompted model's
    features, prompt tokens trained on task 1 only."""
    model, tasks, test_x = features_setup
    m = 16
    method = jaxcl.method("ranpac", model, tasks[0][0], num_tasks=2, scenario="class", projection=m, adapt_epochs=1)
    loop = jaxcl.trainer(method, optax.sgd(0.5))
    state = loop.init(jax.random.PRNGKey(0), tasks[0][0]["x"])
    init_tokens = np.asarray(state.params["prompt"]["tokens"])
    g, c = np.zeros((m, m)), np.zeros((m, 6))
    for t, state in _through_tasks(method, loop, state, tasks):
        batches = tasks[t]
        assert not np.array_equal(np.asarray(state.params["prompt"]["tokens"]), init_tokens)
        w_rand = np.asarray(state.extra["w_rand"], np.float64)
        f = lambda x: _feats(model, state, x, state.params["prompt"]["tokens"])  # noqa: E731
        h = np.maximum(np.concatenate([f(b["x"]) for b in batches]) @ w_rand, 0)
        y = np.eye(6)[np.concatenate([b["y"] for b in batches])]
        g, c = g + h.T @ h, c + h.T @ y
        lam = float(state.extra["ridge"])
        ref = np.maximum(f(test_x) @ w_rand, 0) @ np.linalg.solve(g + lam * np.eye(m), c)
        n = 3 * (t + 1)
        got = np.asarray(loop.predict(state, test_x, t))
        np.testing.assert_allclose(got[:, :n], ref[:, :n], atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_the_prompt_methods_differentiate_only_what_they_train():
    """The frozen trunk is behind stop_gradient in the loss (``_ptm.without_trunk_gradient``):
    its weight gradients, a third of the backward pass, are never computed. Exactly the
    leaves ``state.trainable`` trains get a gradient."""
    model = vit.variant("vit_cifar")(num_heads=1, num_outputs=4, classes_per_head=(4,), depth=DEPTH)
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    batch = {"x": x, "y": np.array([0, 1, 0, 1], np.int32), "mask": np.ones(4, np.float32)}
    layers = {"dualprompt": {"g_layers": (0,), "e_layers": (1,)}, "coda_prompt": {"layers": (0, 1)}}
    for name in ("l2p", "dualprompt", "coda_prompt"):
        m = jaxcl.method(name, model, batch, num_tasks=2, scenario="class", **layers.get(name, {}))
        state = m.begin_task(m.init(jax.random.PRNGKey(0), x), jnp.int32(0))
        inner = dict(state.params["params"])  # L2P's and DualPrompt's heads start at 0: nothing would flow back
        inner["head"] = jax.tree_util.tree_map(lambda w: jax.random.normal(jax.random.PRNGKey(2), w.shape),
                                               inner["head"])
        state = state.replace(params={**state.params, "params": inner})
        grad = jax.jit(jax.grad(m.loss, has_aux=True), static_argnums=5)  # one compile, not one per op
        grads, _ = grad(state.params, state, batch, jnp.int32(0), jax.random.PRNGKey(1), m.phases(0)[0].name)
        flags = dict(jax.tree_util.tree_flatten_with_path(state.trainable)[0])
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            if bool(np.any(flags[path])):
                assert np.any(np.asarray(g) != 0), (name, jax.tree_util.keystr(path))
            else:
                assert not np.any(np.asarray(g)), f"{name}: the frozen {jax.tree_util.keystr(path)} has a gradient"


# ----------------------------------------------------------------------------- real CIFAR-10


PRETRAIN = ("pretrain", QUIET + [
    f"data.dir={SHARED_DATA}", "model.name=vit_cifar", f"model.depth={DEPTH}", "data.class_order=(0,1,2,3,4)",
    "data.classes_per_task=5", "data.train_limit=2000", "data.test_limit=500", "epochs=5", "optimizer.name=adam",
    "optimizer.lr=1e-3", "optimizer.momentum=0.0", "optimizer.weight_decay=0.0", "optimizer.schedule=constant",
    "data.augment=false", "checkpoint.every_steps=0"])


def _cl_spec(name, pretrained_dir, data_dir, **sets) -> tuple[str, list[str]]:
    """Class-incremental CIFAR-10 classes 5-8 in 2 tasks from the pretrained trunk, with
    the runlocal settings of the paper config for ``name`` (its layers fitted to DEPTH):
    (config spec, --set strings)."""
    values = {"data.name": "cifar10", "data.source": "npz", "data.dir": str(data_dir), "data.pipeline": "memory",
              "data.image_size": 0, "data.class_order": "(5,6,7,8)", "data.classes_per_task": 2, "num_tasks": 2,
              "data.train_limit": 400, "data.test_limit": 200, "data.allow_missing_classes": False, "epochs": 3,
              "batch_size": 32, "model.pretrained": str(pretrained_dir), "checkpoint.keep": 3,
              "model.depth": DEPTH, **LAYERS.get(name, {})}
    if name == "finetune":
        values.update({"optimizer.name": "adam", "optimizer.lr": 1e-3, "optimizer.momentum": 0.0})
    if name == "coda_prompt":  # its head starts random (L2P's and DualPrompt's at zero): more steps to learn
        values.update({"optimizer.lr": 1e-2, "epochs": 4})
    values.update(sets)
    return f"ptm_cifar100:runlocal=1,method={name}", QUIET + [f"{k}={v}" for k, v in values.items()]


def _cl_config(name, pretrained_dir, data_dir, **sets):
    spec, sets = _cl_spec(name, pretrained_dir, data_dir, **sets)
    return config_lib.override(jaxcl.get_config(spec), sets)


# The block runs in one process of its own that compiles with XLA's full optimisation, as
# users do (conftest.optimized_env: its training outweighs the longer compiles): the
# pretraining (a vit_cifar on CIFAR-10 classes 0-4: the "pretrained model" of these tests),
# each method's class-incremental run from it, and CODA-Prompt killed mid-task and resumed.
# One RESULT line each.
CIFAR_SCRIPT = """
    import jax, numpy as np
    import jaxcl
    from jaxcl import checkpoint, config as C
    jobs = json.loads(args[0])

    def run(spec, sets, workdir, **kw):
        return jaxcl.run(C.override(jaxcl.get_config(spec), sets), workdir, echo=lambda s: None, **kw)

    for name, spec, sets, workdir in jobs["runs"]:  # the pretraining first
        r = run(spec, sets, workdir)
        emit(what="run", name=name, workdir=workdir, accuracy_matrix=r["accuracy_matrix"], forgetting=r["forgetting"])
    spec, sets, uncut, cut = jobs["resume"]
    full = run(spec, sets, uncut)
    # dies at the save after step 2 of task 2: resumes from step 1's
    saves = die_at_save(1, lambda: run(spec, sets, cut),
                        when=lambda meta: meta["position"]["task"] == 1 and meta["position"]["batch"] >= 2)
    resumed = run(spec, sets, cut, resume=True)
    same = jax.tree_util.tree_map(np.array_equal, checkpoint.load_state(uncut)["params"],
                                  checkpoint.load_state(cut)["params"])
    emit(what="resume", full=full["accuracy_matrix"], resumed=resumed["accuracy_matrix"], saves=saves,
         params_equal={jax.tree_util.keystr(k): bool(v) for k, v in jax.tree_util.tree_flatten_with_path(same)[0]})
"""


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """``({name: its RESULT}, the resume RESULT)`` of CIFAR_SCRIPT."""
    if not (SHARED_DATA / "cifar10.npz").exists():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("cifar")
    pre = out / "pretrain"
    runs = [("pretrain", *PRETRAIN, str(pre))]
    runs += [(name, *_cl_spec(name, pre, SHARED_DATA), str(out / name)) for name in PTM + ("finetune",)]
    # CODA-Prompt's kill-and-resume: 3 steps a task (the programs of its run above, from the
    # compile cache), a checkpoint every step
    resume = [*_cl_spec("coda_prompt", pre, SHARED_DATA, epochs=1, **{
        "data.train_limit": 96, "data.test_limit": 64, "checkpoint.every_steps": 1}), str(out / "full"), str(out / "cut")]
    found = run_script(CIFAR_SCRIPT, [json.dumps({"runs": runs, "resume": resume})], devices=1, optimized=True)
    return {x["name"]: x for x in found if x["what"] == "run"}, next(x for x in found if x["what"] == "resume")


@pytest.fixture(scope="module")
def pretrained(cifar):
    """(the pretrained vit_cifar's workdir, the data folder)."""
    return Path(cifar[0]["pretrain"]["workdir"]), SHARED_DATA


@pytest.fixture(scope="module")
def cl_runs(cifar, pretrained):
    runs, _ = cifar
    return pretrained[0], {name: (runs[name], runs[name]["workdir"]) for name in PTM + ("finetune",)}


def test_the_pretrained_model_learned_its_classes(cifar):
    assert cifar[0]["pretrain"]["accuracy_matrix"][0][0] > 0.4  # 5 classes: chance 0.2


def _trunk(state: dict) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(state["params"]["params"])[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat if "head" not in jax.tree_util.keystr(p)}


@pytest.mark.parametrize("name", PTM)
def test_trains_class_incrementally_on_real_cifar10_with_the_trunk_frozen(cl_runs, name):
    pre, runs = cl_runs
    r, wd = runs[name]
    R = np.asarray(r["accuracy_matrix"])
    assert R.shape == (2, 2) and np.isfinite(R).all()
    # two classes a task, no task id: above chance on each (R[0, 0] among 2 classes, chance
    # 0.5; R[1, 1] among the 4 seen, chance 0.25)
    assert R[0, 0] > 0.6 and R[1, 1] > 0.4, R
    before = _trunk(checkpoint.load_state(pre))
    saved = sorted((p for p in (Path(wd) / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(saved) >= 2  # one after every task
    for ck in saved:
        after = _trunk(checkpoint.load_state(ck))
        assert after.keys() == before.keys()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=f"{name}: {k} moved")


@pytest.mark.parametrize("name", PTM)
def test_forgets_less_than_finetune_on_the_same_backbone(cl_runs, name):
    _, runs = cl_runs
    ft = runs["finetune"][0]
    mine = runs[name][0]
    assert mine["forgetting"] < ft["forgetting"], (name, mine["accuracy_matrix"], ft["accuracy_matrix"])


def test_coda_prompt_freezes_the_earlier_tasks_components(cl_runs):
    _, runs = cl_runs
    wd = runs["coda_prompt"][1]
    saved = sorted((p for p in (Path(wd) / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    first, last = (checkpoint.load_state(saved[i])["params"]["prompt"] for i in (0, -1))
    half = first["k"].shape[1] // 2  # pool 20 in 2 tasks: components 0-9 are task 1's
    for k in ("k", "a", "p"):
        np.testing.assert_array_equal(first[k][:, :half], last[k][:, :half])
        assert not np.array_equal(first[k][:, half:], last[k][:, half:])  # task 2 initialised and trained its own


def test_coda_prompt_resumes_exactly_after_a_crash_mid_task(cifar):
    """CODA-Prompt changes its arrays and masks at each task start (Gram-Schmidt from the
    run's key): a run killed mid-task (CIFAR_SCRIPT) and resumed ends bit-identical to the
    one that was not."""
    r = cifar[1]
    assert r["saves"] >= 3  # it died in the second task, after saves of the first
    assert r["resumed"] == r["full"]
    assert r["params_equal"] and all(r["params_equal"].values()), r["params_equal"]


def test_l2p_seeds_and_a_pull_sweep_run_in_one_program(pretrained, tmp_path):
    pre, data_dir = pretrained
    c = _cl_config("l2p", pre, data_dir, epochs=1, **{"data.train_limit": 64, "data.test_limit": 64})
    c = config_lib.override(c, ["seeds=(0, 1)", "sweep=('method.pull=0.0,1.0',)"])
    r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    assert r["runs_in_program"] == 4
    by = {(x["setting"]["method.pull"], x["seed"]): np.asarray(x["accuracy_matrix"]) for x in r["runs"]}
    assert sorted(by) == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]
    assert all(np.isfinite(m).all() and m.shape == (2, 2) for m in by.values())
    assert not np.array_equal(by[(0.0, 0)], by[(0.0, 1)]) or not np.array_equal(by[(0.0, 0)], by[(1.0, 0)])


# ----------------------------------------------------------------------------- the paper configs


# One method a config file: each method's runlocal settings of ptm_cifar100 run on real
# CIFAR-10 above (cl_runs) and every prompt/PTM method exports on vit_cifar in test_export;
# here the TFDS -> grain path of each file (ImageNet-R's split cut 80/20 included).
@pytest.mark.parametrize("config,name", [("ptm_cifar100", "l2p"), ("ptm_imagenet_r", "ranpac")])
def test_paper_config_runs_on_mock_tfds(config, name, tmp_path):
    import tensorflow_datasets as tfds

    c = config_lib.override(jaxcl.get_config(f"{config}:runlocal=1,method={name}"),
                            QUIET + ["data.grain_workers=0", "num_tasks=2", f"model.depth={DEPTH}"])
    with tfds.testing.mock_data(num_examples=1500):  # imagenet_r: 1500 x 0.8 x 200/1000 classes in 10 tasks
        r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    assert r["data_path"] == "grain" and np.asarray(r["accuracy_matrix"]).shape == (2, 2)
    assert r["config"]["model"]["name"] == "vit_cifar" and r["config"]["data"]["image_size"] == 32


def test_paper_configs_hold_the_papers_settings():
    c = jaxcl.get_config("ptm_cifar100:method=l2p")
    config_lib.validate(c)
    assert (c.model.name, c.scenario, c.num_tasks, c.data.classes_per_task, c.data.image_size) == \
        ("vit_b16", "class", 10, 10, 224)
    m = c.method
    assert (m.pool_size, m.length, m.top_k, m.batchwise_prompt, m.pull) == (10, 10, 4, True, 1.0)
    assert c.optimizer.name == "adam" and c.optimizer.lr == pytest.approx(0.015) and c.epochs == 5
    c = jaxcl.get_config("ptm_cifar100:method=coda_prompt")
    assert (c.method.pool_size, c.method.length, c.epochs, c.optimizer.lr) == (100, 8, 20, 1e-3)
    c = jaxcl.get_config("ptm_imagenet_r:method=dualprompt")
    config_lib.validate(c)
    assert tuple(c.data.tfds_splits) == ("test[:80%]", "test[80%:]") and len(c.data.class_order) == 200
    assert (c.method.e_length, c.epochs, c.data.classes_per_task) == (20, 50, 20)
    assert jaxcl.get_config("ptm_imagenet_r:method=ranpac").method.projection == 10000


def test_settings_are_refused_by_name():
    with pytest.raises(config_lib.ConfigError, match="method.top_k"):
        config_lib.validate(config_lib.override(jaxcl.get_config("ptm_cifar100:method=l2p"), ["method.top_k=11"]))
    with pytest.raises(config_lib.ConfigError, match="method.length"):
        config_lib.validate(config_lib.override(jaxcl.get_config("ptm_cifar100:method=coda_prompt"),
                                                ["method.length=7"]))
    with pytest.raises(config_lib.ConfigError, match="method.pool_size"):
        config_lib.validate(config_lib.override(jaxcl.get_config("ptm_cifar100:method=dualprompt"),
                                                ["method.pool_size=5"]))
    with pytest.raises(config_lib.ConfigError, match="method.adapt_epochs"):
        config_lib.validate(config_lib.override(jaxcl.get_config("ptm_cifar100:method=ranpac"),
                                                ["method.adapt_epochs=-1"]))
    model = vit.variant("vit_cifar")(num_heads=1, num_outputs=4, classes_per_head=(4,))
    with pytest.raises(config_lib.ConfigError, match="method.e_layers"):
        jaxcl.method("dualprompt", model, jnp.zeros((2, 32, 32, 3)), num_tasks=2, scenario="class", e_layers=(3, 9))
