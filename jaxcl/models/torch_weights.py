"""Weights from the ecosystem's files: torchvision's (and timm's) ResNet-18/34/50 and
VGG-16/VGG-16-BN ``.safetensors`` files into jaxcl's ImageNet-layout models
(``resnet18``, ``resnet34``, ``resnet50``, ``vgg16``, ``vgg16_bn``), and timm's Vision
Transformers into ``vit_ti16``/``vit_s16``/``vit_b16``/``vit_l16`` (and any
:class:`~jaxcl.models.vit.ViT`)::

    jaxcl run ... --set model.name=resnet50 --set model.pretrained=resnet50.safetensors
    jaxcl run ... --set model.pretrained=runs/pretrain-c10      # a jaxcl run, as before

The file keeps torchvision's key names and layouts; here conv kernels go from OIHW to
HWIO, dense kernels from (out, in) to (in, out), batch norm ``weight``, ``bias``,
``running_mean``, ``running_var`` to ``scale``, ``bias``, ``mean``, ``var`` (eps 1e-5 on
both sides); ``num_batches_tracked`` is ignored. timm's key names are torchvision's for
these ResNets; its VGG's ``pre_logits.fc1``/``pre_logits.fc2``/``head.fc`` (convs) are
read as ``classifier.0``/``classifier.3``/``classifier.6``.

timm's ViT keys: ``patch_embed.proj`` (the conv kernel ``[D, C, p, p]`` becomes the dense
kernel ``[p * p * C, D]`` on flattened patches), ``cls_token``, ``pos_embed``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` (LayerNorm
``weight`` is ``scale``), ``head``. When the images give another grid of patches than the
file's (``data.image_size``), the position embedding is resampled as timm's
``resample_abs_pos_embed`` does when it loads a checkpoint (timm 1.0.31's
``checkpoint_filter_fn``): the cls entry kept, the grid resized by PyTorch's bicubic
interpolation with ``antialias=True`` and ``align_corners=False`` (:func:`resample_grid`;
the file's grid is taken as square).

The last classifier layer (``fc``, ``classifier.6``: 1000 ImageNet classes) is dropped:
the per-task heads take its place (a ViT's ``head``, too). ``keep_head=True`` loads it into every head instead
(the heads must then have its size). A batch norm fills every task's row of a
``TaskNorm``, as :func:`jaxcl.checkpoint.graft` does. Pickles (``.pth``, ``.pt``,
``.bin``, ``.ckpt``) are refused with the command that converts them.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcl import checkpoint
from jaxcl.models.resnet import ResNet
from jaxcl.models.vgg import VGG
from jaxcl.models.vit import ViT

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
    key_of, head = _keys(model)
    trees = {"params": traverse_util.flatten_dict(params), "model_state": traverse_util.flatten_dict(model_state)}
    wanted, wrong, counts = set(), [], {"params": 0, "model_state": 0}
    for tree, flat in trees.items():
        for path, dst in list(flat.items()):
            found = key_of(path)
            if found is None or (path[1] == "head" and not keep_head):
                continue
            key, kind = found
            wanted.add(key)
            if key not in tensors:
                continue
            per_task = path[1] == "head" or path[-1].startswith("task_")
            shape = dst.shape[1:] if per_task else dst.shape
            a = _layout(kind, tensors[key], shape, model)
            if a.shape != shape:
                wrong.append(f"{key}: {tuple(tensors[key].shape)} in the file, this model needs "
                             f"{_torch_shape(kind, shape, model)}")
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


def _torch_shape(kind: str, shape: tuple, model=None) -> tuple:
    if kind == "conv" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "patch" and len(shape) == 2:
        p = model.patch
        return (shape[1], shape[0] // (p * p), p, p)
    return tuple(shape[::-1]) if kind == "dense" else tuple(shape)


def _layout(kind: str, a: np.ndarray, shape: tuple, model) -> np.ndarray:
    """A file's array in jaxcl's layout (``shape`` is what the model holds)."""
    if kind == "conv" and a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if kind == "dense":
        return a.T
    if kind == "patch" and a.ndim == 4:  # [D, C, p, p] -> [(p, p, C), D]
        return a.transpose(2, 3, 1, 0).reshape(-1, a.shape[0])
    if kind == "pos" and a.shape != shape and a.ndim == 3 and len(shape) == 3 and a.shape[-1] == shape[-1]:
        old = math.isqrt(a.shape[1] - 1)
        if old * old == a.shape[1] - 1:
            grid = resample_grid(a[0, 1:].reshape(old, old, -1), model.grid)
            return np.concatenate([a[:, :1], grid.reshape(1, -1, a.shape[-1])], 1)
    return a


def _keys(model):
    """(a function: flattened jaxcl variable path -> (file key, kind) or None, the
    prefix of the file's ImageNet classifier keys)."""
    if isinstance(model, ViT):
        return _vit_key, "head."
    name = _namer(model)
    return functools.partial(_torch_key, name=name), name(("head",), "dense") + "."


def _vit_key(path: tuple) -> tuple[str, str] | None:
    """(timm key, kind: dense | patch | pos | plain) of a ViT variable; None for the
    variables timm has no counterpart of (methods' own)."""
    collection, *path = path
    if collection != "params":
        return None
    *module, leaf = path
    if not module:
        return {"cls_token": ("cls_token", "plain"), "pos_embed": ("pos_embed", "pos")}.get(leaf)
    prefix = ".".join(m.replace("blocks_", "blocks.", 1) if m.startswith("blocks_") else m for m in module)
    if leaf == "kernel":
        return f"{prefix}.weight", "patch" if module == ["patch_embed", "proj"] else "dense"
    if leaf in ("bias", "scale"):
        return f"{prefix}.{'weight' if leaf == 'scale' else 'bias'}", "plain"
    return None


def _cubic_aa(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The bicubic kernel of PyTorch's antialiased interpolation (PIL's, a = -0.5)."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]``: PyTorch's ``interpolate(mode="bicubic", antialias=True,
    align_corners=False)`` along one axis (ATen's ``_compute_indices_min_size_weights_aa``):
    taps within ``support`` of the output pixel's centre, weights normalised to sum 1."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = _cubic_aa((np.arange(lo, hi) - center + 0.5) * invscale)
        w[i, lo:hi] = taps / taps.sum()
    return w


def resample_grid(grid: np.ndarray, size: tuple) -> np.ndarray:
    """``[h, w, D]`` -> ``[size[0], size[1], D]`` as timm resamples a position embedding."""
    wh, ww = _aa_weights(grid.shape[0], size[0]), _aa_weights(grid.shape[1], size[1])
    out = np.einsum("ih,hwd->iwd", wh, grid.astype(np.float64))
    return np.einsum("jw,iwd->ijd", ww, out).astype(grid.dtype)


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
    raise WeightsError(f"model.pretrained: torchvision/timm weights fit the ResNets, VGGs and ViTs; "
                       f"not {type(model).__name__}")
