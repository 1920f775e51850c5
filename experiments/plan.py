r"""Plans for bit budgets from one stored parent, against uniform widths and the pyramid.

  python experiments/plan.py --model=runs/smollm2_gptq/parents/gptq_per-channel_matquant \
      --float=smollm2-135m --budgets=2.5,3,3.5,4.5 --out=runs/plans_smollm2

For each budget: the planner's per-layer plan (KL to --float's model on
calibration sequences from the training plays, or to the parent's widest slice
without --float), written to OUT/plan_<budget>.json; then held-out log pplx
(Shakespeare validation) of every plan, every uniform width and the pyramid,
with their average bits. Rows go to OUT/results.json as they finish (a rerun
skips them) and to OUT/table.md.
"""

import os
import time

from absl import app, flags, logging

from matquant_jax import ckpts, evals, nn, parents
from matquant_jax.core import QuantSpec, plans
from matquant_jax.data import pipeline
from matquant_jax.lab import logs, report
from matquant_jax.parents import planner

_MODEL = flags.DEFINE_string('model', None, 'A stored parent directory.', required=True)
_FLOAT = flags.DEFINE_string('float', None, 'The float model for the KL reference (else the widest slice).')
_BUDGETS = flags.DEFINE_list('budgets', ['2.5', '3', '3.5', '4.5'], 'Average bits per quantized param.')
_WIDTHS = flags.DEFINE_list('widths', [str(w) for w in planner.WIDTHS], 'Allowed widths.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.', required=True)
_SAMPLES = flags.DEFINE_integer('samples', 4, 'Calibration sequences for the KL.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'Calibration sequence length.')
_REFINE = flags.DEFINE_integer('refine_steps', 20, 'Local-search proposals after the knapsack.')
_PPL_BATCHES = flags.DEFINE_integer('ppl_batches', 2, 'Held-out batches of 8 x ppl_seq_len tokens.')
_PPL_SEQ = flags.DEFINE_integer('ppl_seq_len', 512, 'Held-out window (the model\'s training length for '
                                'the embedded default: 128).')
_DATA_DIR = flags.DEFINE_string('data_dir', pipeline.default_data_dir(), 'TFDS data directory.')


def main(argv):
  del argv
  logs.setup()
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'results.json')
  results = report.read_json(path, {'rows': [], 'plans': {}})
  save = lambda: report.write_json(path, results)

  model, variables, tokenizer = parents.load(_MODEL.value)
  layers = model.config.num_layers
  counts = planner.layer_params(variables)
  targets = nn.quantized_targets(variables, model.config)
  widths = tuple(int(w) for w in _WIDTHS.value)
  float_params = ckpts.load(_FLOAT.value)[1]['params'] if _FLOAT.value else None
  train_texts = pipeline.load_split_texts('shakespeare_plays', _DATA_DIR.value, 'train')
  stream = evals.token_stream(tokenizer, train_texts[8:16])  # not the GPTQ/OmniQuant calibration plays
  calib = pipeline.train_batch(stream, 0, _SAMPLES.value, _SEQ.value, seed=2)[:, :-1]
  candidates = {f'uniform int{w}': (w,) * layers for w in widths}
  candidates['pyramid'] = plans.pyramid(layers)
  todo = [b for b in _BUDGETS.value if f'planner {b} bits' not in results['plans']]
  if todo:
    found = planner.search_budgets(model, variables, calib, [float(b) for b in todo], widths,
                                   'float' if _FLOAT.value else 'widest', float_params, _REFINE.value)
    for b in todo:
      plan = found[float(b)]
      results['plans'][f'planner {b} bits'] = dict(layer_bits=list(plan.layer_bits),
                                                   average_bits=plan.average_bits,
                                                   calibration_kl=plan.kl, search_s=plan.search_s)
      plans.save(os.path.join(_OUT.value, f'plan_{b}.json'), plan.layer_bits, budget_bits=float(b),
                 layer_params=counts, calibration_kl=plan.kl, search_s=plan.search_s, parent=_MODEL.value)
      logging.info('planner %s bits: %s (%.3f bits), KL %.4f, search %.0fs', b, plan.layer_bits,
                   plan.average_bits, plan.kl, plan.search_s)
    save()
  for b in _BUDGETS.value:
    candidates[f'planner {b} bits'] = tuple(results['plans'][f'planner {b} bits']['layer_bits'])

  texts = evals.read_texts('tfds:shakespeare_plays:validation', _DATA_DIR.value)
  done = {r['plan'] for r in results['rows']}
  for name, layer_bits in candidates.items():
    if name in done:
      continue
    t = time.perf_counter()
    ll = evals.log_perplexity(model, variables, tokenizer, texts, QuantSpec(layer_bits, targets=targets),
                                 _PPL_SEQ.value, 8, _PPL_BATCHES.value)
    results['rows'].append(dict(plan=name, average_bits=planner.average_bits(layer_bits, counts),
                                log_pplx=ll, layer_bits=list(layer_bits)))
    logging.info('%-22s %.3f bits  log pplx %.4f (%.0fs)', name, results['rows'][-1]['average_bits'], ll,
                 time.perf_counter() - t)
    save()
  rows = sorted(results['rows'], key=lambda r: (r['average_bits'], r['plan']))
  lines = ['| plan | average bits | held-out log pplx |', '|---|---|---|']
  lines += [f"| {r['plan']} | {r['average_bits']:.3f} | {r['log_pplx']:.3f} |" for r in rows]
  table = '\n'.join(lines) + '\n'
  with open(os.path.join(_OUT.value, 'table.md'), 'w') as f:
    f.write(table)
  print(table)
  print({k: f"{v['search_s']:.0f}s" for k, v in results['plans'].items()})


if __name__ == '__main__':
  app.run(main)
