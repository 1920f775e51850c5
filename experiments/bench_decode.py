r"""Prefill and decode speed of one resident parent at several precisions, side by side.

  python experiments/bench_decode.py [--model=smollm2-135m] [--batch=1,8] [--new_tokens=32]
      [--llama_bench=PATH]

Variants: the float weights; one min-max uint8 parent (--targets) sliced at
8, 4 and 2 bits and at the pyramid plan; the same parent held resident at 4
and at 2 bits (`parents.resident`: 5/8 and 3/8 byte per code, the same
slices). The weights at a width are made inside the jitted step from the
resident bytes. Prefill is timed as a call that generates nothing; decode as
the rest of a call that generates --new_tokens (EOS ignored). Runs interleave
(median of --repeats). The batch-1 decode bound is the machine's memory
bandwidth (measured here, a jitted sum over a large array) over the resident
weight bytes every token must read; the table gives the fraction reached and
each variant's decode speed over the float weights'.

With a llama.cpp build (--llama_bench, or `llama-bench` on PATH; never
required), the same decode measurement (2 threads, batch 1) of the source
GGUF and of the .gguf files in --gguf_dir is printed beside it.
Runs unchanged on CPU, GPU or TPU.
"""

import glob
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from matquant_jax import ckpts, parents
from matquant_jax.core import QuantSpec, contract, plans
from matquant_jax.data import shakespeare
from matquant_jax.evals import llama_cpp
from matquant_jax.lab import logs, timing
from matquant_jax.text import sampler

_MODEL = flags.DEFINE_string('model', 'smollm2-135m', 'Float checkpoint, .gguf or model name.')
_BATCH = flags.DEFINE_list('batch', ['1', '8'], 'Batch sizes.')
_PROMPT = flags.DEFINE_integer('prompt_tokens', 64, 'Prompt length in tokens.')
_NEW = flags.DEFINE_integer('new_tokens', 32, 'Decoded tokens per row.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repeats; the median is reported.')
_TARGETS = flags.DEFINE_list('targets', ['ffn', 'attn'], 'Weights held as uint8 codes.')
_LLAMA_BENCH = flags.DEFINE_string('llama_bench', None, 'llama.cpp\'s llama-bench binary (default: PATH).')
_GGUF_DIR = flags.DEFINE_string('gguf_dir', None, 'More .gguf files for llama.cpp to decode.')
_BANDWIDTH_MIB = flags.DEFINE_integer('bandwidth_mib', 1024, 'Array size for the bandwidth probe.')


def memory_bandwidth(mib: int, repeats: int = 5) -> float:
  """Bytes/s a jitted reduction reads from device memory (best of `repeats`)."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return x.nbytes / best


def prompts(tokenizer, n: int, length: int) -> list[str]:
  """n different passages of Hamlet, each cut to about `length` tokens."""
  text = open(os.path.join(shakespeare.texts_dir(), 'hamlet_gut.txt'), encoding='utf-8').read()
  out = []
  for i in range(n):
    ids = tokenizer.encode(text[20000 + 3000 * i: 26000 + 3000 * i])[:length - 1]  # BOS is added
    out.append(tokenizer.decode(ids))
  return out


def main(argv):
  del argv
  logs.setup()
  model, variables, tokenizer = ckpts.load(_MODEL.value)
  targets = tuple(_TARGETS.value)
  stored = parents.make_parent(model.config, variables['params'], QuantSpec(8, targets=targets))
  held = {r: parents.resident(stored, r) for r in (4, 2)}
  cache = -(-_PROMPT.value // sampler.BUCKET) * sampler.BUCKET + _NEW.value + sampler.BUCKET
  make = lambda v: sampler.Sampler(model, v, tokenizer, cache)
  float_sampler, parent_sampler = make(variables), make(stored)
  held_samplers = {r: make(v) for r, v in held.items()}
  variants = {'float weights': (float_sampler, None), 'parent int8': (parent_sampler, 8),
              'parent int4': (parent_sampler, 4), 'parent int2': (parent_sampler, 2),
              'parent pyramid': (parent_sampler, plans.pyramid(model.config.num_layers)),
              'resident 4 bits, int4': (held_samplers[4], 4), 'resident 4 bits, int2': (held_samplers[4], 2),
              'resident 2 bits, int2': (held_samplers[2], 2)}
  resident = {name: parents.weight_bytes(s.variables)['total'] for name, (s, _) in variants.items()}
  bandwidth = memory_bandwidth(_BANDWIDTH_MIB.value)

  rows = []
  for b in map(int, _BATCH.value):
    batch = prompts(tokenizer, b, _PROMPT.value)
    runners = {}
    for name, (s, bits) in variants.items():
      for new in (0, _NEW.value):
        runners[name, new] = (lambda s=s, bits=bits, new=new: s.sample(batch, new, bits=bits,
                                                                        stop_at_eos=False))
    t = time.perf_counter()
    med = timing.interleaved_medians(runners, _REPEATS.value)
    print(f'batch {b}: {len(runners)} runners, {time.perf_counter() - t:.0f}s including compilation',
          flush=True)
    prompt_len = parent_sampler.encode(batch)[0].shape[1]
    for name in variants:
      prefill, full = med[name, 0], med[name, _NEW.value]
      decode = max(full - prefill, 1e-9)
      rows.append(dict(variant=name, batch=b, prefill_tok_s=b * prompt_len / prefill,
                       decode_tok_s=b * _NEW.value / decode, resident_mib=resident[name] / 2**20,
                       bound_tok_s=bandwidth / resident[name]))

  print(f'\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}; model {_MODEL.value}; '
        f'prompt {prompt_len} tokens (padded), {_NEW.value} new; parent targets {targets}; '
        f'memory bandwidth {bandwidth / 1e9:.1f} GB/s; contraction {contract.mode()}')
  print('| variant | batch | prefill tok/s | decode tok/s | resident weights MiB | '
        'batch-1 bound tok/s | of bound | vs float |\n|---|---|---|---|---|---|---|---|')
  base = {r['batch']: r['decode_tok_s'] for r in rows if r['variant'] == 'float weights'}
  for r in rows:
    share = f'{r["decode_tok_s"] / r["bound_tok_s"]:.0%}' if r['batch'] == 1 else ''
    print(f'| {r["variant"]} | {r["batch"]} | {r["prefill_tok_s"]:,.0f} | {r["decode_tok_s"]:.1f} | '
          f'{r["resident_mib"]:.1f} | {r["bound_tok_s"]:.1f} | {share} | '
          f'{r["decode_tok_s"] / base[r["batch"]]:.2f} |')

  binary = _LLAMA_BENCH.value or llama_cpp.bench_binary(None)
  if not binary:
    print('\nllama.cpp: no llama-bench found (--llama_bench or PATH); not measured')
    return
  files = [ckpts.MODELS[_MODEL.value]() if _MODEL.value in ckpts.MODELS else _MODEL.value]
  if _GGUF_DIR.value:
    files += sorted(glob.glob(os.path.join(_GGUF_DIR.value, '*.gguf')))
  print(f'\nllama.cpp ({binary}, 2 threads, batch 1, {_NEW.value} new tokens):')
  print('| file | MiB | decode tok/s |\n|---|---|---|')
  for f in files:
    if f.endswith('.gguf'):
      print(f'| {os.path.basename(f)} | {os.path.getsize(f) / 2**20:.1f} | '
            f'{llama_cpp.decode_speed(binary, f, _NEW.value):.1f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
