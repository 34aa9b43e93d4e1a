"""DualPrompt (Wang et al., ECCV 2022): a shared G(eneral)-prompt on the first blocks and
task-specific E(xpert)-prompts with keys on later blocks of a frozen pretrained ViT, both
by prefix-tuning of the attention keys and values.

As google-research/l2p's DualPrompt (``configs/cifar100_dualprompt.py``,
``use_prefix_tune_for_g_prompt`` and ``use_prefix_tune_for_e_prompt``):

* G-prompt: on each block of ``g_layers`` a pair (key prefix, value prefix) of
  ``g_length`` tokens each, shared by all tasks;
* E-prompts: a pool of ``pool_size`` prompts, each a pair of ``e_length``-token prefixes
  for every block of ``e_layers``, with one key each. Training task t uses E-prompt t
  (the code's ``use_prompt_mask`` with ``top_k=1``); at test time the E-prompt whose key
  is the most cosine-similar to the frozen model's cls feature of the un-prompted image
  (task-key matching, no task id; with ``batchwise_prompt`` the batch's majority choice,
  as the code);
* on a block with both, the G-prefix comes first (the code's concatenation);
* the representation is the cls token's output (``vit_classifier="token"``);
* loss = cross-entropy over the current task's classes (the others masked) - ``pull`` x
  the cosine similarity of the query to the E-prompt's key;
* the model is frozen; prompts, keys and the head train.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.methods import _ptm, base


def defaults() -> dict:
    return {
        "g_length": 5,  # G-prompt tokens per block (each of key and value)
        "g_layers": (0, 1),  # blocks with the G-prompt
        "e_length": 5,  # E-prompt tokens per block (each of key and value)
        "e_layers": (2, 3, 4),  # blocks with the E-prompts
        "pool_size": 10,  # E-prompts (at least one per task)
        "batchwise_prompt": True,  # at test time the batch's majority E-prompt for every image (as the code)
        "pull": 1.0,  # weight of the key-query surrogate (pull_constraint_coeff)
    }


def validate(config) -> None:
    m = config.method
    for k in ("g_length", "e_length", "pool_size"):
        base.need(isinstance(m[k], int) and m[k] >= 1, k, f"must be an integer >= 1, got {m[k]!r}")
    base.need(m.pool_size >= config.num_tasks, "pool_size",
              f"{m.pool_size} E-prompts for {config.num_tasks} tasks (one per task is needed)")
    base.check_range(m, "pull", 0)


BACKBONE = "vit"  # a pretrained ViT's token interface (jaxcl.models.vit)


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    g_layers = _ptm.check_layers(model, "g_layers", m.g_layers)
    e_layers = _ptm.check_layers(model, "e_layers", m.e_layers)
    pool, batchwise, coeff = m.pool_size, m.batchwise_prompt, m.pull
    init = _ptm.uniform()

    def init_prompts(rng, width):
        return {"g": init(jax.random.fold_in(rng, 0), (len(g_layers), 2, m.g_length, width)),
                "e": init(jax.random.fold_in(rng, 1), (len(e_layers), 2, pool, m.e_length, width)),
                "key": init(jax.random.fold_in(rng, 2), (pool, width))}

    def forward(params, state, x, task, train, rng, mask):
        p = params[_ptm.PROMPT]
        b = x.shape[0]
        query = _ptm.frozen_features(model, params, x)
        if train:
            idx = jnp.broadcast_to(task, (b, 1))
        else:
            idx, _ = _ptm.select(p["key"], query, 1, batchwise, None)
        e = p["e"][:, :, idx[:, 0]]  # [layers, 2, B, e_length, D]
        prefixes = []
        for layer in range(model.depth):
            parts = []
            if layer in g_layers:
                g = p["g"][g_layers.index(layer)]
                parts.append(jnp.broadcast_to(g[:, None], (2, b) + g.shape[1:]))
            if layer in e_layers:
                parts.append(e[e_layers.index(layer)])
            prefixes.append(None if not parts else tuple(jnp.concatenate([q[i] for q in parts], 1) for i in (0, 1)))
        feat = _ptm.features(model, params, x, train, rng, prefixes=prefixes, pool="cls")
        logits = _ptm.classify(model, params, feat, task)
        if mask is None:
            return logits, 0.0, {}
        sim = _ptm.pull(p["key"], query, idx, mask)
        return logits, -coeff * sim, {"pull": sim}

    return _ptm.prompt_method("dualprompt", config, model, info, init_prompts=init_prompts, forward=forward,
                              zero_head=True)
