"""One registry of the released architectures: `preset('gemma3_270m')`, `preset('gemma2_2b',
dtype='bfloat16')`. The family modules define them; this is where a user (and the checkpoint
loaders) look them up by name."""

from __future__ import annotations

from matquant_jax.nn import gemma3, llama
from matquant_jax.nn.config import TransformerConfig

PRESETS = {
    'gemma2_2b': TransformerConfig.gemma2_2b, 'gemma2_9b': TransformerConfig.gemma2_9b,
    'gemma2_27b': TransformerConfig.gemma2_27b, **gemma3.PRESETS,
    'smollm2_135m': llama.smollm2_135m, 'mistral_7b': llama.mistral_7b,
}
GEMMA = tuple(n for n in PRESETS if n.startswith('gemma'))  # what an official Gemma orbax tree can be


def preset(name: str, **overrides) -> TransformerConfig:
  """The config of a released model by name; overrides replace fields (e.g. dtype)."""
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; choose from {sorted(PRESETS)}')
  return PRESETS[name](**overrides)
