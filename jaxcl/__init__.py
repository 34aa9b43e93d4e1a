"""jaxcl: continual-learning methods as pure JAX/Flax transforms.

>>> import jaxcl
>>> config = jaxcl.get_config("split_digits:method=ewc")
>>> config.method.name
'ewc'
"""
from jaxcl import config, data, methods, metrics, models, report, sharding
from jaxcl.api import Trainer, method, trainer
from jaxcl.checkpoint import CheckpointError, Checkpointer
from jaxcl.config import ConfigError, base_config
from jaxcl.configs import get_config, list_benchmarks
from jaxcl.data import DataError
from jaxcl.methods import Method, State
from jaxcl.train import NonFiniteLossError, RunError, run

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Checkpointer", "ConfigError", "DataError", "Method", "NonFiniteLossError", "RunError",
    "State", "Trainer", "base_config", "config", "data", "get_config", "list_benchmarks", "method", "methods", "metrics", "models",
    "report", "run", "sharding", "trainer",
]
