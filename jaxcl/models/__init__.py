"""Flax Linen models, found by name (``jaxcl list`` prints them).

Every model maps ``(x, task, train)`` to logits and ends in ``layers.Heads`` named
``head``; everything before the head is the trunk.
"""
from __future__ import annotations

import functools

from jaxcl.models.cnn import CNN
from jaxcl.models.layers import Conv, ConvNorm, Dense, Heads, Norm
from jaxcl.models.mlp import MLP
from jaxcl.models.resnet import BasicBlock, Bottleneck, ResNet
from jaxcl.models.vgg import VGG
from jaxcl.models.vit import ViT, LayerNorm
from jaxcl.models import vit as _vit
from jaxcl.models.wrn import WideResNet

_MODELS = {
    "mlp": MLP,
    "cnn": CNN,
    "reduced_resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock, width=20, stem="cifar"),
    "resnet18_cifar": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock, width=64, stem="cifar"),
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock, width=64, stem="imagenet"),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock, width=64, stem="imagenet"),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck, width=64, stem="imagenet"),
    "vgg16": functools.partial(VGG, batch_norm=False, conv_bias=True, pool=7, dropout=0.5),
    "vgg16_bn": functools.partial(VGG, batch_norm=True, conv_bias=True, pool=7, dropout=0.5),
    "vgg16_bn_cifar": VGG,
    "wrn28_2": functools.partial(WideResNet, depth=28, widen=2),
    **{name: _vit.variant(name) for name in _vit.VARIANTS},
}
VITS = tuple(_vit.VARIANTS)
RESNETS = ("reduced_resnet18", "resnet18_cifar", "resnet18", "resnet34", "resnet50")  # model.stages

DESCRIPTIONS = {
    "mlp": "MLP on flattened input (model.hidden, model.activation, model.dropout)",
    "cnn": "small CNN: 2x(conv3x3, conv3x3, maxpool), dense 512 (model.width, default 32)",
    "reduced_resnet18": "reduced ResNet-18 of GEM/La-MAML/NCCL: BasicBlock [2,2,2,2], width 20, 3x3 stem",
    "resnet18_cifar": "CIFAR ResNet-18: BasicBlock [2,2,2,2], width 64, 3x3 stem, no max-pool",
    "resnet18": "ImageNet-layout ResNet-18: 7x7/2 stem, max-pool, BasicBlock [2,2,2,2]",
    "resnet34": "ImageNet-layout ResNet-34: BasicBlock [3,4,6,3]",
    "resnet50": "ImageNet-layout ResNet-50: Bottleneck [3,4,6,3]",
    "vgg16": "torchvision's ImageNet VGG-16: 13 convs with bias, 7x7 adaptive pool, dense 25088-4096-4096, dropout 0.5",
    "vgg16_bn": "torchvision's ImageNet VGG-16-BN: vgg16 with batch norm after every conv",
    "vgg16_bn_cifar": "VGG-16 with batch norm for 32x32 inputs, dense 512-4096-4096 trunk (CPG's vgg16_bn_cifar100)",
    "wrn28_2": "Wide ResNet 28-2, pre-activation, for 32x32 inputs",
    "vit_ti16": "timm's ViT-Ti/16 (vit_tiny_patch16_224): width 192, depth 12, 3 heads, 5.5M parameters",
    "vit_s16": "timm's ViT-S/16 (vit_small_patch16_224): width 384, depth 12, 6 heads, 21.7M parameters",
    "vit_b16": "timm's ViT-B/16 (vit_base_patch16_224): width 768, depth 12, 12 heads, 85.8M parameters",
    "vit_l16": "timm's ViT-L/16 (vit_large_patch16_224): width 1024, depth 24, 16 heads, 303M parameters",
    "vit_cifar": "small ViT for CPUs: patch 4 (on 32x32: 64 patches), width 64, depth 4, 4 heads (model.width)",
}


def available() -> list[str]:
    return sorted(_MODELS)


def build(cfg_model, info, **overrides):
    """The model named by ``cfg_model.name`` with heads shaped for ``info`` (a StreamInfo)."""
    name = cfg_model.name
    if name not in _MODELS:
        raise ValueError(f"model.name: unknown model {name!r}; known: {', '.join(available())}")
    kw = dict(num_heads=info.num_heads, num_outputs=info.num_outputs, classes_per_head=tuple(info.classes_per_head),
              weight_init=cfg_model.init, dtype=cfg_model.dtype)
    if name == "mlp":
        kw.update(hidden=tuple(cfg_model.hidden), activation=cfg_model.activation, dropout=cfg_model.dropout)
    elif cfg_model.width:
        kw.update(width=cfg_model.width)
    if name in VITS:  # the position embedding's grid comes from the images; dropout as the MLP's
        kw.update(image_size=tuple(info.input_shape[:2]), dropout=cfg_model.dropout)
        if cfg_model.get("depth"):
            kw.update(depth=cfg_model.depth)
    if name in RESNETS and getattr(cfg_model, "stages", ()):
        kw.update(stage_sizes=tuple(cfg_model.stages))
    kw.update(overrides)
    return _MODELS[name](**kw)


__all__ = ["BasicBlock", "Bottleneck", "CNN", "Conv", "ConvNorm", "DESCRIPTIONS", "Dense", "Heads", "MLP", "Norm",
           "RESNETS", "ResNet", "VGG", "VITS", "ViT", "LayerNorm", "WideResNet", "available", "build"]
