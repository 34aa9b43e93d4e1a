"""Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation, for 32x32 inputs: WRN-28-2
has 4 blocks per stage, widths 32/64/128, a 3x3 stem of 16 channels (1.47M parameters
with a 100-way head). Block: relu(bn1(x)) -> conv1 (stride) -> bn2 -> relu -> conv2, plus
the input (or a 1x1 conv of the pre-activated input when the shape changes); the trunk
ends in relu(bn) and global average pooling.

Units: ``conv1`` and its batch norm form a ``unit`` (conv -> norm); ``conv2``, the shortcut
and the stem are units without norm; ``bn1`` and the last norm stand alone
(``norm_unit``). Names: ``stem``, ``block{stage}_{i}/{bn1,conv1,conv2,shortcut}``,
``final_norm``, ``head``.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.models.layers import Conv, ConvNorm, Heads, ModuleDef, Norm, NormUnit


class WideResNet(nn.Module):
    depth: int = 28
    widen: int = 2
    width: int = 16  # stem channels; the stages have widen * (16, 32, 64) * width / 16
    num_heads: int = 1
    num_outputs: int = 10
    classes_per_head: tuple = ()
    weight_init: str = "torch"
    dtype: str = "float32"
    conv: ModuleDef = Conv
    norm: ModuleDef = Norm
    unit: ModuleDef = ConvNorm
    norm_unit: ModuleDef = NormUnit

    @nn.compact
    def __call__(self, x: jax.Array, task=None, train: bool = False) -> jax.Array:
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        conv = functools.partial(self.conv, weight_init=self.weight_init, dtype=self.dtype)
        unit = functools.partial(self.unit, conv=conv, norm=self.norm)
        bare = functools.partial(self.unit, conv=conv, norm=None)  # a conv alone
        pre = functools.partial(self.norm_unit, norm=self.norm)
        h = bare(self.width, 3, 1, name="stem")(x, task, train)
        for s, mult in enumerate((1, 2, 4)):
            w = self.width * self.widen * mult
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                name = f"block{s + 1}_{i}"
                o = nn.relu(pre(name=f"{name}_bn1")(h, task, train))
                short = bare(w, 1, stride, name=f"{name}_shortcut")(o, task, train) if (
                    stride != 1 or h.shape[-1] != w) else h
                y = nn.relu(unit(w, 3, stride, name=f"{name}_conv1")(o, task, train))
                y = bare(w, 3, 1, name=f"{name}_conv2")(y, task, train)
                h = y + short
        h = nn.relu(pre(name="final_norm")(h, task, train))
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return Heads(self.num_heads, self.num_outputs, self.classes_per_head, self.weight_init, name="head")(h, task)
