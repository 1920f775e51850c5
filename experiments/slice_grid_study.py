r"""Issue 23's lattice-aware first checks on the real models: what the source weights are, which
slice grid reproduces them best, and what kept outliers buy, before any calibration.

  python experiments/slice_grid_study.py --workdir=runs/slice_grid [--model=gemma3-270m]
      [--stages=lattice,weights,pplx] [--groups=32,64,0] [--outliers=0,0.0005]
      [--grids=native,msb,ep,regrid] [--bits=8,4,3,2] [--ppl_batches=2]

Stages (each writes its file as it finishes; a rerun skips finished rows):
1. lattice: every GGUF tensor's type and block size, and, measured on the loaded float weights,
   the share of 32-weight blocks along the input axis whose values lie on a uniform lattice of
   at most 16 / 32 / 256 levels (Q4_x / Q5_x / Q8_0) -> WORKDIR/lattice.md.
2. weights: relative weight MSE (sum (w_hat - w)^2 / sum w^2) of every FFN and attention weight
   per grid, granularity, width and kept-outlier fraction; and the same on synthetic Gaussian,
   Laplace and Student-t(3) weights [576, 2000] -> WORKDIR/weights.md, weights.json (seconds).
3. pplx: log pplx on held-out Shakespeare (--ppl_batches x 8 x 512 tokens) of the FFN weights
   (the paper's targets) at each grid, granularity, width and outlier fraction, with bits per
   quantized weight counted (r, + the E.P. bucket, + 48 bits per kept outlier) ->
   WORKDIR/results.json, table.md, plot.png.

Grids, all from one min-max int8 parent except `native`:
  native   a one-width r-bit min-max grid (the one-width PTQ model; its own parent per width)
  msb      the paper's MSB slice S(q, r) (2^r levels, the top one clamped)
  ep       the Extra-Precision slice (2^r + 1 levels; counted with its extra bucket)
  regrid   the range-keeping slice round(q (2^r - 1) / 255) (`quant.regrid_float`): storage-free,
           but not the top bits of the code
  sym-msb  the MSB slice of a symmetric int8 parent (GGUF Q8_0 / Q4_0 hold its slices)
  anchored the zero-anchored slice (study only): z_r = round(z / 2^(c-r)),
           s = clamp(round((q - z) / 2^(c-r)) + z_r, 0, 2^r - 1), w = alpha 2^(c-r) (s - z_r):
           the parent's step 2^(c-r) wide, with w = 0 exactly on the grid, as a native grid has it
"""

import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from matquant_jax import ckpts, evals, nn
from matquant_jax.core import quant
from matquant_jax.data import pipeline
from matquant_jax.lab import logs, report

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the tables and rows go.', required=True)
_MODEL = flags.DEFINE_enum('model', 'smollm2-135m', sorted(ckpts.MODELS), 'The real model.')
_STAGES = flags.DEFINE_list('stages', ['lattice', 'weights', 'pplx'], 'Stages to run.')
_GROUPS = flags.DEFINE_list('groups', ['32', '64', '0'], 'Group sizes (0: one scale per output '
                            'channel); 32 aligns with both models\' source blocks, 64 and 0 do not.')
_OUTLIERS = flags.DEFINE_list('outliers', ['0', '0.0001', '0.0005', '0.002'], 'Kept outlier fractions.')
_GRIDS = flags.DEFINE_list('grids', ['native', 'msb', 'ep', 'regrid', 'sym-msb'], 'Slice grids.')
_BITS = flags.DEFINE_list('bits', ['8', '6', '4', '3', '2'], 'Widths.')
_PPL_OUTLIERS = flags.DEFINE_list('ppl_outliers', None, 'Outlier fractions for the pplx stage '
                                  '(default: --outliers).')
_PPL_GRIDS = flags.DEFINE_list('ppl_grids', None, 'Grids for the pplx stage (default: --grids).')
_PPL_BATCHES = flags.DEFINE_integer('ppl_batches', 2, 'Perplexity batches of 8 x 512 tokens.')
_DATA_DIR = flags.DEFINE_string('data_dir', pipeline.default_data_dir(), 'TFDS data directory.')

GRID_LABELS = {'native': 'one-width min-max', 'msb': 'MSB slice', 'ep': 'E.P. slice',
               'regrid': 'range-keeping re-grid', 'sym-msb': 'symmetric MSB slice',
               'anchored': 'zero-anchored slice'}


def granularity(group: int | None) -> str:
  return f'g{group}' if group else 'per-channel'


def weight_at(w: jax.Array, axes, group: int | None, grid: str, bits: int, outliers: float,
              parents: dict) -> tuple[np.ndarray, float]:
  """(the weight at `bits` on `grid`, its bits per weight). `parents` caches the int8 parents."""
  if grid == 'native':
    qa = quant.QuantizedArray.from_float(w, bits, axes, group, outliers=outliers)
    return qa.dequantize(bits), bits + qa.outlier_bits()
  sym = grid == 'sym-msb'
  if sym not in parents:
    parents[sym] = quant.QuantizedArray.from_float(w, 8, axes, group, symmetric=sym, outliers=outliers)
  qa = parents[sym]
  extra = qa.outlier_bits()
  if grid == 'regrid':
    d = quant.dequantize(quant.regrid_float(qa.codes, bits, 8), qa.scale, qa.zero_point)
    return qa.restore_outliers(d.reshape(qa.shape)), bits + extra
  if grid == 'anchored':
    step = float(2 ** (8 - bits))
    z_r = jnp.floor(qa.zero_point / step + 0.5)
    s = jnp.clip(jnp.floor((qa.codes.astype(jnp.float32) - qa.zero_point) / step + 0.5) + z_r, 0, 2**bits - 1)
    return qa.restore_outliers((qa.scale * step * (s - z_r)).reshape(qa.shape)), bits + extra
  ep = grid == 'ep'
  return qa.dequantize(bits, ep), qa.average_bits(bits, ep) + extra


def lattice_table(model_name: str, config: nn.TransformerConfig, params) -> str:
  """GGUF tensor types per role, and distinct values per 32-block measured on our weights."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(ckpts.MODELS[model_name]())
  by_role = {}
  for t in reader.tensors:
    role = t.name.split('.')[-2] if t.name.startswith('blk.') else t.name.rsplit('.', 1)[0]
    by_role.setdefault(role, []).append(t.tensor_type.name)
  lines = [f'{model_name}: GGUF tensor types by role (count), block size\n', '| role | types | block |',
           '|---|---|---|']
  for role, types in sorted(by_role.items()):
    counts = {k: types.count(k) for k in sorted(set(types))}
    blocks = sorted({gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[k]][0] for k in counts})
    lines.append(f'| {role} | {", ".join(f"{k} x{n}" for k, n in counts.items())} | {blocks} |')
  lines += ['', 'Measured on the loaded float weights, input axis in blocks of 32: the share of blocks '
            'whose values lie on a uniform lattice (w = w_min + k d) of at most 16 / 32 / 256 levels\n',
            '| weight | blocks | 16 levels | 32 levels | 256 levels |', '|---|---|---|---|---|']
  for path, info in nn.targeted_weights(config, ('ffn', 'attn')).items():
    levels = []
    for key, _ in nn.blocks(config):
      w = np.asarray(nn.flat_leaves(params[key])[path], np.float32)
      axes = list(info.reduce_axes)
      k = int(np.prod([w.shape[a] for a in axes]))
      rows = np.moveaxis(w, axes, list(range(w.ndim - len(axes), w.ndim))).reshape(-1, k)
      levels.append(lattice_levels(rows[:, : k - k % 32].reshape(-1, 32)))
    n = np.concatenate(levels)
    lines.append(f'| {path} | {n.size} | {np.mean(n <= 16):.1%} | {np.mean(n <= 32):.1%} | {np.mean(n <= 256):.1%} |')
  return '\n'.join(lines) + '\n'


def lattice_levels(blocks: np.ndarray) -> np.ndarray:
  """Per block [n, 32]: the levels of the smallest uniform lattice w_min + k d (d the smallest gap,
  or a half, third or quarter of it) that holds every value; a huge number when none does."""
  s = np.sort(blocks, axis=1).astype(np.float64)
  gaps = np.diff(s, axis=1)
  tol = 1e-6 * np.maximum(np.abs(s).max(axis=1), 1e-30)
  d = np.where(gaps > tol[:, None], gaps, np.inf).min(axis=1)
  d = np.where(np.isfinite(d), d, 1.0)  # a constant block: one level
  out = np.full(len(s), np.iinfo(np.int64).max)
  for div in (1, 2, 3, 4):
    k = (s - s[:, :1]) / (d[:, None] / div)
    on = np.all(np.abs(k - np.round(k)) < 1e-3, axis=1)
    out = np.where(on & (out == np.iinfo(np.int64).max), np.round(k[:, -1]).astype(np.int64) + 1, out)
  return out


def weight_rows(weights: dict[str, tuple[list, tuple]], groups, outliers, grids, bits) -> list[dict]:
  """Relative weight MSE per (set, grid, granularity, width, outliers), pooled over each set."""
  rows = []
  total = len(weights) * len(groups) * len(outliers)
  bar = tqdm.tqdm(total=total, desc='weight MSE', mininterval=2.0)
  for name, (ws, axes_list) in weights.items():
    for g in groups:
      if g and any(w.shape[max(axes)] % g for w, axes in zip(ws, axes_list)):  # never a partial pool
        logging.warning('%s: group size %d does not divide every weight\'s contraction; skipped', name, g)
        bar.update(len(outliers))
        continue
      for o in outliers:
        err = {(grid, b): [0.0, 0.0, 0] for grid in grids for b in bits}  # sum err^2, sum bits*n, n
        norm = 0.0
        for w, axes in zip(ws, axes_list):
          w = jnp.asarray(w, jnp.float32)
          norm += float(jnp.sum(w * w))
          cache = {}
          for grid in grids:
            for b in bits:
              d, bpw = weight_at(w, axes, g, grid, b, o, cache)
              e = err[grid, b]
              e[0] += float(jnp.sum((d - w) ** 2))
              e[1] += bpw * w.size
              e[2] += w.size
        bar.update(1)
        for (grid, b), (se, bsum, n) in err.items():
          if n:
            rows.append({'set': name, 'grid': grid, 'granularity': granularity(g), 'bits': b, 'outliers': o,
                         'rel_mse': se / norm, 'bits_per_weight': bsum / n})
  bar.close()
  return rows


def weights_md(rows: list[dict]) -> str:
  """One table per weight set and outlier fraction: grids as columns, (granularity, width) rows."""
  out = []
  grids = list(dict.fromkeys(r['grid'] for r in rows))
  for (name, o) in dict.fromkeys((r['set'], r['outliers']) for r in rows):
    sub = [r for r in rows if r['set'] == name and r['outliers'] == o]
    out += [f'\n{name}, kept outliers {o:.2%}: relative weight MSE (bits per weight)\n',
            '| granularity | width | ' + ' | '.join(GRID_LABELS[g] for g in grids) + ' |',
            '|---|---|' + '---|' * len(grids)]
    for gran, b in dict.fromkeys((r['granularity'], r['bits']) for r in sub):
      cells = []
      for g in grids:
        r = next((r for r in sub if (r['granularity'], r['bits'], r['grid']) == (gran, b, g)), None)
        cells.append(f'{r["rel_mse"]:.2e} ({r["bits_per_weight"]:.3f})' if r else '-')
      out.append(f'| {gran} | int{b} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(out) + '\n'


def synthetic() -> dict[str, tuple[list, tuple]]:
  rng = np.random.default_rng(0)
  shape = (576, 2000)  # [in, out]: contraction axis 0
  return {'synthetic Gaussian': ([rng.standard_normal(shape)], [(0,)]),
          'synthetic Laplace': ([rng.laplace(size=shape)], [(0,)]),
          'synthetic Student-t(3)': ([rng.standard_t(3, size=shape)], [(0,)])}


def real_sets(config, params) -> dict[str, tuple[list, tuple]]:
  sets = {}
  for target in ('ffn', 'attn'):
    ws, axes = [], []
    for key, _ in nn.blocks(config):
      flat = nn.flat_leaves(params[key])
      for path, info in nn.targeted_weights(config, (target,)).items():
        ws.append(flat[path])
        axes.append(info.reduce_axes)
    sets[target] = (ws, axes)
  return sets


def ffn_variables(config, params, group, grid, bits, outliers) -> tuple[dict, float]:
  """float params with every FFN weight replaced by its `grid` weight at `bits`; bits/weight."""
  out = jax.tree.map(lambda x: x, params)
  bsum = n = 0
  for key, _ in nn.blocks(config):
    for path, info in nn.targeted_weights(config, ('ffn',)).items():
      *parents_, leaf = path.split('/')
      node = out[key]
      for p in parents_:
        node = node[p]
      w = jnp.asarray(node[leaf], jnp.float32)
      d, bpw = weight_at(w, info.reduce_axes, group, grid, bits, outliers, {})
      node[leaf] = jnp.asarray(d, jnp.float32)
      bsum, n = bsum + bpw * w.size, n + w.size
  return {'params': out}, bsum / n


def main(argv):
  del argv
  logs.setup()
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  model, variables, tokenizer = ckpts.load(_MODEL.value)
  params, config = variables['params'], model.config
  groups = [int(g) or None for g in _GROUPS.value]
  outliers = [float(o) for o in _OUTLIERS.value]
  grids, bits = _GRIDS.value, [int(b) for b in _BITS.value]
  if 'lattice' in _STAGES.value:
    md = lattice_table(_MODEL.value, config, params)
    report.write_text(os.path.join(workdir, 'lattice.md'), md)
    print(md)
  if 'weights' in _STAGES.value:
    t = time.perf_counter()
    rows = weight_rows({**real_sets(config, params), **synthetic()}, groups, outliers, grids, bits)
    report.write_json(os.path.join(workdir, 'weights.json'), {'model': _MODEL.value, 'rows': rows})
    md = f'{_MODEL.value} (FFN and attention weights) and synthetic weights\n' + weights_md(rows)
    report.write_text(os.path.join(workdir, 'weights.md'), md)
    logging.info('weights stage in %.0fs', time.perf_counter() - t)
    print(md)
  if 'pplx' in _STAGES.value:
    results, save = report.open_results(workdir, model=_MODEL.value)
    texts = evals.read_texts('tfds:shakespeare_plays:validation', _DATA_DIR.value)
    done = {(r['data_type'], r['method'], r['granularity']) for r in results['rows']}
    todo = [(g, o, grid, b) for g in groups for o in [float(x) for x in (_PPL_OUTLIERS.value or _OUTLIERS.value)]
            for grid in (_PPL_GRIDS.value or grids) for b in bits
            if not (b == 8 and grid not in ('native', 'sym-msb'))]  # int8: the min-max parent itself
    if ('float32', 'float weights', 'float') not in done:
      nll = evals.log_perplexity(model, variables, tokenizer, texts, None, max_batches=_PPL_BATCHES.value)
      results['rows'].append(report.Row('float32', 'float weights', nll, 32.0, run='float', base='float', model=_MODEL.value,
                                        granularity='float').__dict__)
      save()
    bar = tqdm.tqdm(todo, desc='log pplx', mininterval=2.0)
    for g, o, grid, b in bar:
      method = f'{GRID_LABELS[grid]}, outliers {o:.2%}'
      if (f'int{b}', method, granularity(g)) in done:
        continue
      t = time.perf_counter()
      v, bpw = ffn_variables(config, params, g, grid, b, o)
      nll = evals.log_perplexity(model, v, tokenizer, texts, None, max_batches=_PPL_BATCHES.value)
      results['rows'].append(report.Row(f'int{b}', method, nll, bpw, run=grid, base='ptq', model=_MODEL.value,
                                        granularity=granularity(g), seconds=time.perf_counter() - t).__dict__)
      logging.info('%-12s int%d %-45s log pplx %.4f  %.3f bits  (%.0fs)', granularity(g), b, method, nll, bpw,
                   time.perf_counter() - t)
      save()
    rows = results.pop('rows')
    report.write(workdir, rows, f'{_MODEL.value}: slice grids and kept outliers (min-max, FFN)', **results)
    print(open(os.path.join(workdir, 'table.md')).read())


if __name__ == '__main__':
  app.run(main)
