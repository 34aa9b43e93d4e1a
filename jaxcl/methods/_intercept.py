"""Methods that attach variables to layers (CLR, NCCL, ResCL) on any Flax model.

A jaxcl model is extended by swapping its layer classes (``model.clone(conv=...)``); a
model of plain ``flax.linen.Dense``/``Conv`` layers is extended by Flax's method
interception instead: :class:`Intercepted` wraps the model's ``init``/``apply`` in
``nn.intercept_methods`` and hands every ``Dense``/``Conv`` call to a hook,
``hook(layer, x, y, task, call)`` (``y`` the layer's output, ``call`` the layer's own
``__call__``), which may create variables in the layer's scope (``layer.variable``) and
returns the output to use. Parameter names stay those of the plain model.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYERS = (nn.Dense, nn.Conv)
TARGET = "target_layer"  # a hook's second copy of a layer (ResCL's target branch); never intercepted


class Intercepted:
    """``model`` with ``hook`` applied to each of its Dense and Conv layers (see the
    module docstring); ``init``/``apply`` take the jaxcl model protocol's arguments."""

    def __init__(self, model, hook):
        self.model, self.hook = model, hook

    def _interceptor(self, task):
        def intercept(next_fun, args, kwargs, context):
            layer = context.module
            if context.method_name != "__call__" or not isinstance(layer, LAYERS) or layer.name == TARGET:
                return next_fun(*args, **kwargs)
            return self.hook(layer, args[0], next_fun(*args, **kwargs), task, next_fun)

        return intercept

    def init(self, rngs, x, task=None, train=False, **kw):
        with nn.intercept_methods(self._interceptor(task)):
            return self.model.init(rngs, x, task, train, **kw)

    def apply(self, variables, x, task=None, train=False, **kw):
        with nn.intercept_methods(self._interceptor(task)):
            return self.model.apply(variables, x, task, train, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


def is_plain(model, fields) -> bool:
    """Whether ``model`` lacks every jaxcl layer field in ``fields`` (and so is extended
    by interception)."""
    return not any(hasattr(model, f) for f in fields)


def kernel_size(layer) -> int:
    k = layer.kernel_size
    return int(k if isinstance(k, int) else k[0])


def collections(model, x) -> dict:
    """Variable shapes of ``model`` initialised on ``x`` (nothing allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(x)[:1], jnp.zeros((), jnp.int32),
                                             False))
