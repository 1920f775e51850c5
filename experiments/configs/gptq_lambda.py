"""MatQuant-GPTQ objectives side by side on the embedded model (run beside configs/gptq.py).

lambda (1, 1, 1) over [8,4,2] (the default), int8-weighted (1, 0.1, 0.01), and MatGPTQ's
widths [8,4,3]; evaluated at every width like the other studies.
"""

from matquant_jax.lab import configs


def get_config():
  c = configs.base_config()
  gptq = dict(algo='gptq')
  c.runs = [configs.run('matquant', 'MatQuant', '8,4,2', (1.0, 1.0, 1.0), **gptq),
            configs.run('matquant_int8_weighted', 'MatQuant, lambda 1/0.1/0.01', '8,4,2',
                        (1.0, 0.1, 0.01), **gptq),
            configs.run('matquant_843', 'MatQuant [8,4,3]', '8,4,3', (1.0, 1.0, 1.0), **gptq)]
  return c
