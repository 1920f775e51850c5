"""The decoder's explicit KV cache: `init_cache` and the per-step slot bookkeeping.

Keys and values are held [B * K, S, H] (batch and kv heads merged, before the
slots): the layout whose attention dots read the cache in place, and a step's
dynamic-update-slice writes its T slots in place inside the decode loop (with
[B, K, S, H] and B = 1, XLA copies every cache four times a step). Sliding-window layers keep a ring of `window` slots
when the window is shorter than the cache: slot (index mod window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from matquant_jax.nn.config import AttentionType, TransformerConfig


def ring_size(config: TransformerConfig, cache_size: int) -> int | None:
  """The sliding-window layers' ring length, or None when they keep the full cache."""
  local = AttentionType.LOCAL_SLIDING in config.attention_types
  return config.sliding_window_size if local and config.sliding_window_size < cache_size else None


def init_cache(config: TransformerConfig, batch_size: int, cache_size: int, dtype=None) -> dict:
  """An empty KV cache: per layer 'k', 'v' [B * K, S, H] (S = the window for sliding-window
  layers when it is shorter than `cache_size`); shared 'positions' and 'valid' [B, S] (each
  slot's position, and whether it holds a real token), the ring's own 'ring' {'positions',
  'valid'} [B, window], and 'end_index', the number of tokens written."""
  ring = ring_size(config, cache_size)
  dtype = jnp.dtype(dtype or config.dtype)

  def kv(slots):
    z = jnp.zeros((batch_size * config.num_kv_heads, slots, config.head_dim), dtype)
    return {'k': z, 'v': z}

  def slots(n):
    return {'positions': jnp.zeros((batch_size, n), jnp.int32), 'valid': jnp.zeros((batch_size, n), bool)}

  cache = {'end_index': jnp.zeros((), jnp.int32), **slots(cache_size)}
  if ring:
    cache['ring'] = slots(ring)
  for i, kind in enumerate(config.attention_types):
    cache[f'layer_{i}'] = kv(ring if ring and kind == AttentionType.LOCAL_SLIDING else cache_size)
  return cache


def ring_write(buf: jax.Array, new: jax.Array, end_index: jax.Array, axis: int) -> jax.Array:
  """Writes `new`'s T entries along `axis` of a ring `buf` at slots (end_index + t) mod size;
  only the last `size` of them when T exceeds the ring."""
  size, t = buf.shape[axis], new.shape[axis]
  if t >= size:
    last = jax.lax.slice_in_dim(new, t - size, t, axis=axis)
    return jnp.roll(last, (end_index + t) % size, axis=axis)  # entry j lands at (end + t - size + j) mod size
  if t == 1:  # the decode step: one slot, in place
    start = [0] * buf.ndim
    start[axis] = end_index % size
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)
  idx = (end_index + jnp.arange(t)) % size
  return buf.at[(slice(None),) * axis + (idx,)].set(new.astype(buf.dtype))


def cache_inputs(tokens: jax.Array, positions: jax.Array, input_mask: jax.Array, cache: dict):
  """Writes this step's positions and validity into the cache's shared slots.

  Returns (masks, key positions, the updated shared fields). masks['full'] [B, T, S]: slots
  written, real and not in the future; with a ring, masks['ring'] [B, T, W + T] and key
  positions['ring'] [B, W + T] cover the ring as it was before this step followed by this
  step's own T keys (what a sliding-window layer attends over).
  """
  start = (0, cache['end_index'])
  if tokens.shape[1] > cache['valid'].shape[1]:
    raise ValueError(f'{tokens.shape[1]} tokens do not fit a cache of {cache["valid"].shape[1]} slots')
  positions, input_mask = positions.astype(jnp.int32), input_mask.astype(bool)
  key_positions = jax.lax.dynamic_update_slice(cache['positions'], positions, start)
  valid = jax.lax.dynamic_update_slice(cache['valid'], input_mask, start)
  visible = lambda kp, ok: ok[:, None, :] & (kp[:, None, :] <= positions[:, :, None])
  masks, keys = {'full': visible(key_positions, valid)}, {'full': key_positions}
  new = {'end_index': cache['end_index'] + tokens.shape[1], 'positions': key_positions, 'valid': valid}
  if 'ring' in cache:
    ring = cache['ring']
    keys['ring'] = jnp.concatenate([ring['positions'], positions], axis=1)
    masks['ring'] = visible(keys['ring'], jnp.concatenate([ring['valid'], input_mask], axis=1))
    new['ring'] = {'positions': ring_write(ring['positions'], positions, cache['end_index'], 1),
                   'valid': ring_write(ring['valid'], input_mask, cache['end_index'], 1)}
  return masks, keys, new
