r"""The exported GGUF files judged by llama.cpp itself: its log pplx beside the project's on the
same token windows, file sizes, and llama.cpp's decode speed beside the source GGUF's.

  python experiments/bench_gguf.py [--models=smollm2-135m,gemma3-270m] [--bits=8,4,2] [--group_size=32]
      [--parents=NAME=DIR,...] [--windows=16] [--seq_len=256] [--llama_cpp=DIR] [--out=runs/bench_gguf]

For each model: min-max int8 parents over FFN + attention in groups of --group_size, asymmetric
and symmetric (--grids), and any
stored parents named in --parents, e.g. the best MatQuant parent of a study), each exported at
every width in --bits and at the Pyramid (`ckpts.export_gguf`). Both engines read exactly the
same ids: --windows consecutive windows of --seq_len held-out tokens (Shakespeare validation
plays, the project's tokenizer; BOS opening each window for Gemma), every token predicted once.
llama.cpp's number comes from its F32 logits through its C API (`evals.llama_cpp`, built once
from the llama-cpp-python sdist into --llama_cpp, default ~/.cache/matquant_jax). A difference
within 0.015 nats is the check (llama.cpp's quantized dot products round activations to 8 bits).
Writes OUT/rows.jsonl (one line per file, as it finishes; a rerun skips what is there),
OUT/table.md and OUT/gguf.png.
"""

import json
import os
import time

from absl import app, flags, logging

from matquant_jax import ckpts, evals, nn, parents
from matquant_jax.core import QuantSpec, plans
from matquant_jax.data import pipeline
from matquant_jax.evals import llama_cpp
from matquant_jax.lab import logs

_MODELS = flags.DEFINE_list('models', ['smollm2-135m', 'gemma3-270m'], 'Model names (ckpts.MODELS).')
_BITS = flags.DEFINE_list('bits', ['8', '4', '2'], 'Widths to export.')
_GROUP = flags.DEFINE_integer('group_size', 32, 'Group size of the min-max parent.')
# name -> (parent: symmetric, group size (None: --group_size)), export options, widths (None: --bits)
GRIDS = {
    'min-max': ((False, None), {}, None),  # the paper's asymmetric grid: Q4_1 (Q8_0 re-quantized at int8)
    'symmetric': ((True, None), {}, None),  # zero point 2^(c-1): Q8_0 / Q4_0 exactly
    'min-max-k': ((False, None), {'k_quants': True}, ('4', '2')),  # Q4_K / Q2_K where rows allow
    'symmetric-g64-q2': ((True, 64), {'two_bit': 'Q2_0'}, ('2',)),  # a true 2.25-bit file
}
_GRIDS = flags.DEFINE_list('grids', list(GRIDS), f'Min-max parents made here and how they are written: {list(GRIDS)}.')
_PARENTS = flags.DEFINE_list('parents', [], 'More stored parents to export: NAME=DIR (model taken from DIR).')
_WINDOWS = flags.DEFINE_integer('windows', 16, 'Evaluation windows.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per window.')
_LLAMA = flags.DEFINE_string('llama_cpp', None, 'Where llama.cpp is built (default ~/.cache/matquant_jax).')
_OUT = flags.DEFINE_string('out', 'runs/bench_gguf', 'Output directory.')
_SPEED_ONLY = flags.DEFINE_bool('speed_only', False, 'Only re-measure llama.cpp\'s decode speed of the '
                                 'files in OUT/rows.jsonl (on a quiet machine; the rest is kept).')
_PPL = flags.DEFINE_string('ppl', 'tfds:shakespeare_plays:validation', 'Held-out text source.')


def windows(model, tokenizer):
  texts = evals.read_texts(_PPL.value, pipeline.default_data_dir())
  bos = tokenizer.bos_id if model.config.bos_per_sequence else None
  batches = pipeline.eval_batches(evals.token_stream(tokenizer, texts), 1, _SEQ.value, _WINDOWS.value, bos)
  return [b[0] for b in batches]


def main(argv):
  del argv
  logs.setup()
  os.makedirs(_OUT.value, exist_ok=True)
  rows_path = os.path.join(_OUT.value, 'rows.jsonl')
  done = {}
  if os.path.exists(rows_path):
    done = {r['file']: r for r in map(json.loads, open(rows_path))}
  src = llama_cpp.build(_LLAMA.value)
  binding, bench = llama_cpp.binding(src), llama_cpp.bench_binary(src)
  if _SPEED_ONLY.value:
    for row in done.values():
      row['llama_cpp_tok_s'] = llama_cpp.decode_speed(bench, row['path'])
      logging.info('%s: llama.cpp decodes %.1f tok/s', row['file'], row['llama_cpp_tok_s'])
      save(rows_path, done)
    return report(list(done.values()))
  made = {}
  jobs = [(m, g, None) for m in _MODELS.value for g in _GRIDS.value] + [
      (None, *p.split('=', 1)) for p in _PARENTS.value]
  for model_name, label, parent_dir in jobs:
    if parent_dir:
      model, parent, tokenizer = parents.load(parent_dir)
      model_name = parents.read_manifest(parent_dir).get('run', {}).get('source') or ckpts.named_model(model.config)
      source, options, only = model_name, {}, None
    else:
      (symmetric, group), options, only = GRIDS[label]
      names = [f'int{b}' for b in only or _BITS.value] + ([] if only else ['pyramid'])
      if all(done.get(f'{model_name}/{label}/{w}', {}).get('file_nll') is not None
             or 'Q2_0' in (done.get(f'{model_name}/{label}/{w}', {}).get('params_by_type') or {})
             for w in names):
        continue  # every file of this grid measured: no parent to make
      key = (model_name, symmetric, group or _GROUP.value)
      if key not in made:
        model, variables, tokenizer = ckpts.load(model_name)
        made[key] = model, parents.make_parent(model.config, variables['params'], QuantSpec(
            8, group_size=group or _GROUP.value, targets=('ffn', 'attn'), symmetric=symmetric)), tokenizer
      model, parent, tokenizer = made[key]
      source = model_name
    source = ckpts.MODELS[source]() if source in ckpts.MODELS else source
    meta, context = ckpts.gguf_source_metadata(source) if str(source).endswith('.gguf') else ({}, 8192)
    wins = windows(model, tokenizer)
    eval_fn = evals.make_eval_fn(model)
    widths = [(f'int{b}', int(b)) for b in only or _BITS.value]
    if only is None:
      widths.append(('pyramid', plans.pyramid(model.config.num_layers)))
    files = ([('source', source, None)] if str(source).endswith('.gguf') and label == 'min-max' else []) + [
        (w, os.path.join(_OUT.value, f'{model_name}-{label}-{w}.gguf'), bits) for w, bits in widths]
    for width, path, bits in files:
      key = f'{model_name}/{label}/{width}'
      if key in done:
        row = done[key]
        if not row.get('params_by_type') and bits is not None:  # rows of an earlier version
          row['params_by_type'] = file_types(path)
        if row.get('file_nll') is None and 'Q2_0' not in (row.get('params_by_type') or {}):
          row['file_nll'] = file_nll(path, wins, row.get('params_by_type'))
        save(rows_path, done)
        continue
      t = time.time()
      if bits is not None:
        written = ckpts.export_gguf(path, parent, model.config, tokenizer, bits, context_length=context,
                                   metadata={**meta, 'general.name': f'{model_name} MatQuant {label} {width}'},
                                   **options)
        types = written['params_by_type']
        worst = max((t['rel_err'] for t in written['tensors']), default=None)
        ours = eval_fn(parent, [w[None] for w in wins], nn.resolve_spec(bits, parent, model.config))
      else:
        m2, v2, _ = ckpts.load(path)
        ours = evals.make_eval_fn(m2)(v2, [w[None] for w in wins], None)
        types, worst = {}, None
      theirs = llama_cpp.log_perplexity(binding, path, wins)
      row = dict(file=key, model=model_name, parent=label, width=width, mib=os.path.getsize(path) / 2**20,
                 project_nll=ours, file_nll=file_nll(path, wins, types), llama_cpp_nll=theirs, diff=theirs - ours,
                 llama_cpp_tok_s=llama_cpp.decode_speed(bench, path) if bench else None,
                 tokens=len(wins) * _SEQ.value, path=path, params_by_type=types, weight_rel_err=worst)
      logging.info('%s: project %.4f llama.cpp %.4f (%+.4f) %.1f MiB, %.1f s', key, ours, theirs,
                   theirs - ours, row['mib'], time.time() - t)
      done[key] = row
      save(rows_path, done)
  report(list(done.values()))


def file_nll(path: str, wins, types: dict | None) -> float | None:
  """The project's NLL of the written file itself, read back by `ckpts.load` (None for files
  with Q2_0 tensors, which only llama.cpp reads): the file holds the model when this equals the
  parent's slice; what llama.cpp adds on top is its own arithmetic."""
  if 'Q2_0' in (types or {}):
    return None
  model, variables, _ = ckpts.load(path)
  return evals.make_eval_fn(model)(variables, [w[None] for w in wins], None)


def file_types(path: str) -> dict:
  """Parameters per ggml type of a file's matrices."""
  import gguf  # pylint: disable=g-import-not-at-top
  counts = {}
  for t in gguf.GGUFReader(path).tensors:
    if len(t.shape) == 2:
      counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
  return counts


def save(path: str, rows: dict) -> None:
  with open(path + '.tmp', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows.values())
  os.replace(path + '.tmp', path)


def report(rows):
  lines = ['| model | parent | slice | types | MiB | project log pplx (slice) | project on the file | '
           'llama.cpp on the file | llama.cpp - project | llama.cpp decode tok/s |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    tok_s = f'{r["llama_cpp_tok_s"]:.1f}' if r['llama_cpp_tok_s'] else '-'
    on_file = f'{r["file_nll"]:.4f}' if r.get('file_nll') is not None else '(not readable by gguf)'
    types = '+'.join(k for k, _ in sorted((r.get('params_by_type') or {}).items(), key=lambda kv: -kv[1]))
    lines.append(f'| {r["model"]} | {r["parent"]} | {r["width"]} | {types or "source"} | {r["mib"]:.1f} | '
                 f'{r["project_nll"]:.4f} | {on_file} | {r["llama_cpp_nll"]:.4f} | {r["diff"]:+.4f} | {tok_s} |')
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(_OUT.value, 'table.md'), 'w') as f:
    f.write(table + '\n')
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4))
  labels = [f'{r["model"]}\n{r["width"]}' for r in rows]
  x = range(len(rows))
  ax.bar([i - 0.2 for i in x], [r['project_nll'] for r in rows], 0.4, label='project (JAX)')
  ax.bar([i + 0.2 for i in x], [r['llama_cpp_nll'] for r in rows], 0.4, label='llama.cpp on the .gguf')
  ax.set_xticks(list(x), labels, fontsize=6)
  ax.set_ylabel('log pplx (nats/token)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, 'gguf.png'), dpi=120)


if __name__ == '__main__':
  app.run(main)
