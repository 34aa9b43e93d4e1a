"""Fine-tuning: train on each task in turn with nothing against forgetting (the lower
bound). The simplest method: copy this file to start a new one."""
from jaxcl.methods import base


def defaults() -> dict:
    return {}


def validate(config) -> None:
    """No settings to check."""


def make(config, model, info) -> base.Method:
    return base.make("finetune", config, model)
