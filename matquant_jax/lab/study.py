"""The main job: pretrain in float, QAT the baselines and MatQuant, evaluate every slice."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
from tensorboardX import SummaryWriter

from matquant_jax import evals, nn, parents
from matquant_jax.algos import blockwise, gptq, omniquant, qat
from matquant_jax.core import losses
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.data import pipeline
from matquant_jax.lab import configs, report
from matquant_jax.nn import sharding


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> nn.TransformerConfig:
  """The Gemma-2 config of `cfg.model`, with the tokenizer's vocabulary size."""
  return nn.TransformerConfig(num_embed=vocab_size, **cfg.model.to_dict())


def _fingerprint(cfg: ml_collections.ConfigDict) -> dict:
  """What a workdir's checkpoints depend on (evaluation settings and new runs may change)."""
  data = {k: v for k, v in cfg.data.to_dict().items() if not k.startswith('eval')}
  return {'seed': cfg.seed, 'data': data, 'model': cfg.model.to_dict(),
          'pretrain': cfg.pretrain.to_dict(), 'qat': cfg.qat.to_dict(),
          'omniquant': cfg.omniquant.to_dict(),
          'runs': {r['name']: dict(r) for r in cfg.runs}} | (
              {'gptq': cfg.gptq.to_dict()} if any(r.get('algo') == 'gptq' for r in cfg.runs) else {})


def float_settings(cfg: ml_collections.ConfigDict) -> dict:
  """What decides the pretrained float model (not where the data lies, nor logging/saving)."""
  data = {k: v for k, v in cfg.data.to_dict().items() if not k.startswith('eval') and k != 'data_dir'}
  pre = {k: v for k, v in cfg.pretrain.to_dict().items()
         if k not in ('checkpoint_dir', 'checkpoint_every', 'log_every')}
  return blockwise.as_settings({'seed': cfg.seed, 'data': data, 'model': cfg.model.to_dict(), 'pretrain': pre})


def float_dir(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the float model's checkpoints go: WORKDIR/checkpoints/float, or the shared
  `pretrain.checkpoint_dir` when it is new or was made with these float settings, else its
  subdirectory float_<settings digest>: studies that agree share one model, others never mix."""
  if not cfg.pretrain.checkpoint_dir:
    return os.path.join(workdir, 'checkpoints', 'float')
  shared, settings = os.path.abspath(cfg.pretrain.checkpoint_dir), float_settings(cfg)
  recorded = report.read_json(os.path.join(shared, blockwise.SETTINGS_FILE), None)
  used = recorded is not None or any(n.isdigit() for n in (os.listdir(shared) if os.path.isdir(shared) else ()))
  if recorded is not None and recorded.get('float') == settings or not used:
    return shared
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(shared, f'float_{key}')


def check_workdir(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Records the config in a new workdir; in a used one, raises ValueError naming the first
  setting that differs from the one its checkpoints were made with (new runs may be added)."""
  path = os.path.join(workdir, 'config.json')
  now = json.loads(json.dumps(_fingerprint(cfg)))  # tuples -> lists, as stored
  if os.path.exists(path):
    before = report.read_json(path)
    shared = set(before['runs']) & set(now['runs'])  # runs may be added
    old, new = ({**x, 'runs': {k: v for k, v in x['runs'].items() if k in shared}} for x in (before, now))
    key = blockwise.first_difference(old, new)
    if key is not None:
      raise ValueError(f'workdir {workdir} holds checkpoints made with {key}={blockwise.lookup(old, key)!r}, '
                       f'but the config says {blockwise.lookup(new, key)!r}; use a new --workdir')
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


run_spec = configs.run_spec


def save_parent(directory: str, variables, mcfg: nn.TransformerConfig, tokenizer, run: dict) -> None:
  """Writes a run's stored parent once (a resumed study keeps the one it wrote)."""
  if jax.process_index() == 0 and not parents.is_parent(directory):
    parents.save(directory, variables, mcfg, tokenizer, run=run)


def run_study(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the whole study in `workdir`; returns the results dict also written there.

  Stages: set up (mesh, data, model), pretrain in float, make every run's parent (QAT,
  OmniQuant or GPTQ), evaluate every slice, report (results.json, table.md, plot.png).
  """
  configs.check_config(cfg)
  workdir = os.path.abspath(workdir)
  lead = jax.process_index() == 0  # only process 0 writes summaries and results
  os.makedirs(workdir, exist_ok=True)
  if lead:
    check_workdir(workdir, cfg)
  t_start = time.perf_counter()
  env = setup(cfg)
  writer = SummaryWriter(os.path.join(workdir, 'tensorboard')) if lead else None
  timings = {}
  t = time.perf_counter()
  float_params = pretrain(cfg, env, workdir, writer)
  timings['float'] = time.perf_counter() - t
  models = {'float': (float_params, None)}
  for r in cfg.runs:
    t = time.perf_counter()
    models[r['name']] = (make_run(cfg, env, r, float_params, workdir, writer), r)
    timings[r['name']] = time.perf_counter() - t
  t = time.perf_counter()
  rows = evaluate(cfg, env, models)
  timings['eval'] = time.perf_counter() - t
  timings['total'] = time.perf_counter() - t_start
  if writer is not None:
    writer.close()
  d = cfg.data
  out = {'log_pplx': {}, 'timings_s': timings, 'runs': [dict(r) for r in cfg.runs],
         'model': env.mcfg.__dict__ | {'num_params': env.num_params},
         'tokens': {'pretrain': cfg.pretrain.steps * d.batch_size * d.seq_len,
                    'qat_per_run': cfg.qat.steps * d.batch_size * d.seq_len,
                    'eval': int(sum(b[:, 1:].size for b in env.val))}}
  for row, key in rows:
    out['log_pplx'].setdefault(row.run, {})[key] = row.log_pplx
  out['rows'] = [dataclasses.asdict(row) for row, _ in rows]
  if lead:
    report.write(workdir, [row for row, _ in rows], **{k: v for k, v in out.items() if k != 'rows'})
    logging.info('wrote %s/{results.json,table.md,plot.png}; total %.1fs', workdir, timings['total'])
  return out


@dataclasses.dataclass
class Env:
  """What every stage shares: mesh, data, the model and its batches."""
  mesh: Any
  rules: tuple
  data: pipeline.TokenData
  mcfg: nn.TransformerConfig
  model: nn.Transformer
  batch_fn: Any
  qat_batch_fn: Any
  val: list
  init: Any
  num_params: int


def setup(cfg: ml_collections.ConfigDict) -> Env:
  mesh = sharding.make_mesh(cfg.mesh)
  rules = tuple(tuple(r) for r in cfg.mesh.rules)
  sharding.check_rules(rules, mesh)
  logging.info('mesh: %s over %d devices in %d processes', dict(mesh.shape), mesh.size, jax.process_count())
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
  init = qat.init_params(model, d.seq_len, cfg.seed, mesh, rules)
  num_params = int(sum(x.size for x in jax.tree.leaves(init)))
  logging.info('model: %s, %d parameters', mcfg, num_params)
  return Env(mesh, rules, data, mcfg, model, batch_fn, qat_batch_fn, val, init, num_params)


def pretrain(cfg: ml_collections.ConfigDict, env: Env, workdir: str, writer) -> dict:
  """The float model (shared between studies with `pretrain.checkpoint_dir`)."""
  params, _ = qat.train(env.model, env.init, losses.parse_objective('float'), env.batch_fn,
                        qat.Options.from_config(cfg.pretrain), float_dir(cfg, workdir), writer, 'float',
                        env.mesh, env.rules, settings={'float': float_settings(cfg)})
  return params


def make_run(cfg: ml_collections.ConfigDict, env: Env, r: dict, float_params, workdir: str, writer):
  """One run's weights (QAT params, or an OmniQuant/GPTQ parent); its stored parent is written."""
  objective = losses.parse_objective(r['objective'], r['lambdas'], r['parent_bits'])
  ckpt_dir = os.path.join(workdir, 'checkpoints', r['name'])
  spec = run_spec(cfg, r)
  algo = r.get('algo', 'qat')
  if algo == 'omniquant':
    weights = run_omniquant(cfg, r, env.mcfg, float_params, env.data.train, objective, spec, ckpt_dir, writer)
    stored = weights
  elif algo == 'gptq':
    weights = run_gptq(cfg, env.mcfg, float_params, env.data.train, objective, spec, ckpt_dir, r['name'])
    stored = weights
  else:
    opts = qat.Options.from_config(cfg.qat, spec, steps=round(cfg.qat.steps * r.get('budget', 1.0)))
    weights, _ = qat.train(env.model, float_params, objective, env.qat_batch_fn, opts, ckpt_dir, writer,
                           r['name'], env.mesh, env.rules,
                           settings={'float': float_settings(cfg), 'data_seed': cfg.qat.data_seed})
    stored = parents.make_parent(env.mcfg, weights, spec) if r['objective'] != 'float' else None
  if stored is not None:
    save_parent(os.path.join(workdir, 'parents', r['name']), stored, env.mcfg, env.data.tokenizer, dict(r))
  return weights


def evaluate(cfg: ml_collections.ConfigDict, env: Env, models: dict) -> list[tuple[report.Row, str]]:
  """(row, key) of every evaluated slice in the paper's Table 2 order; key is 'float', 'int<r>'
  or 'mix:<name>' (results.json's log_pplx[run][key])."""
  eval_fn = evals.make_eval_fn(env.model)
  q = cfg.qat.quant
  runs = {name: r for name, (_, r) in models.items() if r is not None}
  others = [r for r in runs.values() if configs.is_sliced(r)]
  rows = []
  def row(dtype, method, name, key, spec, base=None):
    r = runs.get(name)
    base = base or (r.get('algo', 'qat') if r else 'float')
    params = models[name][0]
    nll = eval_fn(params, env.val, spec)
    logging.info('eval %-20s %-14s log pplx %.4f', name, key, nll)
    rows.append((report.Row(dtype, method, nll, nn.bits_per_weight(params, spec, env.mcfg), run=name, base=base),
                 key))

  row('float32', 'Pretrained (no quantization)', 'float', 'float', None, 'float')
  for r in runs.values():
    if r['objective'] == 'float':  # the float model trained on the same tokens as the QAT runs
      row('float32', r['label'], r['name'], 'float', None, 'float')
  bits_order = [b for b in report.PAPER_ORDER if b in cfg.eval.bits] + [
      b for b in cfg.eval.bits if b not in report.PAPER_ORDER]
  for b in bits_order:
    key = f'int{b}'
    ptq = configs.quant_spec(b, dict(q, parent_bits=b, extra_precision=False))  # the runs' grid, at b bits
    row(key, 'PTQ of float (min-max)', 'float', key, ptq, 'ptq')
    if b != 8 and 'baseline_int8' in runs:
      row(key, 'Sliced int8', 'baseline_int8', key, run_spec(cfg, runs['baseline_int8'], b))
    if f'baseline_{key}' in runs:
      row(key, 'Baseline', f'baseline_{key}', key, run_spec(cfg, runs[f'baseline_{key}'], b))
    for r in others:
      row(key, r['label'], r['name'], key, run_spec(cfg, r, b))
  for mix, layer_bits in cfg.eval.mixnmatch.items():
    for name, label in [('baseline_int8', 'Sliced int8')] * ('baseline_int8' in runs) + [
        (r['name'], r['label']) for r in others]:
      row(f"Mix'n'Match {mix}", label, name, f'mix:{mix}', run_spec(cfg, runs[name], tuple(layer_bits)))
  return rows
