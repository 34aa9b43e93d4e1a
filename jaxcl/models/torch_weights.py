"""Weights from the ecosystem's files: torchvision's (and timm's) ResNet-18/34/50 and
VGG-16/VGG-16-BN ``.safetensors`` files into jaxcl's ImageNet-layout models
(``resnet18``, ``resnet34``, ``resnet50``, ``vgg16``, ``vgg16_bn``)::

    jaxcl run ... --set model.name=resnet50 --set model.pretrained=resnet50.safetensors
    jaxcl run ... --set model.pretrained=runs/pretrain-c10      # a jaxcl run, as before

The file keeps torchvision's key names and layouts; here conv kernels go from OIHW to
HWIO, dense kernels from (out, in) to (in, out), batch norm ``weight``, ``bias``,
``running_mean``, ``running_var`` to ``scale``, ``bias``, ``mean``, ``var`` (eps 1e-5 on
both sides); ``num_batches_tracked`` is ignored. timm's key names are torchvision's for
these ResNets; its VGG's ``pre_logits.fc1``/``pre_logits.fc2``/``head.fc`` (convs) are
read as ``classifier.0``/``classifier.3``/``classifier.6``.

The last classifier layer (``fc``, ``classifier.6``: 1000 ImageNet classes) is dropped:
the per-task heads take its place. ``keep_head=True`` loads it into every head instead
(the heads must then have its size). A batch norm fills every task's row of a
``TaskNorm``, as :func:`jaxcl.checkpoint.graft` does. Pickles (``.pth``, ``.pt``,
``.bin``, ``.ckpt``) are refused with the command that converts them.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import traverse_util

from jaxcl import checkpoint
from jaxcl.models.resnet import ResNet
from jaxcl.models.vgg import VGG

PICKLES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
TIMM_VGG = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.", "head.fc.": "classifier.6."}
BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
SHOWN = 5  # offenders listed per kind


class WeightsError(checkpoint.CheckpointError):
    """A weight file this model cannot start from: a pickle, missing or unexpected keys,
    arrays of the wrong shape."""


def load_pretrained(params, model_state, path: str, model=None, keep_head: bool = False):
    """``(params, model_state, n_params, n_stats)``: the State's ``params`` and
    ``model_state`` with the trunk read from ``path`` (a ``.safetensors`` file of
    torchvision's key names, or a jaxcl run's workdir), and how many arrays of each
    were replaced. ``model`` (the built model) tells a file's layout; a workdir is
    grafted by parameter path and needs none."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLES:
        out = str(Path(path).with_suffix(".safetensors"))
        raise WeightsError(
            f"model.pretrained={path}: a pickle, which jaxcl never loads (unpickling runs code). Convert it "
            f"once, with PyTorch: python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{path}', weights_only=True), '{out}')\" and pass model.pretrained={out}")
    if suffix == ".safetensors":
        return load_torch(params, model_state, read(path), model, keep_head, str(path))
    src = checkpoint.load_state(path)
    params, n_params = checkpoint.graft(params, src.get("params", {}))
    model_state, n_stats = checkpoint.graft(model_state, src.get("model_state", {}))
    if n_params == 0:
        raise checkpoint.CheckpointError(f"model.pretrained={path}: no parameter of this model found in it")
    return params, model_state, n_params, n_stats


def read(path: str) -> dict:
    """The arrays of a safetensors file by torchvision key name (timm's VGG names
    renamed, its 1x1/7x7 conv classifier flattened to dense)."""
    from safetensors.numpy import load_file
    try:
        tensors = load_file(path)
    except Exception as e:
        raise WeightsError(f"model.pretrained={path}: cannot read it as safetensors "
                           f"({type(e).__name__}: {str(e)[:200]})") from None
    out = {}
    for k, v in tensors.items():
        for timm, tv in TIMM_VGG.items():
            if k.startswith(timm):
                k, v = tv + k[len(timm):], v.reshape(v.shape[0], -1) if v.ndim == 4 else v
        out[k] = v
    return out


def load_torch(params, model_state, tensors: dict, model, keep_head: bool = False, source: str = "weights"):
    """:func:`load_pretrained` for arrays already read (torchvision key -> array)."""
    name = _namer(model)
    head = name(("head",), "dense") + "."
    trees = {"params": traverse_util.flatten_dict(params), "model_state": traverse_util.flatten_dict(model_state)}
    wanted, wrong, counts = set(), [], {"params": 0, "model_state": 0}
    for tree, flat in trees.items():
        for path, dst in list(flat.items()):
            found = _torch_key(path, name)
            if found is None or (path[1] == "head" and not keep_head):
                continue
            key, kind = found
            wanted.add(key)
            if key not in tensors:
                continue
            a = tensors[key]
            a = a.transpose(2, 3, 1, 0) if kind == "conv" and a.ndim == 4 else a.T if kind == "dense" else a
            per_task = path[1] == "head" or path[-1].startswith("task_")
            shape = dst.shape[1:] if per_task else dst.shape
            if a.shape != shape:
                wrong.append(f"{key}: {tuple(tensors[key].shape)} in the file, this model needs "
                             f"{_torch_shape(kind, shape)}")
                continue
            flat[path] = jnp.broadcast_to(jnp.asarray(a, dst.dtype), dst.shape)
            counts[tree] += 1
    missing = sorted(wanted - set(tensors))
    unexpected = sorted(k for k in tensors if k not in wanted and not k.endswith(".num_batches_tracked")
                        and (keep_head or not k.startswith(head)))
    if missing or unexpected or wrong:
        lines = [f"{what} ({len(keys)}): " + "; ".join(keys[:SHOWN]) + ("; ..." if len(keys) > SHOWN else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise WeightsError(f"model.pretrained={source} does not fit model {type(model).__name__}:\n  "
                           + "\n  ".join(lines))
    return (traverse_util.unflatten_dict(trees["params"]), traverse_util.unflatten_dict(trees["model_state"]),
            counts["params"], counts["model_state"])


def _torch_key(path: tuple, name) -> tuple[str, str] | None:
    """(torchvision key, kind: conv | dense | plain) of a jaxcl variable, given by its
    flattened path (collection first); None for variables torchvision has no
    counterpart of (methods' own variables)."""
    collection, *path = path
    if collection not in ("params", "batch_stats"):
        return None
    *module, leaf = path
    if module[-1:] == ["conv"] and leaf in ("kernel", "bias"):
        prefix, suffix, kind = name(tuple(module[:-1]), "conv"), leaf, "conv"
    elif module[-2:] == ["norm", "bn"] and leaf in BN:
        prefix, suffix, kind = name(tuple(module[:-2]), "norm"), BN[leaf], "plain"
    elif module[-1:] == ["norm"] and leaf.startswith("task_") and leaf[5:] in BN:
        prefix, suffix, kind = name(tuple(module[:-1]), "norm"), BN[leaf[5:]], "plain"
    elif len(module) == 1 and leaf in ("kernel", "bias"):
        prefix, suffix, kind = name(tuple(module), "dense"), leaf, "dense"
    else:
        return None
    if prefix is None:
        return None
    return (f"{prefix}.weight", kind) if suffix == "kernel" else (f"{prefix}.{suffix}", "plain")


def _torch_shape(kind: str, shape: tuple) -> tuple:
    if kind == "conv" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape[::-1]) if kind == "dense" else tuple(shape)


def _namer(model):
    """A function (jaxcl module path, part: conv | norm | dense) -> torchvision prefix."""
    if isinstance(model, ResNet):
        def name(module, part):
            if module == ("stem",):
                return {"conv": "conv1", "norm": "bn1"}[part]
            if module == ("head",):
                return "fc"
            if len(module) != 2 or not module[0].startswith("layer"):
                return None
            stage, block = module[0][len("layer"):].split("_")
            if module[1] == "shortcut":
                return f"layer{stage}.{block}.downsample.{0 if part == 'conv' else 1}"
            return f"layer{stage}.{block}.{module[1].replace('conv', 'conv' if part == 'conv' else 'bn')}"
        return name
    if isinstance(model, VGG):
        index, at = {}, 0  # jaxcl conv unit -> its conv's index in torchvision's ``features``
        for v in model.layout:
            if v != "M":
                index[f"conv{len(index) + 1}"] = at
            at += 1 if v == "M" else 3 if model.batch_norm else 2
        dense = {"fc1": "classifier.0", "fc2": "classifier.3", "head": "classifier.6"}

        def name(module, part):
            if len(module) != 1:
                return None
            if module[0] in index:
                return f"features.{index[module[0]] + (part == 'norm')}"
            return dense.get(module[0])
        return name
    raise WeightsError(f"model.pretrained: torchvision weights fit the ResNets and VGGs; not {type(model).__name__}")
