"""Benchmark configs: ``<benchmark>.py`` with ``get_config(arg)`` returning a locked
``ml_collections.ConfigDict``. Installed as ``jaxcl.configs``.

``get_config("split_mnist:method=ewc")`` loads ``split_mnist.py`` and calls its
``get_config("method=ewc")``; a path to any ``.py`` file with a ``get_config`` works too.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

DEFAULT = "split_digits"


def list_benchmarks() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_config(spec: str | None = None):
    """``spec`` is ``NAME[:ARG]`` or ``PATH.py[:ARG]`` (default: the embedded default)."""
    from jaxcl.config import ConfigError

    spec = spec or DEFAULT
    name, _, arg = spec.partition(":")
    if name.endswith(".py"):
        path = Path(name)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"jaxcl_user_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if name not in list_benchmarks():
            raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(list_benchmarks())} "
                              "(or give a path to a config .py file)")
        module = importlib.import_module(f"jaxcl.configs.{name}")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {name} has no get_config(arg) function")
    return module.get_config(arg or None)
