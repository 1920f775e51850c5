"""Log perplexity: token log-probabilities in bounded memory and a jitted NLL sum."""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax import nn
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.data import pipeline
from matquant_jax.evals.sources import token_stream


LOGITS_BYTES = 2**29  # float32 logits made at once by evaluation (a 262k vocabulary needs bounding)


def token_logprobs(model: nn.Transformer, variables, inputs: jax.Array, targets: jax.Array,
                   spec: QuantSpec | None) -> jax.Array:
  """log p(target) [B, T] under the model; the [rows, T, vocab] logits are made a few rows at a
  time (at most LOGITS_BYTES), so a large vocabulary does not need B x T x vocab memory."""
  b, t = inputs.shape
  rows = max(1, LOGITS_BYTES // (t * model.config.num_embed * 4))

  def logprobs(x, y):
    logits = model.apply(nn.as_variables(variables), x, spec=spec).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]

  if rows >= b:
    return logprobs(inputs, targets)
  one_row = lambda xy: logprobs(xy[0][None], xy[1][None])[0]
  return jax.lax.map(one_row, (inputs, targets), batch_size=rows)


@functools.lru_cache(maxsize=32)
def make_eval_fn(model: nn.Transformer) -> Callable:
  """eval_fn(params, batches, spec) -> mean NLL in nats per token (log perplexity).

  params may also be variables {'params', 'quant'}, e.g. an exported OmniQuant parent.
  One function (and so one jit cache, one compilation per spec and shape) per model.
  """

  @functools.partial(jax.jit, static_argnums=2)
  def _sums(params, batch, spec):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    mask = nn.token_mask(model.config, targets)
    nll = -token_logprobs(model, params, inputs, targets, spec)
    return jnp.sum(nll * mask), jnp.sum(mask)

  def eval_fn(params, batches: Iterable[np.ndarray], spec: QuantSpec | None) -> float:
    total, count = 0.0, 0.0
    for b in batches:
      s, n = _sums(params, jnp.asarray(b), spec)
      total, count = total + float(s), count + float(n)
    return total / count

  return eval_fn


def log_perplexity(model, variables, tokenizer, texts: Iterable[str], spec=None,
                   seq_len: int = 512, batch_size: int = 8, max_batches: int | None = None) -> float:
  """Mean NLL (nats/token) over non-overlapping windows of the joined documents. A model trained
  with BOS opening every sequence (`config.bos_per_sequence`, Gemma) reads BOS before each window
  of seq_len tokens, as at serving time; every token is still predicted once.
  spec: anything `nn.resolve_spec` takes (a QuantSpec, a width, per-layer widths, a plan file)."""
  spec = nn.resolve_spec(spec, variables, model.config)
  bos = tokenizer.bos_id if model.config.bos_per_sequence else None
  batches = pipeline.eval_batches(token_stream(tokenizer, texts), batch_size, seq_len, max_batches, bos)
  return make_eval_fn(model)(variables, batches, spec)
