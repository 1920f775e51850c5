"""From a TFDS text dataset to deterministic token batches.

Each split is tokenized once into one stream (BOS doc EOS BOS doc EOS ...),
cached as .npy. Training batches are random windows chosen by (seed, step),
so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os

import filelock
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from matquant_jax.data import shakespeare, vocab
from matquant_jax.nn.config import BOS_ID, EOS_ID


LOCAL_BUILDERS = {'shakespeare_plays': shakespeare.ShakespearePlays}


DATA_DIR_ENV = 'MATQUANT_DATA_DIR'


def default_data_dir() -> str:
  """Where datasets and tokenizers are built: $MATQUANT_DATA_DIR, else ~/.cache/matquant_jax."""
  return os.environ.get(DATA_DIR_ENV) or '~/.cache/matquant_jax'


@dataclasses.dataclass
class TokenData:
  train: np.ndarray
  validation: np.ndarray
  tokenizer: spm.SentencePieceProcessor


def load_split_texts(name: str, data_dir: str, split: str) -> list[str]:
  """The 'text' field of every example of a TFDS split (prepared as array_record)."""
  data_dir = os.path.expanduser(data_dir)
  if name in LOCAL_BUILDERS:
    builder = LOCAL_BUILDERS[name](data_dir=data_dir, file_format='array_record')
  else:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  os.makedirs(data_dir, exist_ok=True)
  with filelock.FileLock(os.path.join(data_dir, '.prepare.lock')):  # jobs sharing a data dir build it once
    builder.download_and_prepare()
  source = builder.as_data_source(split=split)
  texts = [source[i]['text'] for i in range(len(source))]
  return [t.decode('utf-8') if isinstance(t, bytes) else t for t in texts]


def load_tokens(name: str, data_dir: str, vocab_size: int) -> TokenData:
  """Builds (once) the dataset, the tokenizer on its train split, and token streams."""
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  prefix = os.path.join(data_dir, 'tokens', f'{name.replace("/", "_")}_spm{vocab_size}')
  texts = {}
  def texts_of(split):
    if split not in texts:
      texts[split] = load_split_texts(name, data_dir, split)
    return texts[split]
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  with filelock.FileLock(prefix + '.lock'):  # another job may be building the same files
    sp = vocab.train_or_load(prefix + '.model', (t for t in texts_of('train')), vocab_size)
    streams = {}
    for split in ('train', 'validation'):
      path = f'{prefix}_{split}.npy'
      if not os.path.exists(path):
        ids = sp.encode(texts_of(split))
        stream = np.concatenate([np.array([BOS_ID] + d + [EOS_ID], np.int32) for d in ids])
        tmp = path + '.tmp.npy'
        np.save(tmp, stream)
        os.replace(tmp, path)
      streams[split] = np.load(path)
  return TokenData(streams['train'], streams['validation'], sp)


def train_batch(stream: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int | tuple[int, ...],
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Random windows [batch_size / process_count, seq_len + 1], a pure function of (seed, step).

  seed: an int or a tuple of ints (e.g. (seed, phase, run seed) for separate streams).

  The global batch is the same for any number of processes; each process reads
  only its own contiguous block of rows.
  """
  if len(stream) <= seq_len + 1:
    raise ValueError(f'token stream of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}')
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by the {process_count} processes')
  rng = np.random.default_rng([*(seed if isinstance(seed, tuple) else (seed,)), step])
  starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
  rows = batch_size // process_count
  mine = starts[process_index * rows:(process_index + 1) * rows]
  return np.stack([stream[s:s + seq_len + 1] for s in mine])


def eval_batches(stream: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int | None = None, bos_id: int | None = None) -> list[np.ndarray]:
  """Consecutive [batch_size, seq_len + 1] windows from the start of the stream, each token
  predicted once. Without `bos_id` a window's first token is the previous window's last; with
  it (models trained with BOS opening every sequence) each window is BOS + seq_len new tokens."""
  shared = bos_id is None
  n = (len(stream) - shared) // seq_len // batch_size
  if max_batches is not None:
    n = min(n, max_batches)
  if n == 0:
    raise ValueError(f'validation stream of {len(stream)} tokens gives no full batch of {batch_size}x{seq_len}')
  out = []
  for b in range(n):
    rows = np.stack([stream[i * seq_len:(i + 1) * seq_len + shared]
                     for i in range(b * batch_size, (b + 1) * batch_size)])
    if not shared:
      rows = np.concatenate([np.full((batch_size, 1), bos_id, stream.dtype), rows], 1)
    out.append(rows)
  return out
