"""Tiny models for tests and examples: the real architecture at a size that compiles in seconds."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from matquant_jax import nn


def init_params(model: nn.Transformer, seed: int = 0) -> dict:
  """The model's parameters from PRNGKey(seed) (the values do not depend on the example input)."""
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))['params']


def tiny(seed: int = 0, **config) -> tuple[nn.Transformer, dict]:
  """(model, params) of `TransformerConfig.tiny(**config)` (Gemma-2 by default, 2 layers, D 32)."""
  model = nn.Transformer(nn.TransformerConfig.tiny(**config))
  return model, init_params(model, seed)
