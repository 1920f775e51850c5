r"""GPTQ calibration time per block, single precision vs MatQuant [8,4,2], and the planner's search.

  python experiments/bench_gptq.py [--config=experiments/configs/gptq.py] [--repeats=3]

Both variants quantize every block of the config's model (random weights) on
the same calibration shape (gptq.samples x seq_len), in one process, with
repeats interleaved; compilation is excluded by a warm-up call. MatQuant keeps
one activation stream per width (three Hessian passes) and searches 256 codes
per weight against 16 for int4. Then the planner's search time for a 3-bit
budget on the MatQuant parent.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from matquant_jax import nn
from matquant_jax.algos import gptq
from matquant_jax.core import QuantSpec, losses
from matquant_jax.lab import study, timing
from matquant_jax.parents import planner

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/gptq.py', 'Experiment config.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repeats; the median is reported.')


def main(argv):
  del argv
  cfg = _CONFIG.value
  g = cfg.gptq
  mcfg = study.model_config(cfg, cfg.data.vocab_size)
  model = nn.Transformer(mcfg)
  tokens = np.random.default_rng(0).integers(4, cfg.data.vocab_size, (g.samples, g.seq_len)).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens[:1]))['params']
  opts = gptq.Options.from_config(g)
  targets = tuple(cfg.qat.quant.targets)
  variants = {'single precision int4 (baseline)': ('4', None, 4),
              'MatQuant [8,4,2]': ('8,4,2', (1.0, 1.0, 1.0), 8)}
  parents = {}

  def runner(name):
    obj, lambdas, bits = variants[name]
    def run():
      parents[name] = gptq.calibrate(mcfg, params, tokens, losses.parse_objective(obj, lambdas, bits),
                                     QuantSpec(bits, parent_bits=bits, targets=targets), opts, desc=name)
      jax.block_until_ready(parents[name])
    return run
  med = {n: s / mcfg.num_layers for n, s in timing.interleaved_medians(
      {n: runner(n) for n in variants}, _REPEATS.value).items()}

  t = time.perf_counter()
  plan = planner.search(model, parents['MatQuant [8,4,2]'], tokens[:8], 3.0, reference='widest')
  search_s = time.perf_counter() - t

  print(f'model: {mcfg.num_layers} blocks, D {mcfg.embed_dim}, H {mcfg.hidden_dim}; {g.samples} x '
        f'{g.seq_len} calibration tokens; targets {targets}; {jax.devices()[0].platform}')
  print('| variant | s / block |\n|---|---|')
  for name, s in med.items():
    print(f'| {name} | {s:.3f} |')
  sp, mq = med['single precision int4 (baseline)'], med['MatQuant [8,4,2]']
  print(f'MatQuant / single precision = {mq / sp:.2f}')
  print(f'planner, 3-bit budget over widths {planner.WIDTHS}: {search_s:.1f}s '
        f'(plan {plan.layer_bits}, {plan.average_bits:.2f} bits)')


if __name__ == '__main__':
  app.run(main)
