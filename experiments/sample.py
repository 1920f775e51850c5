r"""Generates text from one resident model at several precisions, side by side.

  python experiments/sample.py --model=smollm2-135m --bits=8,4,2 \
      --prompt='To be, or not to be,' [--max_new_tokens=32] [--temperature=0.8 --top_p=0.9]
  python experiments/sample.py --model=runs/default/parents/matquant --bits=8,4,2,pyramid

--model: a stored parent (its uint8 codes are sliced per call), or float
weights (a checkpoint directory, .gguf file or 'smollm2-135m'), which are
first made into a min-max int8 parent in memory (--targets), plus a float row.
--bits: widths, 'pyramid', or precision plan files. --resident_bits=R holds the
parent for widths up to R in fewer bytes (every --bits entry must be <= R). The first call at each
precision compiles; tokens/s is from a second, timed call.
"""

import time

from absl import app, flags

from matquant_jax import ckpts, nn, parents
from matquant_jax.core import QuantSpec, plans
from matquant_jax.lab import logs
from matquant_jax.text import sampler

_MODEL = flags.DEFINE_string('model', 'smollm2-135m', 'Stored parent, checkpoint, .gguf or model name.')
_BITS = flags.DEFINE_list('bits', ['8', '4', '2'], "Widths, 'pyramid' or plan files.")
_PROMPTS = flags.DEFINE_multi_string('prompt', ['To be, or not to be, that is the question:'],
                                     'Prompt (repeat the flag for a batch).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Keep the k most likely tokens.')
_TOP_P = flags.DEFINE_float('top_p', None, 'Keep the smallest set with this probability.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_TARGETS = flags.DEFINE_list('targets', ['ffn', 'attn'], 'Weights quantized when --model is float.')
_CACHE = flags.DEFINE_integer('cache_size', 512, 'KV-cache slots.')
_RESIDENT = flags.DEFINE_integer('resident_bits', None, 'Hold the parent for widths up to this only '
                                 '(parents.resident: fewer bytes, the same slices).')


def precision(arg: str, num_layers: int):
  """A --bits entry -> (label, what Sampler.sample takes)."""
  if arg == 'pyramid':
    return 'pyramid', plans.pyramid(num_layers)
  if arg.isdigit():
    return f'int{arg}', int(arg)
  return arg, arg  # a plan file


def main(argv):
  del argv
  logs.setup()
  model, variables, tokenizer = ckpts.load(_MODEL.value)
  rows = []
  if nn.stored_bits(variables) is None:  # float weights: a float row, then a min-max parent
    rows.append(('float', sampler.Sampler(model, variables, tokenizer, _CACHE.value), None))
    spec = QuantSpec(8, targets=tuple(_TARGETS.value))
    variables = parents.make_parent(model.config, variables['params'], spec)
  if _RESIDENT.value is not None:
    variables = parents.resident(variables, _RESIDENT.value)
  resident = sampler.Sampler(model, variables, tokenizer, _CACHE.value)
  rows += [(label, resident, bits) for label, bits in
           (precision(b, model.config.num_layers) for b in _BITS.value)]
  mode = sampler.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  bytes_ = parents.weight_bytes(variables)
  print(f'resident parent: {bytes_["total"] / 2**20:.1f} MiB ({bytes_["quantized"] / 2**20:.1f} MiB '
        f'quantized weights, targets {nn.quantized_targets(variables, model.config)}); sampling {mode}')
  results = []
  for label, s, bits in rows:
    run = lambda: s.sample(_PROMPTS.value, _MAX_NEW.value, bits=bits, sampling=mode, rng=_SEED.value)
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    t = time.perf_counter()
    outs = run()
    took = time.perf_counter() - t
    n = sum(len(o.tokens) for o in outs)
    results.append((label, outs, n / took, first))
  for i, prompt in enumerate(_PROMPTS.value):
    print(f'\nprompt: {prompt!r}\n')
    print('| precision | tokens/s | first call s | continuation |\n|---|---|---|---|')
    for label, outs, rate, first in results:
      text = outs[i].text.replace('\n', ' ⏎ ').replace('|', '\\|')
      print(f'| {label} | {rate:.1f} | {first:.1f} | {text} |')


if __name__ == '__main__':
  app.run(main)
