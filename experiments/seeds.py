r"""Runs a study with several QAT data seeds on one pretrained model, then aggregates.

  python experiments/seeds.py --config=experiments/configs/default.py --seeds=0,1,2 --workdir=runs/seeds

Every seed is a full study in WORKDIR/seed_N (resumable like main.py) whose QAT runs
draw their batches with qat.data_seed = N; all share the float model pretrained once
in WORKDIR/float (as the paper's runs share one pretrained checkpoint). Writes
WORKDIR/{summary.json, table.md, plot.png}: mean and sample std of every row over the
seeds, MatQuant minus Baseline per width, and the int2 gap closure against the
'Float, same tokens' row and against the int8 baseline.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

from matquant_jax.lab import logs, report, study

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/default.py', 'Study config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the seeds and the summary go.', required=True)
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'QAT data seeds.')


def summarize(tables: list[list[report.Row]]) -> dict:
  """Rows aggregated over seeds, per-seed gap closures and MatQuant - Baseline differences."""
  get = lambda t, dtype, run: next((r.log_pplx for r in t if (r.data_type, r.run) == (dtype, run)), None)
  closures = [report.gap_closure(t) for t in tables]
  deltas = {}
  for bits in (8, 4, 2):
    key = f'int{bits}'
    d = [get(t, key, 'matquant') - get(t, key, f'baseline_{key}') for t in tables
         if get(t, key, 'matquant') is not None and get(t, key, f'baseline_{key}') is not None]
    if d:
      deltas[key] = dict(mean=float(np.mean(d)), std=float(np.std(d, ddof=1)) if len(d) > 1 else 0.0)
  closure = {k: dict(mean=float(np.mean([c[k] for c in closures])),
                     std=float(np.std([c[k] for c in closures], ddof=1)) if len(closures) > 1 else 0.0)
             for k in (closures[0] if closures else {})}
  return dict(rows=report.aggregate(tables), matquant_minus_baseline=deltas,
              int2_gap_closure=closure, per_seed_int2_gap_closure=closures)


def notes(summary: dict) -> str:
  """The differences and gap closures under the aggregated table."""
  lines = ['| MatQuant - Baseline | mean | std |', '|---|---|---|']
  lines += [f"| {k} | {v['mean']:+.3f} | {v['std']:.3f} |" for k, v in summary['matquant_minus_baseline'].items()]
  lines += ['', '| int2 gap closed, reference | mean | std |', '|---|---|---|']
  lines += [f"| {k} | {100 * v['mean']:.0f}% | {100 * v['std']:.0f}% |"
            for k, v in summary['int2_gap_closure'].items()]
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  logs.setup()
  workdir = os.path.abspath(_WORKDIR.value)
  seeds = [int(s) for s in _SEEDS.value]
  tables = []
  for seed in seeds:
    cfg = _CONFIG.value.copy_and_resolve_references()
    cfg.qat.data_seed = seed
    cfg.pretrain.checkpoint_dir = cfg.pretrain.checkpoint_dir or os.path.join(workdir, 'float')
    logging.info('seed %d of %s', seed, seeds)
    tables.append(report.as_rows(study.run_study(cfg, os.path.join(workdir, f'seed_{seed}'))['rows']))
  summary = summarize(tables)
  title = f'QAT, mean +- sample std over data seeds {", ".join(map(str, seeds))}'
  report.write(workdir, summary.pop('rows'), title, notes(summary), seeds=seeds, **summary)
  print(open(os.path.join(workdir, 'table.md')).read())


if __name__ == '__main__':
  app.run(main)
