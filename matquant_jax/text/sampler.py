"""Text generation from one resident model at any precision, chosen per call.

`Sampler(model, variables, tokenizer).sample(prompts, max_new_tokens, bits=4)`:
prompts are left-padded to a common bucket length, prefilled in one forward
pass into a KV cache, then decoded in one jitted `lax.while_loop`. `bits`
reaches the model as a `QuantSpec`, a jit static: one compilation per distinct
precision, cached by jit, and the resident weights (a stored uint8 parent, or
float weights fake-quantized per step) are the same for every call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax import nn
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.text import tokenization


BUCKET = 16  # prompts are padded to a multiple of this, so few prefill shapes compile


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn: greedy (temperature 0), or from the softmax at
  `temperature`, restricted to the `top_k` most likely and/or the smallest set
  whose probability reaches `top_p`."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN would pick token 0 forever
      raise ValueError(f'temperature must be a finite number >= 0, got {self.temperature}')
    if self.top_k is not None:
      if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
        raise ValueError(f'top_k must be an integer >= 1, got {self.top_k!r}')
      object.__setattr__(self, 'top_k', int(self.top_k))
    if self.top_p is not None and not 0 < self.top_p <= 1:  # also refuses NaN
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')


GREEDY = Sampling()


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """One prompt's continuation: its text and token ids (up to, not including, EOS)."""
  text: str
  tokens: list[int]


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token ids [B] from logits [B, V]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)
    logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _generate(model: nn.Transformer, variables, tokens, input_mask, max_new_tokens, rng, *,
              spec: QuantSpec | None, sampling: Sampling, cache_size: int, eos_id: int):
  """Prefill then decode; returns (generated ids [B, cache_size - P], number of decode steps)."""
  b, p = tokens.shape
  positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0).astype(jnp.int32)
  cache = nn.init_cache(model.config, b, cache_size)
  output = model.apply(variables, tokens, positions, spec=spec, cache=cache, input_mask=input_mask)
  logits, cache = output.logits, output.cache
  out = jnp.full((b, cache_size - p), eos_id, jnp.int32)
  state = (jnp.zeros((), jnp.int32), logits[:, -1], cache, positions[:, -1] + 1,
           out, jnp.zeros((b,), bool), rng)

  def cond(state):
    step, _, _, _, _, done, _ = state
    return (step < max_new_tokens - 1) & ~jnp.all(done)  # the last token needs no forward pass

  def pick(state):
    step, last, cache, pos, out, done, rng = state
    rng, key = jax.random.split(rng)
    token = jnp.where(done, eos_id, sample_logits(last, key, sampling))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    return token, (step, last, cache, pos, out, done | (token == eos_id), rng)

  def body(state):
    token, (step, _, cache, pos, out, done, rng) = pick(state)
    output = model.apply(variables, token[:, None], pos[:, None], spec=spec, cache=cache,
                         input_mask=jnp.ones((b, 1), bool))
    return step + 1, output.logits[:, -1], output.cache, pos + 1, out, done, rng

  state = jax.lax.while_loop(cond, body, state)
  _, (step, _, _, _, out, _, _) = pick(state)
  out = jnp.where(jnp.arange(out.shape[1]) < max_new_tokens, out, eos_id)  # max_new_tokens=0
  return out, jnp.minimum(step + 1, max_new_tokens)


class Sampler:
  """Generates text from one resident model; the precision is chosen per call.

  variables: {'params': ...} (float weights, or stored `QuantizedArray`
  parents from `parents.load`), optionally with OmniQuant's 'quant' collection.
  cache_size: KV-cache slots, the most prompt (padded to a multiple of 16)
  plus new tokens one call can use.
  """

  def __init__(self, model: nn.Transformer, variables, tokenizer, cache_size: int = 1024,
               extra_precision: bool = False):
    self.model = model
    self.variables = nn.as_variables(variables)
    if tokenizer is None:  # e.g. a parent saved without one: mq.load returns None
      raise ValueError('the Sampler needs a tokenizer, and none was given (a stored parent saved '
                       'without one?): pass one, e.g. mq.text.tokenization.from_directory(DIR), or '
                       'save the parent with its tokenizer')
    self.tokenizer = tokenization.wrap(tokenizer)
    self.cache_size = cache_size
    self.extra_precision = extra_precision
    self._generate = jax.jit(functools.partial(_generate, model),
                             static_argnames=('spec', 'sampling', 'cache_size', 'eos_id'))

  def spec(self, bits) -> QuantSpec | None:
    """bits (None: as stored; an int; a per-layer tuple; a plan file; a QuantSpec) -> the
    QuantSpec the model is applied with (`nn.resolve_spec`)."""
    return nn.resolve_spec(bits, self.variables, self.model.config, extra_precision=self.extra_precision)

  def encode(self, prompts: Sequence[str], add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token ids [B, P] and their mask, P a multiple of BUCKET."""
    if isinstance(prompts, str) or not prompts:
      raise ValueError('prompts must be a non-empty list of strings')
    bos = [self.tokenizer.bos_id] if add_bos and self.tokenizer.bos_id is not None else []
    ids = []
    for i, text in enumerate(prompts):
      if not text:
        raise ValueError(f'prompt {i} is empty')
      row = bos + list(self.tokenizer.encode(text))
      if not row:
        raise ValueError(f'prompt {i} ({text!r}) tokenizes to no tokens (and the tokenizer has no BOS)')
      ids.append(row)
    p = -(-max(map(len, ids)) // BUCKET) * BUCKET
    tokens = np.zeros((len(ids), p), np.int32)
    mask = np.zeros((len(ids), p), bool)
    for i, row in enumerate(ids):
      tokens[i, p - len(row):] = row
      mask[i, p - len(row):] = True
    return tokens, mask

  def sample(self, prompts: Sequence[str], max_new_tokens: int, *, bits=None,
             sampling: Sampling = GREEDY, rng: jax.Array | int = 0, add_bos: bool = True,
             stop_at_eos: bool = True) -> list[SampleOutput]:
    """One continuation per prompt, decoded at `bits` (see `spec`); a row stops at EOS
    (unless stop_at_eos=False, as benchmarks use to decode a fixed length)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
      raise ValueError(f'max_new_tokens must be a non-negative integer, got {max_new_tokens!r}')
    spec = self.spec(bits)
    tokens, mask = self.encode(prompts, add_bos)
    if tokens.shape[1] + max_new_tokens > self.cache_size:
      raise ValueError(f'prompt ({tokens.shape[1]} tokens, padded) + max_new_tokens ({max_new_tokens}) '
                       f'exceeds the cache of {self.cache_size} slots; make the Sampler with a larger cache_size')
    if isinstance(rng, int):
      rng = jax.random.PRNGKey(rng)
    eos = self.tokenizer.eos_id if stop_at_eos and self.tokenizer.eos_id is not None else -1
    out, _ = self._generate(self.variables, tokens, mask, jnp.int32(max_new_tokens), rng, spec=spec,
                            sampling=sampling, cache_size=self.cache_size, eos_id=eos)
    results = []
    for row in np.asarray(out)[:, :max_new_tokens].tolist():
      if eos in row:
        row = row[:row.index(eos)]
      results.append(SampleOutput(self.tokenizer.decode(row), row))
    return results
