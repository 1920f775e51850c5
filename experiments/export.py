r"""Writes a stored parent and packed exports of it, or its slices as GGUF files for llama.cpp.

  python experiments/export.py --model=smollm2-135m --out=runs/exports [--bits=6,4,3,2] [--plan=pyramid]
      [--other_dtype=bfloat16]
  python experiments/export.py --model=runs/default/parents/matquant --out=runs/exports_default
  python experiments/export.py --model=smollm2-135m --format=gguf --bits=4 --group_size=32 --out=runs/gguf
      [--symmetric] [--extra_precision] [--plan=pyramid] [--float_type=F16] [--wide=Q8_0]

--format=gguf: one `<model>-<slice>.gguf` per width in --bits (and --plan when given), each
the parent's slice in exact ggml blocks (`ckpts.export_gguf`; int4 of an asymmetric g32
parent is Q4_1, of a symmetric one Q4_0); the table gives each tensor type's count, bits on
disk and largest error against the project's own slice (decoded back with the `gguf`
package); the last line is the last file's path. A float --model is made a min-max parent
with --group_size (and --symmetric) first; general.* and the chat template are copied from a
source GGUF.

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
_FORMAT = flags.DEFINE_enum('format', 'parent', ['parent', 'gguf'], 'Stored parent + packed slices, or GGUF files.')
_GROUP = flags.DEFINE_integer('group_size', None, 'Group size of the min-max parent (default: per channel).')
_SYMMETRIC = flags.DEFINE_bool('symmetric', False, 'Symmetric min-max parent (zero point 2^(c-1)).')
_EP = flags.DEFINE_bool('extra_precision', False, 'GGUF: write the extra-precision slices.')
_FLOAT_TYPE = flags.DEFINE_enum('float_type', 'F16', ['F16', 'F32', 'Q8_0'], 'GGUF: type of unquantized weights.')
_WIDE = flags.DEFINE_enum('wide', 'Q8_0', ['Q8_0', 'F16'], 'GGUF: type of asymmetric widths above 5 bits.')
_OTHER_DTYPE = flags.DEFINE_enum('other_dtype', None, ['float32', 'bfloat16'],
                                 'Recast the weights that are not quantized (default: as loaded).')


def main(argv):
  del argv
  logs.setup()
  model, variables, tokenizer = ckpts.load(_MODEL.value)
  config = model.config
  float_params = None
  if nn.stored_bits(variables) is not None and (_GROUP.value or _SYMMETRIC.value):
    raise app.UsageError(f'{_MODEL.value} is a stored parent: its grid is fixed (--group_size and '
                         '--symmetric make a parent from float weights)')
  if nn.stored_bits(variables) is None:
    float_params = variables['params']
    variables = parents.make_parent(config, float_params, QuantSpec(
        8, targets=tuple(_TARGETS.value), group_size=_GROUP.value, symmetric=_SYMMETRIC.value))
  os.makedirs(_OUT.value, exist_ok=True)
  if _FORMAT.value == 'gguf':
    return export_gguf(variables, config, tokenizer)
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


def export_gguf(variables, config, tokenizer):
  source = _MODEL.value
  if parents.is_parent(source):  # its source, for general.* and the chat template
    source = parents.read_manifest(source).get('run', {}).get('source') or ckpts.named_model(config) or ''
  source = ckpts.MODELS[source]() if source in ckpts.MODELS else source
  metadata, context = ckpts.gguf_source_metadata(source) if str(source).endswith('.gguf') else ({}, 8192)
  name = os.path.basename(_MODEL.value.rstrip('/')).removesuffix('.gguf')
  exports = [(f'int{b}', int(b)) for b in _BITS.value]
  if flags.FLAGS['plan'].present and _PLAN.value:
    exports.append((os.path.basename(_PLAN.value).removesuffix('.json'), _PLAN.value if _PLAN.value != 'pyramid'
                    else plans.pyramid(config.num_layers)))
  print('| file | MiB | bits / weight | types (parameters) | largest error / max abs w |')
  print('|---|---|---|---|---|')
  paths = []
  for label, bits in exports:
    path = os.path.join(_OUT.value, f'{name}-{label}{"-ep" if _EP.value else ""}.gguf')
    report = ckpts.export_gguf(path, variables, config, tokenizer, bits, extra_precision=_EP.value,
                               float_type=_FLOAT_TYPE.value, wide=_WIDE.value, context_length=context,
                               metadata={**metadata, 'general.name': f'{metadata.get("general.name", name)} '
                                         f'MatQuant {label}'})
    n = sum(report['params_by_type'].values())
    worst = {}
    for t in report['tensors']:
      worst[t['type']] = max(worst.get(t['type'], 0.0), t['rel_err'])
    types = ', '.join(f'{k} {v / 1e6:.1f}M' for k, v in sorted(report['params_by_type'].items()))
    errs = ', '.join(f'{k} {v:.1e}' for k, v in sorted(worst.items()))
    print(f'| {os.path.basename(path)} | {report["bytes"] / 2**20:.1f} | {8 * report["bytes"] / n:.2f} | '
          f'{types} | {errs} |', flush=True)
    paths.append(path)
  print(paths[-1])


if __name__ == '__main__':
  app.run(main)
