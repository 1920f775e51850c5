r"""OmniQuant calibration speed: seconds per block per epoch, single precision vs MatQuant [8,4,2].

  python experiments/bench_omniquant.py [--config=experiments/configs/omniquant.py] [--repeats=3]

Both variants calibrate the same blocks of the config's model on the same
calibration shape (omniquant.samples x seq_len, batch_size), in one process,
with repeats interleaved; compilation is excluded. MatQuant runs three slices
per step (forward and backward), so about 3x is expected.
"""

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from matquant_jax import nn
from matquant_jax.algos import omniquant
from matquant_jax.core import losses
from matquant_jax.lab import configs, study, timing

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/omniquant.py', 'Experiment config.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repeats; the median is reported.')


def main(argv):
  del argv
  cfg = _CONFIG.value
  o = cfg.omniquant
  mcfg = study.model_config(cfg, cfg.data.vocab_size)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, cfg.data.vocab_size, (o.samples, o.seq_len)).astype(np.int32)
  params = nn.Transformer(mcfg).init(jax.random.PRNGKey(0), jnp.asarray(tokens[:1]))['params']
  x = nn.embed(mcfg, params, tokens)
  opts = omniquant.Options.from_config(o)
  tx = omniquant.optimizer(opts)
  q = cfg.qat.quant
  variants = {'single precision int2 (baseline)': ('2', None, 2),
              'MatQuant [8,4,2]': ('8,4,2', (0.1, 0.1, 1.0), 8)}
  layers = nn.blocks(mcfg)
  steps_per_epoch = o.samples // o.batch_size
  prepared = {}
  for name, (obj, lambdas, parent) in variants.items():
    objective = losses.parse_objective(obj, lambdas, parent)
    spec = configs.quant_spec(parent, dict(q, parent_bits=parent))
    qtree = omniquant.init_transforms(mcfg, params, spec, o.lwc, o.let)
    fns = {a: omniquant._layer_fns(b, objective, spec, tx, opts)[0]  # pylint: disable=protected-access
           for a, b in {blk.attn_type: blk for _, blk in layers}.items()}
    prepared[name] = (objective, qtree, fns)

  def epoch(name, key, block):
    objective, qtree, fns = prepared[name]
    aux = jax.tree.map(jnp.copy, qtree[key])
    opt_state = tx.init(aux)
    step = fns[block.attn_type]
    for b in range(steps_per_epoch):
      sl = slice(b * o.batch_size, (b + 1) * o.batch_size)
      xs = {r: x[sl] for r in objective.widths}
      aux, opt_state, _ = step(aux, opt_state, params[key], xs, x[sl], tokens[sl], {}, None)
    jax.block_until_ready(aux)

  def run_all_blocks(name):
    return lambda: [epoch(name, key, block) for key, block in layers]
  med = {n: s / len(layers) for n, s in timing.interleaved_medians(
      {n: run_all_blocks(n) for n in variants}, _REPEATS.value).items()}

  print(f'model: {mcfg.num_layers} blocks, D {mcfg.embed_dim}, H {mcfg.hidden_dim}; '
        f'{o.samples} x {o.seq_len} calibration tokens, batch {o.batch_size} '
        f'({steps_per_epoch} steps per epoch); {jax.devices()[0].platform}')
  print('| variant | s / block / epoch | ms / step |')
  print('|---|---|---|')
  for name, s in med.items():
    print(f'| {name} | {s:.3f} | {1000 * s / steps_per_epoch:.1f} |')
  sp, mq = med['single precision int2 (baseline)'], med['MatQuant [8,4,2]']
  print(f'MatQuant / single precision = {mq / sp:.2f} (three slices per step)')


if __name__ == '__main__':
  app.run(main)
