"""Gemma 3 (text) as a configuration of the shared decoder in gemma.py.

Against Gemma-2 the switches are: QK-norm (RMSNorm over head_dim on queries
and keys, before RoPE, params `attn/_query_norm`, `attn/_key_norm`), five
sliding-window layers to one global layer, RoPE base 10k on local and 1M on
global layers (with linear scaling by 8 on the 4B/12B/27B global layers), no
soft caps, a 262,144-entry vocabulary, and the gating einsum stored
transposed (2, H, D). Sandwich norms, (1 + w) RMSNorm, embeddings scaled by
sqrt(D) and the tied head are as in Gemma-2. Values follow google-deepmind/gemma
(`gm.nn.Gemma3_*`); the 4B/12B/27B presets are their text part only.
"""

from __future__ import annotations

import dataclasses

from matquant_jax.nn.config import AttentionType, TransformerConfig


VOCAB = 262_144


def gemma3_config(*, num_layers: int, embed_dim: int, hidden_dim: int, num_heads: int, head_dim: int,
                  num_kv_heads: int, sliding_window: int, global_scale: float = 1.0,
                  query_pre_attn_scalar: float | None = None, num_embed: int = VOCAB,
                  dtype: str = 'float32') -> TransformerConfig:
  """A Gemma 3 text decoder."""
  return TransformerConfig(
      num_layers=num_layers, num_embed=num_embed, embed_dim=embed_dim, hidden_dim=hidden_dim,
      num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads,
      sliding_window_size=sliding_window, attn_logits_soft_cap=None, final_logit_softcap=None,
      query_pre_attn_scalar=query_pre_attn_scalar, transpose_gating_einsum=True,
      rope_base=1_000_000.0, rope_local_base=10_000.0, rope_global_scale=global_scale,
      attention_pattern='gemma3', qk_norm=True, bos_per_sequence=True, dtype=dtype)


def gemma3_270m(**kw) -> TransformerConfig:
  """Gemma 3 270M: 18 layers, D 640, H 2048, 4 heads / 1 KV head of 256, window 512."""
  return gemma3_config(num_layers=18, embed_dim=640, hidden_dim=2048, num_heads=4, head_dim=256,
                       num_kv_heads=1, sliding_window=512, **kw)


def gemma3_1b(**kw) -> TransformerConfig:
  """Gemma 3 1B: 26 layers, D 1152, H 6912, 4 heads / 1 KV head of 256, window 512."""
  return gemma3_config(num_layers=26, embed_dim=1152, hidden_dim=6 * 1152, num_heads=4, head_dim=256,
                       num_kv_heads=1, sliding_window=512, **kw)


def gemma3_4b(**kw) -> TransformerConfig:
  """Gemma 3 4B (text): 34 layers, D 2560, H 10240, 8 heads / 4 KV heads of 256, window 1024."""
  return gemma3_config(num_layers=34, embed_dim=2560, hidden_dim=2560 * 4, num_heads=8, head_dim=256,
                       num_kv_heads=4, sliding_window=1024, global_scale=8.0, **kw)


def gemma3_12b(**kw) -> TransformerConfig:
  """Gemma 3 12B (text): 48 layers, D 3840, H 15360, 16 heads / 8 KV heads of 256, window 1024."""
  return gemma3_config(num_layers=48, embed_dim=3840, hidden_dim=3840 * 4, num_heads=16, head_dim=256,
                       num_kv_heads=8, sliding_window=1024, global_scale=8.0, **kw)


def gemma3_27b(**kw) -> TransformerConfig:
  """Gemma 3 27B (text): 62 layers, D 5376, H 21504, 32 heads / 16 KV heads of 128, window 1024,
  queries scaled by (D / heads)^-0.5 = 168^-0.5 rather than head_dim^-0.5."""
  return gemma3_config(num_layers=62, embed_dim=5376, hidden_dim=5376 * 4, num_heads=32, head_dim=128,
                       num_kv_heads=16, sliding_window=1024, global_scale=8.0,
                       query_pre_attn_scalar=(5376 // 32)**-0.5, **kw)


PRESETS = {'gemma3_270m': gemma3_270m, 'gemma3_1b': gemma3_1b, 'gemma3_4b': gemma3_4b,
           'gemma3_12b': gemma3_12b, 'gemma3_27b': gemma3_27b}


def from_gguf_metadata(shape: dict, sliding_window: int, rope_base: float, rope_scale: float,
                       norm_eps: float) -> TransformerConfig:
  """The config of a llama.cpp 'gemma3' file: `shape` holds the sizes read from it. Local layers'
  RoPE base is 10k and queries scale by head_dim^-0.5, except for 62 layers (27B): (D / heads)^-0.5,
  as llama.cpp's loader sets them (neither is in the file)."""
  scalar = (shape['embed_dim'] // shape['num_heads'])**-0.5 if shape['num_layers'] == 62 else None
  config = gemma3_config(sliding_window=sliding_window, global_scale=rope_scale,
                         query_pre_attn_scalar=scalar, **shape)
  return dataclasses.replace(config, rope_base=rope_base, norm_eps=norm_eps)


def from_hf_config(hf: dict, dtype: str = 'float32') -> TransformerConfig:
  """The config of a Hugging Face Gemma3ForCausalLM config.json (or its text_config)."""
  hf = hf.get('text_config', hf)
  scaling = hf.get('rope_scaling') or {}
  if scaling and scaling.get('rope_type', scaling.get('type')) != 'linear':
    raise ValueError(f'Gemma 3 rope_scaling {scaling!r} is not supported (only linear)')
  head_dim = hf.get('head_dim', 256)
  scalar = hf.get('query_pre_attn_scalar', head_dim)
  config = gemma3_config(
      num_layers=hf['num_hidden_layers'], embed_dim=hf['hidden_size'], hidden_dim=hf['intermediate_size'],
      num_heads=hf['num_attention_heads'], head_dim=head_dim, num_kv_heads=hf['num_key_value_heads'],
      sliding_window=hf['sliding_window'], global_scale=float(scaling.get('factor', 1.0)),
      query_pre_attn_scalar=None if abs(scalar - head_dim) < 1e-6 else scalar**-0.5,
      num_embed=hf['vocab_size'], dtype=dtype)
  config = dataclasses.replace(config, rope_base=hf.get('rope_theta', 1_000_000.0),
                               rope_local_base=hf.get('rope_local_base_freq', 10_000.0),
                               norm_eps=hf.get('rms_norm_eps', 1e-6))
  if 'layer_types' in hf:
    want = ['sliding_attention' if t == AttentionType.LOCAL_SLIDING else 'full_attention'
            for t in config.attention_types]
    if list(hf['layer_types']) != want:
      raise ValueError(f'Gemma 3 layer_types {hf["layer_types"]} are not the 5 local : 1 global pattern')
  return config


def hf_config(c: TransformerConfig, base: dict) -> dict:
  """config.json of a Gemma3ForCausalLM for `c` (`base`: the sizes every family shares)."""
  return dict(base, architectures=['Gemma3ForCausalLM'], model_type='gemma3_text',
              sliding_window=c.sliding_window_size, rope_local_base_freq=c.rope_local_base,
              rope_scaling={'rope_type': 'linear', 'factor': c.rope_global_scale}
              if c.rope_global_scale != 1.0 else None,
              query_pre_attn_scalar=c.head_dim if c.query_pre_attn_scalar is None else c.query_scale**-2,
              rms_norm_eps=c.norm_eps,
              layer_types=['sliding_attention' if t == AttentionType.LOCAL_SLIDING else 'full_attention'
                           for t in c.attention_types])
