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

import statistics  # pylint: disable=g-import-not-at-top
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType
import ml_collections
import numpy as np

from matquant_jax import configs, losses, omniquant, sharding, study, train
from matquant_jax.models import gemma
from matquant_jax.qeinsum import QuantSpec

_DEVICES = flags.DEFINE_list('devices', ['1', '8', '256'], 'FSDP mesh sizes for the memory table.')
_STEPS = flags.DEFINE_integer('throughput_steps', 10, 'Timed steps per repeat (0: skip throughput).')
GIB = 2**30


def memory_table() -> str:
  rules = sharding.DEFAULT_RULES
  opt = configs.optimizer(1e-5, 150)
  lines = ['| model | devices (fsdp) | params | + AdamW, FFN trainable (QAT) | + AdamW, all trainable '
           '| OmniQuant transforms |', '|---|---|---|---|---|---|']
  for name in ('gemma2_2b', 'gemma2_9b'):
    cfg = getattr(gemma.TransformerConfig, name)()
    model = gemma.Transformer(cfg)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    qtree = jax.eval_shape(lambda p, c=cfg: omniquant.init_transforms(c, p, QuantSpec(8)), params)
    for n in map(int, _DEVICES.value):
      mesh = AbstractMesh((1, n, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
      cols = []
      p_sh = train.model_shardings(cfg, params, mesh, rules)
      p_bytes = sharding.per_device_bytes(params, p_sh)
      for trainable in ('ffn', 'all'):
        t, _ = train.split_params(params, trainable)
        tx = train.make_optimizer(opt, 1000)
        t_sh = train.model_shardings(cfg, t, mesh, rules)
        o = jax.eval_shape(tx.init, t)
        o_sh = sharding.state_shardings({'opt_state': o}, tx, t_sh, mesh)['opt_state']
        cols.append(p_bytes + sharding.per_device_bytes(o, o_sh))
      q_bytes = sharding.per_device_bytes(qtree, train.model_shardings(cfg, qtree, mesh, rules))
      lines.append(f'| {name} | {n} | {p_bytes / GIB:.2f} GiB | {cols[0] / GIB:.2f} GiB | '
                   f'{cols[1] / GIB:.2f} GiB | {q_bytes / 2**20:.1f} MiB |')
  return '\n'.join(lines)


def throughput_table(steps: int) -> str:
  cfg = configs.base_config()
  d = cfg.data
  mcfg = study.model_config(cfg, d.vocab_size)
  model = gemma.Transformer(mcfg)
  rng = np.random.default_rng(0)
  batch = rng.integers(4, d.vocab_size, (d.batch_size, d.seq_len + 1)).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(batch[:, :-1]))['params']
  objective = losses.parse_objective('8,4,2', (0.1, 0.1, 1.0))
  meshes = {'1 device': (1, 1, 1), '8 devices, data': (8, 1, 1), '8 devices, fsdp': (1, 8, 1),
            '8 devices, data 2 x fsdp 2 x tensor 2': (2, 2, 2)}
  run_cfg = ml_collections.ConfigDict(dict(steps=10**6, trainable='ffn', checkpoint_every=10**6,
                                           log_every=10**6, optimizer=cfg.qat.optimizer,
                                           quant=dict(parent_bits=8)))
  prepared = {}
  for label, shape in meshes.items():
    mesh = sharding.make_mesh(sharding.mesh_config(*shape), jax.devices()[:int(np.prod(shape))])
    trainable, frozen = train.split_params(params, 'ffn')
    tx = train.make_optimizer(run_cfg.optimizer, 1000)
    t_sh = train.model_shardings(mcfg, trainable, mesh, sharding.DEFAULT_RULES)
    f_sh = train.model_shardings(mcfg, frozen, mesh, sharding.DEFAULT_RULES)
    make_state = lambda t, tx=tx: train.init_state(t, tx)
    s_sh = sharding.state_shardings(jax.eval_shape(make_state, trainable), tx, t_sh, mesh)
    state = jax.jit(make_state, out_shardings=s_sh)(jax.device_put(trainable, t_sh))
    b_sh = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
    fn = train.make_train_step(model, objective, run_cfg.quant, tx, (s_sh, f_sh, b_sh))
    frozen, gb = jax.device_put(frozen, f_sh), sharding.global_batch(batch, b_sh)
    state, _ = fn(state, frozen, gb)  # compile
    jax.block_until_ready(state)
    prepared[label] = [fn, state, frozen, gb]
  times = {k: [] for k in meshes}
  for _ in range(3):
    for label, slot in prepared.items():
      fn, state, frozen, gb = slot
      t = time.perf_counter()
      for _ in range(steps):
        state, _ = fn(state, frozen, gb)
      jax.block_until_ready(state)
      times[label].append((time.perf_counter() - t) / steps)
      slot[1] = state
  tokens = d.batch_size * d.seq_len
  base = statistics.median(times['1 device'])
  lines = [f'MatQuant [8,4,2] train step, default model, global batch {d.batch_size} x {d.seq_len}, '
           f'{os.cpu_count()} CPU cores shared by the simulated devices',
           '| mesh | ms / step | tokens / s | vs 1 device |', '|---|---|---|---|']
  for label, ts in times.items():
    s = statistics.median(ts)
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
