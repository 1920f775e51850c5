"""The study's outputs: a table laid out like the paper's Table 2, and a plot."""

from __future__ import annotations

PAPER_ORDER = (8, 4, 2, 6, 3)


def rows(out: dict):
  """(dtype, method, log pplx, bits per FFN parameter) in the paper's order."""
  ll, bits = out['log_pplx'], out['bits_per_ffn_param']
  runs = out['runs']
  yield 'float32', 'Pretrained (no quantization)', ll['float']['float'], 32.0
  evaluated = sorted({int(k[3:]) for k in ll['float'] if k.startswith('int')}, reverse=True)
  order = [b for b in PAPER_ORDER if b in evaluated] + [b for b in evaluated if b not in PAPER_ORDER]
  others = [r for r in runs if r['label'] != 'Baseline']
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


def plot(out: dict, path: str) -> None:
  """log pplx against bits per FFN parameter: a line per method, markers for baselines and mixtures."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  series: dict[str, list] = {}
  for dtype, method, nll, b in rows(out):
    kind = 'mix' if dtype.startswith('Mix') else ('float' if dtype == 'float32' else 'int')
    series.setdefault((method, kind), []).append((b, nll))
  colors = {}
  for (method, kind), pts in series.items():
    pts.sort()
    xs, ys = zip(*pts)
    if kind == 'float':
      ax.axhline(ys[0], color='gray', ls='--', label=method)
      continue
    color = colors.setdefault(method, f'C{len(colors)}')
    if kind == 'mix':
      ax.scatter(xs, ys, marker='*', s=160, color=color, edgecolor='k', zorder=3,
                 label=f"{method} Mix'n'Match")
    elif method == 'Baseline':
      ax.scatter(xs, ys, marker='s', s=60, color=color, zorder=3, label='Baseline (trained per precision)')
    else:
      ax.plot(xs, ys, marker='o', color=color, label=method)
  ax.set_xlabel('bits per FFN parameter')
  ax.set_ylabel('log perplexity (nats/token), validation')
  ax.set_title('MatQuant: one int8 parent sliced to every precision')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
