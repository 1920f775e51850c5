"""The default study plus MatQuant with larger int8/int4 weights (the paper's ablation grid)."""

from matquant_jax.lab import configs


def get_config():
  c = configs.base_config()
  c.runs = c.runs + [
      configs.run('matquant_l02', 'MatQuant lambda=(0.2,0.2,1)', '8,4,2', (0.2, 0.2, 1.0)),
      configs.run('matquant_l05', 'MatQuant lambda=(0.5,0.5,1)', '8,4,2', (0.5, 0.5, 1.0)),
  ]
  return c
