"""GPTQ as the base algorithm, in the Table 1 layout, on the embedded model.

Per width the GPTQ baseline (8, 6, 4, 3, 2 bits; the int8 one also sliced to
every width) and MatQuant-GPTQ [8,4,2] (lambda 1, 1, 1, as MatGPTQ's scripts),
all on the same pretrained float model and calibration sequences. One-shot:
seconds per run here.
"""

from matquant_jax.lab import configs


def get_config():
  c = configs.base_config()
  c.runs = configs.gptq_table_runs()
  return c
