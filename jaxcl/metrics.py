"""Continual-learning metrics: pure functions of the accuracy matrix.

``R[i][j]`` is the accuracy on task j's test set after training on tasks 0..i (a
T x T matrix; rows of a run still going may be fewer). ``b[j]`` is the accuracy on task j
of the model before any training (needed by FWT).

* ACC (average accuracy): mean_j R[T-1, j].
* BWT (backward transfer, Lopez-Paz & Ranzato 2017): 1/(T-1) sum_{j<T-1} R[T-1, j] - R[j, j].
* FWT (forward transfer, same paper): 1/(T-1) sum_{j>=1} R[j-1, j] - b[j].
* Forgetting (Chaudhry et al. 2018, eq. 4): 1/(T-1) sum_{j<T-1} max_{l<T-1} R[l, j] - R[T-1, j]
  (the max runs over every earlier row, as in the paper).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] > R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be [rows <= tasks, tasks], got shape {R.shape}")
    return R


def acc(R) -> float:
    """
    >>> acc([[0.9, 0.1], [0.7, 0.8]])
    0.75
    """
    R = _matrix(R)
    return float(R[-1].mean())


def bwt(R) -> float:
    """
    >>> round(bwt([[0.9, 0.1], [0.7, 0.8]]), 6)
    -0.2
    """
    R = _matrix(R)
    t = R.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([R[t - 1, j] - R[j, j] for j in range(t - 1)]))


def fwt(R, b: Sequence[float]) -> float:
    R = _matrix(R)
    t = R.shape[0]
    if t < 2:
        return 0.0
    b = np.asarray(b, dtype=np.float64)
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, t)]))


def forgetting(R) -> float:
    R = _matrix(R)
    t = R.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([R[:t - 1, j].max() - R[t - 1, j] for j in range(t - 1)]))


def summary(R, b: Sequence[float]) -> dict:
    return {"acc": acc(R), "bwt": bwt(R), "fwt": fwt(R, b), "forgetting": forgetting(R)}


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def param_counts(params: dict, num_tasks: int, num_heads: int) -> dict:
    """Backbone and per-task parameter counts.

    ``params`` is ``State.params``: the ``params`` collection (trunk + ``head``) and any
    extra collection a method adds (counted as per-task extras when stacked per task,
    i.e. when every leaf's leading axis is ``num_tasks``).
    """
    main = params.get("params", {})
    head = count(main.get("head", {}))
    backbone = count({k: v for k, v in main.items() if k != "head"})
    extra, shared = {}, {}
    for name, coll in params.items():
        if name == "params":
            continue
        n = count(coll)
        leaves = jax.tree_util.tree_leaves(coll)
        if bool(leaves) and all(x.shape[:1] == (num_tasks,) for x in leaves):
            extra[name] = n // num_tasks
        else:
            shared[name] = n
    return {
        "backbone": backbone,
        "head_per_task": head // max(num_heads, 1) if num_heads == num_tasks else head,
        "heads_total": head,
        "extra_per_task": extra,
        "extra_shared": shared,
        "total": backbone + head + sum(count(c) for k, c in params.items() if k != "params"),
    }


def steps_per_second(steps: int, seconds: float) -> float:
    return float(steps / seconds) if seconds > 0 else float("nan")
