"""The decoder's explicit KV cache: `init_cache` and the per-step slot bookkeeping."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from matquant_jax.nn.config import TransformerConfig


def init_cache(config: TransformerConfig, batch_size: int, cache_size: int, dtype=None) -> dict:
  """An empty KV cache: per layer 'k', 'v' [B, S, K, H]; shared 'positions' and 'valid' [B, S]
  (each slot's position, and whether it holds a real token) and the next slot 'end_index'."""
  kv = jnp.zeros((batch_size, cache_size, config.num_kv_heads, config.head_dim),
                 jnp.dtype(dtype or config.dtype))
  cache = {'end_index': jnp.zeros((), jnp.int32),
           'positions': jnp.zeros((batch_size, cache_size), jnp.int32),
           'valid': jnp.zeros((batch_size, cache_size), bool)}
  cache.update({f'layer_{i}': {'k': kv, 'v': kv} for i in range(config.num_layers)})
  return cache


def cache_inputs(tokens: jax.Array, positions: jax.Array, input_mask: jax.Array, cache: dict):
  """Writes this step's positions and validity into the cache's shared slots.

  Returns (mask [B, T, S]: written, real and not in the future; the updated shared fields).
  """
  start = (0, cache['end_index'])
  if tokens.shape[1] > cache['valid'].shape[1]:
    raise ValueError(f'{tokens.shape[1]} tokens do not fit a cache of {cache["valid"].shape[1]} slots')
  key_positions = jax.lax.dynamic_update_slice(cache['positions'], positions.astype(jnp.int32), start)
  valid = jax.lax.dynamic_update_slice(cache['valid'], input_mask.astype(bool), start)
  mask = valid[:, None, :] & (key_positions[:, None, :] <= positions[:, :, None])
  return mask, {'end_index': cache['end_index'] + tokens.shape[1], 'positions': key_positions,
                'valid': valid}
