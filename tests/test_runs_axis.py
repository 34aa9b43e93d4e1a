"""The ``runs`` mesh axis: the runs of ``--seeds``/``--sweep`` split over groups of
devices. Each run's results equal the one-device program's, no collective of the
compiled train step crosses a run group (read from the HLO), checkpoints resume exactly,
and a number of runs the axis does not divide is refused by name.

The layouts need several devices: every single-process case runs in one subprocess of 4
virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``), every
2-process case in one local job (each fresh process pays the jax import and its compiles).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _jobs import launch, run_script
from conftest import xla_flags_without_devices
from jax.sharding import AbstractMesh, PartitionSpec as P

import jaxcl
from jaxcl import config as config_lib
from jaxcl import sharding

QUIET = ["log.progress=false", "log.plots=false", "log.tensorboard=false"]
SHORT = ["num_tasks=2", "epochs=1", *QUIET]
FAMILIES = {  # one method per family: its sets on top of SHORT
    "ewc": [],  # regulariser
    "packnet": [],  # per-run pruning masks
    "er": ["data.stream=permuted", "scenario=domain", "data.classes_per_task=10", "online=true",
           "batch_size=10"],  # replay, and a stream that differs per seed: a resident copy per run
    "clr": ["model.name=cnn", "loop.run_axis=vmap"],  # per-task kernels of a conv model (vmapped convolutions;
    # auto would run a conv model's runs one after another on CPU: the ewc map case below)
    "nccl": ["online=true", "batch_size=8", "method.inner_steps=2"],  # calibration
    "rescl": [],  # residual branches
}
COLLECTIVE = re.compile(r" (all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)(-start)?\(")

# One process of 4 devices runs every single-process case (argv: out dir) and prints one
# "RESULT {json}" line per case: the results of 1 and 2 run groups, a run killed at a save
# and resumed on 2 run groups and on one device, and the HLO of the train step of every
# family and layout. The compiles are shared: the HLO of ewc, packnet and er is that of
# the train calls their 2-group runs made (the same program, read back from the compile
# cache), and the killed ewc run is the 2-group run of the results (the same config),
# resumed onto one device with the 1-group run's program.
SCRIPT = """
    import jax, jax.numpy as jnp, numpy as np
    import jaxcl
    from jaxcl import config as C, train
    from jaxcl.checkpoint import Checkpointer
    assert jax.device_count() == 4, jax.devices()
    FAMILIES, SHORT, EWC = json.loads(%r), %r, %r
    out = args[0]
    made = []  # every Setup the runs build
    real_setup = train.setup
    train.setup = lambda c: made.append(real_setup(c)) or made[-1]

    def config(name, *sets):
        return C.override(jaxcl.get_config(f"split_digits:method={name}"), SHORT + FAMILIES.get(name, []) + list(sets))

    def hlo(S, case):
        # the compiled train chunk of every phase of task 0 (the run's K: the run's program), as XLA's text
        state = train._init_fn(S)(train._keys(S))
        B, K = S.config.batch_size, S.steps_per_call
        xs = S.feed.train_items(S.pool_tasks(0), [np.arange(B)] * S.R, range(K), B, K)
        xs = train._items(S, xs, 2)
        paths = {}
        for ph in S.method.phases(0):
            paths[ph.name] = f"{out}/{case}_{ph.name}.hlo"
            text = S.fns["train"](ph.name).lower(state, S.src.get("train"), xs, jnp.int32(0)).compile().as_text()
            open(paths[ph.name], "w").write(text)
        return paths

    cases = {"ewc": EWC, "packnet": ["seeds=(0,1)"],
             "er": ["seeds=(0,1)"], "ewc_map": EWC + ["loop.run_axis=map"]}
    for name, sets in cases.items():
        for runs in (1, 2):
            r = jaxcl.run(config(name.split("_")[0], *sets, f"mesh.runs={runs}", "mesh.data=1"), f"{out}/{name}{runs}",
                          echo=lambda s: None)
            S = made[-1]
            src = {k: (str(a.sharding.spec), list(a.sharding.shard_shape(a.shape)), list(a.shape))
                   for k, a in (S.src.get("train") or {}).items()}
            emit(what="results", case=name, runs=runs, workdir=f"{out}/{name}{runs}", devices=r["devices"],
                 run_axis=S.run_axis,
                 state_bytes=r["state_bytes"], src=src, per_run=S.feed.per_run,
                 matrices=[[x["setting"], x["seed"], x["accuracy_matrix"]] for x in r["runs"]])
        if S.run_axis == "vmap":  # the runs on 2 run groups of one device each
            emit(what="hlo", case=name, hlo=hlo(S, name), group=1, runs=S.R)
    for name in ("clr", "nccl", "rescl"):  # the other families, the same layout
        S = train.setup(config(name, "seeds=(0,1)", "mesh.runs=2", "mesh.data=1"))
        emit(what="hlo", case=name, hlo=hlo(S, name), group=1, runs=S.R)
    for runs, data in ((2, 2), (1, 4)):  # groups of 2 devices; and the control: one group of 4
        S = train.setup(config("ewc", "seeds=(0,1)", f"mesh.runs={runs}", f"mesh.data={data}"))
        emit(what="hlo", case=f"ewc_runs{runs}_data{data}", hlo=hlo(S, f"ewc_runs{runs}_data{data}"), group=data)

    c = config("ewc", *cases["ewc"], "mesh.runs=2", "mesh.data=1")  # the ewc run of 2 groups above
    saves = die_at_save(4, lambda: jaxcl.run(c, f"{out}/cut", echo=lambda s: None))
    import shutil
    shutil.copytree(f"{out}/cut", f"{out}/cut_one_group")
    resumed = jaxcl.run(c, f"{out}/cut", resume=True, echo=lambda s: None)
    # the checkpoint holds global arrays: it may continue on another layout (one device)
    other = jaxcl.run(C.override(c, ["mesh.runs=1"]), f"{out}/cut_one_group", resume=True, echo=lambda s: None)
    states = []
    for d in ("ewc2", "cut"):
        import orbax.checkpoint as ocp
        ck = Checkpointer(f"{out}/{d}/checkpoints")
        st = ocp.StandardCheckpointer().restore(ck.directory / str(ck.latest()) / "state")
        states.append([np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(st)])
    emit(what="resume", resumed=[x["accuracy_matrix"] for x in resumed["runs"]], states_equal=states[0] == states[1],
         other=[x["accuracy_matrix"] for x in other["runs"]], other_mesh=other["devices"]["mesh"],
         saves_before_crash=saves)
"""
# ewc killed at its 4th save (of 7) and resumed, here on 4 devices and in the 2-process job below
EWC_RESUME = ["checkpoint.every_steps=5", "loop.steps_per_call=3"]
EWC_CASE = ["seeds=(0,1)", "sweep=('method.ewc_lambda=1,1000',)", *EWC_RESUME]
SCRIPT = SCRIPT % (json.dumps(FAMILIES), SHORT, EWC_CASE)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Every case of SCRIPT, by kind."""
    out = {}
    for x in run_script(SCRIPT, [str(tmp_path_factory.mktemp("four"))], devices=4):
        out.setdefault(x["what"], []).append(x)
    return out


@pytest.fixture(scope="module")
def hlo(four):
    return {x["case"]: x for x in four["hlo"]}


@pytest.fixture(scope="module")
def results(four):
    out = {}
    for x in four["results"]:
        out.setdefault(x["case"], {})[x["runs"]] = x
    return out


# ----------------------------------------------------------------------------- reading the HLO


def _texts(case: dict) -> dict:
    return {phase: Path(p).read_text() for phase, p in case["hlo"].items()}


def replica_groups(line: str, n_devices: int) -> list[list[int]]:
    """The device groups of one collective of XLA's HLO text, in any of its spellings:
    ``{{0,1},{2,3}}``, the iota form ``[2,2]<=[4]`` / ``[2,2]<=[2,2]T(1,0)``, the mesh
    form ``mesh['axis_0'=2,'axis_1'=2] {'axis_1'}``, ``source_target_pairs`` of a
    permute, and ``{}`` (every device in one group)."""
    if m := re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    if m := re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        shape, dims = [int(x) for x in m.group(1).split(",")], [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        reduced = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
        kept = [i for i in range(len(names)) if i not in reduced]
        ids = np.arange(int(np.prod(sizes))).reshape(sizes).transpose(kept + reduced)
        return ids.reshape(-1, int(np.prod([sizes[i] for i in reduced]))).tolist()
    if m := re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line):
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        return groups or [list(range(n_devices))]
    raise AssertionError(f"no replica groups found in: {line[:300]}")


def crossing(hlo_text: str, group: int, n_devices: int = 4) -> list[str]:
    """The collectives of ``hlo_text`` whose device groups span more than one run group
    (run group g = devices g*group .. (g+1)*group-1, the mesh's runs-major layout)."""
    bad = []
    for line in hlo_text.splitlines():
        if COLLECTIVE.search(line):
            for g in replica_groups(line, n_devices):
                if len({d // group for d in g}) > 1:
                    bad.append(line.strip()[:200])
                    break
    return bad


def collectives(hlo_text: str) -> list[str]:
    return [line.strip()[:200] for line in hlo_text.splitlines() if COLLECTIVE.search(line)]


def test_replica_group_spellings_are_read():
    assert replica_groups("x = all-reduce(y), replica_groups={{0,1},{2,3}}, to_apply=z", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,2]<=[4], use_global", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,2]<=[2,2]T(1,0), use", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, use", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups={}, to_apply", 4) == [[0, 1, 2, 3]]
    assert replica_groups("source_target_pairs={{0,1},{1,0}}, ", 4) == [[0, 1], [1, 0]]


# ----------------------------------------------------------------------------- no collective crosses runs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_with_one_device_per_run_group_the_train_step_has_no_collective(hlo, family):
    """The runs over mesh.runs=2 x data=1 (ewc: its 4 runs of sweep x seeds, 2 a group; the
    others 2 seeds): every phase's train step of every method family compiles to a program
    without a single collective (each group trains its runs alone)."""
    phases = _texts(hlo[family])
    assert phases and hlo[family]["runs"] == (4 if family == "ewc" else 2)
    for phase, text in phases.items():
        assert "shard_map" in text  # really the per-group program
        assert collectives(text) == [], (family, phase, collectives(text)[:3])


def test_inside_a_run_group_collectives_stay_in_the_group(hlo):
    """mesh.runs=2 x data=2: the batch is split inside each group, so the gradients are
    all-reduced, but only among the group's two devices; the control layout (one group
    of 4, data=4) all-reduces across all four, which the same reading catches."""
    inside = _texts(hlo["ewc_runs2_data2"])["train"]
    assert collectives(inside), "data=2 inside a group should all-reduce the gradients"
    assert crossing(inside, group=2) == []
    control = _texts(hlo["ewc_runs1_data4"])["train"]
    assert crossing(control, group=2), "a 4-device all-reduce should count as crossing 2-device groups"


# ----------------------------------------------------------------------------- results


@pytest.mark.parametrize("family", ["ewc", "packnet", "er"])
def test_each_run_equals_the_one_device_program(results, family):
    one, split = results[family][1], results[family][2]
    assert one["devices"]["count"] == 1 and split["devices"]["count"] == 2
    assert split["devices"]["mesh"] == {"runs": 2, "data": 1, "fsdp": 1}
    assert [m[:2] for m in one["matrices"]] == [m[:2] for m in split["matrices"]]
    for (_, seed, a), (_, _, b) in zip(one["matrices"], split["matrices"]):
        assert a == b, (family, seed, a, b)  # the same numbers, bit for bit
    assert one["matrices"][0][2] != one["matrices"][1][2]  # the runs differ
    # each device holds half of the state: the runs are split, nothing else is
    b1, b2 = one["state_bytes"], split["state_bytes"]
    assert b2["total"] == b1["total"] and b2["devices"] == 2 and b2["per_device_max"] == b1["total"] // 2


def test_each_group_runs_its_runs_one_after_another_with_run_axis_map(results):
    """loop.run_axis=map (auto's choice for a convolutional step on CPU) over mesh.runs=2:
    the 4 runs of sweep x seeds, 2 per group, each group's one after another and the two
    groups side by side. Every run computes its single run's program, so its accuracies
    are the one-group map's bit for bit and its logged losses the same to XLA's rounding;
    and they agree with the vmapped runs."""
    one, two = results["ewc_map"][1], results["ewc_map"][2]
    assert one["run_axis"] == two["run_axis"] == "map" and results["ewc"][2]["run_axis"] == "vmap"
    assert two["devices"]["mesh"] == {"runs": 2, "data": 1, "fsdp": 1} and one["devices"]["mesh"]["runs"] == 1
    assert [m[:2] for m in two["matrices"]] == [m[:2] for m in results["ewc"][2]["matrices"]]  # the same runs
    assert [m[2] for m in two["matrices"]] == [m[2] for m in one["matrices"]]
    assert two["matrices"][0][2] != two["matrices"][1][2]  # the seeds differ

    def losses(case, setting, seed):  # the logged train losses of one run
        f = Path(case["workdir"]) / f"method.ewc_lambda={setting}" / f"seed_{seed}" / "metrics.jsonl"
        return [x["loss"] for x in map(json.loads, f.read_text().splitlines()) if x["kind"] == "train"]

    for setting in (1, 1000):
        for seed in (0, 1):  # the one-run program inside the groups' program: XLA may round differently
            np.testing.assert_allclose(losses(two, setting, seed), losses(one, setting, seed), rtol=1e-6)
    # each group's runs took their own swept value (group 0: lambda 1, group 1: lambda 1000)
    assert np.max(np.abs(np.subtract(losses(two, 1000, 1), losses(two, 1, 1)))) > 1e-3
    np.testing.assert_allclose([m[2] for m in two["matrices"]], [m[2] for m in results["ewc"][2]["matrices"]],
                               atol=0.02)
    assert two["state_bytes"]["per_device_max"] == one["state_bytes"]["total"] // 2  # each group holds its runs


def test_the_sweep_x_seeds_grid_and_files(results):
    ewc = results["ewc"][2]
    assert [(s["method.ewc_lambda"], seed) for s, seed, _ in ewc["matrices"]] == [(1.0, 0), (1.0, 1), (1000.0, 0),
                                                                                  (1000.0, 1)]
    wd = Path(ewc["workdir"])
    saved = json.loads((wd / "method.ewc_lambda=1000" / "seed_1" / "results.json").read_text())
    assert saved["devices"]["mesh"]["runs"] == 2 and saved["state_bytes"] == ewc["state_bytes"]
    assert saved["accuracy_matrix"] == ewc["matrices"][3][2]
    for summary in (wd / "summary.json", wd / "method.ewc_lambda=1" / "summary.json"):
        s = json.loads(summary.read_text())
        assert s["devices"]["mesh"] == {"runs": 2, "data": 1, "fsdp": 1} and s["state_bytes"] == ewc["state_bytes"]


def test_per_seed_resident_streams_are_split_along_runs(results):
    er = results["er"][2]
    assert er["per_run"] and er["src"], "the permuted stream should be resident, one copy per seed"
    spec, shard, shape = er["src"]["x"]
    assert "runs" in spec and shape[0] == 2 and shard[0] == 1  # each device holds its own run's copy
    spec, shard, shape = results["ewc"][2]["src"]["x"]  # one stream shared by every run: replicated
    assert "runs" not in spec and shard == shape


def test_a_killed_run_split_over_run_groups_resumes_exactly(four, results):
    (r,) = four["resume"]
    full = [m[2] for m in results["ewc"][2]["matrices"]]  # the same config, never killed
    assert r["saves_before_crash"] == 4
    assert r["resumed"] == full and full[0] != full[1]
    assert r["states_equal"]
    assert r["other_mesh"]["runs"] == 1 and r["other"] == full  # resumed onto one device: the same results


# ----------------------------------------------------------------------------- several processes

# One process of a `launch --local 2` job (argv: out dir, then the launcher's
# --coordinator ...): er (a resident copy per seed) in full, ewc's sweep x seeds with
# loop.run_axis=map (each process's 2 runs one after another), then ewc that dies at its 4th
# save in both processes (as after a kill) and resumes from its checkpoints. The resume
# stays in the same processes: what is tested is that 2 processes restore their halves
# of the checkpoint's global arrays and continue exactly, not a fresh start's imports.
MP_JOB = """
    import jax, numpy as np
    import jaxcl
    from jaxcl import config as C, train
    FAMILIES, SHORT, EWC = json.loads(%r), %r, %r
    out = args[0]
    made = []
    real_setup = train.setup
    train.setup = lambda c: made.append(real_setup(c)) or made[-1]
    me = jax.process_index()
    c = C.override(jaxcl.get_config("split_digits:method=er"), SHORT + FAMILIES["er"] + ["seeds=(0,1)", "mesh.runs=2"])
    r = jaxcl.run(c, f"{out}/er", echo=lambda s: None)
    x = made[-1].src["train"]["x"]
    emit(process=me, case="er", matrices=[m["accuracy_matrix"] for m in r["runs"]], devices=r["devices"],
         local_src=[list(s.data.shape) for s in x.addressable_shards], global_src=list(x.shape),
         local_runs=list(made[-1].feed.local_runs))
    c = C.override(jaxcl.get_config("split_digits:method=ewc"), SHORT + EWC + ["mesh.runs=2"])  # 4 runs
    r = jaxcl.run(C.override(c, ["loop.run_axis=map"]), f"{out}/ewc_map", echo=lambda s: None)
    emit(process=me, case="ewc_map", matrices=[m["accuracy_matrix"] for m in r["runs"]], devices=r["devices"],
         run_axis=made[-1].run_axis)
    saves = die_at_save(4, lambda: jaxcl.run(c, f"{out}/ewc", echo=lambda s: None))  # both processes alike
    said = []
    r = jaxcl.run(c, f"{out}/ewc", resume=True, echo=said.append)
    emit(process=me, case="ewc", matrices=[m["accuracy_matrix"] for m in r["runs"]], devices=r["devices"],
         saves_before_crash=saves, resumed=any(s.startswith("resuming from") for s in said))
""" % (json.dumps(FAMILIES), SHORT, EWC_CASE)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    code, rows, _ = launch(2, MP_JOB, [str(tmp / "runs")], tmp)
    assert code == 0
    return tmp, rows


def test_two_processes_each_feed_their_own_runs_and_match_one_device(two_processes, results):
    tmp, res = two_processes
    er = {x["process"]: x for x in res if x["case"] == "er"}
    assert set(er) == {0, 1}
    for p, x in er.items():
        assert x["local_runs"] == [p] and x["global_src"][0] == 2 and x["local_src"][0][0] == 1  # its copy only
        assert x["devices"]["processes"] == 2 and x["devices"]["mesh"] == {"runs": 2, "data": 1, "fsdp": 1}
    assert er[0]["matrices"] == er[1]["matrices"]  # every process sees every run's results
    # the same config on one device (mesh.runs=1, mesh.data=1 of the 4-device process)
    one = results["er"][1]
    assert one["devices"]["count"] == 1
    assert er[0]["matrices"] == [m[2] for m in one["matrices"]]
    for seed in (0, 1):  # process 0 wrote every run's folder, from the small results each process made
        saved = json.loads((tmp / "runs" / "er" / f"seed_{seed}" / "results.json").read_text())
        assert saved["accuracy_matrix"] == er[0]["matrices"][seed] and saved["seed"] == seed
        assert saved["train_steps"] > 0 and saved["params"]["backbone"] > 0


def test_two_processes_each_run_their_runs_one_after_another(two_processes, results):
    """loop.run_axis=map over 2 processes of one device (mesh.runs=2): each process trains
    its 2 runs one after another; every run is the one-device map's bit for bit."""
    _, res = two_processes
    x = {r["process"]: r for r in res if r["case"] == "ewc_map"}
    assert set(x) == {0, 1} and x[0]["run_axis"] == "map" and x[0]["devices"]["processes"] == 2
    assert x[0]["matrices"] == x[1]["matrices"] == [m[2] for m in results["ewc_map"][1]["matrices"]]


def test_two_processes_killed_at_a_save_resume_exactly(two_processes, results):
    _, res = two_processes
    ewc = [x for x in res if x["case"] == "ewc"]
    assert {x["process"] for x in ewc} == {0, 1}
    assert [x["saves_before_crash"] for x in ewc] == [4, 4]  # both died at their 4th save
    assert [x["resumed"] for x in sorted(ewc, key=lambda x: x["process"])] == [True, False]  # process 0 talks
    # the run uninterrupted on 2 run groups of one process (test_a_killed_run_split_... checks it
    # against the run killed and resumed there, on 2 groups and on one device)
    assert ewc[0]["matrices"] == [m[2] for m in results["ewc"][2]["matrices"]]
    assert ewc[1]["matrices"] == ewc[0]["matrices"]


# ----------------------------------------------------------------------------- refusals and rules


def test_runs_that_mesh_runs_does_not_divide_are_refused_by_name(make_config, tmp_path, capsys):
    from jaxcl import cli

    c = make_config(seeds="(0, 1, 2)", mesh__runs=2)
    with pytest.raises(jaxcl.ConfigError, match=r"mesh.runs=2 does not divide the 3 runs \(seeds x sweep settings\)"):
        jaxcl.run(c, tmp_path / "w", echo=lambda s: None)
    assert not (tmp_path / "w").exists()
    with pytest.raises(jaxcl.ConfigError, match="mesh.runs=4 does not divide the 6 runs"):
        jaxcl.config.validate(make_config(seeds="(0, 1, 2)", sweep="('optimizer.lr=0.1,0.2',)", mesh__runs=4))
    assert cli.main(["run", "split_digits", "--seeds", "0", "1", "2", "--set", "mesh.runs=2",
                     "--workdir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "mesh.runs=2 does not divide the 3 runs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(jaxcl.ConfigError, match="mesh.runs: must be an integer >= 1, got 0"):
        jaxcl.config.validate(make_config(mesh__runs=0))


def test_a_run_axis_larger_than_the_devices_is_a_named_error(make_config, tmp_path):
    with pytest.raises(sharding.ShardingError, match=r"mesh.runs=2 x mesh.fsdp=1 does not divide the 1 devices"):
        jaxcl.run(make_config(seeds="(0, 1)", mesh__runs=2), tmp_path / "w", echo=lambda s: None)
    assert not (tmp_path / "w").exists()
    with pytest.raises(sharding.ShardingError, match=r"asked for mesh.runs 2 x 1 x mesh.fsdp 1 = 2 devices, 1 visible"):
        sharding.make_mesh(1, 1, 2)


def test_state_specs_split_the_run_axis_and_keep_fsdp_inside():
    mesh = AbstractMesh((2, 1, 2), ("runs", "data", "fsdp"))
    assert sharding.spec("params/fc1/kernel", (4, 64, 128), 4, mesh, lead=1, min_bytes=0) == P("runs", None, "fsdp")
    assert sharding.spec("step", (4,), 4, mesh, lead=1) == P("runs")
    assert sharding.spec("params/fc1/kernel", (64, 128), 4, mesh, lead=0, min_bytes=0) == P(None, "fsdp")
    assert sharding.spec("extra/memory/x", (4, 10, 3), 4, AbstractMesh((2, 2, 1), ("runs", "data", "fsdp")),
                         lead=1, min_bytes=0) == P("runs", "data")
    one = AbstractMesh((1, 2, 1), ("runs", "data", "fsdp"))  # one run group: the run axis is not split
    assert sharding.spec("params/fc1/kernel", (4, 64, 128), 4, one, lead=1, min_bytes=0) == P()


# ----------------------------------------------------------------------------- automatic layout


@pytest.mark.parametrize("runs,devices,sets,pipeline,processes,want", [
    (8, 2, [], "memory", 1, 2),  # one group per device, 4 runs each
    (6, 4, [], "memory", 1, 2),  # the most groups dividing both 6 and 4
    (8, 8, ["mesh.fsdp=2"], "memory", 1, 4),  # fsdp pairs: 4 free groups
    (8, 8, ["mesh.data=2"], "memory", 1, 4),
    (1, 8, [], "memory", 1, 1),  # a single run: the batch splits instead
    (8, 2, ["loop.run_axis=map"], "memory", 1, 2),  # each group's runs one after another (a conv step on CPU)
    (8, 2, [], "grain", 2, 1),  # grain feeds every run from every process
    (8, 2, ["mesh.runs=4"], "memory", 1, 4),  # as set
])
def test_mesh_runs_auto_spreads_runs_over_free_devices(monkeypatch, runs, devices, sets, pipeline, processes, want):
    from jaxcl import train

    monkeypatch.setattr(jax, "device_count", lambda: devices)
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    c = config_lib.override(jaxcl.get_config("split_digits"), sets)
    groups, why = train.auto_runs(c, runs, pipeline)
    assert groups == want, why
    assert why.startswith("auto" if "mesh.runs=4" not in sets else "mesh.runs as set")


def test_devices_auto_gives_each_core_its_runs(tmp_path):
    """``jaxcl run --devices auto --seeds 0 1``: as many virtual CPU devices as the cores
    and the runs allow, and mesh.runs (auto) one group per device; results.json says so."""
    import os

    from jaxcl import distributed

    cores = len(os.sched_getaffinity(0))
    want = max(d for d in range(1, min(cores, 2) + 1) if 2 % d == 0)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags_without_devices()
    wd = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "jaxcl.cli", "run", "split_digits:method=finetune", "--devices", "auto",
                           "--seeds", "0", "1", "--workdir", str(wd), "--set", "epochs=1", "--set", "num_tasks=2",
                           "--set", "log.progress=false", "--set", "log.plots=false", "--set", "log.tensorboard=false"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((wd / "seed_1" / "results.json").read_text())
    assert r["devices"]["count"] == want and r["devices"]["mesh"]["runs"] == want, r["devices"]
    assert r["devices"]["runs_why"].startswith("auto")
    assert distributed.cpu_devices_for_runs(1) == 1  # a single run: no virtual devices (XLA_FLAGS untouched)
