"""VGG with batch norm for 32x32 inputs, as the CPG repository's ``vgg16_bn_cifar100``
(used for PackNet/CPG on CIFAR-100): 13 3x3 conv units (bias-free conv, batch norm,
ReLU) in five stages with 2x2 max-pools, then dense 512 -> 4096 -> 4096 (ReLU) in the
shared trunk, then the per-task heads."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxcl.models.layers import Conv, ConvNorm, Dense, Heads, ModuleDef, Norm

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    layout: tuple = VGG16
    hidden: int = 4096
    width: int = 64  # channels of the first stage; later stages scale with it
    num_heads: int = 1
    num_outputs: int = 10
    classes_per_head: tuple = ()
    weight_init: str = "torch"
    dtype: str = "float32"
    conv: ModuleDef = Conv
    norm: ModuleDef = Norm
    dense: ModuleDef = Dense
    unit: ModuleDef = ConvNorm

    @nn.compact
    def __call__(self, x: jax.Array, task=None, train: bool = False) -> jax.Array:
        conv = functools.partial(self.conv, weight_init=self.weight_init, dtype=self.dtype)
        unit = functools.partial(self.unit, conv=conv, norm=self.norm)
        h, i = x, 0
        for v in self.layout:
            if v == "M":
                h = nn.max_pool(h, (2, 2), (2, 2))
            else:
                i += 1
                h = nn.relu(unit(v * self.width // 64, 3, 1, name=f"conv{i}")(h, task, train))
        h = h.reshape(h.shape[0], -1)
        for j in (1, 2):
            h = nn.relu(self.dense(self.hidden, weight_init=self.weight_init, dtype=self.dtype, name=f"fc{j}")(h, task))
        return Heads(self.num_heads, self.num_outputs, self.classes_per_head, self.weight_init, name="head")(h, task)
