r"""Step time of float training, single-precision QAT and MatQuant [8,4,2], side by side.

  python experiments/bench_train_step.py [--config=experiments/configs/default.py] [--steps=20]
  python experiments/bench_train_step.py --model=gemma3-270m --config.data.batch_size=1 --steps=3

All variants train the same parameters (the config's qat.trainable, FFN by
default) on the same batch shape, in one process, with repeats interleaved.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from matquant_jax import ckpts, nn
from matquant_jax.algos import qat
from matquant_jax.core import fake_quant, losses
from matquant_jax.lab import configs, study, timing

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/default.py', 'Experiment config.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repeats; the median is reported.')
_MODEL = flags.DEFINE_string('model', None, 'A real model (ckpts.load) instead of the config\'s; '
                             'batch shape from the config\'s data section.')


def main(argv):
  del argv
  cfg = _CONFIG.value
  d = cfg.data
  rng = np.random.default_rng(0)
  if _MODEL.value:
    model, variables, _ = ckpts.load(_MODEL.value)
    mcfg, params = model.config, variables['params']
  else:
    mcfg = study.model_config(cfg, d.vocab_size)
    model = nn.Transformer(mcfg)
  batch = jnp.asarray(rng.integers(4, mcfg.num_embed, (d.batch_size, d.seq_len + 1)), jnp.int32)
  if not _MODEL.value:
    params = model.init(jax.random.PRNGKey(0), batch[:, :-1])['params']
  q = cfg.qat.quant.to_dict()

  variants = {'float': ('float', None, 8), 'QAT int8': ('8', None, 8), 'QAT int4': ('4', None, 4),
              'QAT int2': ('2', None, 2), 'MatQuant [8,4,2]': ('8,4,2', (0.1, 0.1, 1.0), 8)}
  runners = {}
  for name, (obj, lambdas, parent) in variants.items():
    opts = qat.Options.from_config(cfg.qat, configs.quant_spec(parent, dict(q, parent_bits=parent)),
                                     steps=1000)
    prepared = qat.prepare(model, params, losses.parse_objective(obj, lambdas, parent), opts)
    runners[name] = timing.step_runner(prepared, batch, _STEPS.value)
  med = {k: v / _STEPS.value for k, v in timing.interleaved_medians(runners, _REPEATS.value).items()}

  # Where the time goes: the quantizer alone, and forward passes at float and int2.
  axes = nn.ffn_reduce_axes(mcfg)
  ffn = [params[f'layer_{i}']['mlp'] for i in range(mcfg.num_layers)]
  fq = jax.jit(lambda ws: [{k: fake_quant(w, 2, reduce_axes=axes[k]) for k, w in m.items()} for m in ws])
  fwd = jax.jit(lambda p, spec: model.apply({'params': p}, batch[:, :-1], spec=spec).logits, static_argnums=1)
  def clock(f, *a):
    jax.block_until_ready(f(*a))
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      out = f(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / _STEPS.value
  quant_only = clock(fq, ffn)
  fwd_float = clock(fwd, params, None)
  fwd_int2 = clock(fwd, params, configs.quant_spec(2, dict(q, parent_bits=8)))

  tokens = d.batch_size * d.seq_len
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}; model {mcfg.num_layers}L '
        f'D{mcfg.embed_dim} H{mcfg.hidden_dim}; batch {d.batch_size}x{d.seq_len}; trainable={cfg.qat.trainable}')
  print('| variant | ms / step | tokens / s |\n|---|---|---|')
  for k, v in med.items():
    print(f'| {k} | {1e3 * v:.1f} | {tokens / v:,.0f} |')
  three = med['QAT int8'] + med['QAT int4'] + med['QAT int2']
  print(f'MatQuant / float step                 = {med["MatQuant [8,4,2]"] / med["float"]:.2f}')
  print(f'MatQuant / (int8 + int4 + int2 steps) = {med["MatQuant [8,4,2]"] / three:.2f}')
  print(f'fake-quant of all FFN weights alone: {1e3 * quant_only:.2f} ms; forward float '
        f'{1e3 * fwd_float:.1f} ms, int2 {1e3 * fwd_int2:.1f} ms')


if __name__ == '__main__':
  app.run(main)
