"""Remakes a results file's table and plot from its rows (any file `report.write` made, or one
under docs/results): X_results.json -> X_table.md and X_plot.png beside it.

  python experiments/replot.py docs/results/smollm2_qat_results.json [--title="..."]
  python experiments/replot.py docs/results/*_results.json docs/results/qat_seeds_summary.json
"""

import os

from absl import app, flags

import matquant_jax as mq

_TITLE = flags.DEFINE_string('title', None, 'Plot and table title (default: none).')


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give one or more results files')
  for path in paths:
    rows = mq.lab.report.read_rows(path)
    stem = path[:-len('_results.json')] if path.endswith('_results.json') else os.path.splitext(path)[0]
    mq.lab.report.write_text(f'{stem}_table.md', mq.lab.report.table(rows, _TITLE.value))
    mq.lab.report.plot_rows(rows, f'{stem}_plot.png', _TITLE.value)
    print(f'{path}: {len(rows)} rows -> {stem}_table.md, {stem}_plot.png')


if __name__ == '__main__':
  app.run(main)
