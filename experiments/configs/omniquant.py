"""The paper's Table 1 layout with OmniQuant as the base algorithm, on the embedded model.

Baselines at 8, 4, 2 (twice the epochs), 6 and 3 bits, sliced int8, MatQuant
[8,4,2] with lambda (0.1, 0.1, 1), Single Precision and Extra Precision
MatQuant, all calibrated on the same pretrained float model.
"""

from matquant_jax.lab import configs


def get_config():
  c = configs.base_config()
  c.runs = configs.omniquant_table_runs()
  return c
