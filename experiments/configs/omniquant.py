"""The paper's Table 1 layout with OmniQuant as the base algorithm, on the embedded model.

Baselines at 8, 4, 2 (twice the epochs), 6 and 3 bits, sliced int8, MatQuant
[8,4,2] with lambda (0.1, 0.1, 1), Single Precision and Extra Precision
MatQuant, all calibrated on the same pretrained float model.
"""

from matquant_jax import configs


def get_config():
  c = configs.base_config()
  omni = dict(algo='omniquant')
  c.runs = [configs.baseline(b, 'omniquant') for b in (8, 4, 2, 6, 3)] + [
      configs.run('matquant', 'MatQuant', '8,4,2', (0.1, 0.1, 1.0), **omni),
      configs.run('sp_matquant', 'S.P. MatQuant', '2', (1.0,), **omni),
      configs.run('ep_matquant', 'E.P. MatQuant', '8,4,2', (1.0, 1.0, 1.0), extra_precision=True, **omni),
  ]
  return c
