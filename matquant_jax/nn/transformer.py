"""Gemma-2 and Gemma-3 in Flax linen, with parameter names and shapes of the official checkpoints.

Read top to bottom: config, RoPE, norm, embedder, attention, feed-forward,
block, transformer. FFN einsums (and, with QuantSpec.targets, attention
projections) go through `qeinsum.einsum`, so the precision is chosen per call.
"""

from __future__ import annotations

from flax import traverse_util
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from matquant_jax.core import packing, qeinsum, quant
from matquant_jax.core.contract import contract
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.nn.cache import cache_inputs, ring_write
from matquant_jax.nn.config import AttentionType, TransformerConfig
from matquant_jax.nn.weights import WeightInfo, quantizable_weights


K_MASK = -2.3819763e38  # the official large negative mask value


def fan_in_init(shape, reduce_axes):
  """normal(1/sqrt(fan_in)), fan_in = product of the contraction axes (for training from scratch)."""
  fan_in = 1
  for a in reduce_axes:
    fan_in *= shape[a]
  return nn.initializers.normal(stddev=fan_in**-0.5)


def apply_rope(x: jax.Array, positions: jax.Array, base: float, scale: float = 1.0) -> jax.Array:
  """Half-split rotary embedding. x: [B, T, N, H], positions: [B, T]; `scale` > 1 stretches
  positions (linear RoPE scaling, Gemma 3's global layers)."""
  half = x.shape[-1] // 2
  timescale = base ** (2 * jnp.arange(half) / x.shape[-1])
  angle = positions[..., None, None].astype(jnp.float32) / timescale / scale
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale) (Gemma), or * scale (Llama: plus_one=False)."""
  eps: float = 1e-6
  plus_one: bool = True

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
    scale = self.param('scale', init, (x.shape[-1],))
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
    return (y * (1 + scale if self.plus_one else scale)).astype(x.dtype)


def _norm(config, name):
  return RMSNorm(config.norm_eps, config.norm_plus_one, name=name)


class Embedder(nn.Module):
  """Token embedding (scaled by sqrt(D) in Gemma); also the output projection when tied."""
  vocab_size: int
  embed_dim: int
  scale: bool = True
  tied: bool = True

  def setup(self):
    init = nn.initializers.normal(self.embed_dim**-0.5)
    shape = (self.vocab_size, self.embed_dim)
    self.input_embedding = self.param('input_embedding', init, shape)
    self.output_embedding = self.input_embedding if self.tied else self.param('output_embedding', init, shape)

  def encode(self, tokens, dtype):
    x = self.input_embedding[tokens].astype(dtype)
    return x * jnp.sqrt(self.embed_dim).astype(dtype) if self.scale else x

  def decode(self, x):
    return contract('BTD,VD->BTV', x, self.output_embedding.astype(x.dtype))  # no transpose of the table


def _embedder(config, name=None):
  return Embedder(config.num_embed, config.embed_dim, config.embed_scale, config.tie_embeddings, name=name)


def quantized_einsum(module: nn.Module, name: str, shape: tuple[int, ...], info: WeightInfo,
                     x: jax.Array, bits: int | None, spec: QuantSpec | None) -> jax.Array:
  """Applies `module`'s weight `name` through the quantized-einsum path.

  The weight is a float param, or a stored `QuantizedArray` parent; OmniQuant's
  learned transform, if any, sits at the same path in the 'quant' collection.
  The input is sown into 'einsum_inputs' (a no-op unless that collection is
  mutable; GPTQ reads it for its Hessians).
  """
  module.sow('einsum_inputs', name, x)
  if spec is None or info.target not in spec.targets:
    bits = None
  w = module.get_variable('params', name) if module.has_variable('params', name) else None
  if not isinstance(w, (quant.QuantizedArray, packing.ResidentArray)):
    w = module.param(name, fan_in_init(shape, info.reduce_axes), shape)
  aux = module.get_variable('quant', name) if module.has_variable('quant', name) else None
  return qeinsum.einsum(info.eqn, x, w, reduce_axes=info.reduce_axes, bits=bits, spec=spec, aux=aux)


class Einsum(nn.Module):
  """A weight 'w' of a given shape, applied through the quantized-einsum path."""
  shape: tuple[int, ...]
  info: WeightInfo

  @nn.compact
  def __call__(self, x, bits=None, spec=None):
    return quantized_einsum(self, 'w', self.shape, self.info, x, bits, spec)


class Attention(nn.Module):
  """Grouped-query attention with optional QK-norm, logit soft cap and sliding window.

  Without a cache, keys are the T inputs. With one (decoding), this step's keys and values
  are written at slots end_index.. of the [B * K, S, H] cache and the queries attend over its
  S slots; a sliding-window layer with a ring cache attends over the ring as it was plus this
  step's keys, then writes them into the ring. `key_positions` [B, S] hold each key's
  position (for the window) and `mask` [B, T, S] which keys are written, real and causal.
  Scores are computed kv-head-major ([B * K, T * G, S]) so the cache is read in place.
  Returns (output, new {'k', 'v'} or None).
  """
  config: TransformerConfig
  attn_type: AttentionType

  @nn.compact
  def __call__(self, x, positions, mask, bits=None, spec=None, cache=None, key_positions=None):
    c = self.config
    w = quantizable_weights(c)
    n, k, d, h = c.num_heads, c.num_kv_heads, c.embed_dim, c.head_dim
    if n == k:
      qkv = Einsum((3, n, d, h), w['attn/qkv_einsum/w'], name='qkv_einsum')(x, bits, spec)
      q, key, value = qkv[0], qkv[1], qkv[2]
    else:
      q = Einsum((n, d, h), w['attn/q_einsum/w'], name='q_einsum')(x, bits, spec)
      kv = Einsum((2, k, d, h), w['attn/kv_einsum/w'], name='kv_einsum')(x, bits, spec)
      key, value = kv[0], kv[1]
    if c.qk_norm:  # the official module names
      q, key = _norm(c, '_query_norm')(q), _norm(c, '_key_norm')(key)
    base, scale = c.rope(self.attn_type)
    q = apply_rope(q, positions, base, scale) * jnp.asarray(c.query_scale, x.dtype)
    key = apply_rope(key, positions, base, scale)
    b, t = x.shape[:2]
    heads_major = lambda a: a.transpose(0, 2, 1, 3).reshape(b * k, t, h)  # [B * K, T, H]
    key, value = heads_major(key), heads_major(value)
    if key_positions is None:
      key_positions = positions
    if cache is not None:
      if cache['k'].shape[1] < key_positions.shape[1]:  # a ring: the old window, then this step
        new_cache = {name: ring_write(cache[name], new, cache['end_index'], axis=1)
                     for name, new in (('k', key), ('v', value))}
        key = jnp.concatenate([cache['k'], key.astype(cache['k'].dtype)], axis=1)
        value = jnp.concatenate([cache['v'], value.astype(cache['v'].dtype)], axis=1)
      else:
        start = (0, cache['end_index'], 0)
        key = jax.lax.dynamic_update_slice(cache['k'], key.astype(cache['k'].dtype), start)
        value = jax.lax.dynamic_update_slice(cache['v'], value.astype(cache['v'].dtype), start)
        new_cache = {'k': key, 'v': value}
      key, value = key.astype(x.dtype), value.astype(x.dtype)
      cache = new_cache

    s, g = key.shape[1], n // k
    qg = q.reshape(b, t, k, g, h).transpose(0, 2, 1, 3, 4).reshape(b * k, t * g, h)
    batch = ((0,), (0,))
    logits = jax.lax.dot_general(qg, key, (((2,), (2,)), batch)).astype(jnp.float32)  # [B*K, T*G, S]
    if c.attn_logits_soft_cap is not None:
      logits = jnp.tanh(logits / c.attn_logits_soft_cap) * c.attn_logits_soft_cap
    if self.attn_type == AttentionType.LOCAL_SLIDING:
      dist = positions[:, :, None] - key_positions[:, None, :]
      mask = mask & (dist < c.sliding_window_size)
    logits = jnp.where(mask[:, None, :, None, :], logits.reshape(b, k, t, g, s), K_MASK)
    probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype).reshape(b * k, t * g, s)
    encoded = jax.lax.dot_general(probs, value, (((2,), (1,)), batch))  # [B*K, T*G, H]
    encoded = encoded.reshape(b, k, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    out = Einsum((n, h, d), w['attn/attn_vec_einsum/w'], name='attn_vec_einsum')(encoded, bits, spec)
    return out, cache


class FeedForward(nn.Module):
  """GeGLU (tanh GELU; SwiGLU with ffn_activation='silu'): gate 0 is the activated branch."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, bits=None, spec=None):
    c = self.config
    w = quantizable_weights(c)
    if c.transpose_gating_einsum:
      shape = (2, c.hidden_dim, c.embed_dim)
    else:
      shape = (2, c.embed_dim, c.hidden_dim)
    gate = quantized_einsum(self, 'gating_einsum', shape, w['mlp/gating_einsum'], x, bits, spec)
    act = jax.nn.silu(gate[0]) if c.ffn_activation == 'silu' else jax.nn.gelu(gate[0], approximate=True)
    hidden = act * gate[1]
    return quantized_einsum(self, 'linear', (c.hidden_dim, c.embed_dim), w['mlp/linear'],
                            hidden, bits, spec)


class Block(nn.Module):
  """h = x + post_attn_norm(attn(pre_attn_norm(x))); out = h + post_ffw_norm(mlp(pre_ffw_norm(h))).

  Without post_norms (Llama/Mistral) the post norms are the identity.
  Returns (out, the attention's new cache or None).
  """
  config: TransformerConfig
  attn_type: AttentionType

  @nn.compact
  def __call__(self, x, positions, mask, bits=None, spec=None, cache=None, key_positions=None):
    c = self.config
    post = (lambda name: _norm(c, name)) if c.post_norms else (lambda name: lambda y: y)
    a = _norm(c, 'pre_attention_norm')(x)
    a, cache = Attention(c, self.attn_type, name='attn')(a, positions, mask, bits, spec, cache, key_positions)
    x = x + post('post_attention_norm')(a)
    f = _norm(c, 'pre_ffw_norm')(x)
    f = FeedForward(c, name='mlp')(f, bits, spec)
    return x + post('post_ffw_norm')(f), cache


def token_mask(config: TransformerConfig, tokens: jax.Array) -> jax.Array:
  """1.0 where a token is not the config's padding id (all ones without one)."""
  if config.pad_id is None:
    return jnp.ones(tokens.shape, jnp.float32)
  return (tokens != config.pad_id).astype(jnp.float32)


def attention_inputs(config: TransformerConfig, tokens: jax.Array, positions: jax.Array | None = None):
  """(positions [B, T], mask [B, T, S]): causal, padding keys masked."""
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  causal = positions[:, :, None] >= positions[:, None, :]
  return positions, causal & (token_mask(config, tokens) > 0)[:, None, :]


def embed(config: TransformerConfig, params, tokens: jax.Array) -> jax.Array:
  """The first block's input, for layer-wise algorithms."""
  return _embedder(config).apply(
      {'params': params['embedder']}, tokens, jnp.dtype(config.dtype), method=Embedder.encode)


def blocks(config: TransformerConfig) -> list[tuple[str, Block]]:
  """(params key, module) of every block, in order, for layer-wise algorithms (OmniQuant)."""
  return [(f'layer_{i}', Block(config, a)) for i, a in enumerate(config.attention_types)]


def param_shapes(config: TransformerConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat '/'-joined path -> shape and dtype of every parameter of `config`'s model."""
  tree = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  return traverse_util.flatten_dict(tree['params'], sep='/')


@flax.struct.dataclass
class Output:
  """What the model returns: logits [B, T, vocab] (float32), and the updated KV cache when it was
  called with one (None otherwise)."""
  logits: jax.Array
  cache: dict | None = None


class Transformer(nn.Module):
  """Gemma decoder (and Llama/Mistral by config): `apply({'params': p}, tokens, spec=QuantSpec(...))`
  gives an `Output` (`.logits`).

  Decoding: `apply(variables, tokens, positions, spec=..., cache=cache, input_mask=m)`
  with a cache from `init_cache` gives the logits and the new cache; `input_mask` [B, T] marks
  real tokens (default: not the padding id).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               spec: QuantSpec | None = None, cache: dict | None = None,
               input_mask: jax.Array | None = None):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    if cache is None:
      positions, mask = attention_inputs(c, tokens, positions)
    else:
      if positions is None:
        raise ValueError('decoding with a cache needs the positions of the tokens')
      if input_mask is None:
        input_mask = token_mask(c, tokens) > 0
      masks, key_positions, new_cache = cache_inputs(tokens, positions, input_mask, cache)
    embedder = _embedder(c, name='embedder')
    x = embedder.encode(tokens, dtype)
    for i, attn_type in enumerate(c.attention_types):
      bits = spec.bits_for(i, c.num_layers) if spec is not None else None
      layer_cache = kp = None
      layer_mask = mask if cache is None else masks['full']
      if cache is not None:
        layer_cache = {**cache[f'layer_{i}'], 'end_index': cache['end_index']}
        kp = key_positions['full']
        if layer_cache['k'].shape[1] < kp.shape[1]:  # this layer keeps a ring
          layer_mask, kp = masks['ring'], key_positions['ring']
      x, layer_cache = Block(c, attn_type, name=f'layer_{i}')(
          x, positions, layer_mask, bits, spec, layer_cache, kp)
      if cache is not None:
        new_cache[f'layer_{i}'] = layer_cache
    x = _norm(c, 'final_norm')(x)
    logits = embedder.decode(x).astype(jnp.float32)
    if c.final_logit_softcap is not None:
      logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
    return Output(logits, None if cache is None else new_cache)
