"""The paper's zero-shot multiple-choice tasks (spec section 7) and its table row.

The six downstream tasks read their TFDS datasets (ARC-Easy/Challenge, BoolQ,
HellaSwag, PIQA, Winogrande) with the usual zero-shot prompts (lm-evaluation-harness style) and
are scored by log-likelihood: accuracy, and length-normalized accuracy
(log-likelihood per byte of the answer). Every reader also accepts a local
JSON-lines file of examples with the same features. `shakespeare_next_line`
is a real task built offline from the held-out plays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax import nn
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.data import pipeline
from matquant_jax.evals import perplexity
from matquant_jax.evals.sources import as_str, tfds_examples


@dataclasses.dataclass(frozen=True)
class Item:
  """One multiple-choice question: (context, continuation) per choice; label = the right one."""
  choices: tuple[tuple[str, str], ...]
  label: int


def arc(ex: Mapping[str, Any]) -> Item:
  """ai2_arc: 'Question: q\\nAnswer:' + ' choice'."""
  texts = [as_str(t) for t in ex['choices']['text']]
  labels = [as_str(t) for t in ex['choices']['label']]
  ctx = f"Question: {as_str(ex['question'])}\nAnswer:"
  return Item(tuple((ctx, ' ' + t) for t in texts), labels.index(as_str(ex['answerKey'])))


def boolq(ex: Mapping[str, Any]) -> Item:
  """super_glue/boolq: 'passage\\nQuestion: q?\\nAnswer:' + ' no' / ' yes'."""
  ctx = f"{as_str(ex['passage'])}\nQuestion: {as_str(ex['question'])}?\nAnswer:"
  return Item(((ctx, ' no'), (ctx, ' yes')), int(ex['label']))


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(' [title]', '. ')
  text = re.sub(r'\[.*?\]', '', text)
  return text.replace('  ', ' ')


def hellaswag(ex: Mapping[str, Any]) -> Item:
  """hellaswag: 'activity: context' + ' ending' (HF-style ctx_a/ctx_b or TFDS 'context')."""
  if 'ctx_a' in ex:
    ctx = as_str(ex['ctx_a']) + ' ' + as_str(ex['ctx_b']).capitalize()
  else:
    ctx = as_str(ex['context'])
  query = _hellaswag_clean(as_str(ex['activity_label']) + ': ' + ctx)
  return Item(tuple((query, ' ' + _hellaswag_clean(as_str(e))) for e in ex['endings']), int(as_str(ex['label'])))


def piqa(ex: Mapping[str, Any]) -> Item:
  """piqa: 'Question: goal\\nAnswer:' + ' solution'."""
  ctx = f"Question: {as_str(ex['goal'])}\nAnswer:"
  return Item(((ctx, ' ' + as_str(ex['sol1'])), (ctx, ' ' + as_str(ex['sol2']))), int(ex['label']))


def winogrande(ex: Mapping[str, Any]) -> Item:
  """winogrande: the blank filled with each option is the context; the rest is scored."""
  sentence = as_str(ex['sentence'])
  cut = sentence.index('_')
  rest = ' ' + sentence[cut + 1:].strip()
  label = int(as_str(ex['label']))
  label = label - 1 if label in (1, 2) else label  # '1'/'2' in the raw data
  return Item(tuple((sentence[:cut] + as_str(ex[o]), rest) for o in ('option1', 'option2')), label)


TASKS: dict[str, tuple[str, str, Callable[[Mapping[str, Any]], Item]]] = {
    'arc_easy': ('ai2_arc/ARC-Easy', 'test', arc),
    'arc_challenge': ('ai2_arc/ARC-Challenge', 'test', arc),
    'boolq': ('super_glue/boolq', 'validation', boolq),
    'hellaswag': ('hellaswag', 'validation', hellaswag),
    'piqa': ('piqa', 'validation', piqa),
    'winogrande': ('winogrande/winogrande_xl', 'validation', winogrande),
}


PAPER_TASKS = tuple(TASKS)


OFFLINE_TASK = 'shakespeare_next_line'


def _jsonl(path: str, limit: int | None) -> list[dict]:
  if not os.path.exists(path):
    raise FileNotFoundError(f'examples file {path} does not exist')
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows[:limit]


def task_items(task: str, source: str | None = None, data_dir: str | None = None,
               limit: int | None = None) -> list[Item]:
  """A task's items from its TFDS dataset, or from `source` (a .jsonl file with TFDS features)."""
  if task == OFFLINE_TASK:
    return shakespeare_next_line(data_dir or pipeline.default_data_dir(), limit or 300)
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; known: {sorted(TASKS) + [OFFLINE_TASK]}')
  name, split, reader = TASKS[task]
  rows = _jsonl(source, limit) if source else tfds_examples(name, split, data_dir, limit)
  return [reader(r) for r in rows]


def shakespeare_next_line(data_dir: str, n: int = 300, context_lines: int = 4, choices: int = 4,
                          seed: int = 0) -> list[Item]:
  """The true next line of a held-out play against distractor lines from the same play.

  Built deterministically from the validation plays of the TFDS `shakespeare_plays`
  dataset (Hamlet, Twelfth Night, Julius Caesar): n items spread over the
  plays, lines of at least 20 characters; chance is 1 / choices.
  """
  plays = pipeline.load_split_texts('shakespeare_plays', data_dir, 'validation')
  rng = np.random.default_rng(seed)
  items = []
  per_play = -(-n // len(plays))
  for text in plays:
    lines = [l.strip() for l in text.splitlines() if len(l.strip()) >= 20]
    if len(lines) < context_lines + choices:
      raise ValueError('a validation play has too few lines for the next-line task')
    for i in rng.choice(np.arange(context_lines, len(lines)), size=per_play, replace=False):
      ctx = '\n'.join(lines[i - context_lines:i]) + '\n'
      pool = [j for j in rng.choice(len(lines), size=choices * 3, replace=False)
              if lines[j] != lines[i] and j != i][:choices - 1]
      options = [lines[i]] + [lines[j] for j in pool]
      order = rng.permutation(choices)
      items.append(Item(tuple((ctx, options[k]) for k in order), int(np.argmax(order == 0))))
  return items[:n]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _token_logprobs(model, variables, tokens, targets, spec):
  return perplexity.token_logprobs(model, variables, tokens, targets, spec)


def loglikelihoods(model: nn.Transformer, variables, tokenizer, pairs: Sequence[tuple[str, str]],
                   spec: QuantSpec | None = None, batch_size: int = 16, max_len: int = 512,
                   bucket: int = 32) -> np.ndarray:
  """Sum of log p(continuation | context) for each (context, continuation), in nats."""
  spec = nn.resolve_spec(spec, variables, model.config)
  pad = model.config.pad_id if model.config.pad_id is not None else 0
  seqs = []
  for ctx, cont in pairs:
    c_ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(ctx)
    t_ids = tokenizer.encode(cont)
    if not t_ids:
      raise ValueError(f'continuation {cont!r} encodes to no tokens')
    ids = (c_ids + t_ids)[-(max_len + 1):]
    seqs.append((ids, len(t_ids)))
  out = np.zeros(len(seqs))
  order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    width = -(-max(len(seqs[i][0]) - 1 for i in idx) // bucket) * bucket  # fewer shapes to compile
    tokens = np.full((batch_size, width), pad, np.int32)  # right padding: causal, so harmless
    targets = np.full((batch_size, width), pad, np.int32)
    for row, i in enumerate(idx):
      ids = seqs[i][0]
      tokens[row, :len(ids) - 1], targets[row, :len(ids) - 1] = ids[:-1], ids[1:]
    lp = np.asarray(_token_logprobs(model, variables, jnp.asarray(tokens), jnp.asarray(targets), spec))
    for row, i in enumerate(idx):
      ids, n_cont = seqs[i]
      out[i] = lp[row, len(ids) - 1 - n_cont:len(ids) - 1].sum()
  return out


def accuracy(model, variables, tokenizer, items: Sequence[Item], spec=None,
             **kw) -> dict[str, float]:
  """acc (argmax log-likelihood) and acc_norm (log-likelihood per byte of the answer)."""
  pairs = [c for item in items for c in item.choices]
  ll = loglikelihoods(model, variables, tokenizer, pairs, spec, **kw)
  acc, norm, k = [], [], 0
  for item in items:
    scores = ll[k:k + len(item.choices)]
    nbytes = np.array([len(cont.encode('utf-8')) for _, cont in item.choices])
    acc.append(int(np.argmax(scores)) == item.label)
    norm.append(int(np.argmax(scores / nbytes)) == item.label)
    k += len(item.choices)
  return {'acc': float(np.mean(acc)), 'acc_norm': float(np.mean(norm)), 'n': len(items)}


def table_row(model, variables, tokenizer, spec: QuantSpec | None, items: Mapping[str, Sequence[Item]],
              texts: Sequence[str], seq_len: int = 512, batch_size: int = 8,
              max_batches: int | None = None) -> dict[str, Any]:
  """One row of the paper's table: accuracy and acc_norm per task, Task Avg. (mean accuracy), log pplx."""
  row = {}
  for name, its in items.items():
    result = accuracy(model, variables, tokenizer, its, spec)
    row[name], row[f'{name}_norm'] = result['acc'], result['acc_norm']
  row['task_avg'] = float(np.mean([row[name] for name in items])) if items else float('nan')
  row['log_pplx'] = perplexity.log_perplexity(model, variables, tokenizer, texts, spec, seq_len, batch_size,
                                   max_batches)
  return row
