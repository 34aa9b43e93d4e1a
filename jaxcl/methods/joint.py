"""Joint training (the upper bound): at task t, train on the union of tasks 0..t.

Batches mix tasks, so each sample uses its own task's head (task-incremental) through the
per-sample task ids of the batch.
"""
from jaxcl.methods import base


def defaults() -> dict:
    return {}


def validate(config) -> None:
    """No settings to check."""


def make(config, model, info) -> base.Method:
    return base.make("joint", config, model, data="cumulative")
