"""VGG-16 in two layouts.

* ``vgg16_bn_cifar``: the CPG repository's ``vgg16_bn_cifar100`` for 32x32 inputs (used
  for PackNet/CPG on CIFAR-100): 13 3x3 conv units (bias-free conv, batch norm, ReLU) in
  five stages with 2x2 max-pools, then dense 512 -> 4096 -> 4096 (ReLU) in the shared
  trunk, then the per-task heads.
* ``vgg16`` / ``vgg16_bn``: torchvision's ImageNet layout, so its weights load
  (:mod:`jaxcl.models.torch_weights`): convs with biases (and batch norm for ``_bn``),
  adaptive average pool to 7x7, flattened channel-major as torchvision's ``flatten``,
  dense 25088 -> 4096 -> 4096 with ReLU and dropout 0.5; the heads take the place of
  torchvision's last layer (``classifier.6``).

Parameter names: ``conv{i}`` (i = 1..13), ``fc1``, ``fc2``, ``head``.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxcl.models.layers import Conv, ConvNorm, Dense, Heads, ModuleDef, Norm, adaptive_avg_pool

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    layout: tuple = VGG16
    hidden: int = 4096
    width: int = 64  # channels of the first stage; later stages scale with it
    batch_norm: bool = True
    conv_bias: bool = False
    pool: int = 0  # > 0: adaptive average pool to pool x pool and flatten channel-major (torchvision)
    dropout: float = 0.0  # after each hidden dense layer
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
        conv = functools.partial(self.conv, use_bias=self.conv_bias, weight_init=self.weight_init, dtype=self.dtype)
        unit = functools.partial(self.unit, conv=conv, norm=self.norm if self.batch_norm else None)
        h, i = x, 0
        for v in self.layout:
            if v == "M":
                h = nn.max_pool(h, (2, 2), (2, 2))
            else:
                i += 1
                h = nn.relu(unit(v * self.width // 64, 3, 1, name=f"conv{i}")(h, task, train))
        if self.pool:
            h = adaptive_avg_pool(h, self.pool).transpose(0, 3, 1, 2)
        h = h.reshape(h.shape[0], -1)
        for j in (1, 2):
            h = nn.relu(self.dense(self.hidden, weight_init=self.weight_init, dtype=self.dtype, name=f"fc{j}")(h, task))
            if self.dropout:
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return Heads(self.num_heads, self.num_outputs, self.classes_per_head, self.weight_init, name="head")(h, task)
