r"""Evaluates a loaded model at bf16 and at every bit-width, in the paper's table layout.

  python experiments/evaluate_model.py --model=smollm2-135m|<parent dir> \
      [--tasks=shakespeare_next_line,arc_easy,...] \
      [--ppl=tfds:shakespeare_plays:validation] [--bits=8,6,4,3,2] [--out=table.json]

--model: a checkpoint directory, a .gguf file, 'smollm2-135m', or a stored
parent (`parents.save`, e.g. runs/x/parents/<run>). For float weights every
width is min-max PTQ ('PTQ') and the int8 min-max parent sliced ('Sliced
int8'); for a stored parent, its slices. Rows: data type; columns: accuracy per task,
Task Avg. (mean accuracy) and log pplx (nats/token).
"""

import dataclasses
import json
import time

from absl import app, flags, logging

from matquant_jax import ckpts, evals, nn
from matquant_jax.core import QuantSpec, plans
from matquant_jax.data import pipeline
from matquant_jax.lab import logs

_MODEL = flags.DEFINE_string('model', 'smollm2-135m', 'Checkpoint directory, .gguf file or model name.')
_TASKS = flags.DEFINE_list('tasks', [evals.OFFLINE_TASK], 'Tasks: ' + ', '.join(
    list(evals.TASKS) + [evals.OFFLINE_TASK]))
_TASK_FILES = flags.DEFINE_list('task_files', [], 'task=path.jsonl overrides (local examples).')
_LIMIT = flags.DEFINE_integer('limit', 200, 'Examples per task.')
_PPL = flags.DEFINE_string('ppl', 'tfds:shakespeare_plays:validation', 'Perplexity text source.')
_PPL_WINDOWS = flags.DEFINE_integer('ppl_batches', 8, 'Batches of 8 x seq_len tokens for perplexity.')
_SEQ = flags.DEFINE_integer('seq_len', 512, 'Perplexity window.')
_BITS = flags.DEFINE_list('bits', ['8', '6', '4', '3', '2'], 'Bit-widths.')
_MIX = flags.DEFINE_string('mixnmatch', 'pyramid', "'pyramid' (int2 outer, int8 middle, int4 between) or "
                           'comma-separated per-layer bits, or empty.')
_DATA_DIR = flags.DEFINE_string('data_dir', pipeline.default_data_dir(), 'TFDS data directory.')
_OUT = flags.DEFINE_string('out', None, 'Write the rows as JSON here.')


def evaluate_rows(variables, tokenizer, specs, items, texts):
  """One row per (label, model, spec)."""
  rows = []
  for label, model, spec in specs:
    t = time.perf_counter()
    rows.append(dict(data_type=label, **evals.table_row(model, variables, tokenizer, spec, items,
                                                           texts, _SEQ.value, 8, _PPL_WINDOWS.value)))
    logging.info('%-28s task avg %.3f  log pplx %.4f  (%.0fs)', label, rows[-1]['task_avg'],
                 rows[-1]['log_pplx'], time.perf_counter() - t)
  return rows


def main(argv):
  del argv
  logs.setup()
  model, variables, tokenizer = ckpts.load(_MODEL.value)
  files = dict(kv.split('=', 1) for kv in _TASK_FILES.value)
  items = {t: evals.task_items(t, files.get(t), _DATA_DIR.value, _LIMIT.value) for t in _TASKS.value}
  texts = evals.read_texts(_PPL.value, _DATA_DIR.value)
  layers = model.config.num_layers
  mix = plans.pyramid(layers) if _MIX.value == 'pyramid' else tuple(
      int(b) for b in _MIX.value.split(',') if b)
  bits = [int(b) for b in _BITS.value]
  stored = nn.stored_bits(variables)
  if stored:
    targets = nn.quantized_targets(variables, model.config)
    specs = [(f'int{b} (parent slice)', model, QuantSpec(b, parent_bits=stored, targets=targets))
             for b in bits if b <= stored]
    mix_spec = QuantSpec(mix, parent_bits=stored, targets=targets) if mix else None
  else:
    mix_spec = QuantSpec(mix) if mix else None
    bf16 = nn.Transformer(dataclasses.replace(model.config, dtype='bfloat16'))
    specs = [('bf16', bf16, None)]
    specs += [(f'int{b} (PTQ min-max)', model, QuantSpec(b, parent_bits=b)) for b in bits]
    specs += [(f'int{b} (Sliced int8)', model, QuantSpec(b)) for b in bits if b != 8]
  if mix:
    specs.append((f"Mix'n'Match {','.join(map(str, mix))}", model, mix_spec))
  rows = evaluate_rows(variables, tokenizer, specs, items, texts)
  names = list(items)
  print('| data type | ' + ' | '.join(names) + ' | Task Avg. | log pplx |')
  print('|---' * (len(names) + 3) + '|')
  for r in rows:
    print(f"| {r['data_type']} | " + ' | '.join(f'{100 * r[n]:.1f}' for n in names) +
          f" | {100 * r['task_avg']:.1f} | {r['log_pplx']:.3f} |")
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
