"""One measurement pipeline: the `Row` every experiment writes, results files written whole, one
table and one plot (log pplx against bits per quantized weight)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from matquant_jax.core import files


PAPER_ORDER = (8, 4, 2, 6, 3)


read_json = files.read_json


write_json = files.write_json


def open_results(workdir: str, **identity):
  """(results, save) for WORKDIR/results.json of a resumable experiment.

  Creates the workdir; `identity` (model, settings, ...) must equal what an earlier run stored,
  so a resumed run never mixes rows of two setups. `save()` writes the file whole.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'results.json')
  results = read_json(path, {'rows': []})
  for key, value in identity.items():
    if results.setdefault(key, value) != value:
      raise ValueError(f'{workdir} holds results for {key}={results[key]!r}, not {value!r}')
  return results, lambda: write_json(path, results)


@dataclasses.dataclass
class Row:
  """One measurement, the same schema in every experiment driver and results file.

  run: the identifier of the run that made the weights ('float', 'float_qat', 'baseline_int4',
    'matquant', ...); logic keys on it, never on the display label `method`.
  base: 'float', 'ptq' (min-max of float weights), 'qat', 'omniquant' or 'gptq'.
  bits_per_weight: bits per quantized weight, `nn.bits_per_weight` (r, plus the extra bucket
    with extra precision; a float row counts its float width).
  tasks: accuracy per task ('next_line', 'next_line_norm', ...). std, n: over seeds.
  """
  data_type: str
  method: str
  log_pplx: float
  bits_per_weight: float
  run: str = ''
  base: str = ''
  model: str = ''
  granularity: str = 'channel'
  tasks: dict = dataclasses.field(default_factory=dict)
  std: float = 0.0
  n: int = 1
  seconds: float | None = None

  @classmethod
  def from_dict(cls, d: dict) -> 'Row':
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown row fields {sorted(unknown)} (rows are report.Row; files under '
                       'docs/results show the schema)')
    return cls(**d)


def as_rows(rows) -> list[Row]:
  return [r if isinstance(r, Row) else Row.from_dict(r) for r in rows]


def table(rows, title: str | None = None) -> str:
  """The one markdown table: data type, method, bits, log pplx (+- std over seeds), task accuracies."""
  rows = as_rows(rows)
  tasks = list(dict.fromkeys(k for r in rows for k in r.tasks))
  seeds = any(r.n > 1 for r in rows)
  lines = [f'{title}\n'] if title else []
  lines.append('| data type | method | bits / weight | log pplx |' + ''.join(f' {t} |' for t in tasks))
  lines.append('|---|---|---|---|' + '---|' * len(tasks))
  for r in rows:
    nll = f'{r.log_pplx:.3f} +- {r.std:.3f}' if seeds else f'{r.log_pplx:.3f}'
    accs = ''.join(f' {100 * r.tasks[t]:.1f} |' if t in r.tasks else ' - |' for t in tasks)
    lines.append(f'| {r.data_type} | {r.method} | {r.bits_per_weight:.3f} | {nll} |{accs}')
  return '\n'.join(lines) + '\n'


def write(workdir: str, rows, title: str | None = None, notes: str = '', **extra) -> None:
  """The one writer of an experiment's outputs: WORKDIR/results.json ({'rows': [...], **extra}),
  table.md (the table, then `notes`) and plot.png, each written whole."""
  rows = as_rows(rows)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, 'results.json'), {**extra, 'rows': [dataclasses.asdict(r) for r in rows]})
  write_text(os.path.join(workdir, 'table.md'), table(rows, title) + (f'\n{notes}' if notes else ''))
  plot_rows(rows, os.path.join(workdir, 'plot.png'), title)


write_text = files.write_text


def read_rows(path: str) -> list[Row]:
  """The rows of a results file (`write`'s results.json, or one under docs/results)."""
  return as_rows(read_json(path, {'rows': []})['rows'])


def aggregate(tables: list[list[Row]]) -> list[Row]:
  """Mean and sample std (over seeds) of each (data type, run, method) row of several studies."""
  groups: dict[tuple, list[Row]] = {}
  for t in tables:
    for row in as_rows(t):
      groups.setdefault((row.data_type, row.run, row.method), []).append(row)
  out = []
  for rs in groups.values():
    v = np.array([r.log_pplx for r in rs])
    out.append(dataclasses.replace(rs[0], log_pplx=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                   n=len(v), seconds=None))
  return out


def gap_closure(rows, bits: int = 2) -> dict[str, float]:
  """(Baseline_r - MatQuant_r) / (Baseline_r - reference) for each reference row present.

  References: the float model trained on the QAT tokens (run 'float_qat') and the int8
  baseline. 1 means MatQuant's r-bit slice reaches the reference; 0, the baseline.
  """
  get = {(r.data_type, r.run): r.log_pplx for r in as_rows(rows)}
  base, mq = get.get((f'int{bits}', f'baseline_int{bits}')), get.get((f'int{bits}', 'matquant'))
  refs = {'float_same_tokens': get.get(('float32', 'float_qat')),
          'int8_baseline': get.get(('int8', 'baseline_int8'))}
  if base is None or mq is None:
    return {}
  return {k: (base - mq) / (base - ref) for k, ref in refs.items() if ref is not None and base != ref}


def plot_rows(rows, path: str, title: str | None = None) -> None:
  """A line per method, markers for baselines and mixtures; error bars from std over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  del matplotlib  # the object API needs no backend switch (a notebook's stays as it is)

  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  series: dict[str, list] = {}
  for row in as_rows(rows):
    kind = ('mix' if row.data_type.startswith('Mix') else 'float' if row.base == 'float'
            else 'baseline' if row.run == f'baseline_{row.data_type}' else 'int')
    series.setdefault((row.method, kind), []).append((row.bits_per_weight, row.log_pplx, row.std))
  colors = {}
  for (method, kind), pts in series.items():
    pts.sort()
    xs, ys, es = zip(*pts)
    if kind == 'float':
      ax.axhline(ys[0], color=f'C{7 + len(colors) % 3}', ls='--', label=method)
      continue
    color = colors.setdefault(method, f'C{len(colors)}')
    if kind == 'mix':
      ax.errorbar(xs, ys, yerr=es, fmt='*', ms=12, color=color, mec='k', zorder=3,
                  label=f"{method} Mix'n'Match")
    elif kind == 'baseline':
      ax.errorbar(xs, ys, yerr=es, fmt='s', ms=7, color=color, zorder=3, label=f'{method} (one precision each)')
    else:
      ax.errorbar(xs, ys, yerr=es, fmt='-o', color=color, label=method)
  ax.set_xlabel('bits per quantized weight')
  ax.set_ylabel('log perplexity (nats/token), validation')
  ax.set_title(title or 'MatQuant: one int8 parent sliced to every precision')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
