"""Shared fixtures. Real data from ../shared/data is used when present and its tests
are skipped (cleanly, with the reason) when it is not."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# fixtures/ holds the scripts that made the committed fixtures: they run in the PyTorch
# peers venv, not under pytest
collect_ignore_glob = ["fixtures/*"]


def pytest_configure(config):
    # Keep the npz cache of the test session out of the user's ~/.cache.
    os.environ.setdefault("JAXCL_CACHE_DIR", str(Path(config.rootpath) / ".pytest_cache" / "jaxcl-data"))


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
        return c, stream, m, m.init(jax.random.PRNGKey(0), batch["x"]), batch

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
