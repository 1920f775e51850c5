"""The Table 1 layout with the paper's stated OmniQuant learning rate: one lr of 1e-3 for everything.

OmniQuant's own code (the default, configs/omniquant.py) uses lr 1e-2 for the clipping
logits and 5e-3 for shift/scale; this config keeps the paper's setting reproducible.
"""

from matquant_jax.lab import configs


def get_config():
  c = configs.base_config()
  c.runs = configs.omniquant_table_runs()
  c.omniquant.update(lwc_lr=1e-3, let_lr=1e-3)
  return c
