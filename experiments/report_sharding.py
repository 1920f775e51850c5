r"""Per-device memory of Gemma-2 2B/9B train state under FSDP, and sharded step throughput.

  python experiments/report_sharding.py [--devices=1,8,256] [--throughput_steps=10]

Memory comes from the sharded shapes (no device needed: an abstract mesh of
any size): float32 parameters plus AdamW moments of the trainable part, for
QAT's default (FFN trainable) and for full training, plus OmniQuant's
transforms. Throughput runs the MatQuant [8,4,2] step of the default config
on 8 simulated CPU devices against 1, same global batch.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType
import numpy as np

from matquant_jax import nn
from matquant_jax.algos import omniquant, qat
from matquant_jax.core import QuantSpec, losses
from matquant_jax.lab import configs, study, timing
from matquant_jax.nn import sharding

_DEVICES = flags.DEFINE_list('devices', ['1', '8', '256'], 'FSDP mesh sizes for the memory table.')
_STEPS = flags.DEFINE_integer('throughput_steps', 10, 'Timed steps per repeat (0: skip throughput).')
GIB = 2**30


def memory_table() -> str:
  rules = sharding.DEFAULT_RULES
  lines = ['| model | devices (fsdp) | params | + AdamW, FFN trainable (QAT) | + AdamW, all trainable '
           '| OmniQuant transforms |', '|---|---|---|---|---|---|']
  for name in ('gemma2_2b', 'gemma2_9b'):
    cfg = getattr(nn.TransformerConfig, name)()
    model = nn.Transformer(cfg)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    qtree = jax.eval_shape(lambda p, c=cfg: omniquant.init_transforms(c, p, QuantSpec(8)), params)
    for n in map(int, _DEVICES.value):
      mesh = AbstractMesh((1, n, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
      cols = []
      p_sh = sharding.model_shardings(cfg, params, mesh, rules)
      p_bytes = sharding.per_device_bytes(params, p_sh)
      for trainable in ('ffn', 'all'):
        t, _ = qat.split_params(params, trainable)
        tx = qat.make_optimizer(qat.Options(steps=1000, learning_rate=1e-5, warmup_steps=150))
        t_sh = sharding.model_shardings(cfg, t, mesh, rules)
        o = jax.eval_shape(tx.init, t)
        o_sh = sharding.state_shardings({'opt_state': o}, tx, t_sh, mesh)['opt_state']
        cols.append(p_bytes + sharding.per_device_bytes(o, o_sh))
      q_bytes = sharding.per_device_bytes(qtree, sharding.model_shardings(cfg, qtree, mesh, rules))
      lines.append(f'| {name} | {n} | {p_bytes / GIB:.2f} GiB | {cols[0] / GIB:.2f} GiB | '
                   f'{cols[1] / GIB:.2f} GiB | {q_bytes / 2**20:.1f} MiB |')
  return '\n'.join(lines)


def throughput_table(steps: int) -> str:
  cfg = configs.base_config()
  d = cfg.data
  mcfg = study.model_config(cfg, d.vocab_size)
  model = nn.Transformer(mcfg)
  rng = np.random.default_rng(0)
  batch = rng.integers(4, d.vocab_size, (d.batch_size, d.seq_len + 1)).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(batch[:, :-1]))['params']
  objective = losses.parse_objective('8,4,2', (0.1, 0.1, 1.0))
  meshes = {'1 device': (1, 1, 1), '8 devices, data': (8, 1, 1), '8 devices, fsdp': (1, 8, 1),
            '8 devices, data 2 x fsdp 2 x tensor 2': (2, 2, 2)}
  opts = qat.Options.from_config(cfg.qat, steps=1000)
  runners = {}
  for label, shape in meshes.items():
    mesh = sharding.make_mesh(sharding.mesh_config(*shape), jax.devices()[:int(np.prod(shape))])
    prepared = qat.prepare(model, params, objective, opts, mesh)
    runners[label] = timing.step_runner(prepared, sharding.global_batch(batch, prepared.batch_sharding),
                                        steps)
  med = {k: v / steps for k, v in timing.interleaved_medians(runners, 3).items()}
  tokens = d.batch_size * d.seq_len
  base = med['1 device']
  lines = [f'MatQuant [8,4,2] train step, default model, global batch {d.batch_size} x {d.seq_len}, '
           f'{os.cpu_count()} CPU cores shared by the simulated devices',
           '| mesh | ms / step | tokens / s | vs 1 device |', '|---|---|---|---|']
  for label, s in med.items():
    lines.append(f'| {label} | {1000 * s:.0f} | {tokens / s:,.0f} | {base / s:.2f}x |')
  return '\n'.join(lines)


def main(argv):
  del argv
  print(memory_table())
  if _STEPS.value:
    print()
    print(throughput_table(_STEPS.value))


if __name__ == '__main__':
  app.run(main)
