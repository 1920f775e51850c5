"""The study's outputs: a table laid out like the paper's Table 2, and a plot."""

from __future__ import annotations

import json
import os

import numpy as np


PAPER_ORDER = (8, 4, 2, 6, 3)


def read_json(path: str, default):
  """The JSON object at `path`, or `default` when there is none yet (a fresh workdir)."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj) -> None:
  """Writes to a temporary file and renames it: a stopped run never leaves half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


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


def write_outputs(workdir: str, table: str, rows: list[dict] | None = None, title: str | None = None) -> None:
  """WORKDIR/table.md and, given rows with bits_per_ffn_param, WORKDIR/plot.png."""
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(table)
  if rows is not None:
    plot_rows(rows, os.path.join(workdir, 'plot.png'), title)


def rows(out: dict):
  """(dtype, method, log pplx, bits per FFN parameter) in the paper's order."""
  ll, bits = out['log_pplx'], out['bits_per_ffn_param']
  runs = out['runs']
  yield 'float32', 'Pretrained (no quantization)', ll['float']['float'], 32.0
  for r in runs:
    if r['objective'] == 'float':  # float, trained on the same tokens as the QAT runs
      yield 'float32', r['label'], ll[r['name']]['float'], 32.0
  evaluated = sorted({int(k[3:]) for k in ll['float'] if k.startswith('int')}, reverse=True)
  order = [b for b in PAPER_ORDER if b in evaluated] + [b for b in evaluated if b not in PAPER_ORDER]
  others = [r for r in runs if r['label'] != 'Baseline' and r['objective'] != 'float']
  for b in order:
    key = f'int{b}'
    yield key, 'PTQ of float (min-max)', ll['float'][key], bits['float'][key]
    if b != 8 and key in ll.get('baseline_int8', {}):
      yield key, 'Sliced int8', ll['baseline_int8'][key], bits['baseline_int8'][key]
    if key in ll.get(f'baseline_{key}', {}):
      yield key, 'Baseline', ll[f'baseline_{key}'][key], bits[f'baseline_{key}'][key]
    for r in others:
      yield key, r['label'], ll[r['name']][key], bits[r['name']][key]
  mixes = [k for k in ll.get('baseline_int8', ll[others[0]['name']] if others else {}) if k.startswith('mix:')]
  for mix in mixes:
    for name, label in [('baseline_int8', 'Sliced int8')] + [(r['name'], r['label']) for r in others]:
      if mix in ll.get(name, {}):
        yield f"Mix'n'Match {mix[4:]}", label, ll[name][mix], bits[name][mix]


def table(out: dict) -> str:
  """Markdown table: data type, method, log pplx (nats/token), bits per FFN parameter."""
  lines = ['| data type | method | log pplx | bits / FFN param |', '|---|---|---|---|']
  for dtype, method, nll, b in rows(out):
    lines.append(f'| {dtype} | {method} | {nll:.3f} | {b:.3f} |')
  return '\n'.join(lines) + '\n'


def aggregate(tables: list[list[dict]]) -> list[dict]:
  """Mean and sample std (over seeds) of each (data type, method) row of several studies' tables."""
  groups: dict[tuple, list] = {}
  for t in tables:
    for row in t:
      groups.setdefault((row['data_type'], row['method']), []).append(row)
  out = []
  for (dtype, method), rs in groups.items():
    v = np.array([r['log_pplx'] for r in rs])
    out.append(dict(data_type=dtype, method=method, log_pplx=float(v.mean()),
                    std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n=len(v),
                    bits_per_ffn_param=rs[0]['bits_per_ffn_param']))
  return out


def gap_closure(table: list[dict], bits: int = 2) -> dict[str, float]:
  """(Baseline_r - MatQuant_r) / (Baseline_r - reference) for each reference row present.

  References: 'Float, same tokens' (the float model trained on the QAT tokens) and the
  int8 Baseline. 1 means MatQuant's r-bit slice reaches the reference; 0, the baseline.
  """
  get = {(r['data_type'], r['method']): r['log_pplx'] for r in table}
  base, mq = get.get((f'int{bits}', 'Baseline')), get.get((f'int{bits}', 'MatQuant'))
  refs = {'float_same_tokens': get.get(('float32', 'Float, same tokens')),
          'int8_baseline': get.get(('int8', 'Baseline'))}
  if base is None or mq is None:
    return {}
  return {k: (base - mq) / (base - ref) for k, ref in refs.items() if ref is not None and base != ref}


def plot(out: dict, path: str) -> None:
  """log pplx against bits per FFN parameter for one study's results."""
  plot_rows([dict(zip(('data_type', 'method', 'log_pplx', 'bits_per_ffn_param'), r)) for r in rows(out)],
            path)


def plot_rows(table: list[dict], path: str, title: str | None = None) -> None:
  """A line per method, markers for baselines and mixtures; error bars from a 'std' field."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  del matplotlib  # the object API needs no backend switch (a notebook's stays as it is)

  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  series: dict[str, list] = {}
  for row in table:
    dtype, method = row['data_type'], row['method']
    kind = 'mix' if dtype.startswith('Mix') else ('float' if dtype == 'float32' else 'int')
    series.setdefault((method, kind), []).append(
        (row['bits_per_ffn_param'], row['log_pplx'], row.get('std', 0.0)))
  colors = {}
  for (method, kind), pts in series.items():
    pts.sort()
    xs, ys, es = zip(*pts)
    if kind == 'float':
      ax.axhline(ys[0], color='gray', ls='--' if method.startswith('Pretrained') else ':', label=method)
      continue
    color = colors.setdefault(method, f'C{len(colors)}')
    if kind == 'mix':
      ax.errorbar(xs, ys, yerr=es, fmt='*', ms=12, color=color, mec='k', zorder=3,
                  label=f"{method} Mix'n'Match")
    elif method == 'Baseline':
      ax.errorbar(xs, ys, yerr=es, fmt='s', ms=7, color=color, zorder=3,
                  label='Baseline (trained per precision)')
    else:
      ax.errorbar(xs, ys, yerr=es, fmt='-o', color=color, label=method)
  ax.set_xlabel('bits per FFN parameter')
  ax.set_ylabel('log perplexity (nats/token), validation')
  ax.set_title(title or 'MatQuant: one int8 parent sliced to every precision')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
