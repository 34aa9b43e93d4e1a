"""No convolution inside a loop or conditional on CPU (issue 18): XLA:CPU runs a conv
step inside a while body or a conditional branch ~20x slower, so ``loop.chunk=auto``
unrolls the chunk of a convolutional model there and masks its padding steps with
``jnp.where``; and ~7x slower vmapped over seeds (a grouped convolution), so
``loop.run_axis=auto`` calls one run's program for each seed in turn there. These tests read the compiled program, and check that the unrolled chunk
computes what the scan does (test_loop.py checks the scan against single steps and the
host path against the device path; equality with the scan carries those over)."""
import re

import chex
import jax
import numpy as np
import pytest

import jaxcl
from jaxcl import train, xla
from test_loop import _final_state, _train_rows, quiet

CNN = {"model__name": "cnn", "model__width": 4, "num_tasks": 2, "epochs": 1}
CONTROL = re.compile(r"\b(condition|body|true_computation|false_computation)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")


def convolutions_in_control_flow(hlo: str) -> tuple[int, int]:
    """(convolutions in the program, convolutions inside a while loop's condition or body
    or a conditional's branch, nested calls and fusions included), from compiled HLO text."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if head:
            name = head.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    calls = {n: set(re.findall(r"%([\w.\-]+)", " ".join(b))) & bodies.keys() for n, b in bodies.items()}
    convs = {n: sum(" convolution(" in x for x in b) for n, b in bodies.items()}
    inside, todo = set(), []
    for b in bodies.values():
        for m in CONTROL.finditer(" ".join(b)):
            todo += [m.group(2)] if m.group(2) else re.findall(r"%([\w.\-]+)", m.group(3))
    while todo:
        n = todo.pop()
        if n not in inside:
            inside.add(n)
            todo += calls.get(n, ())
    return sum(convs.values()), sum(convs[n] for n in inside)


def compiled_train_call(config) -> tuple[str, train.Setup]:
    S = train.setup(config)
    state = train._init_fn(S)(train._keys(S))
    K, B = S.steps_per_call, config.batch_size
    xs = S.feed.train_items(0, [np.arange(S.feed.size(0, "train", 0))], range(K), B, K)
    fn = S.fns["train"](S.method.phases(0)[0].name)
    return fn.lower(state, S.src.get("train"), train._items(S, xs, 1), jax.numpy.int32(0)).compile().as_text(), S


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the choice tested is the CPU one")
def test_a_conv_models_train_call_has_no_convolution_inside_control_flow_on_cpu(make_config):
    hlo, S = compiled_train_call(make_config("split_digits:method=finetune", **CNN))
    assert S.chunk == "unrolled" and S.steps_per_call == 1  # what loop.chunk=auto picks here
    total, inside = convolutions_in_control_flow(hlo)
    assert total >= 4 and inside == 0
    # the check bites: the rolled chunk (a scan of conds) has every convolution inside
    hlo, S = compiled_train_call(make_config("split_digits:method=finetune", loop__chunk="scan",
                                             loop__steps_per_call=2, **CNN))
    total, inside = convolutions_in_control_flow(hlo)
    assert S.chunk == "scan" and total >= 4 and inside == total
    # and a dense model keeps the scan: a dot inside a loop is not slow
    assert train.setup(make_config("split_digits:method=finetune")).chunk == "scan"
    # several seeds of a conv model: one run's program for each in turn (map_runs below checks their numbers on the MLP)
    S = train.setup(make_config("split_digits:method=finetune", seeds="(0, 2)", **CNN))
    assert (S.chunk, S.run_axis) == ("unrolled", "map")


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the choice tested is the CPU one")
def test_jaxcls_cpu_programs_use_xlas_own_kernels_not_ynnpack(make_config, monkeypatch):
    """jaxcl compiles for the CPU without YNNPACK's fusions (jaxcl/xla.py: its workloads
    run faster without them, benchmarks/RESULTS.md), the loop's train call included; an
    XLA_FLAGS of the user's own that names the option wins."""
    import jax.numpy as jnp

    assert xla.compiler_options() == xla.CPU_OPTIONS and xla.compiler_options("gpu") == {}
    hlo, _ = compiled_train_call(make_config("split_digits:method=finetune"))
    assert " dot(" in hlo or "dot." in hlo
    assert "__ynn_fusion" not in hlo
    # the check bites: this jaxlib's default (a plain jax.jit) puts the dot in a YNNPACK fusion
    a = jnp.ones((128, 128))
    assert "__ynn_fusion" in jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(a, a).compile().as_text()
    f = xla.jit(lambda a, b: jnp.tanh(a @ b))
    assert "__ynn_fusion" not in f.lower(a, a).compile().as_text()
    # called inside a caller's own jit (JAX takes compiler options at the top level only): part of that program
    np.testing.assert_allclose(np.asarray(jax.jit(lambda a: f(a, a) + 1)(a)), np.asarray(f(a, a)) + 1, rtol=1e-6)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    xla._cpu_options.cache_clear()
    try:
        assert xla.compiler_options() == {}
    finally:
        monkeypatch.undo()
        xla._cpu_options.cache_clear()
    assert xla.compiler_options() == xla.CPU_OPTIONS


MAP_SETS = dict(loop__steps_per_call=4, log__every_steps=3, data__shuffle_classes="true", batch_size=10,
                data__augment="true", checkpoint__every_steps=7, num_tasks=2, epochs=1)
UNROLLED_MAP = {"loop__chunk": "unrolled", "loop__run_axis": "map"}  # what auto picks for a conv model on CPU


@pytest.fixture(scope="module")
def map_runs(tmp_path_factory):
    """Two seeds of the MLP mapped (loop.run_axis=map) with the rolled chunk
    (loop.chunk=scan) and with the unrolled one, and seed 2 alone (scan). The chunk and
    run axis are model-independent code (the MLP compiles in a fraction of the cnn's time;
    the first test checks that auto picks them for a conv model)."""
    import jaxcl.config as config_lib

    def make(**sets):
        values = {"log.progress": "false", "log.plots": "false", "log.tensorboard": "false"}
        values.update({k.replace("__", "."): str(v) for k, v in {**MAP_SETS, **sets}.items()})
        return config_lib.override(jaxcl.get_config("split_digits:method=finetune"),
                                   [f"{k}={v}" for k, v in values.items()])

    tmp = tmp_path_factory.mktemp("map_runs")
    out = {"scan": jaxcl.run(make(seeds="(0, 2)", loop__chunk="scan", loop__run_axis="map"), tmp / "scan", echo=quiet),
           "map": jaxcl.run(make(seeds="(0, 2)", **UNROLLED_MAP), tmp / "map", echo=quiet),
           "single": jaxcl.run(make(seed=2, loop__chunk="scan"), tmp / "single", echo=quiet)}
    return tmp, out


def test_the_unrolled_chunk_and_the_run_map_train_on_the_same_numbers_as_scan_and_vmap(map_runs):
    """Two seeds, the same K (so the same chunks, padding included), mapped: the unrolled
    chunk against the rolled one: the same accuracy matrices, logged losses and final
    state. The seeds' streams differ in length, so the shorter run's padding steps are
    masked (unrolled) where the scan skips them. The mapped scan is each seed's single run
    bit for bit (next test), and test_loop.py checks the vmapped runs against single runs:
    the unrolled map computes what the vmapped scan does."""
    tmp, out = map_runs
    assert [out["map"]["runs"][0][k] for k in ("loop_chunk", "run_axis")] == ["unrolled", "map"]
    assert [out["scan"]["runs"][0][k] for k in ("loop_chunk", "run_axis")] == ["scan", "map"]
    batches = [x["stream"]["train_sizes"][0] // 10 for x in out["map"]["runs"]]
    assert batches[0] != batches[1]  # the runs really have different numbers of batches
    for r in ("seed_0", "seed_2"):
        a, b = _train_rows(tmp / "scan" / r), _train_rows(tmp / "map" / r)
        assert [x["step"] for x in a] == [x["step"] for x in b]
        np.testing.assert_allclose([x["loss"] for x in b], [x["loss"] for x in a], rtol=1e-4)
    chex.assert_trees_all_close([x["accuracy_matrix"] for x in out["map"]["runs"]],
                                [x["accuracy_matrix"] for x in out["scan"]["runs"]], atol=0.005)
    chex.assert_trees_all_close(_final_state(tmp / "map")["params"], _final_state(tmp / "scan")["params"],
                                atol=1e-4, rtol=1e-4)


def test_each_seed_of_a_mapped_run_is_its_single_run_bit_for_bit(map_runs):
    """With loop.run_axis=map each seed runs one run's program: the same accuracy matrix
    and logged rows as its single run, bit for bit (with the rolled chunk: the unrolled
    map's programs agree with one run's bit for bit only under XLA's full optimisation,
    which the test session turns off to halve its compile time, as the cnn's do)."""
    tmp, out = map_runs
    multi, single = out["scan"], out["single"]
    assert multi["runs"][1]["run_axis"] == "map" and multi["runs"][1]["seed"] == 2
    assert single["accuracy_matrix"] == multi["runs"][1]["accuracy_matrix"]
    assert _train_rows(tmp / "single") == _train_rows(tmp / "scan" / "seed_2")


def test_the_nan_check_names_the_exact_step_inside_an_unrolled_chunk(make_config, tmp_path):
    """lr=1e30: step 0 is finite, step 1 is not (as with one step per call in test_loop)."""
    c = make_config("split_digits:method=finetune", optimizer__lr=1e30, loop__chunk="unrolled",
                    loop__steps_per_call=3)
    with pytest.raises(train.NonFiniteLossError, match="epoch 0: global step 1 "):
        jaxcl.run(c, tmp_path, echo=quiet)


def test_bad_loop_kinds_are_refused_by_name(make_config):
    with pytest.raises(jaxcl.ConfigError, match="loop.chunk: 'rolled' is not one of auto, scan, unrolled"):
        jaxcl.config.validate(make_config(loop__chunk="rolled"))
    with pytest.raises(jaxcl.ConfigError, match="loop.run_axis: 'pmap' is not one of auto, vmap, map"):
        jaxcl.config.validate(make_config(loop__run_axis="pmap"))
