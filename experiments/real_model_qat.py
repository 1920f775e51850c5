r"""QAT on a real pretrained model: MatQuant [8,4,2] against int8/int4/int2 baselines.

  python experiments/real_model_qat.py --workdir=runs/smollm2_qat [--model=smollm2-135m]
      [--steps=64 --batch_size=4 --seq_len=128 --learning_rate=5e-5 --group_size=32]
      [--runs=matquant,baseline_int2,... --noreference_rows]
      [--init_parent=runs/smollm2_ep/parents/g32_skip1_matquant_ep --extra_precision --lambdas=1,1,1]

Every run trains the FFN weights of the loaded model (SmolLM2-135M by default) on the same
batches from the Shakespeare training plays: 'Float, same tokens' (the fair reference:
QAT is also extra training on a new domain), the int8, int4 and int2 single-precision
baselines, and MatQuant [8,4,2] with lambda (0.1, 0.1, 1). Each run checkpoints with orbax and
resumes. Rows (log pplx on held-out plays, next-line task accuracy) are appended to
WORKDIR/results.json as they finish; WORKDIR/table.md and WORKDIR/plot.png at the end.

--init_parent starts the runs from a stored parent (e.g. an OmniQuant or E.P. MatQuant parent
of real_model_study.py) instead of the pretrained weights: `warm_start.float_variables` gives
float weights whose min-max fake quantization is that parent, and the parent's own slices
become the reference rows.
"""

import dataclasses
import os
import time

from absl import app, flags, logging

from matquant_jax import ckpts, evals, nn, parents
from matquant_jax.algos import qat, warm_start
from matquant_jax.core import QuantSpec, losses
from matquant_jax.data import pipeline
from matquant_jax.lab import logs, report

_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and results.', required=True)
_MODEL = flags.DEFINE_enum('model', 'smollm2-135m', sorted(ckpts.MODELS), 'The real model.')
_DATA_DIR = flags.DEFINE_string('data_dir', pipeline.default_data_dir(), 'TFDS data directory.')
_STEPS = flags.DEFINE_integer('steps', 64, 'QAT steps per run.')
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
_LR = flags.DEFINE_float('learning_rate', 5e-5, 'Peak AdamW learning rate (warm-up 1/8 of the steps, '
                         'cosine decay to a tenth).')
_GROUP = flags.DEFINE_integer('group_size', 32, 'Quantization group size along the contraction axis; '
                              '0: one scale per output channel.')
_LAMBDAS = flags.DEFINE_list('lambdas', ['0.1', '0.1', '1'], 'MatQuant [8,4,2] lambdas.')
_INIT_PARENT = flags.DEFINE_string('init_parent', None, 'A stored parent directory to start QAT from '
                                   '(its group size must be --group_size).')
_EXTRA = flags.DEFINE_bool('extra_precision', False, 'Train and evaluate Extra Precision slices (the '
                           "paper's E.P. MatQuant; use with an E.P. parent and lambdas 1,1,1).")
_PPL_BATCHES = flags.DEFINE_integer('ppl_batches', 1, 'Perplexity batches of 8 x 512 tokens.')
_TASK_N = flags.DEFINE_integer('task_n', 100, 'Offline next-line task items.')

# name, objective, parent bits (None: float training)
RUNS = [('matquant', '8,4,2', 8), ('baseline_int2', '2', 2), ('baseline_int4', '4', 4),
        ('baseline_int8', '8', 8), ('float_same_tokens', 'float', None)]
_RUNS = flags.DEFINE_list('runs', [r[0] for r in RUNS], 'The training runs to do (to split them over '
                          'processes: one workdir each, rows merged afterwards).')
_REFERENCE_ROWS = flags.DEFINE_bool('reference_rows', True, 'Evaluate the untrained rows (pretrained '
                                    'float, PTQ, sliced min-max) too.')


def main(argv):
  del argv
  logs.setup()
  if unknown := set(_RUNS.value) - {r[0] for r in RUNS}:
    raise ValueError(f'--runs: unknown runs {sorted(unknown)}; known: {[r[0] for r in RUNS]}')
  workdir = os.path.abspath(_WORKDIR.value)
  settings = dict(model=_MODEL.value, steps=_STEPS.value, batch_size=_BATCH.value, seq_len=_SEQ.value,
                  learning_rate=_LR.value, group_size=_GROUP.value, lambdas=_LAMBDAS.value)
  if _INIT_PARENT.value or _EXTRA.value:  # (absent from workdirs made before these flags)
    settings.update(init_parent=_INIT_PARENT.value, extra_precision=_EXTRA.value)
  group = _GROUP.value or None
  if _INIT_PARENT.value and (g := parents.read_manifest(_INIT_PARENT.value).get('group_size')) != group:
    raise ValueError(f'--init_parent has group size {g}, but --group_size={_GROUP.value}')
  results, save = report.open_results(workdir, settings=settings)

  model, variables, tokenizer = ckpts.load(_MODEL.value)
  cfg = model.config
  start = {'params': variables['params']}
  if _INIT_PARENT.value:
    stored = parents.load(_INIT_PARENT.value)[1]
    start = warm_start.float_variables(cfg, stored)
    logging.info('%s: min-max requantization reproduces %.4f%% of its codes', _INIT_PARENT.value,
                 100 * warm_start.code_agreement(cfg, stored, start))
  gran = f'g{group}' if group else 'per-channel'
  train_texts = pipeline.load_split_texts('shakespeare_plays', _DATA_DIR.value, 'train')
  stream = evals.token_stream(tokenizer, train_texts)
  def batch_fn(step):
    batch = pipeline.train_batch(stream, step, _BATCH.value, _SEQ.value, seed=(0, 1))
    if cfg.bos_per_sequence:  # Gemma: every sequence opens with BOS, as in use
      batch[:, 0] = tokenizer.bos_id
    return batch
  texts = evals.read_texts('tfds:shakespeare_plays:validation', _DATA_DIR.value)
  items = evals.shakespeare_next_line(_DATA_DIR.value, _TASK_N.value)
  done = {(r['data_type'], r['method']) for r in results['rows']}

  def measure(dtype, method, variables, spec, run, base='qat'):
    if (dtype, method) in done:
      return
    t = time.perf_counter()
    row = evals.table_row(model, variables, tokenizer, spec, {'next_line': items}, texts,
                          512, 8, _PPL_BATCHES.value)
    results['rows'].append(dataclasses.asdict(report.Row(
        dtype, method, row['log_pplx'], nn.bits_per_weight(variables, spec, cfg), run=run, base=base,
        model=_MODEL.value, granularity=gran, seconds=time.perf_counter() - t,
        tasks={'next_line': row['next_line'], 'next_line_norm': row['next_line_norm']})))
    logging.info('%-8s %-32s log pplx %.4f  next-line acc %.3f / %.3f  (%.0fs)', dtype, method,
                 row['log_pplx'], row['next_line'], row['next_line_norm'], time.perf_counter() - t)
    save()

  spec = lambda bits, parent_bits=8: QuantSpec(bits, parent_bits=parent_bits, group_size=group,
                                               extra_precision=_EXTRA.value)
  ep = 'E.P. ' if _EXTRA.value else ''
  if _REFERENCE_ROWS.value and _INIT_PARENT.value:
    for b in (8, 4, 2):
      measure(f'int{b}', f'{ep}Parent before QAT', start, spec(b), 'init_parent', 'omniquant')
  elif _REFERENCE_ROWS.value:
    measure('float32', 'Pretrained float', start, None, 'float', 'float')
    for b in (8, 4, 2):  # where every run starts
      measure(f'int{b}', f'PTQ min-max ({gran})', start, spec(b, b), 'float', 'ptq')
  lambdas = tuple(map(float, _LAMBDAS.value))
  for name, objective, parent_bits in (r for r in RUNS if r[0] in _RUNS.value):
    opts = qat.Options(steps=_STEPS.value, learning_rate=_LR.value, warmup_steps=max(1, _STEPS.value // 8),
                         trainable='ffn', spec=spec(parent_bits, parent_bits) if parent_bits else None,
                         log_every=4)
    obj = losses.parse_objective(objective, lambdas if name == 'matquant' else None, parent_bits or 8)
    t = time.perf_counter()
    trained, _ = qat.train(model, start, obj, batch_fn, opts,
                            os.path.join(workdir, 'checkpoints', name), desc=f'{_MODEL.value} QAT {name}')
    results.setdefault('train_s', {}).setdefault(name, time.perf_counter() - t)
    if name == 'matquant':
      for b in (8, 4, 2):
        measure(f'int{b}', f'{ep}MatQuant', trained, spec(b), name)
    elif name == 'baseline_int8':
      measure('int8', 'Baseline', trained, spec(8), name)
      for b in (4, 2):
        measure(f'int{b}', f'{ep}Sliced int8 Baseline', trained, spec(b), name)
    elif parent_bits:
      measure(f'int{parent_bits}', 'Baseline', trained, spec(parent_bits, parent_bits), name)
    else:
      measure('float32', 'Float, same tokens', trained, None, name, 'float')
  if _REFERENCE_ROWS.value and not _INIT_PARENT.value:
    for b in (4, 2):
      measure(f'int{b}', f'{ep}Sliced int8 (min-max, {gran})', start, spec(b), 'float', 'ptq')

  origin = f', from {_INIT_PARENT.value}' if _INIT_PARENT.value else ''
  title = (f'{_MODEL.value}, FFN QAT, {_STEPS.value} steps x {_BATCH.value} x {_SEQ.value} tokens, '
           f'lr {_LR.value:g}, {gran}, lambdas {",".join(_LAMBDAS.value)}{origin}')
  report.write(workdir, results.pop('rows'), title, **results)
  print(open(os.path.join(workdir, 'table.md')).read())


if __name__ == '__main__':
  app.run(main)
