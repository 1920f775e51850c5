"""A SentencePiece tokenizer trained on a training split, built once and cached."""

from __future__ import annotations

import io
import os
from typing import Iterable

import sentencepiece as spm

from matquant_jax.nn.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def train_or_load(path: str, texts: Iterable[str], vocab_size: int) -> spm.SentencePieceProcessor:
  """Loads the model at `path`, or trains one on `texts` (Gemma ids: PAD 0, EOS 1, BOS 2, UNK 3)."""
  if not os.path.exists(path):
    lines = (line for t in texts for line in t.splitlines() if line.strip())
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=buf, vocab_size=vocab_size, model_type='bpe',
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID, character_coverage=1.0,
        byte_fallback=True, num_threads=os.cpu_count() or 1, minloglevel=2)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(buf.getvalue())
    os.replace(tmp, path)  # atomic: no half-written tokenizer
  return spm.SentencePieceProcessor(model_file=path)
