"""The XLA options of the programs jaxcl compiles, and :func:`jit`, which passes them.

On CPU, jaxlib 0.10's XLA hands dots and convolutions to YNNPACK by default. jaxcl's
workloads train and evaluate faster with XLA's own CPU kernels, measured side by side
(benchmarks/RESULTS.md, "XLA:CPU without YNNPACK"): W6's ViT-Ti/16 train step +17 % and its
evaluation +22 %, W1's MLP evaluation +52 %, W3's ResNet-18 evaluation +40 %. So every
program jaxcl compiles for the CPU leaves YNNPACK out (an empty
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


def jit(fn: Callable | None = None, **kw: Any) -> Callable:
    """``jax.jit`` with :func:`compiler_options` added (decorator form too)."""
    if fn is None:
        return functools.partial(jit, **kw)
    options = compiler_options()
    if options:
        kw["compiler_options"] = {**options, **(kw.get("compiler_options") or {})}
    return jax.jit(fn, **kw)
