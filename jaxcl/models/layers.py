"""Layers built to be extended by continual-learning methods.

Every model in :mod:`jaxcl.models` is made of these. A method that needs its own
variables next to a layer's weights (CLR's per-task reprogramming kernels, NCCL's
calibration, ResCL's combination) subclasses a layer and overrides one hook, then hands
the subclass to the model (``model.clone(conv=MyConv)``); the model definition is not
copied and parameter names stay those of the plain model, so a checkpoint of the plain
model loads into the extended one.

Hooks, each a plain method called inside the layer's compact ``__call__`` (so it may
create variables in any collection with ``self.param`` / ``self.variable``):

* ``Dense.adapt(kernel, bias, task)`` / ``Conv.adapt(kernel, bias, task)``: transform the
  weights before they are used;
* ``Dense.post(y, task)`` / ``Conv.post(y, task)``: transform the output.

``task`` is the task id: a scalar, or one id per sample (a batch that mixes tasks).
``ConvNorm`` (conv followed by batch norm) is the unit of every CNN here; ResCL replaces
the whole unit.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModuleDef = Any


def _uniform_fan_in(fan_in: int) -> Callable:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv weights
    (kaiming_uniform with a=sqrt(5)) and biases."""
    bound = 1.0 / np.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kernel_init(style: str, fan_in: int) -> Callable:
    if style == "torch":
        return _uniform_fan_in(fan_in)
    return nn.initializers.lecun_normal()


def bias_init(style: str, fan_in: int) -> Callable:
    if style == "torch":
        return _uniform_fan_in(fan_in)
    return nn.initializers.zeros


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


class Dense(nn.Module):
    features: int
    use_bias: bool = True
    weight_init: str = "torch"
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array, task: Optional[Array] = None) -> Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", kernel_init(self.weight_init, fan_in), (fan_in, self.features))
        bias = self.param("bias", bias_init(self.weight_init, fan_in), (self.features,)) if self.use_bias else None
        kernel, bias = self.adapt(kernel, bias, task)
        dt = _dtype(self.dtype)
        y = jnp.dot(x.astype(dt), kernel.astype(dt))
        if bias is not None:
            y = y + bias.astype(dt)
        return self.post(y, task)

    def adapt(self, kernel, bias, task):
        return kernel, bias

    def post(self, y, task):
        return y


class Conv(nn.Module):
    """2-D convolution, NHWC input, HWIO kernel, symmetric integer padding (as PyTorch)."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int = -1  # -1: kernel_size // 2
    use_bias: bool = False
    weight_init: str = "torch"
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array, task: Optional[Array] = None) -> Array:
        k, cin = self.kernel_size, x.shape[-1]
        fan_in = cin * k * k
        kernel = self.param("kernel", kernel_init(self.weight_init, fan_in), (k, k, cin, self.features))
        bias = self.param("bias", bias_init(self.weight_init, fan_in), (self.features,)) if self.use_bias else None
        kernel, bias = self.adapt(kernel, bias, task)
        y = conv2d(x, kernel, self.strides, self.padding if self.padding >= 0 else k // 2, _dtype(self.dtype))
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return self.post(y, task)

    def adapt(self, kernel, bias, task):
        return kernel, bias

    def post(self, y, task):
        return y


def conv2d(x: Array, kernel: Array, strides: int = 1, padding: int = 0, dtype=jnp.float32,
           groups: int = 1) -> Array:
    return jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (strides, strides), [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )


def adaptive_avg_pool(x: Array, size: int) -> Array:
    """PyTorch's ``AdaptiveAvgPool2d((size, size))`` on NHWC: output row ``i`` averages
    input rows ``floor(i * H / size)`` to ``ceil((i + 1) * H / size)`` (bins may overlap),
    the same for columns."""
    def pool(x, axis):
        n = x.shape[axis]
        if n == size:
            return x
        bins = [jax.lax.slice_in_dim(x, i * n // size, -(-(i + 1) * n // size), axis=axis) for i in range(size)]
        return jnp.concatenate([b.mean(axis, keepdims=True) for b in bins], axis)

    return pool(pool(x, 1), 2)


def _shifted_sum(y: Array, kernel: Array) -> Array:
    """Depthwise correlation ``out[b,h,w,c] = sum_ij ypad[b,h+i,w+j,c] * k[i,j,c]`` (stride
    1, 'same' padding) as k*k shifted multiply-adds; ``kernel`` is ``[k, k, 1, C]`` or one
    per sample, ``[B, k, k, 1, C]``. The centre-tap-1 kernel returns ``y`` bit for bit."""
    k = kernel.shape[-4]
    p = k // 2
    h, w = y.shape[1], y.shape[2]
    yp = jnp.pad(y, ((0, 0), (p, p), (p, p), (0, 0))) if p else y
    per_sample = kernel.ndim == 5
    out = None
    for i in range(k):
        for j in range(k):
            tap = kernel[:, i, j, 0][:, None, None, :] if per_sample else kernel[i, j, 0]
            term = yp[:, i:i + h, j:j + w, :] * tap
            out = term if out is None else out + term
    return out


def _chunk(batch: int, per_sample_bytes: int, budget: int = 2 << 20) -> int:
    """Samples per chunk of the kernel-gradient reduction: the largest divisor of the
    batch whose inputs fit ``budget`` bytes (about the L2 cache)."""
    best = 1
    for d in range(1, batch + 1):
        if batch % d == 0 and d * per_sample_bytes <= budget:
            best = d
    return best


@jax.custom_vjp
def depthwise(y: Array, kernel: Array) -> Array:
    """Depthwise k x k convolution (stride 1, 'same' padding, one kernel per channel:
    ``kernel`` is ``[k, k, 1, C]``, HWIO with feature_group_count=C, or ``[B, k, k, 1, C]``,
    one per sample). Written as shifted multiply-adds because XLA:CPU's grouped
    convolution runs ~30x slower (measured: 76 ms vs 2.3 ms forward at 64x32x32x64);
    the kernel gradient reduces the batch in cache-sized chunks (4.5x faster than one
    pass per tap)."""
    return _shifted_sum(y, kernel)


def _depthwise_fwd(y, kernel):
    return _shifted_sum(y, kernel), (y, kernel)


def _depthwise_bwd(res, g):
    y, kernel = res
    if kernel.ndim == 5:  # one kernel per sample (inference on mixed batches): plain autodiff
        _, vjp = jax.vjp(_shifted_sum, y, kernel)
        return vjp(g)
    k = kernel.shape[0]
    p, (b, h, w, c) = k // 2, y.shape
    dy = _shifted_sum(g, kernel[::-1, ::-1])  # the transpose of a correlation: the flipped kernel
    yp = jnp.pad(y, ((0, 0), (p, p), (p, p), (0, 0))) if p else y
    n = _chunk(b, (yp[0].size + g[0].size) * 4)

    def taps(a, gg):
        return jnp.stack([jnp.sum(a[:, i:i + h, j:j + w, :] * gg, axis=(0, 1, 2)) for i in range(k) for j in range(k)])

    if n == b:
        dk = taps(yp, g)
    else:
        dk = jax.lax.scan(lambda acc, xs: (acc + taps(*xs), None), jnp.zeros((k * k, c), g.dtype),
                          (yp.reshape((b // n, n) + yp.shape[1:]), g.reshape((b // n, n) + g.shape[1:])))[0]
    return dy, dk.reshape(k, k, 1, c).astype(kernel.dtype)


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _batch_stats(x: Array):
    """Mean and (biased) variance over every axis but the last, as flax's BatchNorm."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)


class _BatchNorm(nn.Module):
    """Batch norm with the numerics of ``flax.linen.BatchNorm`` (and so of PyTorch's
    normalisation; the running variance is the biased one, as flax's). Methods choose
    its mode statically: a ``lax.cond`` between modes runs ~20x slower around
    convolutions on XLA:CPU (measured on the reduced ResNet-18), so PackNet compiles
    one step per mode instead."""

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,)))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,)))
        if train:
            mean, var = _batch_stats(x)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class Norm(nn.Module):
    """Batch norm with PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9; eps 1e-5).
    Statistics live in the ``batch_stats`` collection."""

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, task: Optional[Array] = None, train: bool = False) -> Array:
        return _BatchNorm(self.momentum, self.epsilon, name="bn")(x.astype(jnp.float32), train)


class TaskNorm(nn.Module):
    """Batch norm with its own affine parameters and statistics for every task, stacked
    on a leading axis of ``num_tasks`` and picked by the task id (per-task batch norm for
    PackNet and CLR). Same numerics as :class:`Norm`; ``task`` may be one id per sample
    at inference. Variables: ``params/task_scale``, ``params/task_bias``,
    ``batch_stats/task_mean``, ``batch_stats/task_var``, each ``[num_tasks, C]``."""

    num_tasks: int
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, task: Optional[Array] = None, train: bool = False) -> Array:
        x = x.astype(jnp.float32)
        n, c = self.num_tasks, x.shape[-1]
        scale = self.param("task_scale", nn.initializers.ones, (n, c))
        bias = self.param("task_bias", nn.initializers.zeros, (n, c))
        ra_mean = self.variable("batch_stats", "task_mean", lambda: jnp.zeros((n, c)))
        ra_var = self.variable("batch_stats", "task_var", lambda: jnp.ones((n, c)))
        task = jnp.zeros((), jnp.int32) if task is None else jnp.asarray(task, jnp.int32)
        if train:
            if task.ndim:
                raise ValueError("TaskNorm trains on one task at a time: pass a scalar task id")
            mean, var = _batch_stats(x)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = ra_mean.value.at[task].set(m * ra_mean.value[task] + (1 - m) * mean)
                ra_var.value = ra_var.value.at[task].set(m * ra_var.value[task] + (1 - m) * var)
        else:
            mean, var = ra_mean.value[task], ra_var.value[task]
        shape = (-1,) + (1,) * (x.ndim - 2) + (c,) if task.ndim else (c,)
        mean, var = mean.reshape(shape), var.reshape(shape)
        mul = jax.lax.rsqrt(var + self.epsilon) * scale[task].reshape(shape)
        return (x - mean) * mul + bias[task].reshape(shape)


def is_per_task(path) -> bool:
    """Whether a variable (given by its tree path) is stacked per task: heads and
    :class:`TaskNorm` variables."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return "head" in keys or any(isinstance(k, str) and k.startswith("task_") for k in keys)


class NormUnit(nn.Module):
    """A norm standing alone, not right after a conv (the pre-activation norms of a wide
    ResNet); methods that replace units replace these too."""

    norm: ModuleDef = Norm

    @nn.compact
    def __call__(self, x: Array, task: Optional[Array] = None, train: bool = False) -> Array:
        return self.norm(name="norm")(x, task, train)


class ConvNorm(nn.Module):
    """conv -> norm (no activation): the unit every CNN here is made of."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    conv: ModuleDef = Conv
    norm: Optional[ModuleDef] = Norm

    @nn.compact
    def __call__(self, x: Array, task: Optional[Array] = None, train: bool = False) -> Array:
        y = self.conv(self.features, self.kernel_size, self.strides, name="conv")(x, task)
        if self.norm is not None:
            y = self.norm(name="norm")(y, task, train)
        return y


def select(task: Array, num: int) -> Array:
    """One-hot weights [B, num] (or [num]) of a scalar or per-sample task id."""
    return jax.nn.one_hot(jnp.asarray(task), num, dtype=jnp.float32)


class Heads(nn.Module):
    """``num_heads`` linear classifiers stacked on a leading axis, picked by task id.

    A scalar task id uses that task's head for the whole batch; a vector picks a head
    per sample; ``"all"`` returns every head's logits, ``[B, heads, outputs]`` (for
    distillation over old heads). Outputs beyond a head's own class count
    (``classes_per_head``) are set to a large negative number, so neither the loss nor
    argmax ever picks them.
    """

    num_heads: int
    num_outputs: int
    classes_per_head: tuple = ()
    weight_init: str = "torch"

    @nn.compact
    def __call__(self, h: Array, task: Optional[Array] = None) -> Array:
        h = h.astype(jnp.float32)
        d, hn, c = h.shape[-1], self.num_heads, self.num_outputs
        kernel = self.param("kernel", kernel_init(self.weight_init, d) if self.weight_init == "torch"
                            else nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                  in_axis=-2, out_axis=-1, batch_axis=(0,)),
                            (hn, d, c))
        bias = self.param("bias", bias_init(self.weight_init, d), (hn, c))
        per_head = self.classes_per_head or (c,) * hn
        if isinstance(task, str):
            if task != "all":
                raise ValueError(f"Heads: task {task!r}: give a task id, one per sample, or 'all'")
            logits = jnp.einsum("bd,hdc->bhc", h, kernel) + bias
            valid = jnp.arange(c) < jnp.asarray(per_head)[:, None]
            return jnp.where(valid, logits, -1e9)
        if hn == 1 or task is None:
            logits = h @ kernel[0] + bias[0]
            idx = jnp.zeros((), jnp.int32)
        else:
            task = jnp.asarray(task, jnp.int32)
            if task.ndim == 0:
                logits = h @ kernel[task] + bias[task]
            else:
                sel = select(task, hn)  # [B, H]
                logits = jnp.einsum("bd,hdc,bh->bc", h, kernel, sel) + sel @ bias
            idx = task
        if min(per_head) < c:
            valid = jnp.arange(c) < jnp.asarray(per_head)[idx][..., None]
            logits = jnp.where(valid, logits, -1e9)
        return logits
