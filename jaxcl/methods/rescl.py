"""ResCL: Residual Continual Learning (Lee, Joo, Hong, Kim, AAAI 2020, arXiv 2002.06774).

Each layer is re-parameterised as a per-channel combination of the source network (what
was learned so far) and a fine-tuned copy of it, the combination is learned with
distillation and a decay pulling it back to the source, then everything merges back into
one network of the original size. Over a stream:

* task 0: the source network is trained as usual (phase ``train``);
* every later task t, stage 1 (phase ``finetune``): the target branch, a copy of the
  source, is fine-tuned alone on task t (cross-entropy; weight decay from the optimizer);
* stage 2 (phase ``combine``): before each nonlinearity every unit computes
  ``(1 + a_s) * h_s + a_t * h_t``, h_s and h_t the source and target unit outputs (conv and
  its own batch norm in each branch, both fed the combined activation), a_s and a_t
  per output channel in the collection ``rescl``. Trained (a_s, a_t, the target branch
  and task t's head) with

      LwF: sum_{k<t} T^2 KL(softmax(z_src,k / T) || softmax(z_k / T))   (the old heads
           against the frozen source network's outputs on the same batch, T = 2)
      + T^2 KL(softmax(z_ft,t / T) || softmax(z_t / T))   (the new head against the
           stage-1 fine-tuned network; ``method.target_loss=ce`` uses the labels instead)
      + lambda * (||a_s||_1 + ||a_t||_1)

  The source branch's batch norm runs on its statistics; the target's learns.
* merge (end of stage 2): batch norm is folded exactly, and the combination written back
  into the source network, which keeps its architecture and size (conv, batch norm,
  heads) and is the source of the next task::

      s = gamma / sqrt(var + eps)  per branch
      W = (1 + a_s) W_s + a_t W_t s_t / s_s,   batch norm: gamma_s, var_s, mean 0,
      beta = (1 + a_s)(beta_s - (mean_s - b_s) s_s) + a_t (beta_t - (mean_t - b_t) s_t)

  so the merged network computes exactly the combined one (inference mode); without
  batch norm (dense layers), W = (1 + a_s) W_s + a_t W_t and b alike.
* Vision Transformers (:mod:`jaxcl.models.vit`): every dense layer (the patch embedding,
  qkv, the attention projection, the MLP's two) is combined at its output, and so is every
  LayerNorm: both branches normalise the same input, so only the affine maps differ,
  ``(1 + a_s)(xhat g_s + b_s) + a_t (xhat g_t + b_t)``, and the merge writes
  ``g = (1 + a_s) g_s + a_t g_t`` and ``b`` alike (exact). The cls token and the position
  embedding are trained on the first task and frozen after.

Default ``a_s = a_t = 0`` (``method.a_init``): stage 2 starts from the source network
itself, so nothing of the old tasks is lost before learning starts, and the L1 decay
pulls toward that same point. The target branch gets no gradient while a_t = 0, but a_t
does (the two branches differ after stage 1), so it leaves 0 at the first step. The
public reproduction (parvex/residual-continual-learning-benchmark) starts from the
average, ``(-0.5, 0.5)``: measured here, on Split-Digits with a reduced ResNet-18 that
start lost task 0 (50 %, chance) while ``(0, 0)`` kept it at 100 % with the same data
order. ``method.l1`` (lambda) sits in the state, so a sweep over lambda can ``vmap`` one
train step over states (``benchmarks/rescl_sweep.py``).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.methods import _intercept, base
from jaxcl.models import layers
from jaxcl.models.vit import normalise

MODES = ("source", "target", "combined")
TEMPERATURE = 2.0


def defaults() -> dict:
    return {"l1": 1e-3, "a_init": (0.0, 0.0), "combine_epochs": 0, "target_loss": "kd", "temperature": TEMPERATURE}


class ResCLUnit(nn.Module):
    """A conv+norm unit with a source and a target branch and their combination.
    ``mode`` picks what it computes: ``source`` (the source branch alone, whose variables
    have the plain ``ConvNorm`` names), ``target`` (the target branch alone) or
    ``combined`` (``(1 + a_s) h_s + a_t h_t``; the source's batch norm in inference
    mode, the target's per ``train``)."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    conv: Any = layers.Conv
    norm: Optional[Any] = layers.Norm
    mode: str = "source"
    a_init: tuple = (0.0, 0.0)

    @nn.compact
    def __call__(self, x, task=None, train: bool = False):
        def branch(prefix, bn_train):
            y = self.conv(self.features, self.kernel_size, self.strides, name=prefix + "conv")(x, task)
            return self.norm(name=prefix + "norm")(y, task, bn_train) if self.norm is not None else y

        return _combine(self, branch, train, self.features)


class ResCLNorm(nn.Module):
    """A standalone norm (pre-activation networks) with a source and a target branch and
    their combination."""

    norm: Any = layers.Norm
    mode: str = "source"
    a_init: tuple = (0.0, 0.0)

    @nn.compact
    def __call__(self, x, task=None, train: bool = False):
        def branch(prefix, bn_train):
            return self.norm(name=prefix + "norm")(x, task, bn_train)

        return _combine(self, branch, train, x.shape[-1])


class ResCLDense(nn.Module):
    """A dense layer with a source (``kernel``, ``bias``: the plain Dense names) and a
    target branch (``target_kernel``, ``target_bias``) and their combination."""

    features: int
    use_bias: bool = True
    weight_init: str = "torch"
    dtype: str = "float32"
    mode: str = "source"
    a_init: tuple = (0.0, 0.0)

    @nn.compact
    def __call__(self, x, task=None):
        fan_in = x.shape[-1]

        def branch(prefix, bn_train):
            k = self.param(prefix + "kernel", layers.kernel_init(self.weight_init, fan_in), (fan_in, self.features))
            y = jnp.dot(x, k)
            if self.use_bias:
                y = y + self.param(prefix + "bias", layers.bias_init(self.weight_init, fan_in), (self.features,))
            return y

        return _combine(self, branch, False, self.features)


class ResCLLayerNorm(nn.Module):
    """A LayerNorm (:class:`jaxcl.models.vit.LayerNorm`) with a source (``scale``,
    ``bias``) and a target affine (``target_scale``, ``target_bias``) and their combination."""

    epsilon: float = 1e-6
    dtype: str = "float32"
    mode: str = "source"
    a_init: tuple = (0.0, 0.0)

    @nn.compact
    def __call__(self, x, task=None):
        d = x.shape[-1]
        xhat = normalise(x, self.epsilon)

        def branch(prefix, bn_train):
            scale = self.param(prefix + "scale", nn.initializers.ones, (d,))
            bias = self.param(prefix + "bias", nn.initializers.zeros, (d,))
            return xhat * scale + bias

        return _combine(self, branch, False, d).astype(layers._dtype(self.dtype))


def _combine(module, branch, train, features):
    a_s = module.variable("rescl", "a_s", lambda: jnp.full((features,), module.a_init[0], jnp.float32))
    a_t = module.variable("rescl", "a_t", lambda: jnp.full((features,), module.a_init[1], jnp.float32))
    if module.is_initializing():  # every variable exists whatever the mode
        ys, yt = branch("", False), branch("target_", False)
        return {"source": ys, "target": yt}.get(module.mode, ys)
    if module.mode == "source":
        return branch("", train)
    if module.mode == "target":
        return branch("target_", train)
    ys, yt = branch("", False), branch("target_", train)
    return (1.0 + a_s.value) * ys + a_t.value * yt


def combination_hook(mode: str, a_init):
    """``_combine`` for a plain ``flax.linen`` Dense or Conv (through interception): the
    target branch is a copy of the layer named ``target_layer`` inside it, the
    combination is taken at the layer's output."""

    def hook(layer, x, y, task, call):
        o = y.shape[-1]
        a_s = layer.variable("rescl", "a_s", lambda: jnp.full((o,), a_init[0], jnp.float32)).value
        a_t = layer.variable("rescl", "a_t", lambda: jnp.full((o,), a_init[1], jnp.float32)).value
        if mode == "source" and not layer.is_initializing():
            return y
        yt = layer.clone(parent=layer, name=_intercept.TARGET)(x)
        if layer.is_initializing():
            return {"target": yt}.get(mode, y)
        return yt if mode == "target" else (1.0 + a_s) * y + a_t * yt

    return hook


def _clone(model, mode: str, a_init):
    if _intercept.is_plain(model, ("unit", "dense", "norm_unit", "layer_norm")):
        return _intercept.Intercepted(model, combination_hook(mode, a_init))
    kw = {}
    if hasattr(model, "unit"):
        kw["unit"] = functools.partial(ResCLUnit, mode=mode, a_init=a_init)
    if hasattr(model, "dense"):
        kw["dense"] = functools.partial(ResCLDense, mode=mode, a_init=a_init)
    if hasattr(model, "norm_unit"):
        kw["norm_unit"] = functools.partial(ResCLNorm, mode=mode, a_init=a_init)
    if hasattr(model, "layer_norm"):
        kw["layer_norm"] = functools.partial(ResCLLayerNorm, mode=mode, a_init=a_init)
    if not kw:
        raise ValueError(f"ResCL needs a model built of units or dense layers; {type(model).__name__} has neither")
    return model.clone(**kw)


def _kl(teacher_logits, student_logits, t):
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), summed over classes, per sample."""
    p = jax.nn.softmax(teacher_logits / t, -1)
    return t * t * jnp.sum(p * (jax.nn.log_softmax(teacher_logits / t, -1) - jax.nn.log_softmax(student_logits / t, -1)), -1)


def _is_target(path) -> bool:
    return any(isinstance(k, str) and k.startswith("target_") for k in (getattr(p, "key", None) for p in path))


def validate(config) -> None:
    m = config.method
    base.check_choice(m, "target_loss", ("kd", "ce"))
    base.need(len(m.a_init) == 2, "a_init", f"expected (a_s, a_t), got {m.a_init}")
    base.check_range(m, "l1", 0)
    base.check_range(m, "combine_epochs", 0)
    base.check_range(m, "temperature", 0, strict=True)
    if config.scenario != "task":
        raise base.ConfigError(f"scenario: ResCL keeps a head per task: it needs scenario=task, got {config.scenario}")


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    if info.num_heads != info.num_tasks:
        raise ValueError("ResCL keeps a head per task: it needs scenario=task")
    a_init = tuple(float(a) for a in m.a_init)
    num_tasks, temp = info.num_tasks, float(m.temperature)
    models = {mode: _clone(model, mode, a_init) for mode in MODES}
    if isinstance(models["source"], _intercept.Intercepted):
        shapes = _intercept.collections(models["source"], jnp.zeros((1,) + tuple(info.input_shape)))
        if "rescl" not in shapes:
            raise ValueError(f"ResCL combines dense and conv layers; {type(model).__name__} has none")
        if "batch_stats" in shapes:
            raise ValueError(f"ResCL on a model of plain flax.linen layers ({type(model).__name__}) cannot fold its "
                             "batch norm: build the model of jaxcl.models.layers ConvNorm units, or drop batch norm")
        base.check_task_heads("ResCL", shapes["params"], num_tasks)
        try:  # stage 2 distils every old head at once
            jax.eval_shape(lambda v: models["source"].apply(v, jnp.zeros((1,) + tuple(info.input_shape)), "all"), shapes)
        except Exception as e:
            raise ValueError(f"ResCL calls the model with task='all' for every head's logits [B, heads, outputs] "
                             f"(jaxcl.models.Heads does this); {type(model).__name__} failed: {e}") from None
    eps = layers.Norm().epsilon
    first = base.Phase("train", base.epochs(config))
    stages = (base.Phase("finetune", base.epochs(config)),
              base.Phase("combine", base.epochs(config, m.combine_epochs or config.epochs)))

    def trainable(params, task, stage):
        """What trains: the source on task 0, then the target branch (stage 1) plus the
        combination (stage 2); always task ``task``'s head row only."""
        row = jnp.arange(num_tasks) == task

        def leaf(path, w):
            keys = [getattr(k, "key", None) for k in path]
            if layers.is_per_task(path):
                return row.reshape((-1,) + (1,) * (w.ndim - 1))
            if keys[0] == "rescl":
                return jnp.asarray(stage == 2)
            return jnp.asarray(stage >= 1) if _is_target(path) else jnp.asarray(stage == 0)

        return jax.tree_util.tree_map_with_path(leaf, params)

    def init(rng, x):
        state = base.init_state(models["combined"], rng, x)
        extra = {"teacher": state.params, "teacher_stats": state.model_state,  # the stage-1 network, a constant
                 "lambda": jnp.asarray(m.l1, jnp.float32)}
        return state.replace(trainable=trainable(state.params, jnp.int32(0), jnp.int32(0)), extra=extra)

    def _copy_source_to_target(tree):
        """Every ``target_*`` entry takes the value of its source sibling."""
        if not isinstance(tree, dict):
            return tree
        out = {k: _copy_source_to_target(v) for k, v in tree.items()}
        for k in tree:
            if k.startswith("target_") and k[len("target_"):] in tree:
                out[k] = jax.tree_util.tree_map(lambda a: a, out[k[len("target_"):]])
        if isinstance(tree.get(_intercept.TARGET), dict):  # a plain layer's copy: its kernel and bias
            out[_intercept.TARGET] = {k: out[k] for k in tree[_intercept.TARGET]}
        return out

    def begin_task(state, task):
        later = task > 0
        pick = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(later, new, old))
        params = pick(_copy_source_to_target(state.params), state.params)
        params["rescl"] = jax.tree_util.tree_map_with_path(  # the combination starts afresh
            lambda p, a: jnp.full_like(a, a_init[0] if p[-1].key == "a_s" else a_init[1]), params["rescl"])
        model_state = pick(_copy_source_to_target(state.model_state), state.model_state)
        stage = jnp.where(later, 1, 0)
        return state.replace(params=params, model_state=model_state, trainable=trainable(params, task, stage))

    def loss(params, state, batch, task, rng, phase):
        x, y, mask = batch["x"], batch["y"], batch["mask"]
        if phase in ("train", "finetune"):
            mode = "source" if phase == "train" else "target"
            logits, model_state = base.apply(models[mode], params, state.model_state, x, task, train=True, rng=rng)
            ce = base.cross_entropy(logits, y, mask)
            return ce, {"model_state": model_state, "metrics": {"ce": ce, "acc": base.accuracy(logits, y, mask)}}
        # stage 2: the combined network against the frozen source and the stage-1 network
        frozen = jax.lax.stop_gradient
        # the source branch is a constant here: no weight-gradient convolutions for it (the
        # slowest kind on XLA:CPU); its input gradients still flow
        params = jax.tree_util.tree_map_with_path(
            lambda p, w: w if (layers.is_per_task(p) or getattr(p[0], "key", None) == "rescl" or _is_target(p))
            else frozen(w), params)
        z_all, model_state = base.apply(models["combined"], params, state.model_state, x, "all", train=True, rng=rng)
        if "source_logits" in batch:  # recorded once before training (all heads), as ../shared/peers W5 does
            src_all = frozen(batch["source_logits"])
        else:  # the frozen source network on this batch
            src_all, _ = base.apply(models["source"], frozen(params), state.model_state, x, "all", train=False)
            src_all = frozen(src_all)
        n = jnp.maximum(mask.sum(), 1.0)
        old = (jnp.arange(num_tasks) < task).astype(jnp.float32)  # heads of the tasks before this one
        lwf = jnp.sum(jax.vmap(lambda zs, z: _kl(zs, z, temp), in_axes=1, out_axes=1)(src_all, z_all) * old * mask[:, None]) / n
        z_new = jnp.take(z_all, task, axis=1)
        if m.target_loss == "kd":
            z_ft, _ = base.apply(models["target"], state.extra["teacher"], state.extra["teacher_stats"], x, task,
                                 train=False)
            new = jnp.sum(_kl(frozen(z_ft), z_new, temp) * mask) / n
        else:
            new = base.cross_entropy(z_new, y, mask)
        l1 = sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(params["rescl"]))
        total = lwf + new + state.extra["lambda"] * l1
        return total, {"model_state": model_state,
                       "metrics": {"lwf": lwf, "new": new, "l1": l1, "acc": base.accuracy(z_new, y, mask)}}

    def merge(params, stats):
        """Fold batch norm and write the combination into the source network (exact)."""
        p, st = jax.tree_util.tree_map(lambda a: a, params), jax.tree_util.tree_map(lambda a: a, stats)

        def visit(node_p, node_s, node_a):
            for k, v in list(node_p.items()):
                if isinstance(v, dict) and k != "rescl":
                    visit(v, node_s.get(k, {}) if isinstance(node_s, dict) else {}, node_a.get(k, {}))
            a_s, a_t = node_a.get("a_s"), node_a.get("a_t")
            if a_s is None:
                return
            if "target_conv" in node_p:  # a conv unit
                ws, wt = node_p["conv"]["kernel"], node_p["target_conv"]["kernel"]
                bs = node_p["conv"].get("bias", jnp.zeros_like(a_s))
                bt = node_p["target_conv"].get("bias", jnp.zeros_like(a_s))
                if "norm" in node_p:
                    ns, nt = node_p["norm"]["bn"], node_p["target_norm"]["bn"]
                    ss, stt = node_s["norm"]["bn"], node_s["target_norm"]["bn"]
                    scale_s = ns["scale"] / jnp.sqrt(ss["var"] + eps)
                    scale_t = nt["scale"] / jnp.sqrt(stt["var"] + eps)
                    ratio = jnp.where(scale_s != 0, scale_t / jnp.where(scale_s != 0, scale_s, 1.0), 0.0)
                    node_p["conv"]["kernel"] = (1 + a_s) * ws + a_t * wt * ratio
                    node_p["norm"]["bn"]["bias"] = ((1 + a_s) * (ns["bias"] - (ss["mean"] - bs) * scale_s)
                                                    + a_t * (nt["bias"] - (stt["mean"] - bt) * scale_t))
                    node_s["norm"]["bn"]["mean"] = jnp.zeros_like(ss["mean"])
                    if "bias" in node_p["conv"]:
                        node_p["conv"]["bias"] = jnp.zeros_like(bs)
                else:
                    node_p["conv"]["kernel"] = (1 + a_s) * ws + a_t * wt
                    if "bias" in node_p["conv"]:
                        node_p["conv"]["bias"] = (1 + a_s) * bs + a_t * bt
            elif "target_norm" in node_p:  # a standalone norm: two affine maps make one
                ns, nt = node_p["norm"]["bn"], node_p["target_norm"]["bn"]
                ss, stt = node_s["norm"]["bn"], node_s["target_norm"]["bn"]
                root = jnp.sqrt(ss["var"] + eps)
                scale_s, scale_t = ns["scale"] / root, nt["scale"] / jnp.sqrt(stt["var"] + eps)
                node_p["norm"]["bn"]["scale"] = ((1 + a_s) * scale_s + a_t * scale_t) * root
                node_p["norm"]["bn"]["bias"] = ((1 + a_s) * (ns["bias"] - ss["mean"] * scale_s)
                                                + a_t * (nt["bias"] - stt["mean"] * scale_t))
                node_s["norm"]["bn"]["mean"] = jnp.zeros_like(ss["mean"])
            elif "target_scale" in node_p:  # a LayerNorm: two affine maps of the same xhat make one
                node_p["scale"] = (1 + a_s) * node_p["scale"] + a_t * node_p["target_scale"]
                node_p["bias"] = (1 + a_s) * node_p["bias"] + a_t * node_p["target_bias"]
            elif "target_kernel" in node_p or _intercept.TARGET in node_p:  # a dense layer, or a plain flax one
                target = node_p.get(_intercept.TARGET, {"kernel": node_p.get("target_kernel"),
                                                        "bias": node_p.get("target_bias")})
                node_p["kernel"] = (1 + a_s) * node_p["kernel"] + a_t * target["kernel"]
                if "bias" in node_p:
                    node_p["bias"] = (1 + a_s) * node_p["bias"] + a_t * target["bias"]

        visit(p["params"], st.get("batch_stats", {}), p["rescl"])
        return p, st

    def after_phase(state, task, phase):
        if phase == "finetune":
            return state.replace(extra={**state.extra, "teacher": state.params, "teacher_stats": state.model_state},
                                 trainable=trainable(state.params, task, jnp.int32(2)))
        if phase == "combine":
            params, stats = merge(state.params, state.model_state)
            return state.replace(params=params, model_state=stats)
        return state

    def predict(state, x, task):
        return base.apply(models["source"], state.params, state.model_state, x, task, train=False)[0]

    def phases(task: int):
        return (first,) if task == 0 else stages

    def report(state):
        return param_report(state.params)

    return base.make("rescl", config, model, init=init, begin_task=begin_task, loss=loss, after_phase=after_phase,
                     predict=predict, phases=phases, report=report)


def param_report(params) -> dict:
    """The deployed (merged) network counts only the source branch and the heads."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    merged = sum(w.size for p, w in leaves if getattr(p[0], "key", None) == "params" and not _is_target(p))
    target = sum(w.size for p, w in leaves if _is_target(p))
    comb = sum(w.size for p, w in leaves if getattr(p[0], "key", None) == "rescl")
    return {"merged_network": merged, "target_branch": target, "combination": comb,
            "unmerged_network": merged + target + comb}
