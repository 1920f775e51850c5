"""Hugging Face directories (config.json + safetensors): read and write."""

from __future__ import annotations

import glob
import os
import re
import shutil
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

from matquant_jax import nn
from matquant_jax.core import files
from matquant_jax.ckpts.layouts import HF_GEMMA3_NORMS, HF_GEMMA_NORMS, HF_LLAMA, check_params, checkpoint_tensors, gemma_params, llama_params, tensor_reader
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


# Stored but deliberately not read: rotary caches some exporters write (recomputed here).
IGNORED = re.compile(r'.*\.rotary_emb\.inv_freq')


def read_shards(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a directory's *.safetensors shards; a name in two shards is an error."""
  paths = sorted(glob.glob(os.path.join(directory, '*.safetensors')))
  if not paths:
    raise FileNotFoundError(f'{directory}: no *.safetensors files')
  tensors, where = {}, {}
  for path in paths:
    try:
      shard = safetensors.numpy.load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or bad headers
      raise ValueError(f'{path}: not a readable safetensors file ({e})') from None
    for name, value in shard.items():
      if name in where:
        raise ValueError(f'{directory}: tensor {name!r} is stored in two shards, '
                         f'{os.path.basename(where[name])} and {os.path.basename(path)}')
      tensors[name], where[name] = value, path
  return tensors


def check_all_read(tensors: Mapping[str, np.ndarray], read: set, config: nn.TransformerConfig,
                   source: str) -> None:
  """Every stored tensor is one the model read (or IGNORED): a smaller num_hidden_layers, biases,
  adapters or a stored head are refused rather than dropped. A head stored beside tied
  embeddings is accepted only when it equals the embedding."""
  head, embed = HF_LLAMA['head'], HF_LLAMA['embed']
  if config.tie_embeddings and head in tensors and head not in read:
    if tensors[head].shape != tensors[embed].shape or not np.array_equal(tensors[head], tensors[embed]):
      raise ValueError(f'{source}: config.json ties the embeddings (tie_word_embeddings) but {head!r} '
                       'holds different weights; untie them in config.json or remove the tensor')
    read = read | {head}
  unread = sorted(n for n in set(tensors) - read if not IGNORED.fullmatch(n))
  if unread:
    raise ValueError(f'{source}: {len(unread)} stored tensors are not part of the model config.json '
                     f'describes ({config.num_layers} layers, num_hidden_layers): {unread[:4]}')


def load_hf(directory: str, dtype: str = 'float32'):
  """(config, params, tokenizer) from a Hugging Face model directory."""
  cfg_path = os.path.join(directory, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'{directory}: no config.json (not a Hugging Face model directory)')
  hf = files.read_json(cfg_path)
  tensors = read_shards(directory)
  get, read = tensor_reader(directory, tensors)
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
  check_all_read(tensors, read, config, directory)
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
  created = not os.path.exists(directory)
  os.makedirs(directory, exist_ok=True)
  try:
    write_safetensors(os.path.join(directory, 'model.safetensors'),
                      {k: v.astype(dtype) for k, v in hf_tensors(params, config).items()})
    files.write_json(os.path.join(directory, 'config.json'), hf_config(config))
  except BaseException:
    if created:  # a failed save leaves no directory behind
      shutil.rmtree(directory, ignore_errors=True)
    raise
