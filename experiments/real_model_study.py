r"""The real-model study: SmolLM2-135M or Gemma-3-270M (GGUF wheels) through MatQuant with
OmniQuant or GPTQ.

  python experiments/real_model_study.py --workdir=runs/smollm2 [--model=gemma3-270m]
      [--group_size=32] [--skip_tokens=1] [--algo=gptq --baselines=8,6,4,3,2 --act_order]
      [--epochs=4] [--baselines=4,2] [--extra_precision] [--methods=MatQuant]
      [--feedback=per_width] [--slice_grid=regrid] [--widths=8,4,3] [--outliers=0.0005]

  The recipe at par on both models (docs/results.md, issue 23): --algo=gptq --group_size=64
  --act_order --extra_precision --feedback=per_width --lambdas=1,1,0.05 --baselines=8,4,2

1. Checks the loaded model against its independent numpy reference on held-out
   Shakespeare (SmolLM2's file is Q4_1 with Q8_0 embeddings, Gemma 3's Q4_K_M).
2. Calibrates on the training plays, at the chosen granularity (per output channel, or
   groups of --group_size along the contraction axis): MatQuant [8,4,2] with lambda
   (0.1, 0.1, 1), and OmniQuant single-precision baselines at --baselines (int2 with twice
   the epochs). Per-block checkpoints: a rerun resumes.
3. Evaluates bf16 and, per width 8/6/4/3/2: min-max PTQ, the min-max int8 parent sliced,
   the OmniQuant baseline, the MatQuant parent sliced, and the same parent sliced with Extra
   Precision (no clamp; not calibrated for it, unlike the paper's E.P. MatQuant);
   and a pyramid Mix'n'Match: log pplx on the held-out plays and accuracy on the
   offline next-line task.

Rows are appended to WORKDIR/results.json as they finish (a rerun, or a run with another
recipe in the same workdir, skips what is there); methods name their recipe, e.g.
'MatQuant (OmniQuant, g32, skip 1)'. Parents go to WORKDIR/parents/<recipe>_<run>.
"""

import dataclasses
import os
import time

from absl import app, flags, logging
import jax.numpy as jnp
import numpy as np

from matquant_jax import ckpts, evals, nn, parents
from matquant_jax.algos import gptq, omniquant
from matquant_jax.core import QuantSpec, losses, plans
from matquant_jax.data import pipeline
from matquant_jax.lab import configs, logs, report, study
from matquant_jax.testing import reference

_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and results.', required=True)
_MODEL = flags.DEFINE_enum('model', 'smollm2-135m', sorted(ckpts.MODELS), 'The real model.')
_DATA_DIR = flags.DEFINE_string('data_dir', pipeline.default_data_dir(), 'TFDS data directory.')
_SAMPLES = flags.DEFINE_integer('samples', 64, 'OmniQuant calibration sequences.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'OmniQuant calibration sequence length.')
_EPOCHS = flags.DEFINE_integer('epochs', 4, 'OmniQuant epochs per block (int2 baseline: twice).')
_GROUP = flags.DEFINE_integer('group_size', 0, 'Quantization group size along the contraction '
                              'axis; 0: one scale per output channel.')
_SKIP = flags.DEFINE_integer('skip_tokens', 0, 'Leading positions left out of the block loss.')
_BASELINES = flags.DEFINE_list('baselines', ['4', '2'], 'Widths of OmniQuant single-precision baselines.')
_PPL_BATCHES = flags.DEFINE_integer('ppl_batches', 4, 'Perplexity batches of 8 x 512 tokens.')
_TASK_N = flags.DEFINE_integer('task_n', 100, 'Offline next-line task items.')
_BITS = flags.DEFINE_list('bits', ['8', '6', '4', '3', '2'], 'Widths to evaluate.')
_FLOAT = flags.DEFINE_enum('float_dtype', 'bfloat16', ['bfloat16', 'float32'],
                           'Activations of the float row (bf16 is slow on CPU).')
_ALGO = flags.DEFINE_enum('algo', 'omniquant', ['omniquant', 'gptq'], 'The base algorithm.')
_WIDTHS = flags.DEFINE_string('widths', '8,4,2', 'The MatQuant objective\'s widths (MatGPTQ also uses 8,4,3); '
                              'the parent is int8.')
_LAMBDAS = flags.DEFINE_list('lambdas', None, 'MatQuant lambdas, one per --widths entry (default: 0.1,0.1,1 for '
                             'OmniQuant, 1,1,1 for GPTQ as in MatGPTQ).')
_ACT_ORDER = flags.DEFINE_bool('act_order', False, 'GPTQ: columns by decreasing Hessian diagonal.')
_BALANCE = flags.DEFINE_bool('balance', False, 'GPTQ: each width\'s error in units of its own step '
                             '(gptq.Options.balance), so lambda weighs the widths as it says.')
_OUTLIERS = flags.DEFINE_float('outliers', 0.0, 'The fraction of each weight kept in float16 outside the '
                               'grid (QuantSpec.outliers, every base; 48 bits each, counted).')
_FEEDBACK = flags.DEFINE_enum('feedback', 'mean', list(gptq.FEEDBACK), 'GPTQ: the residual fed back '
                              '(gptq.Options.feedback; per_width: each width its own target and Hessian).')
_EP = flags.DEFINE_bool('ep_rows', True, 'Also evaluate the Extra Precision slices (int4/3/2).')
_MIX = flags.DEFINE_bool('mixnmatch', True, 'Evaluate the pyramid Mix\'n\'Match rows.')
_EXTRA = flags.DEFINE_bool('extra_precision', False, 'Calibrate MatQuant for Extra Precision slices (no '
                            'clamp at the top, the paper\'s E.P. MatQuant) and evaluate those.')
_GRID = flags.DEFINE_enum('slice_grid', 'msb', ['msb', 'regrid'], 'The slice every parent is calibrated '
                          'for and evaluated with (QuantSpec.slice_grid; regrid: the range-keeping re-grid).')
_METHODS = flags.DEFINE_list('methods', None, 'Evaluate only the rows whose method starts with one of '
                             'these (e.g. MatQuant); default: every row.')


def main(argv):
  del argv
  logs.setup()
  workdir = os.path.abspath(_WORKDIR.value)
  model_name = _MODEL.value
  short = model_name.split('-')[0]
  results, save = report.open_results(workdir, model=model_name)
  model, variables, tokenizer = ckpts.load(model_name)
  params = variables['params']
  cfg = model.config
  texts = evals.read_texts('tfds:shakespeare_plays:validation', _DATA_DIR.value)
  if 'reference' not in results:
    gguf_path = ckpts.MODELS[model_name]()
    if model_name == 'gemma3-270m':  # Gemma needs its BOS; 600 tokens cross the 512-token window
      ids = np.asarray([tokenizer.bos_id] + tokenizer.encode(texts[0][20000:40000]))[:600]
      ref = reference.gguf_gemma3_forward(gguf_path, ids)[0]
    else:
      ids = np.asarray(tokenizer.encode(texts[0][20000:40000])[:512])
      ref = reference.gguf_llama_nll(gguf_path, ids)
    logp = np.asarray(evals.token_logprobs(model, variables, jnp.asarray(ids[:-1])[None],
                                           jnp.asarray(ids[1:])[None], None))
    ours = float(-np.mean(logp))
    results['reference'] = {'tokens': len(ids), 'jax_float32': ours, 'numpy_float64': ref}
    logging.info('float check on %d held-out tokens: JAX %.5f vs numpy %.5f nats', len(ids), ours, ref)
    save()

  group = _GROUP.value or None
  gran = f'g{group}' if group else 'per-channel'
  recipe = f'{gran}, skip {_SKIP.value}' if _SKIP.value else gran
  tag = recipe.replace(', ', '_').replace(' ', '')
  algo = _ALGO.value
  label = {'omniquant': 'OmniQuant', 'gptq': 'GPTQ'}[algo]
  if _GRID.value != 'msb' and (_EP.value or _EXTRA.value):
    raise app.UsageError('the re-grid has no extra-precision bucket: use --ep_rows=false and no --extra_precision')
  if _GRID.value != 'msb':
    tag, recipe = f'{tag}_{_GRID.value}', f'{recipe}, {_GRID.value}'
  if algo == 'gptq':
    tag = f'gptq_{tag}' + ('_actorder' if _ACT_ORDER.value else '') + ('_balanced' if _BALANCE.value else '')
    recipe += (', act-order' if _ACT_ORDER.value else '') + (', balanced' if _BALANCE.value else '')
    if _FEEDBACK.value != 'mean':
      tag, recipe = f'{tag}_{_FEEDBACK.value}', f'{recipe}, {_FEEDBACK.value.replace("_", "-")} feedback'
  elif _BALANCE.value or _FEEDBACK.value != 'mean':
    raise app.UsageError('--balance and --feedback are GPTQ options here (--algo=gptq)')
  if _OUTLIERS.value:
    tag += f'_outliers{_OUTLIERS.value:g}'
    recipe += f', outliers {_OUTLIERS.value:.2%}'
  mat_lambdas = tuple(map(float, _LAMBDAS.value)) if _LAMBDAS.value else (
      (0.1, 0.1, 1.0) if algo == 'omniquant' else (1.0, 1.0, 1.0))
  train_texts = pipeline.load_split_texts('shakespeare_plays', _DATA_DIR.value, 'train')
  stream = evals.token_stream(tokenizer, train_texts[:8])
  calib = pipeline.train_batch(stream, 0, _SAMPLES.value, _SEQ.value, seed=1)[:, :-1]
  if cfg.bos_per_sequence:  # Gemma: rows open with BOS, as in use (its activations differ there)
    calib[:, 0] = tokenizer.bos_id
  base_opts = omniquant.Options.from_config(configs.base_config().omniquant, epochs=_EPOCHS.value,
                                            skip_tokens=_SKIP.value)
  ep = _EXTRA.value
  mat = 'matquant_ep' if ep else 'matquant'
  if _WIDTHS.value != '8,4,2':
    tag, recipe = f'{tag}_w{_WIDTHS.value.replace(",", "")}', f'{recipe}, [{_WIDTHS.value}]'
  calibrations = [(mat, _WIDTHS.value, mat_lambdas, 8, 1)] + [
      (f'baseline_int{b}', b, (1.0,), int(b), 2 if b == '2' else 1) for b in _BASELINES.value]
  made = {}
  for name, objective, lambdas, parent_bits, budget in calibrations:
    spec = QuantSpec(parent_bits, parent_bits=parent_bits, group_size=group, extra_precision=name == mat and ep,
                     slice_grid=_GRID.value, outliers=_OUTLIERS.value)
    opts = dataclasses.replace(base_opts, epochs=base_opts.epochs * budget)
    t = time.perf_counter()
    obj = losses.parse_objective(objective, lambdas, parent_bits)
    ckpt = os.path.join(workdir, 'checkpoints', f'{tag}_{name}')
    if algo == 'gptq':
      gopts = gptq.Options(act_order=_ACT_ORDER.value, balance=_BALANCE.value, feedback=_FEEDBACK.value)
      made[name] = gptq.calibrate(cfg, params, calib, obj, spec, gopts, ckpt, desc=f'{short} {tag} {name}')
    else:
      qtree = omniquant.calibrate(cfg, params, calib, obj, spec, opts, ckpt, desc=f'{short} {tag} {name}')
      made[name] = parents.make_parent(cfg, params, spec, qtree)
    results.setdefault('calibration_s', {}).setdefault(f'{tag}_{name}', time.perf_counter() - t)
    study.save_parent(os.path.join(workdir, 'parents', f'{tag}_{name}'), made[name], cfg, tokenizer,
                      {'name': name, 'objective': objective, 'lambdas': lambdas, 'recipe': recipe,
                       'algo': algo, 'epochs': opts.epochs, 'samples': _SAMPLES.value,
                       'slice_grid': _GRID.value})
  save()

  items = evals.shakespeare_next_line(_DATA_DIR.value, _TASK_N.value)
  mix = plans.pyramid(cfg.num_layers)  # SmolLM2's 30 layers: 10 x int2, 10 x int4, 10 x int8
  float_model = nn.Transformer(dataclasses.replace(cfg, dtype=_FLOAT.value))
  spec = lambda b, **kw: QuantSpec(b, group_size=group, slice_grid=_GRID.value, **kw)
  short_dtype = {'bfloat16': 'bf16', 'float32': 'float32'}[_FLOAT.value]
  rows = [(short_dtype, f'{short_dtype} activations, float weights', float_model, params, None, 'float', 'float')]
  mat_label = f'E.P. MatQuant ({label}, {recipe})' if ep else f'MatQuant ({label}, {recipe})'
  for b in map(int, _BITS.value):
    rows.append((f'int{b}', f'PTQ min-max ({gran})', model, params, QuantSpec(b, parent_bits=b, group_size=group),
                 'float', 'ptq'))
    if b != 8:
      rows.append((f'int{b}', f'Sliced int8 (min-max, {gran})', model, params, spec(b), 'float', 'ptq'))
    if _EP.value and b in (4, 3, 2):
      rows.append((f'int{b}', f'Sliced int8, E.P. slice (min-max, {gran})', model, params,
                   spec(b, extra_precision=True), 'float', 'ptq'))
    if f'baseline_int{b}' in made:
      rows.append((f'int{b}', f'{label} baseline ({recipe})', model, made[f'baseline_int{b}'],
                   QuantSpec(b, parent_bits=b, group_size=group), f'baseline_int{b}', algo))
    if b != 8 and 'baseline_int8' in made:
      rows.append((f'int{b}', f'Sliced {label} int8 ({recipe})', model, made['baseline_int8'], spec(b),
                   'baseline_int8', algo))
    rows.append((f'int{b}', mat_label, model, made[mat], spec(b, extra_precision=ep), mat, algo))
    if _EP.value and not ep and b in (4, 3, 2):
      ep_label = 'MatQuant' if algo == 'omniquant' else f'MatQuant ({label})'
      rows.append((f'int{b}', f'{ep_label}, E.P. slice ({recipe})', model, made['matquant'],
                   spec(b, extra_precision=True), 'matquant', algo))
  if _MIX.value:
    rows.append(("Mix'n'Match pyramid", f'Sliced int8 (min-max, {gran})', model, params, spec(mix), 'float', 'ptq'))
    rows.append(("Mix'n'Match pyramid", mat_label, model, made[mat], spec(mix, extra_precision=ep), mat, algo))
  done = {(r['data_type'], r['method']) for r in results['rows']}
  float_bits = {'bfloat16': 16, 'float32': 32}[_FLOAT.value]
  for dtype, method, m, variables, s, run, base in rows:
    if (dtype, method) in done or (_METHODS.value and not method.startswith(tuple(_METHODS.value))):
      continue
    t = time.perf_counter()
    row = evals.table_row(m, variables, tokenizer, s, {'next_line': items}, texts, 512, 8,
                          _PPL_BATCHES.value)
    results['rows'].append(dataclasses.asdict(report.Row(
        dtype, method, row['log_pplx'], nn.bits_per_weight(variables, s, cfg, float_bits), run=run,
        base=base, model=model_name, granularity=gran, seconds=time.perf_counter() - t,
        tasks={'next_line': row['next_line'], 'next_line_norm': row['next_line_norm']})))
    logging.info('%-22s %-40s log pplx %.4f  next-line acc %.3f / %.3f  (%.0fs)', dtype, method,
                 row['log_pplx'], row['next_line'], row['next_line_norm'], time.perf_counter() - t)
    save()
  report.write(workdir, results.pop('rows'), f'{model_name}, {label} ({recipe})', **results)
  print(open(os.path.join(workdir, 'table.md')).read())


if __name__ == '__main__':
  app.run(main)
