r"""Training, calibration and evaluation on both contraction paths, side by side in one process.

  python experiments/bench_contraction.py [--repeats=3] [--skip_real]

For each workload the same computation is built twice, once with plain
`jnp.einsum` (the path before `core.contract`, MATQUANT_CONTRACTION=einsum)
and once with `contract` (the default), each with its own jitted functions,
then timed with repeats interleaved (median; compilation excluded):

- QAT MatQuant [8,4,2] step, the default config's model and batch;
- QAT MatQuant [8,4,2] step on SmolLM2-135M's FFN weights, batch 2 x 128;
- OmniQuant MatQuant step on one block of the OmniQuant config's model;
- GPTQ MatQuant calibration of the GPTQ config's model, per block;
- one evaluation pass: SmolLM2-135M log-likelihoods of 4 x 256 tokens at int4.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from matquant_jax import ckpts, nn
from matquant_jax.algos import gptq, omniquant, qat
from matquant_jax.core import QuantSpec, contract, losses
from matquant_jax.evals import perplexity
from matquant_jax.lab import configs, study, timing

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/default.py', 'QAT config.')
_OMNI = config_flags.DEFINE_config_file('omniquant_config', 'experiments/configs/omniquant.py',
                                        'OmniQuant config.')
_GPTQ = config_flags.DEFINE_config_file('gptq_config', 'experiments/configs/gptq.py', 'GPTQ config.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repeats; the median is reported.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps per timed call.')
_SKIP_REAL = flags.DEFINE_bool('skip_real', False, 'Skip the SmolLM2 workloads.')

MATQUANT = ('8,4,2', (0.1, 0.1, 1.0), 8)


def in_mode(name, run):
  def call():
    with contract.use(name):
      run()
  return call


def qat_runner(model, params, batch, cfg):
  q = cfg.qat.quant.to_dict()
  obj, lambdas, parent = MATQUANT
  opts = qat.Options.from_config(cfg.qat, configs.quant_spec(parent, dict(q, parent_bits=parent)), steps=1000)
  prepared = qat.prepare(model, params, losses.parse_objective(obj, lambdas, parent), opts)
  return timing.step_runner(prepared, batch, _STEPS.value)


def omniquant_runner(cfg):
  o = cfg.omniquant
  mcfg = study.model_config(cfg, cfg.data.vocab_size)
  tokens = np.random.default_rng(0).integers(4, cfg.data.vocab_size, (o.samples, o.seq_len)).astype(np.int32)
  params = nn.Transformer(mcfg).init(jax.random.PRNGKey(0), jnp.asarray(tokens[:1]))['params']
  x = nn.embed(mcfg, params, tokens)
  opts = omniquant.Options.from_config(o)
  tx = omniquant.optimizer(opts)
  obj, lambdas, parent = MATQUANT
  objective = losses.parse_objective(obj, lambdas, parent)
  spec = configs.quant_spec(parent, dict(cfg.qat.quant, parent_bits=parent))
  key, block = nn.blocks(mcfg)[0]
  qtree = omniquant.init_transforms(mcfg, params, spec, o.lwc, o.let)
  step = omniquant._layer_fns(block, objective, spec, tx, opts)[0]  # pylint: disable=protected-access

  def run():
    aux = jax.tree.map(jnp.copy, qtree[key])
    opt_state = tx.init(aux)
    for b in range(_STEPS.value):
      sl = slice(b * o.batch_size, (b + 1) * o.batch_size)
      aux, opt_state, _ = step(aux, opt_state, params[key], {r: x[sl] for r in objective.widths},
                               x[sl], tokens[sl], {}, None)
    jax.block_until_ready(aux)
  return run


def gptq_runner(cfg):
  g = cfg.gptq
  mcfg = study.model_config(cfg, cfg.data.vocab_size)
  tokens = np.random.default_rng(0).integers(4, cfg.data.vocab_size, (g.samples, g.seq_len)).astype(np.int32)
  params = nn.Transformer(mcfg).init(jax.random.PRNGKey(0), jnp.asarray(tokens[:1]))['params']
  obj, _, _ = MATQUANT
  objective = losses.parse_objective(obj, (1.0, 1.0, 1.0), 8)
  spec = QuantSpec(8, targets=tuple(cfg.qat.quant.targets))

  def run():
    jax.block_until_ready(gptq.calibrate(mcfg, params, tokens, objective, spec, gptq.Options.from_config(g),
                                         desc='bench'))
  return run, mcfg.num_layers


def eval_runner(model, params, tokens):
  spec = QuantSpec(4, targets=('ffn', 'attn'))
  fn = jax.jit(lambda p, t: perplexity.token_logprobs(model, {'params': p}, t[:, :-1], t[:, 1:], spec))
  return lambda: jax.block_until_ready(fn(params, tokens))


def main(argv):
  del argv
  cfg = _CONFIG.value
  d = cfg.data
  mcfg = study.model_config(cfg, d.vocab_size)
  model = nn.Transformer(mcfg)
  rng = np.random.default_rng(0)
  batch = jnp.asarray(rng.integers(4, mcfg.num_embed, (d.batch_size, d.seq_len + 1)), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), batch[:, :-1])['params']
  builders = {
      'QAT MatQuant step, default model': (lambda: qat_runner(model, params, batch, cfg), _STEPS.value),
      'OmniQuant MatQuant step, one block': (lambda: omniquant_runner(_OMNI.value), _STEPS.value),
  }
  gptq_blocks = []

  def gptq_build():
    run, n = gptq_runner(_GPTQ.value)
    gptq_blocks.append(n)
    return run
  builders['GPTQ MatQuant calibration, per block'] = (gptq_build, None)
  if not _SKIP_REAL.value:
    real, rvars, _ = ckpts.load('smollm2-135m')
    rparams = rvars['params']
    rbatch = jnp.asarray(rng.integers(4, 49152, (2, 129)), jnp.int32)
    builders['QAT MatQuant step, SmolLM2-135M FFN (2 x 128)'] = (
        lambda: qat_runner(real, rparams, rbatch, cfg), _STEPS.value)
    etokens = jnp.asarray(rng.integers(4, 49152, (4, 256)), jnp.int32)
    builders['evaluation pass, SmolLM2-135M int4 (4 x 256)'] = (
        lambda: eval_runner(real, rparams, etokens), 1)

  runners = {}
  for name, (build, _) in builders.items():
    for m in ('einsum', 'dot'):
      runners[name, m] = in_mode(m, build())
  t = time.perf_counter()
  med = timing.interleaved_medians(runners, _REPEATS.value)
  print(f'{len(runners)} runners, {time.perf_counter() - t:.0f}s; device {jax.devices()[0].device_kind}; '
        f'default model {mcfg.num_layers}L D{mcfg.embed_dim} H{mcfg.hidden_dim}, batch {d.batch_size}x{d.seq_len}')
  print('| workload | einsum (before) | contract (after) | speed-up |\n|---|---|---|---|')
  for name, (_, per) in builders.items():
    div = per or (gptq_blocks[0] if gptq_blocks else 1)
    unit = 's / block' if per is None else ('s / pass' if per == 1 else 's / step')
    before, after = med[name, 'einsum'] / div, med[name, 'dot'] / div
    print(f'| {name} | {before:.3f} {unit} | {after:.3f} {unit} | {before / after:.2f}x |')


if __name__ == '__main__':
  app.run(main)
