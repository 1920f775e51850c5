"""Matryoshka Quantization (MatQuant) in JAX/Flax: one int8 parent, served at any width.

    import matquant_jax as mq
    model, variables, tokenizer = mq.load('smollm2-135m')          # or a stored parent directory
    parent = mq.make_parent(model.config, variables['params'], mq.QuantSpec(8))   # min-max int8
    mq.log_perplexity(model, parent, tokenizer, texts, 2)
    mq.Sampler(model, parent, tokenizer).sample(['To be, or not'], 16, bits=4)

The house has a room per role, each a subpackage with its own face: `mq.core` (numerics,
`QuantSpec`, the objective, plans), `mq.nn` (config, presets, the Transformer, the table of
quantizable weights, sharding), `mq.text` (tokenizers, Sampler), `mq.data`, `mq.parents`
(make, store, export, plan), `mq.ckpts` (checkpoint formats and `load`), `mq.algos` (QAT,
OmniQuant, GPTQ), `mq.evals` (perplexity, tasks), `mq.lab` (studies, results files) and
`mq.testing`. The names below are re-exported from them; everything is imported on first
use, so `import matquant_jax` stays cheap.
"""

import importlib
import os

# XLA:CPU's concurrency-optimized scheduler starts every layer's dequantization (or fake
# quantization) at the top of a step and holds all of them: a whole float model of temporaries
# that misses the caches (a stored parent decoded at 0.4x the float speed). The memory-minimizing
# scheduler makes each layer's weight just before its dot. Set before jax's CPU backend starts
# (a no-op afterwards, and when XLA_FLAGS already names the flag).
_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=false".strip()

SUBPACKAGES = ('core', 'nn', 'text', 'data', 'parents', 'ckpts', 'algos', 'evals', 'lab', 'testing')
_EXPORTS = {
    # models and checkpoints
    'load': 'ckpts', 'Transformer': 'nn', 'TransformerConfig': 'nn', 'Output': 'nn',
    # precision and numerics
    'QuantSpec': 'core', 'fake_quant': 'core', 'slice_codes': 'core', 'QuantizedArray': 'core',
    'parse_objective': 'core', 'resolve_spec': 'nn',
    # base algorithms
    'QATOptions': ('algos.qat', 'Options'), 'train_qat': ('algos.qat', 'train'),
    'OmniQuantOptions': ('algos.omniquant', 'Options'), 'calibrate_omniquant': ('algos.omniquant', 'calibrate'),
    'GPTQOptions': ('algos.gptq', 'Options'), 'calibrate_gptq': ('algos.gptq', 'calibrate'),
    # the parent: make, store, export, plan; serving
    'make_parent': 'parents', 'save_parent': ('parents', 'save'), 'load_parent': ('parents', 'load'),
    'export': 'parents', 'export_gguf': 'ckpts', 'search_plan': ('parents.planner', 'search'),
    'Sampler': 'text', 'Sampling': 'text',
    # evaluation
    'log_perplexity': 'evals', 'accuracy': 'evals', 'task_items': 'evals',
    'read_texts': 'evals', 'token_stream': 'evals', 'pyramid': 'core',
}
__all__ = sorted(_EXPORTS) + list(SUBPACKAGES)


def __getattr__(name):
  if name in SUBPACKAGES:
    value = importlib.import_module(f'{__name__}.{name}')
  elif name in _EXPORTS:
    where = _EXPORTS[name]
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(f'{__name__}.{module}'), attr)
  else:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
