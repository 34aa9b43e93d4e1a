"""Vision Transformers in timm's layout (Dosovitskiy et al., ICLR 2021; timm's
``VisionTransformer``), so that timm's ``.safetensors`` files load by key name
(:mod:`jaxcl.models.torch_weights`), plus a token interface for prompt methods.

``vit_ti16`` / ``vit_s16`` / ``vit_b16`` / ``vit_l16`` are timm's ``vit_{tiny,small,base,
large}_patch16_224``; ``vit_cifar`` is a CPU-size ViT (patch 4 on 32x32, width 64, depth 4,
4 heads) for tests and CPU benchmarks.

The network: patch embedding (a ``patch`` x ``patch`` stride-``patch`` convolution with bias,
computed as a ``Dense`` on the flattened patches, which is the same map), a cls token, a learned
absolute position embedding over cls + patches, ``depth`` pre-norm blocks (LayerNorm eps 1e-6,
fused qkv ``Dense`` with bias, heads-major attention (float32 softmax), output
projection, LayerNorm, MLP ``mlp_ratio`` x with exact (erf) GELU), a final LayerNorm and the
per-task heads (:class:`~jaxcl.models.layers.Heads`). The compute dtype is ``dtype``
(LayerNorm statistics in float32), dropout and drop-path are off by default.

Parameter names follow timm's keys: ``patch_embed/proj``, ``cls_token``, ``pos_embed``,
``blocks_N/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}``, ``norm``, ``head``. Every
dense layer is the model's ``dense`` field and every LayerNorm its ``layer_norm`` field, so
methods extend them (NCCL's calibration, ResCL's combination) with ``model.clone(...)``.

Token interface (prompt methods; the model protocol stays ``model(x, task, train)``)::

    model.apply(v, x, task, train, prompts=P, prefixes=..., pool="prompt", features=True)
    model.apply(v, x, method=model.tokens)                  # [B, 1+N, D]
    model.apply(v, tokens, train, prefixes, method=model.encode)   # [B, T, D]
    model.apply(v, feature, task, method=model.classify)    # the heads' logits

``prompts`` ``[B, P, D]`` (or ``[P, D]``) are inserted after the cls token, before the
patches, with no position embedding; ``prefixes`` is None or one entry per block, None or a
pair ``(pk, pv)`` of ``[B, Lp, D]`` (or ``[Lp, D]``) prepended to that block's attention keys
and values (prefix tuning). ``pool``: ``cls`` (the cls token's output), ``prompt`` (the mean
of the prompt tokens' outputs, L2P's ``vit_classifier="prompt"``), ``mean`` (the mean of the
patch tokens' outputs).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.models.layers import Dense, Heads, ModuleDef, _dtype

POOLS = ("cls", "prompt", "mean")


class LayerNorm(nn.Module):
    """PyTorch's LayerNorm over the last axis (biased variance, two passes), statistics in
    float32, output in the compute dtype. ``adapt(scale, bias, task)`` is the hook a method
    overrides (as ``Dense.adapt``)."""

    epsilon: float = 1e-6
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, task=None):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        scale, bias = self.adapt(scale, bias, task)
        return self.affine(normalise(x, self.epsilon), scale, bias).astype(_dtype(self.dtype))

    def adapt(self, scale, bias, task):
        return scale, bias

    @staticmethod
    def affine(xhat, scale, bias):
        return xhat * scale + bias


def normalise(x, epsilon: float):
    """(x - mean) / sqrt(var + eps) over the last axis, in float32, with its gradient
    written out: ``rstd * (g - mean(g) - xhat * mean(g * xhat))`` from the saved ``xhat``
    and ``rstd``. Autodiff's own backward of these lines is a longer chain of elementwise
    ops; W6's train step is ~10 % faster on XLA:CPU with this one (benchmarks/RESULTS.md)."""
    return _normalise(x.astype(jnp.float32), epsilon)


def _stats(x, epsilon):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    rstd = jax.lax.rsqrt(var + epsilon)
    return (x - mean) * rstd, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalise(x, epsilon):
    return _stats(x, epsilon)[0]


def _normalise_fwd(x, epsilon):
    xhat, rstd = _stats(x, epsilon)
    return xhat, (xhat, rstd)


def _normalise_bwd(epsilon, res, g):
    xhat, rstd = res
    return (rstd * (g - jnp.mean(g, -1, keepdims=True) - xhat * jnp.mean(g * xhat, -1, keepdims=True)),)


_normalise.defvjp(_normalise_fwd, _normalise_bwd)


class PatchEmbed(nn.Module):
    """``[B, H, W, C]`` -> ``[B, N, D]``: non-overlapping ``patch`` x ``patch`` patches,
    each flattened (row, column, channel) and projected by ``proj`` (timm's stride-``patch``
    convolution, kernel ``[D, C, p, p]`` = this Dense kernel ``[p * p * C, D]`` reordered)."""

    patch: int
    width: int
    dense: ModuleDef

    @nn.compact
    def __call__(self, x, task=None):
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
        return self.dense(self.width, name="proj")(x, task)


def _batched(a, b):
    return jnp.broadcast_to(a, (b,) + a.shape) if a.ndim == 2 else a


class Attention(nn.Module):
    heads: int
    dense: ModuleDef

    @nn.compact
    def __call__(self, x, task=None, prefix=None):
        b, t, d = x.shape
        h = self.heads
        qkv = self.dense(3 * d, name="qkv")(x, task).reshape(b, t, 3, h, d // h)  # timm's (3, heads, head_dim) order
        # heads-major once for q, k and v (one copy, as timm's permute), the scale on q
        # (T x D numbers, not the T x T logits), the softmax in float32: ~7 % of W6's train
        # step less than jax.nn.dot_product_attention, which transposes each operand and
        # scales the logits (benchmarks/RESULTS.md)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * jnp.asarray((d // h) ** -0.5, qkv.dtype), qkv[1], qkv[2]
        if prefix is not None:  # prefix-tuning: [B or 1, P, D] keys and values before the tokens'
            pk, pv = (_batched(jnp.asarray(a), b).astype(k.dtype).reshape(b, -1, h, d // h).transpose(0, 2, 1, 3)
                      for a in prefix)
            k, v = jnp.concatenate([pk, k], 2), jnp.concatenate([pv, v], 2)
        logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
        y = jnp.einsum("bnts,bnsh->bnth", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
        return self.dense(d, name="proj")(y.transpose(0, 2, 1, 3).reshape(b, t, d), task)


class Mlp(nn.Module):
    hidden: int
    dense: ModuleDef
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, task=None, train=False):
        y = nn.gelu(self.dense(self.hidden, name="fc1")(x, task), approximate=False)
        if self.dropout:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return self.dense(x.shape[-1], name="fc2")(y, task)


class Block(nn.Module):
    heads: int
    hidden: int
    dense: ModuleDef
    layer_norm: ModuleDef
    dropout: float = 0.0
    drop_path: float = 0.0

    def _residual(self, x, y, train):
        if self.dropout:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        if self.drop_path and train:  # stochastic depth: drop the branch per sample
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.drop_path, (x.shape[0], 1, 1))
            y = jnp.where(keep, y / (1.0 - self.drop_path), 0).astype(y.dtype)
        return x + y

    @nn.compact
    def __call__(self, x, task=None, train=False, prefix=None):
        y = Attention(self.heads, self.dense, name="attn")(self.layer_norm(name="norm1")(x, task), task, prefix)
        x = self._residual(x, y, train)
        y = Mlp(self.hidden, self.dense, self.dropout, name="mlp")(self.layer_norm(name="norm2")(x, task), task, train)
        return self._residual(x, y, train)


class ViT(nn.Module):
    num_heads: int = 1
    num_outputs: int = 10
    classes_per_head: tuple = ()
    weight_init: str = "torch"
    dtype: str = "float32"
    image_size: tuple = (224, 224)  # (H, W), or one int: the position embedding's grid
    patch: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12  # attention heads
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    drop_path: float = 0.0  # the last block's rate; block i drops i / (depth - 1) of it, as timm
    pool: str = "cls"
    dense: ModuleDef = Dense
    layer_norm: ModuleDef = LayerNorm

    @property
    def grid(self) -> tuple:
        hw = (self.image_size,) * 2 if isinstance(self.image_size, int) else tuple(self.image_size)
        return hw[0] // self.patch, hw[1] // self.patch

    def setup(self):
        if self.width % self.heads:
            raise ValueError(f"ViT: width {self.width} is not a multiple of heads {self.heads}")
        if self.pool not in POOLS:
            raise ValueError(f"ViT: pool {self.pool!r} is not one of {', '.join(POOLS)}")
        dense = functools.partial(self.dense, weight_init=self.weight_init, dtype=self.dtype)
        norm = functools.partial(self.layer_norm, dtype=self.dtype)
        gh, gw = self.grid
        self.patch_embed = PatchEmbed(self.patch, self.width, dense)
        self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
        self.pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + gh * gw, self.width))
        rates = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]
        self.blocks = [Block(self.heads, int(self.width * self.mlp_ratio), dense, norm, self.dropout, r)
                       for r in rates]
        self.norm = norm()
        self.head = Heads(self.num_heads, self.num_outputs, self.classes_per_head, self.weight_init)

    def tokens(self, x, task=None):
        """``[B, H, W, C]`` -> ``[B, 1 + N, D]``: patch embedding, cls token prepended,
        position embedding added."""
        hw = tuple(x.shape[1:3])
        gh, gw = self.grid
        if hw[0] // self.patch != gh or hw[1] // self.patch != gw or hw[0] % self.patch or hw[1] % self.patch:
            raise ValueError(f"ViT: images of {hw[0]}x{hw[1]} do not fit its {gh}x{gw} grid of {self.patch}-pixel "
                             f"patches ({gh * self.patch}x{gw * self.patch} images)")
        dt = _dtype(self.dtype)
        t = self.patch_embed(x, task).astype(dt)
        cls = jnp.broadcast_to(self.cls_token.astype(dt), (t.shape[0], 1, self.width))
        return jnp.concatenate([cls, t], 1) + self.pos_embed.astype(dt)

    def encode(self, tokens, train: bool = False, prefixes: Optional[Sequence] = None, task=None):
        """Every block, then the final LayerNorm; ``prefixes`` (one entry per block, None or
        ``(pk, pv)``) are prepended to each block's attention keys and values."""
        if prefixes is not None and len(prefixes) != self.depth:
            raise ValueError(f"ViT: prefixes has {len(prefixes)} entries, one per block expected ({self.depth})")
        h = tokens
        if self.dropout:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        for i, block in enumerate(self.blocks):
            h = block(h, task, train, None if prefixes is None else prefixes[i])
        return self.norm(h, task)

    def classify(self, feature, task=None):
        """The per-task heads on a pooled feature ``[B, D]`` (``task`` may be ``"all"``)."""
        return self.head(feature, task)

    def __call__(self, x, task=None, train: bool = False, *, prompts=None, prefixes=None, pool=None,
                 features: bool = False):
        t = self.tokens(x, task)
        n_prompts = 0
        if prompts is not None:
            prompts = _batched(jnp.asarray(prompts), t.shape[0]).astype(t.dtype)
            n_prompts = prompts.shape[1]
            t = jnp.concatenate([t[:, :1], prompts, t[:, 1:]], 1)
        out = self.encode(t, train, prefixes, task)
        pool = pool or self.pool
        if pool == "cls":
            feat = out[:, 0]
        elif pool == "prompt":
            if not n_prompts:
                raise ValueError("ViT: pool='prompt' needs prompts")
            feat = jnp.mean(out[:, 1:1 + n_prompts].astype(jnp.float32), 1)
        elif pool == "mean":
            feat = jnp.mean(out[:, 1 + n_prompts:].astype(jnp.float32), 1)
        else:
            raise ValueError(f"ViT: pool {pool!r} is not one of {', '.join(POOLS)}")
        feat = feat.astype(jnp.float32)
        return feat if features else self.classify(feat, task)


VARIANTS = {  # name: (timm name, width, depth, heads, patch, image size)
    "vit_ti16": ("vit_tiny_patch16_224", 192, 12, 3, 16, 224),
    "vit_s16": ("vit_small_patch16_224", 384, 12, 6, 16, 224),
    "vit_b16": ("vit_base_patch16_224", 768, 12, 12, 16, 224),
    "vit_l16": ("vit_large_patch16_224", 1024, 24, 16, 16, 224),
    "vit_cifar": ("", 64, 4, 4, 4, 32),
}


def variant(name: str):
    _, width, depth, heads, patch, size = VARIANTS[name]
    return functools.partial(ViT, width=width, depth=depth, heads=heads, patch=patch, image_size=(size, size))
