"""Text sources for evaluation: TFDS datasets, local files, and the token stream they make."""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from matquant_jax.data import pipeline


def as_str(x) -> str:
  """A TFDS text feature (bytes) or any value as str."""
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def tfds_examples(name: str, split: str, data_dir: str | None, limit: int | None):
  """Examples of a prepared TFDS dataset, or an error that says how to prepare it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'TFDS dataset {name} ({split}) is not prepared under data_dir={data_dir!r}: run '
        f'`tfds build {name} --data_dir=...` where the network is reachable '
        f'({str(e).splitlines()[0]})') from e
  n = len(source) if limit is None else min(limit, len(source))
  return [source[i] for i in range(n)]


def read_texts(source: str, data_dir: str | None = None, limit: int | None = None,
               feature: str = 'text') -> list[str]:
  """Documents from 'tfds:NAME:SPLIT' (e.g. 'tfds:c4/en:validation') or a local text file."""
  if source.startswith('tfds:'):
    _, name, split = source.split(':', 2)
    if name in pipeline.LOCAL_BUILDERS:  # built here from installed data
      return pipeline.load_split_texts(name, data_dir or pipeline.default_data_dir(), split)[:limit]
    return [as_str(ex[feature]) for ex in tfds_examples(name, split, data_dir, limit)]
  if not os.path.exists(source):
    raise FileNotFoundError(f'text source {source!r} is neither tfds:NAME:SPLIT nor an existing file')
  with open(source, encoding='utf-8') as f:
    return [f.read()]


def token_stream(tokenizer, texts: Iterable[str]) -> np.ndarray:
  """Documents encoded and joined, each opened by BOS and closed by EOS when the tokenizer has them."""
  parts = []
  for text in texts:
    ids = tokenizer.encode(text)
    if tokenizer.bos_id is not None:
      ids = [tokenizer.bos_id] + ids
    if tokenizer.eos_id is not None:
      ids = ids + [tokenizer.eos_id]
    parts.append(np.asarray(ids, np.int32))
  return np.concatenate(parts)
