"""Issue 19: what ``jaxcl.trainer``'s value checks cost per step (``check_values=True``,
the default, against ``check_values=False``), side by side in one process.

The checks read every label and per-sample task id of a batch on the host before the
step is dispatched: free of a transfer for numpy batches, a device-to-host copy of ``y``,
``task`` and ``mask`` for batches already on the device. Measured on finetune with an MLP
(784-256-256, one 2-class head per task, 5 tasks), SGD, for numpy and device batches of
32 and 256 samples: milliseconds per step (median and best over interleaved blocks of
``--steps`` steps, each block ended by ``block_until_ready``), the difference in
microseconds per step and the ratio checked / unchecked (of the best blocks: on a shared
machine the least contended are the steadier figure), and the host time of the checks
alone (``jaxcl.api.check_values_of`` on the batch, timed by itself, median of 2000 calls). The task id checks, batch keys, shapes and dtypes
and the NaN check at end_phase are on in both (they are not switchable).

    python benchmarks/own_loop_checks.py [--repeats 7] [--steps 50]

One JSON line per (feed, batch size).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jaxcl  # noqa: E402
from common import emit  # noqa: E402
from jaxcl.api import check_values_of, checked_keys  # noqa: E402
from jaxcl.models import Heads  # noqa: E402


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, task=None, train=False):
        h = x.reshape(x.shape[0], -1)
        for _ in range(2):
            h = nn.relu(nn.Dense(256)(h))
        return Heads(5, 2, name="head")(h, task)


def block(loop, state, batch, steps: int):
    for _ in range(steps):
        state, _ = loop.step(state, batch, 0)
    return jax.block_until_ready(state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    for size in (32, 256):
        host = {"x": rng.normal(size=(size, 28, 28, 1)).astype(np.float32),
                "y": rng.integers(0, 2, size).astype(np.int32)}
        for feed, batch in (("numpy", host), ("device", {k: jnp.asarray(v) for k, v in host.items()})):
            method = jaxcl.method("finetune", MLP(), host, num_tasks=5)
            loops = {check: jaxcl.trainer(method, optax.sgd(0.01), check_values=check) for check in (True, False)}
            states = {c: lp.begin_task(lp.init(jax.random.PRNGKey(0), host["x"]), 0) for c, lp in loops.items()}
            for c, lp in loops.items():  # compile and warm up
                states[c] = block(lp, states[c], batch, 3)
            times = {True: [], False: []}
            for _ in range(a.repeats):
                for c, lp in loops.items():
                    t0 = time.perf_counter()
                    states[c] = block(lp, states[c], batch, a.steps)
                    times[c].append((time.perf_counter() - t0) / a.steps)
            keys = checked_keys(batch, 0, host["x"].shape[1:], "finetune")
            alone = statistics.median(timeit.repeat(lambda: check_values_of(keys, 0, method.info), number=200,
                                                    repeat=10)) / 200
            on, off = (1e3 * statistics.median(times[c]) for c in (True, False))
            best_on, best_off = (1e3 * min(times[c]) for c in (True, False))
            emit({"bench": "own_loop_checks", "feed": feed, "batch": size, "steps_per_block": a.steps,
                  "repeats": a.repeats, "checked_ms_per_step": round(on, 4), "unchecked_ms_per_step": round(off, 4),
                  "best_checked_ms_per_step": round(best_on, 4), "best_unchecked_ms_per_step": round(best_off, 4),
                  "best_ratio_checked_over_unchecked": round(best_on / best_off, 3),
                  "median_ratio_checked_over_unchecked": round(on / off, 3),
                  "checks_alone_us_per_batch": round(1e6 * alone, 1)})


if __name__ == "__main__":
    main()
