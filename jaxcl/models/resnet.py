"""ResNets: the CIFAR layout (3x3 stride-1 stem, no max-pool; width 20 is the "reduced"
ResNet-18 of GEM / La-MAML / NCCL, width 64 the standard CIFAR ResNet-18) and the
ImageNet layout (7x7 stride-2 stem and 3x3 max-pool; ResNet-18 and ResNet-50).

Every conv is a ``unit`` (``layers.ConvNorm``: conv then batch norm); blocks apply the
activations. Parameter names: ``stem``, ``layer{stage}_{block}/{conv1,conv2,conv3,shortcut}``,
``head``.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.models.layers import Conv, ConvNorm, Heads, ModuleDef, Norm


class BasicBlock(nn.Module):
    features: int
    strides: int
    unit: ModuleDef
    expansion = 1

    @nn.compact
    def __call__(self, x, task=None, train=False):
        y = nn.relu(self.unit(self.features, 3, self.strides, name="conv1")(x, task, train))
        y = self.unit(self.features, 3, 1, name="conv2")(y, task, train)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = self.unit(self.features, 1, self.strides, name="shortcut")(x, task, train)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, as torchvision's v1.5) -> 1x1 with 4x channels."""

    features: int
    strides: int
    unit: ModuleDef
    expansion = 4

    @nn.compact
    def __call__(self, x, task=None, train=False):
        y = nn.relu(self.unit(self.features, 1, 1, name="conv1")(x, task, train))
        y = nn.relu(self.unit(self.features, 3, self.strides, name="conv2")(y, task, train))
        y = self.unit(4 * self.features, 1, 1, name="conv3")(y, task, train)
        if self.strides != 1 or x.shape[-1] != 4 * self.features:
            x = self.unit(4 * self.features, 1, self.strides, name="shortcut")(x, task, train)
        return nn.relu(y + x)


class ResNet(nn.Module):
    stage_sizes: tuple = (2, 2, 2, 2)
    block: ModuleDef = BasicBlock
    width: int = 64
    stem: str = "cifar"  # cifar | imagenet
    num_heads: int = 1
    num_outputs: int = 10
    classes_per_head: tuple = ()
    weight_init: str = "torch"
    dtype: str = "float32"
    conv: ModuleDef = Conv
    norm: ModuleDef = Norm
    unit: ModuleDef = ConvNorm

    @nn.compact
    def __call__(self, x: jax.Array, task=None, train: bool = False) -> jax.Array:
        conv = functools.partial(self.conv, weight_init=self.weight_init, dtype=self.dtype)
        unit = functools.partial(self.unit, conv=conv, norm=self.norm)
        if self.stem == "cifar":
            h = nn.relu(unit(self.width, 3, 1, name="stem")(x, task, train))
        else:
            h = nn.relu(unit(self.width, 7, 2, name="stem")(x, task, train))
            h = nn.max_pool(h, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                h = self.block(self.width * 2 ** i, strides, unit, name=f"layer{i + 1}_{j}")(h, task, train)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return Heads(self.num_heads, self.num_outputs, self.classes_per_head, self.weight_init, name="head")(h, task)
