"""A ResNet small enough to compile in seconds, for tests whose claim holds for any ResNet
(frozen or pruned weights bit for bit, per-task batch norm, mixed-task batches), not for
the reduced ResNet-18's size: the CIFAR stem and one BasicBlock in each of 2 stages,
width 8. It keeps what those claims touch: 3x3 convs, a strided block, a 1x1 shortcut
and batch norm everywhere (6 convs against reduced_resnet18's 20; its train steps compile
~3x faster). ``tiny_resnet()`` registers it as ``model.name=tiny_resnet`` (so that
``jaxcl.run`` builds it by name) until the block ends."""
from __future__ import annotations

import contextlib
import functools

import pytest

from jaxcl import models
from jaxcl.models import BasicBlock, ResNet

TINY = "tiny_resnet"
make_tiny = functools.partial(ResNet, stage_sizes=(1, 1), block=BasicBlock, width=8, stem="cifar")
TINY_CONVS = 6  # stem, layer1_0/conv1-2, layer2_0/conv1-2 and shortcut
TINY_3X3_CHANNELS = 8 + 8 + 8 + 16 + 16  # every 3x3 conv's output channels
TINY_ALL_CHANNELS = TINY_3X3_CHANNELS + 16  # with the 1x1 shortcut's


@contextlib.contextmanager
def tiny_resnet():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models._MODELS, TINY, make_tiny)
        yield TINY
