"""GGUF files (llama.cpp): Llama family and Gemma 3, dequantized with the `gguf` package."""

from __future__ import annotations

import dataclasses
import os
import re


from matquant_jax.ckpts.layouts import GGUF_GEMMA2_NORMS, GGUF_GEMMA3, GGUF_GEMMA3_NORMS, GGUF_LLAMA, check_params, gemma_params, llama_params, tensor_reader, unpermute_rope
from matquant_jax import nn
from matquant_jax.nn import gemma3, llama
from matquant_jax.text import tokenization


def load_gguf(path: str, dtype: str = 'float32'):
  """(config, params, tokenizer) from a GGUF file (architectures 'llama', 'gemma2' and 'gemma3'),
  dequantized to float32."""
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f'GGUF file {path} does not exist')
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError) as e:  # the reader's own errors name no file
    raise ValueError(f'{path}: not a readable GGUF file, truncated or corrupted '
                     f'({type(e).__name__}: {e})') from e
  check_slots(reader, path)
  field = lambda k: reader.fields[k].contents()
  arch = field('general.architecture')
  if arch not in ('llama', 'gemma2', 'gemma3'):
    raise ValueError(f'{path}: unknown GGUF architecture {arch!r}; supported: llama, gemma2, gemma3')
  meta = lambda k, d=None: field(f'{arch}.{k}') if f'{arch}.{k}' in reader.fields else d
  n_heads = meta('attention.head_count')
  tensors = {t.name: t for t in reader.tensors}
  shape = dict(num_layers=meta('block_count'), num_embed=len(field('tokenizer.ggml.tokens')),
               embed_dim=meta('embedding_length'), hidden_dim=meta('feed_forward_length'),
               num_heads=n_heads, num_kv_heads=meta('attention.head_count_kv', n_heads),
               head_dim=meta('attention.key_length'), dtype=dtype)
  if arch == 'gemma3':
    config = gemma3.from_gguf_metadata(shape, meta('attention.sliding_window'),
                                       meta('rope.freq_base', 1_000_000.0), meta('rope.scaling.factor', 1.0),
                                       meta('attention.layer_norm_rms_epsilon', 1e-6))
    config = dataclasses.replace(config, rope_local_base=meta('rope.freq_base_swa', 10_000.0))
  elif arch == 'gemma2':  # llama.cpp's defaults: window 4096, one RoPE base, (D / heads)^-0.5 at 46 layers
    config = nn.TransformerConfig(
        **shape, sliding_window_size=meta('attention.sliding_window', 4096),
        attn_logits_soft_cap=meta('attn_logit_softcapping'), final_logit_softcap=meta('final_logit_softcapping'),
        query_pre_attn_scalar=(shape['embed_dim'] // n_heads)**-0.5 if shape['num_layers'] == 46 else None,
        rope_base=meta('rope.freq_base', 10_000.0), norm_eps=meta('attention.layer_norm_rms_epsilon', 1e-6),
        bos_per_sequence=True)
  else:
    config = llama.llama_config(
        **shape, rope_base=meta('rope.freq_base', 10_000.0),
        norm_eps=meta('attention.layer_norm_rms_epsilon', 1e-5),
        tie_embeddings='output.weight' not in tensors)

  if 'tokenizer.ggml.add_bos_token' in reader.fields:  # trained with BOS opening each sequence
    config = dataclasses.replace(config, bos_per_sequence=bool(field('tokenizer.ggml.add_bos_token')))

  decoded, read = tensor_reader(path, tensors, lambda t: gguf.dequantize(t.data, t.tensor_type))

  def get(name):
    w = decoded(name)
    if arch == 'llama' and re.fullmatch(r'blk\.\d+\.attn_q\.weight', name):
      w = unpermute_rope(w, config.num_heads)
    elif arch == 'llama' and re.fullmatch(r'blk\.\d+\.attn_k\.weight', name):
      w = unpermute_rope(w, config.num_kv_heads)
    return w

  if arch != 'llama':  # half-split RoPE already (llama.cpp's NEOX order): no Q/K permutation
    norms = GGUF_GEMMA3_NORMS if arch == 'gemma3' else GGUF_GEMMA2_NORMS
    params = gemma_params(get, config, GGUF_GEMMA3, norms, norm_shift=-1.0)
  else:
    params = llama_params(get, config, GGUF_LLAMA)
  unread = sorted(set(tensors) - read)
  if unread:  # a larger block_count, biases, adapters, an untied head: refuse rather than drop them
    raise ValueError(f'{path}: {len(unread)} tensors are not part of the {arch} model its metadata '
                     f'describes ({config.num_layers} layers, block_count): {unread[:4]}')
  return config, check_params(params, config, path), tokenization.from_gguf(reader)


def check_slots(reader, path: str) -> None:
  """Each tensor's data fits the space before the next one (or the file's end) with less than one
  alignment of padding: an edited type or shape (F32 -> F16) leaves a gap or an overlap."""
  align = reader.alignment
  ends = sorted((int(t.data_offset), t) for t in reader.tensors)
  size = os.path.getsize(path)
  for i, (offset, t) in enumerate(ends):
    slot = (ends[i + 1][0] if i + 1 < len(ends) else size) - offset
    if not 0 <= slot - int(t.n_bytes) < (align if i + 1 < len(ends) else align + 1):
      raise ValueError(f'{path}: tensor {t.name!r} ({t.tensor_type.name}, shape {list(t.shape)}) needs '
                       f'{int(t.n_bytes)} bytes but the file gives it {slot}: its type or shape was '
                       'edited, or the file is truncated')
