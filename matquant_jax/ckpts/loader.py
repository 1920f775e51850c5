"""One entry point: `load(source)` -> (model, variables, tokenizer)."""

from __future__ import annotations

import os

from matquant_jax import nn, parents
from matquant_jax.ckpts.gemma_orbax import load_gemma_orbax
from matquant_jax.ckpts.gguf import load_gguf
from matquant_jax.ckpts.hf import load_hf
from matquant_jax.ckpts.zoo import MODELS


def load(source: str, dtype: str = 'float32', resident_bits: int | None = None):
  """(model, variables, tokenizer) from a stored parent directory (`parents.save`/`export`),
  a checkpoint directory, a .gguf file, or a model name ('smollm2-135m', 'gemma3-270m');
  variables = {'params': ...}. resident_bits (stored parents only): hold the parent for
  widths up to this, in fewer bytes (`parents.resident`)."""
  if source in MODELS:
    source = MODELS[source]()
  if os.path.isdir(source) and os.path.exists(os.path.join(source, parents.MANIFEST)):
    return parents.load(source, resident_bits)
  if resident_bits is not None:
    raise ValueError(f'resident_bits applies to a stored parent; {source!r} is a float checkpoint '
                     '(make a parent first: parents.make_parent, then parents.resident)')
  if source.endswith('.gguf'):
    config, params, tokenizer = load_gguf(source, dtype)
  elif os.path.isdir(source) and os.path.exists(os.path.join(source, 'config.json')):
    config, params, tokenizer = load_hf(source, dtype)
  elif os.path.isdir(source):
    config, params, tokenizer = load_gemma_orbax(source, dtype)
  else:
    raise FileNotFoundError(f'{source!r} is not a checkpoint directory, a .gguf file or a known '
                            f'model name {sorted(MODELS)}')
  return nn.Transformer(config), {'params': params}, tokenizer
