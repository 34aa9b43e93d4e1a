"""Shared fixtures. Real data from ../shared/data is used when present and its tests
are skipped (cleanly, with the reason) when it is not.

Writing a test that stays fast (the whole suite must fit in 10 minutes on 2 cores; nearly
all of its time is XLA compiling small programs, not training them):
- the embedded digits stream through ``make_config`` (2 epochs, 5 tasks of 2 classes, an
  MLP); fewer tasks/epochs when the assertion does not need them;
- a finished run that is only read: the session's ``tiny_run`` (copy its workdir with
  ``shutil.copytree`` before resuming or damaging it); several tests on one bigger run: a
  module-scoped fixture (see test_packnet.py's ``runs``);
- every distinct program costs a compile (~1-10 s) on a cold cache; the same config in
  two tests compiles once per machine thanks to the persistent cache below, so reuse the
  settings of existing tests (``num_tasks``, ``batch_size``, model) rather than new ones;
- a subprocess (``jaxcl`` on the command line, launched jobs) pays the jax import and its
  own compiles: only where the process boundary is what is tested;
- every checkpoint save costs ~0.3 s (Orbax): a small ``checkpoint.every_steps`` only in
  tests about checkpoints, on few tasks;
- a test whose own training outweighs its compiles: ``@pytest.mark.optimized`` (XLA's
  passes on for that test), only where cold and warm were both measured to gain;
- a test that must stay slow says why in one line; see per-test cost with
  ``JAXCL_TEST_TIMES=/tmp/t.tsv pytest -n 0 tests/test_x.py`` (columns below), and put a
  heavy new file in ``HEAVY_FIRST``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# fixtures/ holds the scripts that made the committed fixtures: they run in the PyTorch
# peers venv, not under pytest
collect_ignore_glob = ["fixtures/*"]


def jax_test_cache_dir() -> str:
    """Where the test session keeps JAX's persistent compilation cache: the user's cache
    folder, not the clone, so a fresh clone on the same machine reuses it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxcl", "jax-tests")


def pytest_configure(config):
    # Keep the npz cache of the test session out of the user's ~/.cache.
    os.environ.setdefault("JAXCL_CACHE_DIR", str(Path(config.rootpath) / ".pytest_cache" / "jaxcl-data"))
    # JAX's persistent compilation cache: a second run loads compiled programs instead of
    # compiling them again (most of the suite's time is XLA compiles of tiny models). Set
    # through the environment so the subprocesses the tests start (`jaxcl run`, launched
    # jobs) use it too; a JAX_COMPILATION_CACHE_DIR of your own wins, an empty one turns it
    # off. Safe with concurrent workers: an entry read while another process writes it is
    # a cache miss with a warning, never a wrong program.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", jax_test_cache_dir())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program: loading beats compiling
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")  # no size floor
    # XLA's expensive optimisation passes off: the tests check numbers and behaviour, not
    # speed, and their programs are tiny, so compiling is nearly all of their time; this
    # halves it (test_api's method tests: 47 -> 26 CPU s). The benchmarks and the
    # accelerator check compile as users do; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the
    # suite that way too.
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    # With those passes off, XLA:CPU's elemental emitters compile ~40 % faster than its MLIR
    # fusion emitters (the default); with them on, the MLIR ones compile faster, but XLA reads
    # the flag once per process, so the few optimised blocks run in processes of their own
    # (optimized_env). Cold suite 21:51 -> 15:49 (benchmarks/RESULTS.md, "Fusion emitters"). Through
    # the environment, so subprocesses compile the same way; an XLA_FLAGS of your own that
    # names the option wins. Set before anything starts JAX's backend.
    emitters = "--xla_cpu_use_fusion_emitters=false"
    if session_disables_optimizations() and \
            "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "") and _xla_knows(emitters):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {emitters}".strip()
        os.environ["JAXCL_TEST_ADDED_XLA_FLAGS"] = emitters  # the workers inherit both: optimized_env drops it
    if "jax" in sys.modules:  # imported before us (a plugin): its flags already read the environment
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"] or None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                          int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
        jax.config.update("jax_disable_most_optimizations", session_disables_optimizations())


def session_disables_optimizations() -> bool:
    """Whether this test session compiles with XLA's expensive passes off (the default
    set above; ``JAX_DISABLE_MOST_OPTIMIZATIONS=0`` or empty turns them back on)."""
    return os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "") not in ("", "0")


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA accepts ``flag`` in XLA_FLAGS: XLA aborts a process whose
    XLA_FLAGS names a flag it does not know (a newer or older jaxlib, the accelerator
    check's image), so a child process is asked first (~2 s, once: the xdist workers
    inherit the answer through the environment)."""
    import subprocess

    answer = os.environ.get("JAXCL_TEST_XLA_KNOWS")
    if answer is None:
        env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
        child = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                               timeout=300)
        answer = os.environ["JAXCL_TEST_XLA_KNOWS"] = "1" if child.returncode == 0 else "0"
    return answer == "1"


def xla_flags_without_devices(flags: str | None = None) -> str:
    """The session's XLA_FLAGS (the emitter choice above), or ``flags``, without a host
    device count, for a subprocess whose devices come from its own command line."""
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    return " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))


# JAXCL_TEST_TIMES=<file>: one tab-separated line per test (its setup, call and teardown):
# node id, wall s, CPU s of this process and of the subprocesses it waited for, seconds in
# XLA compiles (or persistent-cache loads), in tracing and in lowering, and the persistent
# cache's hits and misses. CPU time is what the test costs on a loaded machine.
_TIMES = os.environ.get("JAXCL_TEST_TIMES")
_jax_events = {"compile": 0.0, "trace": 0.0, "lower": 0.0, "hits": 0, "misses": 0}


def _listen_to_jax():
    from jax import monitoring

    names = {"/jax/core/compile/backend_compile_duration": "compile",
             "/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}

    def duration(event, secs, **kw):
        if event in names:
            _jax_events[names[event]] += secs

    def count(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            _jax_events["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            _jax_events["misses"] += 1

    monitoring.register_event_duration_secs_listener(duration)
    monitoring.register_event_listener(count)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _TIMES:
        yield
        return
    import resource
    import time

    if "listening" not in _jax_events:
        _jax_events["listening"] = True
        _listen_to_jax()

    def cpu():
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime, b.ru_utime + b.ru_stime

    before, t0, (c0, k0) = dict(_jax_events), time.perf_counter(), cpu()
    yield
    wall, (c1, k1) = time.perf_counter() - t0, cpu()
    d = {k: _jax_events[k] - before[k] for k in ("compile", "trace", "lower", "hits", "misses")}
    with open(_TIMES, "a") as f:
        f.write(f"{item.nodeid}\t{wall:.2f}\t{c1 - c0:.2f}\t{k1 - k0:.2f}\t{d['compile']:.2f}\t{d['trace']:.2f}\t"
                f"{d['lower']:.2f}\t{d['hits']}\t{d['misses']}\n")


# The heaviest files first (about in this order: CPU time of a cold run, 2026-12-01): with
# `--dist loadfile --no-loadscope-reorder` the two workers take whole files in this order,
# so the long ones start early and the short ones fill in at the end. Files not named here
# follow, in pytest's order.
HEAVY_FIRST = ("test_prompts.py", "test_vit_methods.py", "test_runs_axis.py", "test_distributed.py", "test_clr.py",
               "test_packnet.py", "test_loop.py", "test_methods.py", "test_cli_errors.py", "test_api.py", "test_baselines.py",
               "test_rescl.py", "test_nccl.py", "test_cpu_loop.py", "test_accelerator_script.py", "test_vit.py",
               "test_train.py", "test_export.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order


def optimized_env() -> dict:
    """The environment of a child process that compiles with XLA's full optimisation, as
    users do: for a runtime-heavy block (test_prompts.py's CIFAR-10 runs), whose training
    time outweighs the longer compile. XLA reads its flags once per process, so such a
    block runs in a process of its own, without the session's emitter choice (with the
    optimisations on, the default emitters compile faster: that block 351 -> 258 CPU s)."""
    added = os.environ.get("JAXCL_TEST_ADDED_XLA_FLAGS", "").split()
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in added)
    return dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="0", XLA_FLAGS=flags)


@pytest.fixture(autouse=True)
def _optimized_compiles(request):
    """``@pytest.mark.optimized``: the test compiles with XLA's optimisation passes on (in
    this process: ``jax_disable_most_optimizations`` is read at each compile), for a test
    whose training outweighs its compiles. Module and session fixtures are set up before
    it and keep the session's setting, so compare such a test only with runs it makes
    itself. test_real_data's multi-dataset run: 22.0 -> 10.7 CPU s warm, 22.0 -> 32.9 cold;
    the ViT tests measured no better than -2 s warm for +15-23 s cold (benchmarks/RESULTS.md)."""
    if request.node.get_closest_marker("optimized") is None or not session_disables_optimizations():
        yield
        return
    import jax

    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``(config, workdir, results)`` of a finished 2-task, 1-epoch finetune run on the
    digits, shared by every test of a worker: read it, or copy ``workdir`` first."""
    import jaxcl
    from jaxcl import config as config_lib

    c = config_lib.override(jaxcl.get_config("split_digits:method=finetune"), _quiet(epochs=1, num_tasks=2))
    wd = tmp_path_factory.mktemp("tiny_run")
    return c, wd, jaxcl.run(c, wd, echo=lambda s: None)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist.npz").exists():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


def _quiet(**sets) -> list[str]:
    """--set strings that silence progress bars, plots and TensorBoard, plus ``sets``."""
    base = {"log.progress": "false", "log.plots": "false", "log.tensorboard": "false"}
    base.update({k: str(v) for k, v in sets.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def make_config():
    """``make_config(spec, **sets)``: a fast config (default: the embedded digits stream,
    2 epochs) with progress bars, plots and TensorBoard off; ``sets`` are --set keys with
    dots written as double underscores (``optimizer__lr=0.1``)."""
    import jaxcl
    from jaxcl import config as config_lib

    def make(spec: str = "split_digits:method=finetune", **sets):
        values = {"epochs": 2}
        values.update({k.replace("__", "."): v for k, v in sets.items()})
        return config_lib.override(jaxcl.get_config(spec), _quiet(**values))

    return make


@pytest.fixture
def method_setup(make_config):
    """``method_setup(name, **sets)``: (config, stream, method, initial state, a batch of 16
    from task 0) on the embedded digits stream."""
    import jax

    from jaxcl import data, methods, models

    def setup(name: str, **sets):
        c = make_config(f"split_digits:method={name}", **sets)
        stream = data.build(c)
        m = methods.build(c, models.build(c.model, stream.info), stream.info)
        batch = next(data.batches(data.pool(stream, 0), 16))
        # init jitted: one program (cached on disk) where op by op every initializer and
        # shape is a compile of its own (test_methods, test_baselines, test_nccl: -6 %)
        return c, stream, m, jax.jit(m.init)(jax.random.PRNGKey(0), batch["x"]), batch

    return setup


class Crash(Exception):
    """What :func:`crash_at_save` raises: a run dying in the middle."""


@pytest.fixture
def crash_at_save(monkeypatch):
    """``crash_at_save(run, n, check=None)``: call ``run()`` with ``Checkpointer.save``
    raising :class:`Crash` on its ``n``-th call (the run dies; the saves before it
    stay); ``check(call, meta)`` sees every save before. Restores ``save`` after."""
    from jaxcl.checkpoint import Checkpointer

    def crash(run, n: int, check=None):
        real_save, calls = Checkpointer.save, {"n": 0}

        def dying_save(self, index, state, meta):
            calls["n"] += 1
            if check is not None:
                check(calls["n"], meta)
            if calls["n"] == n:
                raise Crash()
            return real_save(self, index, state, meta)

        monkeypatch.setattr(Checkpointer, "save", dying_save)
        try:
            with pytest.raises(Crash):
                run()
        finally:
            monkeypatch.setattr(Checkpointer, "save", real_save)

    return crash
