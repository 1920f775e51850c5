"""Hugging Face directories (config.json + safetensors): read and write."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

from matquant_jax import nn
from matquant_jax.ckpts.layouts import HF_GEMMA3_NORMS, HF_GEMMA_NORMS, HF_LLAMA, check_params, checkpoint_tensors, gemma_params, llama_params
from matquant_jax.nn import gemma3, llama
from matquant_jax.text import tokenization

Params = Any


def gemma2_from_hf_config(hf: dict, dtype: str = 'float32') -> nn.TransformerConfig:
  """Gemma-2 config from a Hugging Face config.json."""
  return nn.TransformerConfig(
      num_layers=hf['num_hidden_layers'], num_embed=hf['vocab_size'], embed_dim=hf['hidden_size'],
      hidden_dim=hf['intermediate_size'], num_heads=hf['num_attention_heads'],
      head_dim=hf['head_dim'], num_kv_heads=hf['num_key_value_heads'],
      sliding_window_size=hf.get('sliding_window', 4096),
      attn_logits_soft_cap=hf.get('attn_logit_softcapping', 50.0),
      final_logit_softcap=hf.get('final_logit_softcapping', 30.0),
      query_pre_attn_scalar=hf.get('query_pre_attn_scalar', hf['head_dim']) ** -0.5,
      rope_base=hf.get('rope_theta', 10_000.0), bos_per_sequence=True, dtype=dtype)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
  """Writes tensors as one .safetensors file, atomically (no half-written file on failure)."""
  tmp = path + '.tmp'
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata)
  os.replace(tmp, path)


def _getter(tensors: Mapping[str, np.ndarray], source: str):
  def get(name):
    if name not in tensors:
      raise ValueError(f'{source}: tensor {name!r} is missing')
    return np.asarray(tensors[name], np.float32)
  return get


def load_hf(directory: str, dtype: str = 'float32'):
  """(config, params, tokenizer) from a Hugging Face model directory."""
  cfg_path = os.path.join(directory, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'{directory}: no config.json (not a Hugging Face model directory)')
  with open(cfg_path) as f:
    hf = json.load(f)
  files = sorted(glob.glob(os.path.join(directory, '*.safetensors')))
  if not files:
    raise FileNotFoundError(f'{directory}: no *.safetensors files')
  tensors = {}
  for path in files:
    tensors.update(safetensors.numpy.load_file(path))
  get = _getter(tensors, directory)
  arch = (hf.get('architectures') or [hf.get('model_type', '?')])[0]
  if arch in ('LlamaForCausalLM', 'MistralForCausalLM'):
    config = llama.from_hf_config(hf, dtype)
    params = llama_params(get, config, HF_LLAMA)
  elif arch == 'Gemma2ForCausalLM':
    config = gemma2_from_hf_config(hf, dtype)
    params = gemma_params(get, config, HF_LLAMA, HF_GEMMA_NORMS)
  elif arch == 'Gemma3ForCausalLM':
    config = gemma3.from_hf_config(hf, dtype)
    params = gemma_params(get, config, HF_LLAMA, HF_GEMMA3_NORMS)
  else:
    raise ValueError(f'{directory}: unknown architecture {arch!r}; supported: LlamaForCausalLM, '
                     'MistralForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM')
  return config, check_params(params, config, directory), tokenization.from_directory(directory)


def hf_tensors(params: Params, c: nn.TransformerConfig) -> dict[str, np.ndarray]:
  """Hugging Face tensor names and [out, in] arrays (Llama/Mistral, or Gemma-2/3 when
  config.norm_plus_one)."""
  norms = (HF_GEMMA3_NORMS if c.qk_norm else HF_GEMMA_NORMS) if c.norm_plus_one else None
  return checkpoint_tensors(params, c, HF_LLAMA, norms)


def hf_config(c: nn.TransformerConfig) -> dict:
  """config.json for `hf_tensors`."""
  base = dict(num_hidden_layers=c.num_layers, vocab_size=c.num_embed, hidden_size=c.embed_dim,
              intermediate_size=c.hidden_dim, num_attention_heads=c.num_heads,
              num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_base,
              tie_word_embeddings=c.tie_embeddings)
  if c.qk_norm:
    return gemma3.hf_config(c, base)
  if c.norm_plus_one:
    return dict(base, architectures=['Gemma2ForCausalLM'], sliding_window=c.sliding_window_size,
                attn_logit_softcapping=c.attn_logits_soft_cap, final_logit_softcapping=c.final_logit_softcap,
                query_pre_attn_scalar=c.query_scale**-2)
  arch = 'MistralForCausalLM' if c.attention_pattern == 'sliding' else 'LlamaForCausalLM'
  return dict(base, architectures=[arch], rms_norm_eps=c.norm_eps,
              sliding_window=c.sliding_window_size if arch == 'MistralForCausalLM' else None)


def save_hf(directory: str, params: Params, config: nn.TransformerConfig, dtype=np.float32) -> None:
  """A Hugging Face directory: config.json + model.safetensors."""
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, 'model.safetensors'),
                    {k: v.astype(dtype) for k, v in hf_tensors(params, config).items()})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf_config(config), f, indent=1)
