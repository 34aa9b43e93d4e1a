"""A small CNN: two blocks of two 3x3 convs and a 2x2 max-pool, then one hidden dense layer."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxcl.models.layers import Conv, ConvNorm, Dense, Heads, ModuleDef


class CNN(nn.Module):
    width: int = 32
    hidden: int = 512
    num_heads: int = 1
    num_outputs: int = 10
    classes_per_head: tuple = ()
    weight_init: str = "torch"
    dtype: str = "float32"
    conv: ModuleDef = Conv
    norm: ModuleDef = None  # batch norm off by default; pass layers.Norm to turn it on
    dense: ModuleDef = Dense
    unit: ModuleDef = ConvNorm

    @nn.compact
    def __call__(self, x: jax.Array, task=None, train: bool = False) -> jax.Array:
        conv = functools.partial(self.conv, weight_init=self.weight_init, dtype=self.dtype, use_bias=self.norm is None)
        unit = functools.partial(self.unit, conv=conv, norm=self.norm)
        h = x
        for stage, w in enumerate((self.width, 2 * self.width)):
            for j in range(2):
                h = nn.relu(unit(w, 3, 1, name=f"conv{2 * stage + j + 1}")(h, task, train))
            h = nn.max_pool(h, (2, 2), (2, 2))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(self.dense(self.hidden, weight_init=self.weight_init, dtype=self.dtype, name="fc")(h, task))
        return Heads(self.num_heads, self.num_outputs, self.classes_per_head, self.weight_init, name="head")(h, task)
