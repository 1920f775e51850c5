"""Gemma-2 and Gemma-3 in Flax linen, with parameter names and shapes of the official checkpoints.

Read top to bottom: config, RoPE, norm, embedder, attention, feed-forward,
block, transformer. FFN einsums (and, with QuantSpec.targets, attention
projections) go through `qeinsum.einsum`, so the precision is chosen per call.
"""

from __future__ import annotations

import dataclasses
import enum

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from matquant_jax import qeinsum, quant
from matquant_jax.qeinsum import QuantSpec

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
K_MASK = -2.3819763e38  # the official large negative mask value


class AttentionType(enum.Enum):
  GLOBAL = 1
  LOCAL_SLIDING = 2


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Gemma-2 hyperparameters (names follow the official `TransformerConfig`)."""
  num_layers: int
  num_embed: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  head_dim: int
  num_kv_heads: int
  sliding_window_size: int = 4096
  attn_logits_soft_cap: float | None = 50.0
  final_logit_softcap: float | None = 30.0
  query_pre_attn_scalar: float | None = None  # default head_dim**-0.5
  transpose_gating_einsum: bool = False
  rope_base: float = 10_000.0  # global layers (all layers unless rope_local_base is set)
  dtype: str = 'float32'  # activation dtype; parameters stay float32
  # Family switches; the defaults are Gemma-2. models/llama.py sets them for Llama/Mistral,
  # models/gemma3.py for Gemma 3.
  attention_pattern: str = 'alternating'  # 'alternating' (local, global, ...), 'gemma3' (5 local,
                                          # 1 global), 'global', 'sliding'
  rope_local_base: float | None = None  # sliding-window layers' RoPE base (Gemma 3: 10k)
  rope_global_scale: float = 1.0  # linear RoPE scaling (positions / scale) of global layers
  qk_norm: bool = False  # Gemma 3: RMSNorm over head_dim on queries and keys before RoPE
  ffn_activation: str = 'gelu_tanh'  # GeGLU; 'silu' is SwiGLU
  post_norms: bool = True  # Gemma-2's post-attention / post-FFN norms
  norm_eps: float = 1e-6
  norm_plus_one: bool = True  # Gemma scales by (1 + scale), Llama by its weight
  embed_scale: bool = True  # multiply embeddings by sqrt(embed_dim)
  tie_embeddings: bool = True  # else a separate embedder/output_embedding [vocab, embed]
  pad_id: int | None = PAD_ID  # keys and targets with this id are masked (None: no padding id)
  # Trained with BOS opening every sequence (released Gemma checkpoints: without it the NLL is
  # about 1 nat worse): evaluation windows and calibration rows then start with BOS.
  bos_per_sequence: bool = False

  @property
  def attention_types(self) -> tuple[AttentionType, ...]:
    """Gemma-2: even layers local sliding window, odd layers global; Gemma 3: every sixth global."""
    local, glob = AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL
    pattern = {'alternating': (local, glob), 'gemma3': (local,) * 5 + (glob,),
               'global': (AttentionType.GLOBAL,), 'sliding': (AttentionType.LOCAL_SLIDING,)}
    if self.attention_pattern not in pattern:
      raise ValueError(f'attention_pattern must be one of {sorted(pattern)}, got {self.attention_pattern!r}')
    p = pattern[self.attention_pattern]
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def query_scale(self) -> float:
    return self.query_pre_attn_scalar or self.head_dim**-0.5

  def rope(self, attn_type: AttentionType) -> tuple[float, float]:
    """(base, linear scale) of RoPE in a layer of this type."""
    if attn_type == AttentionType.LOCAL_SLIDING and self.rope_local_base is not None:
      return self.rope_local_base, 1.0
    return self.rope_base, self.rope_global_scale

  @classmethod
  def gemma2_2b(cls, **kw) -> 'TransformerConfig':
    return cls(num_layers=26, num_embed=256128, embed_dim=2304, hidden_dim=9216,
               num_heads=8, head_dim=256, num_kv_heads=4, **{'bos_per_sequence': True, **kw})

  @classmethod
  def gemma2_9b(cls, **kw) -> 'TransformerConfig':
    return cls(num_layers=42, num_embed=256128, embed_dim=3584, hidden_dim=14336,
               num_heads=16, head_dim=256, num_kv_heads=8, transpose_gating_einsum=True,
               **{'bos_per_sequence': True, **kw})

  @classmethod
  def gemma2_27b(cls, **kw) -> 'TransformerConfig':
    return cls(num_layers=46, num_embed=256128, embed_dim=4608, hidden_dim=36864,
               num_heads=32, head_dim=128, num_kv_heads=16, transpose_gating_einsum=True,
               query_pre_attn_scalar=(4608 // 32)**-0.5, **{'bos_per_sequence': True, **kw})

  @classmethod
  def tiny(cls, num_embed: int = 256, **kw) -> 'TransformerConfig':
    """A few-thousand-parameter model for unit tests."""
    base = dict(num_layers=2, num_embed=num_embed, embed_dim=32, hidden_dim=64,
                num_heads=4, head_dim=8, num_kv_heads=2, sliding_window_size=4)
    return cls(**{**base, **kw})

  @classmethod
  def small(cls, num_embed: int = 2048, **kw) -> 'TransformerConfig':
    """The embedded default: a small Gemma-2-architecture model that trains on 2 CPU cores."""
    base = dict(num_layers=4, num_embed=num_embed, embed_dim=128, hidden_dim=512,
                num_heads=4, head_dim=32, num_kv_heads=2, sliding_window_size=64)
    return cls(**{**base, **kw})


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
    return jnp.dot(x, self.output_embedding.T.astype(x.dtype))


def _embedder(config, name=None):
  return Embedder(config.num_embed, config.embed_dim, config.embed_scale, config.tie_embeddings, name=name)


@dataclasses.dataclass(frozen=True)
class WeightInfo:
  """How a quantizable weight is applied: its einsum and contraction (per-channel reduce) axes."""
  eqn: str
  reduce_axes: tuple[int, ...]
  target: str  # 'ffn' or 'attn', as in QuantSpec.targets
  logical_axes: tuple[str | None, ...]  # names for sharding.py's logical-to-mesh rules


def quantizable_weights(config: TransformerConfig) -> dict[str, WeightInfo]:
  """Every weight of a block that goes through the quantized-einsum path, by its params path."""
  w = {}
  if config.num_heads == config.num_kv_heads:
    w['attn/qkv_einsum/w'] = WeightInfo('BTD,SNDH->SBTNH', (2,), 'attn',
                                        ('stack', 'heads', 'embed', 'head_dim'))
  else:
    w['attn/q_einsum/w'] = WeightInfo('BTD,NDH->BTNH', (1,), 'attn', ('heads', 'embed', 'head_dim'))
    w['attn/kv_einsum/w'] = WeightInfo('BSD,CKDH->CBSKH', (2,), 'attn',
                                       ('stack', 'kv_heads', 'embed', 'head_dim'))
  w['attn/attn_vec_einsum/w'] = WeightInfo('BTNH,NHD->BTD', (0, 1), 'attn', ('heads', 'head_dim', 'embed'))
  if config.transpose_gating_einsum:
    w['mlp/gating_einsum'] = WeightInfo('BTD,FHD->FBTH', (2,), 'ffn', ('stack', 'mlp', 'embed'))
  else:
    w['mlp/gating_einsum'] = WeightInfo('BTD,FDH->FBTH', (1,), 'ffn', ('stack', 'embed', 'mlp'))
  w['mlp/linear'] = WeightInfo('BTH,HD->BTD', (0,), 'ffn', ('mlp', 'embed'))
  return w


def logical_axes(config: TransformerConfig) -> dict[str, tuple[str | None, ...]]:
  """Logical axis names of every parameter, by path suffix (block paths without 'layer_i/')."""
  names = {p: i.logical_axes for p, i in quantizable_weights(config).items()}
  names['embedder/input_embedding'] = names['embedder/output_embedding'] = ('vocab', 'embed')
  for norm in ('pre_attention_norm', 'post_attention_norm', 'pre_ffw_norm', 'post_ffw_norm',
               'final_norm', 'attn/_query_norm', 'attn/_key_norm'):
    names[f'{norm}/scale'] = ('norm',)
  return names


def ffn_reduce_axes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """Contraction axes of each FFN weight (per-output-channel statistics reduce over them)."""
  return {p.split('/')[1]: i.reduce_axes for p, i in quantizable_weights(config).items()
          if i.target == 'ffn'}


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
  if not isinstance(w, quant.QuantizedArray):
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

  Without a cache, keys are the T inputs. With one (decoding), this step's
  keys and values are written at slot cache['end_index'] of the [B, S, K, H]
  cache and the queries attend over all S slots; cache['positions'] holds
  every slot's position (for the sliding window) and `mask` [B, T, S] which
  slots are written, real and causal. Returns (output, new {'k', 'v'} or None).
  """
  config: TransformerConfig
  attn_type: AttentionType

  @nn.compact
  def __call__(self, x, positions, mask, bits=None, spec=None, cache=None):
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
    key_positions = positions
    if cache is not None:
      start = (0, cache['end_index'], 0, 0)
      key = jax.lax.dynamic_update_slice(cache['k'], key.astype(cache['k'].dtype), start)
      value = jax.lax.dynamic_update_slice(cache['v'], value.astype(cache['v'].dtype), start)
      key_positions = cache['positions']
      cache = {'k': key, 'v': value}
      key, value = key.astype(x.dtype), value.astype(x.dtype)

    b, t = x.shape[:2]
    s = key.shape[1]
    qg = q.reshape(b, t, k, n // k, h)
    logits = jnp.einsum('BTKGH,BSKH->BTKGS', qg, key).reshape(b, t, n, s).astype(jnp.float32)
    if c.attn_logits_soft_cap is not None:
      logits = jnp.tanh(logits / c.attn_logits_soft_cap) * c.attn_logits_soft_cap
    if self.attn_type == AttentionType.LOCAL_SLIDING:
      dist = positions[:, :, None] - key_positions[:, None, :]
      mask = mask & (dist < c.sliding_window_size)
    logits = jnp.where(mask[:, :, None, :], logits, K_MASK)
    probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    probs = probs.reshape(b, t, k, n // k, s)
    encoded = jnp.einsum('BTKGS,BSKH->BTKGH', probs, value).reshape(b, t, n, h)
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
  def __call__(self, x, positions, mask, bits=None, spec=None, cache=None):
    c = self.config
    post = (lambda name: _norm(c, name)) if c.post_norms else (lambda name: lambda y: y)
    a = _norm(c, 'pre_attention_norm')(x)
    a, cache = Attention(c, self.attn_type, name='attn')(a, positions, mask, bits, spec, cache)
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


class Transformer(nn.Module):
  """Gemma decoder (and Llama/Mistral by config). `apply({'params': p}, tokens, quant=QuantSpec(...))` gives logits.

  Decoding: `apply(variables, tokens, positions, quant=..., cache=cache, input_mask=m)`
  with a cache from `init_cache` gives (logits, new cache); `input_mask` [B, T] marks
  real tokens (default: not the padding id).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               quant: QuantSpec | None = None, cache: dict | None = None,
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
      mask, new_cache = cache_inputs(tokens, positions, input_mask, cache)
    embedder = _embedder(c, name='embedder')
    x = embedder.encode(tokens, dtype)
    for i, attn_type in enumerate(c.attention_types):
      bits = quant.bits_for(i, c.num_layers) if quant is not None else None
      layer_cache = None
      if cache is not None:
        layer_cache = {**cache[f'layer_{i}'], 'end_index': cache['end_index'],
                       'positions': new_cache['positions']}
      x, layer_cache = Block(c, attn_type, name=f'layer_{i}')(x, positions, mask, bits, quant, layer_cache)
      if cache is not None:
        new_cache[f'layer_{i}'] = layer_cache
    x = _norm(c, 'final_norm')(x)
    logits = embedder.decode(x).astype(jnp.float32)
    if c.final_logit_softcap is not None:
      logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
    return logits if cache is None else (logits, new_cache)
