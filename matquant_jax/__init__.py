"""Matryoshka Quantization (MatQuant) in JAX/Flax: one int8 parent, served at any width.

    import matquant_jax as mq
    model, variables, tokenizer = mq.load('smollm2-135m')          # or a stored parent directory
    parent = mq.export_parent(model.config, variables['params'], None, mq.QuantSpec(8))
    mq.log_perplexity(model, parent, tokenizer, texts, mq.QuantSpec(2))
    mq.Sampler(model, parent, tokenizer).sample(['To be, or not'], 16, bits=4)

The names below are re-exported from the modules that define them (imported on
first use, so `import matquant_jax` stays cheap).
"""

import importlib

_EXPORTS = {
    # models and checkpoints
    'load': 'checkpoints', 'Transformer': 'models.gemma', 'TransformerConfig': 'models.gemma',
    # precision and numerics
    'QuantSpec': 'qeinsum', 'fake_quant': 'quant', 'slice_codes': 'quant', 'QuantizedArray': 'quant',
    'parse_objective': 'losses',
    # base algorithms
    'QATOptions': ('train', 'Options'), 'train_qat': ('train', 'train'),
    'OmniQuantOptions': ('omniquant', 'Options'), 'calibrate_omniquant': ('omniquant', 'calibrate'),
    'export_parent': 'omniquant',
    'GPTQOptions': ('gptq', 'Options'), 'calibrate_gptq': ('gptq', 'calibrate'),
    # the stored parent, plans, serving
    'save_parent': ('parent', 'save'), 'load_parent': ('parent', 'load'), 'export': 'parent',
    'search_plan': ('planner', 'search'), 'Sampler': 'sampler', 'Sampling': 'sampler',
    # evaluation
    'log_perplexity': 'evaluate', 'accuracy': 'evaluate', 'task_items': 'evaluate',
    'read_texts': 'evaluate', 'token_stream': 'evaluate', 'pyramid': 'evaluate',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  where = _EXPORTS[name]
  module, attr = where if isinstance(where, tuple) else (where, name)
  value = getattr(importlib.import_module(f'{__name__}.{module}'), attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
