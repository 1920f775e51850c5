r"""Writes a stored parent and packed exports of it, and prints their sizes.

  python experiments/export.py --model=smollm2-135m --out=runs/exports [--bits=6,4,3,2] [--plan=pyramid]
      [--other_dtype=bfloat16]
  python experiments/export.py --model=runs/default/parents/matquant --out=runs/exports_default

--model: a stored parent, or float weights (checkpoint, .gguf, 'smollm2-135m'),
made into a min-max int8 parent first (--targets). Writes OUT/parent (uint8
codes) unless --model already is one, OUT/int<r> per width and OUT/<plan> for
a plan ('pyramid' or a plan file), and checks every export's codes take
ceil(N * r / 8) bytes. The table: bytes on disk per part, and code bits per
quantized parameter.
"""

import math
import os

from absl import app, flags

from matquant_jax import ckpts, nn, parents
from matquant_jax.core import QuantSpec, plans
from matquant_jax.lab import logs

_MODEL = flags.DEFINE_string('model', 'smollm2-135m', 'Stored parent, checkpoint, .gguf or model name.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.', required=True)
_BITS = flags.DEFINE_list('bits', ['6', '4', '3', '2'], 'Packed widths to export.')
_PLAN = flags.DEFINE_string('plan', 'pyramid', "'pyramid', a plan file, or empty.")
_TARGETS = flags.DEFINE_list('targets', ['ffn', 'attn'], 'Weights quantized when --model is float.')
_OTHER_DTYPE = flags.DEFINE_enum('other_dtype', None, ['float32', 'bfloat16'],
                                 'Recast the weights that are not quantized (default: as loaded).')


def main(argv):
  del argv
  logs.setup()
  model, variables, tokenizer = ckpts.load(_MODEL.value)
  config = model.config
  float_params = None
  if nn.stored_bits(variables) is None:
    float_params = variables['params']
    variables = parents.make_parent(config, float_params, QuantSpec(8, targets=tuple(_TARGETS.value)))
  os.makedirs(_OUT.value, exist_ok=True)
  written = []
  if float_params is not None:
    d = os.path.join(_OUT.value, 'parent')
    if not parents.is_parent(d):
      parents.save(d, variables, config, tokenizer, float_dtype=_OTHER_DTYPE.value,
                  run={'made_by': 'experiments/export.py', 'source': _MODEL.value, 'method': 'min-max'})
    written.append(('int8 parent', d, 8))
  else:
    written.append(('int8 parent', _MODEL.value, nn.stored_bits(variables)))
  exports = [(f'int{b}', int(b)) for b in _BITS.value]
  if _PLAN.value:
    plan = plans.pyramid(config.num_layers) if _PLAN.value == 'pyramid' else plans.load(
        _PLAN.value, config.num_layers)
    exports.append((os.path.basename(_PLAN.value).removesuffix('.json'), plan))
  for name, bits in exports:
    d = os.path.join(_OUT.value, name)
    if not parents.is_parent(d):
      parents.export(d, variables, config, tokenizer, bits, float_dtype=_OTHER_DTYPE.value,
                    run={'made_by': 'experiments/export.py', 'source': _MODEL.value})
    written.append((f'packed {name}', d, bits))

  manifest = parents.read_manifest(written[0][1])
  n_quant = sum(math.prod(e['shape']) for e in manifest['quantized'].values())
  n_all = n_quant + sum(math.prod(s.shape) for p, s in nn.param_shapes(config).items()
                        if p not in manifest['quantized'])
  mib = lambda x: f'{x / 2**20:.1f}'
  print(f'\n{config.num_layers} layers; {n_all:,} parameters, {n_quant:,} of them quantized '
        f'(targets {", ".join(nn.quantized_targets(variables, config))})')
  print('| artifact | codes MiB | scales MiB | other MiB | total on disk MiB | code bits / quantized param |')
  print('|---|---|---|---|---|---|')
  print(f'| bf16 model (arithmetic) | | | | {mib(2 * n_all)} | 16 |')
  for label, d, bits in written:
    size = parents.file_bytes(d)
    layer_bits = bits if isinstance(bits, tuple) else (bits,) * config.num_layers
    want = sum(math.ceil(math.prod(e['shape']) * layer_bits[int(p.split('/')[0][6:])] / 8)
               for p, e in manifest['quantized'].items())
    if size['codes'] != want:
      raise AssertionError(f'{d}: codes take {size["codes"]} bytes, the arithmetic says {want}')
    print(f'| {label} | {mib(size["codes"])} | {mib(size["scales"])} | {mib(size["other"])} | '
          f'{mib(size["total"])} | {8 * size["codes"] / n_quant:.2f} |')


if __name__ == '__main__':
  app.run(main)
