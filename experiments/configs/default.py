"""Default study (about 15 minutes on 2 CPU cores): baselines int8/int4/int2 and MatQuant [8,4,2]."""

from matquant_jax.lab import configs


def get_config():
  return configs.base_config()
