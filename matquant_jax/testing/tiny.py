"""What the tests share to build tiny models (`TransformerConfig.tiny()`: the real architecture at a
size that compiles in seconds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from matquant_jax import nn


def init_params(model: nn.Transformer, seed: int = 0) -> dict:
  """The model's parameters from PRNGKey(seed) (the values do not depend on the example input)."""
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))['params']
