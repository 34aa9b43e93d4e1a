"""A ResNet small enough to compile in seconds, for tests whose claim holds for any ResNet
(frozen or pruned weights bit for bit, per-task batch norm, mixed-task batches), not for
the reduced ResNet-18's size: the reduced ResNet-18 with ``model.stages=(1, 1)`` and
``model.width=8``, i.e. the CIFAR stem and one BasicBlock in each of 2 stages. It keeps
what those claims touch: 3x3 convs, a strided block, a 1x1 shortcut and batch norm
everywhere (6 convs against the full one's 20; its train steps compile ~3x faster).
``TINY``: its ``make_config`` settings (``TINY_SETS``: as overrides); ``make_tiny``: the Flax module itself."""
from __future__ import annotations

import functools

from jaxcl.models import BasicBlock, ResNet

TINY = {"model__name": "reduced_resnet18", "model__stages": (1, 1), "model__width": 8}
TINY_SETS = [f"{k.replace('__', '.')}={v}" for k, v in TINY.items()]  # as --set overrides
make_tiny = functools.partial(ResNet, stage_sizes=(1, 1), block=BasicBlock, width=8, stem="cifar")
TINY_CONVS = 6  # stem, layer1_0/conv1-2, layer2_0/conv1-2 and shortcut
TINY_3X3_CHANNELS = 8 + 8 + 8 + 16 + 16  # every 3x3 conv's output channels
TINY_ALL_CHANNELS = TINY_3X3_CHANNELS + 16  # with the 1x1 shortcut's
