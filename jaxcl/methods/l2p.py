"""L2P, Learning to Prompt (Wang et al., CVPR 2022): a pool of prompts with learnable
keys on a frozen pretrained ViT; each image picks the prompts whose keys match it.

As google-research/l2p (``models/prompt.py``, ``models/vit.py``, ``train_continual.py``,
``configs/cifar100_l2p.py``):

* the query is the frozen model's cls feature on the un-prompted image (no gradient);
* the ``top_k`` keys with the highest cosine similarity to the query choose their prompts
  (each ``length`` tokens of the model's width; ``pool_size`` of them), concatenated and
  inserted after the cls token, with no position embedding (the code prepends them after
  the position embedding);
* with ``batchwise_prompt`` every image of a batch uses the ``top_k`` prompts chosen most
  often over the batch (the code does this in training and at test time, so test
  predictions depend on the batch: jaxcl, like the code, evaluates one task's test set at
  a time); with ``prompt_mask`` task t trains prompts ``t*top_k .. (t+1)*top_k - 1``
  (the code's ``use_prompt_mask``, training only);
* the representation is the mean of the prompt tokens' outputs (``vit_classifier=
  "prompt"``), classified by the head (zero-initialised, as the code);
* loss = cross-entropy over the current task's classes (the other classes' logits masked,
  ``train_mask``) - ``pull`` x the summed cosine similarity of the query to the chosen keys
  (``pull_constraint_coeff``);
* the model's parameters are frozen (``state.trainable``); prompts, keys and head train.
  No task id is used at test time (class-incremental).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _ptm, base


def defaults() -> dict:
    return {
        "pool_size": 10,  # prompts in the pool (M)
        "length": 10,  # tokens per prompt (L_p; the code's cifar100_l2p config)
        "top_k": 4,  # prompts per image (N)
        "batchwise_prompt": True,  # the batch's majority choice for every image (train and test, as the code)
        "prompt_mask": False,  # task t trains prompts t*top_k.. (use_prompt_mask; training only)
        "pull": 1.0,  # weight of the key-query surrogate (pull_constraint_coeff)
    }


def validate(config) -> None:
    m = config.method
    for k in ("pool_size", "length", "top_k"):
        base.need(isinstance(m[k], int) and m[k] >= 1, k, f"must be an integer >= 1, got {m[k]!r}")
    base.need(m.top_k <= m.pool_size, "top_k", f"{m.top_k} is more than the pool's {m.pool_size} prompts")
    base.check_range(m, "pull", 0)


BACKBONE = "vit"  # a pretrained ViT's token interface (jaxcl.models.vit)


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    pool, length, top_k, batchwise, pmask, coeff = (m.pool_size, m.length, m.top_k, m.batchwise_prompt,
                                                     m.prompt_mask, m.pull)
    init = _ptm.uniform()

    def init_prompts(rng, width):
        return {"prompt": init(jax.random.fold_in(rng, 0), (pool, length, width)),
                "key": init(jax.random.fold_in(rng, 1), (pool, width))}

    def choose(params, query, task, train, mask):
        idx, _ = _ptm.select(params[_ptm.PROMPT]["key"], query, top_k, batchwise, mask)
        if train and pmask:  # task t's own prompts while they exist in the pool (as the code)
            own = jnp.broadcast_to(task * top_k + jnp.arange(top_k), idx.shape)
            idx = jnp.where((task + 1) * top_k <= pool, own, idx)
        return idx

    def forward(params, state, x, task, train, rng, mask):
        query = _ptm.frozen_features(model, params, x)
        idx = choose(params, query, task, train, mask)
        p = params[_ptm.PROMPT]
        prompts = p["prompt"][idx].reshape(x.shape[0], top_k * length, -1)
        feat = _ptm.features(model, params, x, train, rng, prompts=prompts, pool="prompt")
        logits = _ptm.classify(model, params, feat, task)
        if mask is None:
            return logits, 0.0, {}
        sim = _ptm.pull(p["key"], query, idx, mask)
        return logits, -coeff * sim, {"pull": sim}

    return _ptm.prompt_method("l2p", config, model, info, init_prompts=init_prompts, forward=forward, zero_head=True)
