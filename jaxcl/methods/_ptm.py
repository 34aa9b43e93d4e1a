"""What the pretrained-model methods share (L2P, DualPrompt, CODA-Prompt, SimpleCIL,
RanPAC): a frozen trunk, its features, the scenario's output units, and the prompt
pool's key matching.

The model is a :class:`~jaxcl.models.vit.ViT` (or any model with its token interface:
``model.apply(v, x, task, train, prompts=..., prefixes=..., pool=..., features=True)``
and ``method=model.classify``). A method's own arrays that gradients reach (prompts,
keys) live in ``state.params["prompt"]``, a collection the model never sees, so that a
pretrained file or workdir fills ``state.params["params"]`` exactly as for any method.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.methods import base

NEG = -1e9  # the logit of an output unit that must not be chosen (as jaxcl.models.Heads)
PROMPT = "prompt"  # the params collection of a method's own trained arrays


def check_model(model, method: str) -> None:
    """Refuse, by name, a model without the ViT token interface."""
    if not (hasattr(model, "classify") and hasattr(model, "encode")):
        raise ValueError(f"{method} needs a Vision Transformer with the token interface (model.name=vit_cifar, "
                         f"vit_ti16, vit_s16, vit_b16 or vit_l16); {type(model).__name__} has none")


def _trains(path, head: bool) -> bool:
    """Whether a prompt method trains the leaf at ``path``: its own collection, and the
    heads when ``head``; never the model's other parameters."""
    from jaxcl.models import layers

    return getattr(path[0], "key", None) != "params" or (head and layers.is_per_task(path))


def frozen_trunk(params, *, head: bool) -> dict:
    """``state.trainable``: the model's parameters frozen (but the heads when ``head``),
    the method's own collection trainable."""
    return jax.tree_util.tree_map_with_path(lambda path, _: jnp.asarray(_trains(path, head), bool), params)


def without_trunk_gradient(params, *, head: bool) -> dict:
    """``params`` with the leaves :func:`frozen_trunk` freezes behind ``stop_gradient``:
    the loss's gradient then never computes the frozen model's weight gradients (a third
    of a ViT's backward pass) that ``state.trainable`` would only throw away."""
    return jax.tree_util.tree_map_with_path(lambda path, w: w if _trains(path, head) else jax.lax.stop_gradient(w),
                                            params)


def features(model, params, x, train: bool = False, rng=None, **kw) -> jax.Array:
    """The pooled feature ``[B, D]`` (float32) of the model on ``x`` (``kw``: prompts,
    prefixes, pool)."""
    rngs = {"dropout": rng} if (rng is not None and train) else {}
    return model.apply({"params": params["params"]}, x, None, train, features=True, rngs=rngs, **kw)


def frozen_features(model, params, x) -> jax.Array:
    """The frozen model's cls feature on the un-prompted input, no gradient (the query of
    L2P, DualPrompt and CODA-Prompt; the feature SimpleCIL and RanPAC classify)."""
    return jax.lax.stop_gradient(features(model, params, x))


def classify(model, params, feat, task) -> jax.Array:
    return model.apply({"params": params["params"]}, feat, task, method=model.classify)


def output_units(info) -> jax.Array:
    """``[num_tasks, num_outputs]`` bool: the output units task t trains (its classes in
    the class scenario; every unit of its own head otherwise)."""
    units = np.ones((info.num_tasks, info.num_outputs), bool)
    if info.scenario == "class":
        units[:] = False
        for t, (start, n) in enumerate(zip(info.class_offsets, info.task_classes)):
            units[t, start:start + n] = True
    return jnp.asarray(units)


def masked_loss(logits, batch, task, units, extra_metrics=None):
    """Cross-entropy on the task's own output units (L2P's ``train_mask``, CODA-Prompt's
    masking of the other classes), and its metrics."""
    logits = jnp.where(units[task], logits, NEG)
    ce = base.cross_entropy(logits, batch["y"], batch["mask"])
    metrics = {"ce": ce, "acc": base.accuracy(logits, batch["y"], batch["mask"]), **(extra_metrics or {})}
    return ce, metrics


# ----------------------------------------------------------------------------- class tables (SimpleCIL, RanPAC)


def class_table(info) -> tuple[int, jax.Array]:
    """(rows, offsets): the classes a prototype table holds and where each task's labels
    start in it. Class and domain scenarios: the labels index it directly (the offsets
    are 0); task scenario: task t's local label y is row ``class_offsets[t] + y``."""
    if info.scenario == "task":
        return int(sum(info.task_classes)) + info.num_outputs, jnp.asarray(info.class_offsets, jnp.int32)
    return info.num_outputs, jnp.zeros((info.num_tasks,), jnp.int32)


def rows_of(batch_y, task, offsets) -> jax.Array:
    return batch_y + offsets[task]


def task_logits(table_logits, task, info, offsets) -> jax.Array:
    """``[B, rows]`` scores over the table -> the logits ``[B, num_outputs]`` the scenario
    predicts: in the task scenario the columns of task ``task`` (a scalar or one per
    sample), the units beyond its class count at NEG."""
    if info.scenario != "task":
        return table_logits
    n = info.num_outputs
    cols = offsets[task][..., None] + jnp.arange(n)  # [n] or [B, n]
    cols = jnp.broadcast_to(cols, (table_logits.shape[0], n))
    out = jnp.take_along_axis(table_logits, cols, axis=1)
    own = jnp.asarray(info.task_classes, jnp.int32)[task][..., None]
    return jnp.where(jnp.arange(n) < own, out, NEG)


# ----------------------------------------------------------------------------- first-session adaptation (SimpleCIL, RanPAC)


def adapt_settings() -> dict:
    return {
        "adapt_epochs": 0,  # first-session adaptation epochs on task 1 (APER; RanPAC's Phase 1); 0: none
        "adapt_tokens": 5,  # its prompt tokens (APER's prompt_token_num)
    }


def check_adapt(m) -> None:
    for k, low in (("adapt_epochs", 0), ("adapt_tokens", 1)):
        base.need(isinstance(m[k], int) and m[k] >= low, k, f"must be an integer >= {low}, got {m[k]!r}")


class FirstSession:
    """First-session adaptation with shallow visual prompts (APER's ``aper_vpt``,
    RanPAC's Phase 1 with VPT): on task 1 only, a phase ``adapt`` trains ``adapt_tokens``
    prompt tokens inserted after the cls token and the head (cross-entropy on task 1's
    classes) with the run's optimizer, the trunk frozen; after it everything is frozen.
    ``epochs == 0``: off (the methods train nothing)."""

    def __init__(self, config, model, info):
        self.epochs, self.tokens = config.method.adapt_epochs, config.method.adapt_tokens
        self.model, self.units = model, output_units(info)

    def init(self, rng, state):
        """``state`` with the prompt tokens (uniform, as L2P's) and its trainable mask."""
        if not self.epochs:
            return state.replace(trainable=frozen_trunk(state.params, head=False))
        params = {**state.params, PROMPT: {"tokens": uniform()(jax.random.fold_in(rng, 11),
                                                               (self.tokens, self.model.width))}}
        return state.replace(params=params, trainable=frozen_trunk(params, head=True))

    def features(self, params, x, train=False, rng=None):
        """The adapted (prompted) model's feature."""
        return features(self.model, params, x, train, rng, prompts=params[PROMPT]["tokens"])

    def loss(self, params, state, batch, task, rng, phase):
        if phase != "adapt":  # a statistics phase: no epochs, the loss is never reached (but may be traced)
            return jnp.zeros(()), {"metrics": {}}
        params = without_trunk_gradient(params, head=True)
        logits = classify(self.model, params, self.features(params, batch["x"], True, rng), task)
        ce, metrics = masked_loss(logits, batch, task, self.units)
        return ce, {"metrics": metrics}

    def after_adapt(self, state):
        return state.replace(trainable=jax.tree_util.tree_map(jnp.zeros_like, state.trainable))

    def phases(self, stats: "base.Phase"):
        first = ((base.Phase("adapt", self.epochs),) if self.epochs else ()) + (stats,)
        return lambda t: first if t == 0 else (stats,)


# ----------------------------------------------------------------------------- prompt pools (L2P, DualPrompt)


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """As google-research/l2p's ``prompt.l2_normalize``."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), epsilon))


def select(keys, query, top_k: int, batchwise: bool, mask=None):
    """The prompt ids ``[B, top_k]`` each sample uses, and the cosine similarities
    ``[B, pool]`` of its query to every key (google-research/l2p ``models/prompt.py``):
    the top-k keys by cosine similarity; with ``batchwise`` the top_k ids chosen most
    often over the batch (samples with mask 0 do not vote; ties to the lower id, as the
    code's ``jnp.unique`` + ``top_k``), for every sample."""
    sim = l2_normalize(query) @ l2_normalize(keys).T  # [B, pool]
    _, idx = jax.lax.top_k(sim, top_k)
    if batchwise:
        votes = jnp.ones(idx.shape[0]) if mask is None else mask
        counts = jnp.zeros(keys.shape[0]).at[idx].add(jnp.broadcast_to(votes[:, None], idx.shape))
        _, major = jax.lax.top_k(counts, top_k)
        idx = jnp.broadcast_to(major, idx.shape)
    return idx, sim


def pull(keys, query, idx, mask) -> jax.Array:
    """The key-query surrogate (the code's ``reduce_sim``): the summed cosine similarity
    of every sample's query to the keys of the prompts it uses, averaged over samples."""
    kn, qn = l2_normalize(keys), l2_normalize(query)
    s = jnp.sum(kn[idx] * qn[:, None, :], axis=(1, 2))
    return jnp.sum(s * mask) / jnp.maximum(mask.sum(), 1.0)


# ----------------------------------------------------------------------------- the prompt methods' skeleton


def uniform(scale: float = 0.01):
    """Flax's ``nn.initializers.uniform()`` (U[0, scale)), google-research/l2p's prompt
    and key initialiser."""
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, 0.0, scale)


def prompt_method(name: str, config, model, info, *, init_prompts, forward, begin_task=None, zero_head=False,
                  element_masks=False) -> base.Method:
    """A Method that trains ``state.params["prompt"]`` (and the heads) on the frozen model.

    ``init_prompts(rng, width) -> dict`` makes the method's arrays; ``forward(params,
    state, x, task, train, rng, mask) -> (logits, penalty, metrics)`` is its model (``mask``
    None at test time); the loss is the cross-entropy on the task's own output units plus
    ``penalty``. At test time the output units of tasks not begun yet are never predicted
    (CODA-Prompt's code cuts the logits to the classes seen so far; L2P's and DualPrompt's
    leave them, at exactly 0 from their zero-initialised, never-trained head columns).
    ``zero_head``: heads start at zero (L2P's ``kernel_init=zeros``).
    ``element_masks``: ``state.trainable`` holds a full-shape mask for every prompt array
    (set by ``begin_task``: CODA-Prompt freezes components per task)."""
    check_model(model, name)
    units = output_units(info)

    def init(rng, x):
        state = base.init_state(model, rng, x)
        params = dict(state.params)
        if zero_head:
            inner = dict(params["params"])
            inner["head"] = jax.tree_util.tree_map(jnp.zeros_like, inner["head"])
            params["params"] = inner
        params[PROMPT] = init_prompts(jax.random.fold_in(rng, 11), model.width)
        trainable = frozen_trunk(params, head=True)
        if element_masks:
            trainable[PROMPT] = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params[PROMPT])
        return state.replace(params=params, trainable=trainable,
                             extra={"seen": jnp.zeros((info.num_outputs,), bool)})

    def begin(state, task):
        state = state.replace(extra={**state.extra, "seen": state.extra["seen"] | units[task]})
        return state if begin_task is None else begin_task(state, task)

    def loss(params, state, batch, task, rng, phase):
        params = without_trunk_gradient(params, head=True)
        logits, penalty, metrics = forward(params, state, batch["x"], task, True, rng, batch["mask"])
        ce, metrics = masked_loss(logits, batch, task, units, metrics)
        return ce + penalty, {"metrics": metrics}

    def predict(state, x, task):
        logits = forward(state.params, state, x, task, False, None, None)[0]
        return jnp.where(state.extra["seen"], logits, NEG)

    return base.make(name, config, model, init=init, loss=loss, predict=predict, begin_task=begin,
                     frozen_backbone=True)


def check_layers(model, key: str, layers) -> tuple:
    """``method.<key>``: block indices of the model (a ConfigError naming the key)."""
    layers = tuple(int(i) for i in layers)
    base.need(all(0 <= i < model.depth for i in layers) and len(set(layers)) == len(layers), key,
              f"{layers} are not distinct block indices of this {model.depth}-block model")
    return layers
