"""Evaluation: task readers and prompts, log-likelihood scoring, perplexity sources, the offline task."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import ckpts, evals, nn, testing
from matquant_jax.evals import tasks
from matquant_jax.nn import llama
from matquant_jax.text import tokenization

DATA = os.path.join(os.path.dirname(__file__), 'data')


def _items(task):
  return evals.task_items(task, os.path.join(DATA, f'{task}.jsonl'))


def test_readers_build_the_usual_prompts():
  (arc,) = _items('arc_easy')
  assert arc.label == 1 and arc.choices[1] == (
      'Question: Which of these is a liquid at room temperature?\nAnswer:', ' water')
  (boolq,) = _items('boolq')
  assert boolq.label == 1 and [c for _, c in boolq.choices] == [' no', ' yes']
  assert boolq.choices[0][0] == 'Water is a liquid that makes things wet.\nQuestion: is water wet?\nAnswer:'
  (hs,) = _items('hellaswag')
  assert hs.choices[0] == ('Cooking: A man puts a pan on the stove. He', ' cracks two eggs into the pan.')
  assert hs.choices[1][1] == ' flies to the moon. now.'  # ' [title]' -> '. ', as in the harness
  (pq,) = _items('piqa')
  assert pq.label == 0 and pq.choices[1] == ('Question: To dry wet hands,\nAnswer:', ' dip them in a lake.')
  (wg,) = _items('winogrande')
  assert wg.label == 0  # '1' -> the first option
  assert wg.choices == (('The trophy did not fit in the suitcase because the trophy', ' was too big.'),
                        ('The trophy did not fit in the suitcase because the suitcase', ' was too big.'))
  assert evals.TASKS['arc_challenge'][2] is evals.arc


def test_accuracy_and_length_normalisation(monkeypatch):
  items = [evals.Item((('q', ' a long answer'), ('q', ' b')), label=0),   # 14 and 2 bytes
           evals.Item((('q', ' yes'), ('q', ' no')), label=1)]
  scores = np.array([-5.0, -3.0, -1.0, -2.0])  # item 1: raw picks 1, per byte 0; item 2: picks 0
  monkeypatch.setattr(tasks, 'loglikelihoods', lambda *a, **k: scores)
  assert evals.accuracy(None, None, None, items) == {'acc': 0.0, 'acc_norm': 0.5, 'n': 2}


def test_loglikelihood_equals_a_direct_sum(token_data, data_dir):
  cfg = nn.TransformerConfig.tiny(num_embed=512)
  model = nn.Transformer(cfg)
  params = testing.init_params(model)
  del token_data  # builds the tokenizer file
  sp = tokenization.from_sentencepiece(
      os.path.join(os.path.expanduser(data_dir), 'tokens', 'shakespeare_plays_spm512.model'))
  pairs = [('To be, or not', ' to be'), ('Friends, Romans,', ' countrymen, lend me your ears'),
           ('What', ' light through yonder window breaks')]
  got = evals.loglikelihoods(model, params, sp, pairs, batch_size=2, bucket=8)
  for (ctx, cont), value in zip(pairs, got):
    ids = [nn.BOS_ID] + sp.encode(ctx) + sp.encode(cont)
    n = len(sp.encode(cont))
    logp = jax.nn.log_softmax(model.apply({'params': params}, jnp.asarray([ids[:-1]])).logits[0], axis=-1)
    want = sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1 - n, len(ids) - 1))
    assert value == pytest.approx(want, abs=1e-4)


def test_offline_task_is_deterministic_and_well_formed(data_dir):
  a = evals.shakespeare_next_line(data_dir, n=30)
  b = evals.shakespeare_next_line(data_dir, n=30)
  assert a == b and len(a) == 30
  for item in a:
    assert len(item.choices) == 4 and len({c for _, c in item.choices}) == 4
    assert len({ctx for ctx, _ in item.choices}) == 1 and item.choices[0][0].count('\n') == 4
  assert len({item.label for item in a}) > 1


def test_text_sources_and_their_errors(data_dir, tmp_path):
  path = tmp_path / 'doc.txt'
  path.write_text('Now is the winter of our discontent')
  assert evals.read_texts(str(path)) == ['Now is the winter of our discontent']
  plays = evals.read_texts('tfds:shakespeare_plays:validation', data_dir)
  assert len(plays) == 3 and 'Hamlet' in plays[0][:2000] + plays[1][:2000] + plays[2][:2000]
  with pytest.raises(FileNotFoundError, match='neither tfds:NAME:SPLIT nor an existing file'):
    evals.read_texts(str(tmp_path / 'missing.txt'))
  with pytest.raises(FileNotFoundError, match='TFDS dataset c4/en \\(validation\\) is not prepared'):
    evals.read_texts('tfds:c4/en:validation', str(tmp_path))
  with pytest.raises(ValueError, match="unknown task 'mmlu'"):
    evals.task_items('mmlu')


@pytest.mark.slow
def test_smollm2_beats_chance_on_the_offline_task(data_dir, smollm2):
  model, variables, tokenizer = smollm2
  items = evals.shakespeare_next_line(data_dir, n=48)
  result = evals.accuracy(model, variables, tokenizer, items)
  # chance is 0.25; measured 0.52 on 60 items (the first 24 alone: 0.33, so n stays 48)
  assert result['acc_norm'] > 0.35, result


def test_evaluate_model_command_prints_the_paper_table(tmp_path):
  """The evaluation command on a synthetic Hugging Face Llama checkpoint with local task files."""
  import subprocess
  import sys
  cfg = llama.llama_config(num_layers=2, num_embed=256, embed_dim=32, hidden_dim=64, num_heads=4,
                           num_kv_heads=2)
  params = testing.init_params(nn.Transformer(cfg))
  ckpts.save_hf(str(tmp_path / 'hf'), params, cfg)
  import tokenizers
  from tokenizers import models, pre_tokenizers
  tk = tokenizers.Tokenizer(models.WordLevel({f'w{i}': i for i in range(250)} | {'[UNK]': 250}, '[UNK]'))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.save(str(tmp_path / 'hf' / 'tokenizer.json'))
  (tmp_path / 'doc.txt').write_text(' '.join(f'w{i % 250}' for i in range(3000)))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, 'experiments/evaluate_model.py', f'--model={tmp_path / "hf"}', '--tasks=arc_easy,piqa',
       f'--task_files=arc_easy={DATA}/arc_easy.jsonl,piqa={DATA}/piqa.jsonl', f'--ppl={tmp_path / "doc.txt"}',
       '--seq_len=64', '--ppl_batches=2', '--bits=8,2', '--mixnmatch=2,8', f'--out={tmp_path / "rows.json"}'],
      cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| data type | arc_easy | piqa | Task Avg. | log pplx |' in proc.stdout
  rows = {r['data_type']: r for r in json.load(open(tmp_path / 'rows.json'))}
  assert set(rows) == {'bf16', 'int8 (PTQ min-max)', 'int2 (PTQ min-max)', 'int2 (Sliced int8)',
                       "Mix'n'Match 2,8"}
  assert all(0 < r['log_pplx'] < 2 * np.log(256) for r in rows.values())


def test_gemma_windows_open_with_bos_and_count_each_token_once(token_data, data_dir):
  """A model trained with BOS on every sequence (released Gemma) reads BOS before each window."""
  del token_data
  sp = tokenization.from_sentencepiece(
      os.path.join(os.path.expanduser(data_dir), 'tokens', 'shakespeare_plays_spm512.model'))
  cfg = nn.TransformerConfig.tiny(num_embed=512, bos_per_sequence=True)
  model = nn.Transformer(cfg)
  params = testing.init_params(model)
  texts = ['To be, or not to be, that is the question. ' * 6]
  got = evals.log_perplexity(model, params, sp, texts, seq_len=16, batch_size=2, max_batches=1)
  stream = evals.token_stream(sp, texts)[:32]
  total = 0.0
  for w in stream.reshape(2, 16):  # by hand: [BOS] + 16 tokens, 16 predictions per window
    ids = [sp.bos_id] + list(w)
    logp = jax.nn.log_softmax(model.apply({'params': params}, jnp.asarray([ids[:-1]])).logits[0], axis=-1)
    total -= sum(float(logp[t, ids[t + 1]]) for t in range(16))
  assert got == pytest.approx(total / 32, abs=1e-5)
