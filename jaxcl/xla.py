"""The XLA options of the programs jaxcl compiles, and :func:`jit`, which passes them.

On CPU, jaxlib 0.10's XLA hands dots and convolutions to YNNPACK by default. jaxcl's
workloads mostly train and evaluate faster with XLA's own CPU kernels, measured side by
side (benchmarks/RESULTS.md, "XLA:CPU without YNNPACK"): W2's reduced ResNet-18 train step
+38 % and its evaluation +55 %, W6's ViT-Ti/16 +17 % and +22 %, W1's MLP evaluation +52 %,
W3's ResNet-18 evaluation +40 %, W5's +46 % (W4 unchanged). So the programs
jaxcl trains and evaluates with on the CPU leave YNNPACK out (an empty
``xla_cpu_experimental_ynn_fusion_type``), through ``jax.jit``'s ``compiler_options``: only
jaxcl's own programs, never the rest of the caller's process.

An ``XLA_FLAGS`` that names ``xla_cpu_experimental_ynn_fusion_type`` itself wins (set it to
choose YNNPACK's fusions back). A jaxlib that does not know the option compiles without it.
GPU and TPU programs get no options."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def _cpu_options() -> tuple:
    if any(k in os.environ.get("XLA_FLAGS", "") for k in CPU_OPTIONS):
        return ()
    try:  # one tiny compile: a jaxlib without the option refuses it by name
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(0.0).compile()
    except Exception:  # noqa: BLE001 (any refusal: compile as the jaxlib's defaults)
        return ()
    return tuple(CPU_OPTIONS.items())


def compiler_options(backend: str | None = None) -> dict:
    """The options jaxcl compiles with on ``backend`` (the default backend when None)."""
    return dict(_cpu_options()) if (backend or jax.default_backend()) == "cpu" else {}


try:  # whether a call now runs eagerly, not staged into an enclosing ``jax.jit``
    from jax._src.core import trace_state_clean as _top_level
except ImportError:  # a JAX without it: every call as if nested (no options, never an error)
    def _top_level() -> bool:
        return False


class _Jitted:
    """``jax.jit(fn, compiler_options=...)`` called at the top level, plain ``jax.jit(fn)``
    inside another jitted function (JAX takes compiler options at the top level only, and
    the options of the enclosing program then apply). Attributes (``lower``, ``eval_shape``,
    ...) are the top-level function's."""

    def __init__(self, fn: Callable, options: dict, kw: dict):
        self._top = jax.jit(fn, **{**kw, "compiler_options": {**options, **(kw.get("compiler_options") or {})}})
        self._nested = jax.jit(fn, **kw)
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return (self._top if _top_level() else self._nested)(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._top, name)


def jit(fn: Callable | None = None, **kw: Any) -> Callable:
    """``jax.jit`` with :func:`compiler_options` added where JAX takes them (decorator form
    too): a call inside a caller's own ``jax.jit`` compiles as part of that program."""
    if fn is None:
        return functools.partial(jit, **kw)
    options = compiler_options()
    return _Jitted(fn, options, kw) if options else jax.jit(fn, **kw)
