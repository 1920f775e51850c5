"""The default study plus int6/int3 baselines, Single Precision MatQuant and co-distillation."""

from matquant_jax.lab import configs


def get_config():
  c = configs.base_config()
  c.runs = c.runs + [
      configs.baseline(6), configs.baseline(3),
      configs.run('sp_matquant', 'S.P. MatQuant', '2', (1.0,)),
      configs.run('matquant_distill', 'MatQuant [8,4,2,8->2]', '8,4,2,8->2', (0.1, 0.1, 1.0)),
  ]
  return c
