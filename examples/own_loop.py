"""jaxcl inside your own JAX code: your Flax model, your data, your loop.

    python examples/own_loop.py        # ~20 s on 2 CPU cores

The model is plain ``flax.linen`` (Dense layers) ending in one head per task
(``jaxcl.models.Heads``: PackNet keeps a head per task); the data is scikit-learn's 8x8
digits cut into 5 tasks of 2 classes, loaded and normalised here; the loop is ours.
jaxcl contributes the method (``jaxcl.method``) and the five calls of its contract
(``jaxcl.trainer``): init, begin_task, step, end_phase, predict.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxcl
from jaxcl.models import Heads


class MyMLP(nn.Module):
    num_tasks: int

    @nn.compact
    def __call__(self, x, task=None, train=False):  # the model protocol: task may be None, an id, ids or "all"
        h = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(64)(h))
        h = nn.relu(nn.Dense(64)(h))
        return Heads(self.num_tasks, 2, name="head")(h, task)


def load_tasks(num_tasks: int = 5, seed: int = 0):
    """[(x_train, y_train, x_test, y_test)] per task; labels 0/1 within each task."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x = (x - x.mean()) / x.std()
    y = digits.target
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    tasks = []
    for t in range(num_tasks):
        keep = (y == 2 * t) | (y == 2 * t + 1)
        xt, yt = x[keep], (y[keep] == 2 * t + 1).astype(np.int32)
        cut = int(0.8 * len(xt))
        tasks.append((xt[:cut], yt[:cut], xt[cut:], yt[cut:]))
    return tasks


def batches(x, y, size: int = 32, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(x))
    for i in range(0, len(x) - size + 1, size):
        idx = order[i:i + size]
        yield {"x": x[idx], "y": y[idx]}


def train(name: str, tasks, epochs: int = 3, **settings) -> np.ndarray:
    """The accuracy matrix R[i, j]: accuracy on task j after learning task i."""
    num_tasks = len(tasks)
    sample = next(batches(*tasks[0][:2]))
    method = jaxcl.method(name, MyMLP(num_tasks), sample, num_tasks=num_tasks, epochs=epochs, **settings)
    loop = jaxcl.trainer(method, optax.sgd(0.05, momentum=0.9))
    state = loop.init(jax.random.PRNGKey(0), sample["x"])
    R = np.zeros((num_tasks, num_tasks))
    for t, (x, y, _, _) in enumerate(tasks):
        state = loop.begin_task(state, t)
        for phase in method.phases(t):  # PackNet: train, then retrain after pruning
            for epoch in range(phase.epochs):
                for batch in batches(x, y, seed=epoch):
                    state, metrics = loop.step(state, batch, t, phase)
            state = loop.end_phase(state, t, phase, batches(x, y))
        for j, (_, _, xs, ys) in enumerate(tasks):
            R[t, j] = np.mean(np.argmax(loop.predict(state, xs, j), -1) == ys)
    return R


def main(epochs: int = 3) -> dict:
    tasks = load_tasks()
    results = {"packnet": train("packnet", tasks, epochs, prune=0.5), "ewc": train("ewc", tasks, epochs, ewc_lambda=100.0)}
    for name, R in results.items():
        print(f"{name}: accuracy after the last task {R[-1].mean():.3f}, per task {np.round(R[-1], 3).tolist()}")
    return results


if __name__ == "__main__":
    main()
