"""The main job: pretrain in float, QAT the baselines and MatQuant, evaluate every slice."""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
from flax import traverse_util
import jax
import ml_collections
from tensorboardX import SummaryWriter

from matquant_jax import evals, nn, parents
from matquant_jax.algos import gptq, omniquant, qat
from matquant_jax.core import losses
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.core.quant import QuantizedArray
from matquant_jax.data import pipeline
from matquant_jax.lab import configs, report
from matquant_jax.nn import sharding


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> nn.TransformerConfig:
  """The Gemma-2 config of `cfg.model`, with the tokenizer's vocabulary size."""
  return nn.TransformerConfig(num_embed=vocab_size, **cfg.model.to_dict())


def ffn_average_bits(params, spec: QuantSpec, mcfg: nn.TransformerConfig) -> float:
  """Bits per FFN parameter: r per layer, plus the extra-bucket fraction with extra precision.

  params: float params, or a stored parent whose FFN weights are QuantizedArrays.
  """
  params = nn.as_variables(params)['params']
  axes = nn.ffn_reduce_axes(mcfg)
  total, count = 0.0, 0
  for i in range(mcfg.num_layers):
    bits = spec.bits_for(i, mcfg.num_layers)
    for name, w in params[f'layer_{i}']['mlp'].items():
      size = math.prod(w.shape)
      if bits is None:
        b = 32.0
      elif spec.extra_precision:
        if not isinstance(w, QuantizedArray):
          w = QuantizedArray.from_float(w, spec.parent_bits, axes[name], spec.group_size)
        b = w.average_bits(bits, extra_precision=True)
      else:
        b = float(bits)
      total, count = total + b * size, count + size
  return total / count


def _fingerprint(cfg: ml_collections.ConfigDict) -> dict:
  """What a workdir's checkpoints depend on (evaluation settings and new runs may change)."""
  data = {k: v for k, v in cfg.data.to_dict().items() if not k.startswith('eval')}
  return {'seed': cfg.seed, 'data': data, 'model': cfg.model.to_dict(),
          'pretrain': cfg.pretrain.to_dict(), 'qat': cfg.qat.to_dict(),
          'omniquant': cfg.omniquant.to_dict(),
          'runs': {r['name']: dict(r) for r in cfg.runs}} | (
              {'gptq': cfg.gptq.to_dict()} if any(r.get('algo') == 'gptq' for r in cfg.runs) else {})


def check_workdir(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Records the config in a new workdir; in a used one, raises ValueError naming the first
  setting that differs from the one its checkpoints were made with (new runs may be added)."""
  path = os.path.join(workdir, 'config.json')
  now = json.loads(json.dumps(_fingerprint(cfg)))  # tuples -> lists, as stored
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    old, new = (traverse_util.flatten_dict(x, sep='.') for x in (before, now))
    shared_runs = set(before['runs']) & set(now['runs'])
    for key in sorted(old.keys() | new.keys()):
      if key.startswith('runs.') and key.split('.')[1] not in shared_runs:
        continue
      if old.get(key) != new.get(key):
        raise ValueError(f'workdir {workdir} holds checkpoints made with {key}={old.get(key)!r}, '
                         f'but the config says {new.get(key)!r}; use a new --workdir')
    now['runs'] = {**before['runs'], **now['runs']}
  report.write_json(path, now)


def run_omniquant(cfg: ml_collections.ConfigDict, r: dict, mcfg: nn.TransformerConfig,
                  float_params, train_stream, objective: losses.Objective, spec: QuantSpec,
                  ckpt_dir: str, writer=None) -> dict:
  """Calibrates one OmniQuant run (resumable per block); returns its exported parent variables."""
  o = cfg.omniquant
  calib = pipeline.train_batch(train_stream, 0, o.samples, o.seq_len, cfg.seed + 1)[:, :-1]
  opts = omniquant.Options.from_config(o, epochs=max(1, round(o.epochs * r.get('budget', 1.0))))
  qtree = omniquant.calibrate(mcfg, float_params, calib, objective, spec, opts, ckpt_dir, writer,
                              r['name'], cfg.seed)
  return parents.make_parent(mcfg, float_params, spec, qtree)


def run_gptq(cfg: ml_collections.ConfigDict, mcfg: nn.TransformerConfig, float_params, train_stream,
             objective: losses.Objective, spec: QuantSpec, ckpt_dir: str, name: str) -> dict:
  """One GPTQ run (resumable per block) on the same calibration sequences as OmniQuant's."""
  g = cfg.gptq
  calib = pipeline.train_batch(train_stream, 0, g.samples, g.seq_len, cfg.seed + 1)[:, :-1]
  return gptq.calibrate(mcfg, float_params, calib, objective, spec, gptq.Options.from_config(g),
                        ckpt_dir, name)


def run_spec(cfg: ml_collections.ConfigDict, r: dict, bits=None) -> QuantSpec:
  """The QuantSpec of run `r` at `bits` (default: its parent), from the config's quantizer."""
  q = cfg.qat.quant
  return configs.quant_spec(r['parent_bits'] if bits is None else bits,
                          dict(q, parent_bits=r['parent_bits'], extra_precision=r['extra_precision']))


def save_parent(directory: str, variables, mcfg: nn.TransformerConfig, tokenizer, run: dict) -> None:
  """Writes a run's stored parent once (a resumed study keeps the one it wrote)."""
  if jax.process_index() == 0 and not parents.is_parent(directory):
    parents.save(directory, variables, mcfg, tokenizer, run=run)


def run_study(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the whole study in `workdir`; returns the results dict also written there."""
  configs.check_config(cfg)
  workdir = os.path.abspath(workdir)
  lead = jax.process_index() == 0  # only process 0 writes summaries and results
  os.makedirs(workdir, exist_ok=True)
  if lead:
    check_workdir(workdir, cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = tuple(tuple(r) for r in cfg.mesh.rules)
  sharding.check_rules(rules, mesh)
  logging.info('mesh: %s over %d devices in %d processes', dict(mesh.shape), mesh.size,
               jax.process_count())
  t_start = time.perf_counter()
  data = pipeline.load_tokens(cfg.data.name, cfg.data.data_dir, cfg.data.vocab_size)
  mcfg = model_config(cfg, data.tokenizer.vocab_size())
  model = nn.Transformer(mcfg)
  d = cfg.data
  def batch_fn(step, seed=cfg.seed):
    return pipeline.train_batch(data.train, step, d.batch_size, d.seq_len, seed,
                                jax.process_index(), jax.process_count())
  qat_batch_fn = lambda step: batch_fn(step, (cfg.seed, 1, cfg.qat.data_seed))
  val = pipeline.eval_batches(data.validation, d.eval_batch_size, d.seq_len, d.eval_batches)
  logging.info('data: %d train / %d validation tokens; eval on %d tokens', len(data.train),
               len(data.validation), sum(b[:, 1:].size for b in val))

  writer = SummaryWriter(os.path.join(workdir, 'tensorboard')) if lead else None
  init = qat.init_params(model, d.seq_len, cfg.seed, mesh, rules)
  logging.info('model: %s, %d parameters', mcfg, sum(x.size for x in jax.tree.leaves(init)))

  timings = {}
  t = time.perf_counter()
  float_dir = os.path.abspath(cfg.pretrain.checkpoint_dir or os.path.join(workdir, 'checkpoints', 'float'))
  float_params, _ = qat.train(model, init, losses.parse_objective('float'), batch_fn,
                                qat.Options.from_config(cfg.pretrain),
                                float_dir, writer, 'float', mesh, rules)
  timings['float'] = time.perf_counter() - t

  models = {'float': (float_params, None)}
  for r in cfg.runs:
    t = time.perf_counter()
    objective = losses.parse_objective(r['objective'], r['lambdas'], r['parent_bits'])
    ckpt_dir = os.path.join(workdir, 'checkpoints', r['name'])
    spec = run_spec(cfg, r)
    if r.get('algo', 'qat') == 'omniquant':
      models[r['name']] = (run_omniquant(cfg, r, mcfg, float_params, data.train, objective, spec,
                                         ckpt_dir, writer), r)
      save_parent(os.path.join(workdir, 'parents', r['name']), models[r['name']][0], mcfg, data.tokenizer,
                  dict(r))
    elif r.get('algo') == 'gptq':
      models[r['name']] = (run_gptq(cfg, mcfg, float_params, data.train, objective, spec, ckpt_dir,
                                    r['name']), r)
      save_parent(os.path.join(workdir, 'parents', r['name']), models[r['name']][0], mcfg, data.tokenizer,
                  dict(r))
    else:
      opts = qat.Options.from_config(cfg.qat, spec, steps=round(cfg.qat.steps * r.get('budget', 1.0)))
      params, _ = qat.train(model, float_params, objective, qat_batch_fn, opts, ckpt_dir, writer,
                              r['name'], mesh, rules)
      models[r['name']] = (params, r)
      if r['objective'] != 'float':
        save_parent(os.path.join(workdir, 'parents', r['name']),
                    parents.make_parent(mcfg, params, spec), mcfg, data.tokenizer, dict(r))
    timings[r['name']] = time.perf_counter() - t

  t = time.perf_counter()
  evaluate = evals.make_eval_fn(model)
  q = cfg.qat.quant
  results = {'float': {'float': evaluate(float_params, val, None)}}
  bits_per_param = {}
  def measure(name, params, key, spec):
    results.setdefault(name, {})[key] = evaluate(params, val, spec)
    bits_per_param.setdefault(name, {})[key] = ffn_average_bits(params, spec, mcfg) if spec else 32.0
    logging.info('eval %-20s %-14s log pplx %.4f', name, key, results[name][key])

  for bits in cfg.eval.bits:  # min-max PTQ of the float model, r-bit grid
    measure('float', float_params, f'int{bits}', QuantSpec(bits, parent_bits=bits, targets=tuple(q.targets)))
  for name, (params, r) in models.items():
    if r is None:
      continue
    if r['objective'] == 'float':  # the float model trained on the QAT tokens: a reference row
      measure(name, params, 'float', None)
      continue
    spec = lambda b, r=r: run_spec(cfg, r, b)
    if r['label'] == 'Baseline' and r['parent_bits'] != 8:
      # A one-precision model is evaluated at its own precision; the int8 one,
      # sliced, at every precision below ("Sliced int8").
      measure(name, params, f'int{r["parent_bits"]}', spec(r['parent_bits']))
      continue
    for bits in cfg.eval.bits:
      measure(name, params, f'int{bits}', spec(bits))
    for mix, layer_bits in cfg.eval.mixnmatch.items():
      measure(name, params, f'mix:{mix}', spec(tuple(layer_bits)))
  timings['eval'] = time.perf_counter() - t
  timings['total'] = time.perf_counter() - t_start
  if writer is not None:
    writer.close()

  out = {'log_pplx': results, 'bits_per_ffn_param': bits_per_param, 'timings_s': timings,
         'runs': [dict(r) for r in cfg.runs], 'model': mcfg.__dict__ | {'num_params': int(sum(
             x.size for x in jax.tree.leaves(init)))},
         'tokens': {'pretrain': cfg.pretrain.steps * d.batch_size * d.seq_len,
                    'qat_per_run': cfg.qat.steps * d.batch_size * d.seq_len,
                    'eval': int(sum(b[:, 1:].size for b in val))}}
  out['table'] = [dict(zip(('data_type', 'method', 'log_pplx', 'bits_per_ffn_param'), row))
                  for row in report.rows(out)]
  if not lead:
    return out
  report.write_json(os.path.join(workdir, 'results.json'), out)
  table = report.table(out)
  report.write_outputs(workdir, table)
  report.plot(out, os.path.join(workdir, 'log_pplx_vs_bits.png'))
  print(table)
  logging.info('wrote %s/{results.json,table.md,log_pplx_vs_bits.png}; total %.1fs', workdir, timings['total'])
  return out
