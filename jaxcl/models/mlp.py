"""Multi-layer perceptron on flattened inputs."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.models.layers import Dense, Heads, ModuleDef

ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh}


class MLP(nn.Module):
    hidden: tuple = (400, 400)
    num_heads: int = 1
    num_outputs: int = 10
    classes_per_head: tuple = ()
    activation: str = "relu"
    dropout: float = 0.0
    weight_init: str = "torch"
    dtype: str = "float32"
    dense: ModuleDef = Dense

    @nn.compact
    def __call__(self, x: jax.Array, task=None, train: bool = False) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        act = ACTIVATIONS[self.activation]
        h = x.reshape(x.shape[0], -1)
        for i, n in enumerate(self.hidden):
            h = act(self.dense(n, weight_init=self.weight_init, dtype=self.dtype, name=f"fc{i + 1}")(h, task))
            if self.dropout:
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return Heads(self.num_heads, self.num_outputs, self.classes_per_head, self.weight_init, name="head")(h, task)
