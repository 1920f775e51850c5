"""Official Gemma JAX checkpoints (orbax, flat or nested layout): read and write."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from flax import traverse_util
import jax
import numpy as np

from matquant_jax import nn
from matquant_jax.ckpts.layouts import check_params
from matquant_jax.text import tokenization

Params = Any


def infer_gemma_config(params: Params, dtype: str) -> nn.TransformerConfig:
  """The official Gemma-2 or Gemma 3 preset whose shapes match; else, for Gemma-2, a config
  read off the shapes (a Gemma 3 tree that matches no preset needs an explicit config)."""
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  for name in nn.presets.GEMMA:
    config = nn.preset(name, dtype=dtype)
    if got.get('embedder/input_embedding') != (config.num_embed, config.embed_dim):
      continue  # (tracing a 27B preset's init for its shapes takes seconds)
    if {k: v.shape for k, v in nn.param_shapes(config).items()} == got:
      return config
  flat = traverse_util.flatten_dict(params, sep='/')
  if 'layer_0/attn/_query_norm/scale' in flat:
    raise ValueError('a Gemma 3 checkpoint whose shapes match no preset '
                     f'({[n for n in nn.presets.GEMMA if n.startswith("gemma3")]}); pass config=')
  vocab, d = np.shape(flat['embedder/input_embedding'])
  layers = len({k.split('/')[0] for k in flat if k.startswith('layer_')})
  f = np.shape(flat['layer_0/mlp/linear'])[0]
  if 'layer_0/attn/qkv_einsum/w' in flat:
    _, n, _, h = np.shape(flat['layer_0/attn/qkv_einsum/w'])
    k = n
  else:
    n, _, h = np.shape(flat['layer_0/attn/q_einsum/w'])
    k = np.shape(flat['layer_0/attn/kv_einsum/w'])[1]
  transposed = np.shape(flat['layer_0/mlp/gating_einsum'])[1] == f and f != d
  return nn.TransformerConfig(num_layers=layers, num_embed=vocab, embed_dim=d, hidden_dim=f,
                                 num_heads=n, head_dim=h, num_kv_heads=k,
                                 transpose_gating_einsum=transposed, dtype=dtype)


def format_gemma_params(raw: Mapping[str, Any]) -> Params:
  """Official layouts -> our nested tree: flat {'transformer/layer_0/mlp/linear': {'w': ...}}
  or nested {'transformer': {...}}; the MLP leaves lose their 'w' key, as in the gemma library.
  Gemma 3's vision tower and its embedder projections are left out (the text model)."""
  flat = {}
  for key, value in traverse_util.flatten_dict(dict(raw), sep='/').items():
    path = key[len('transformer/'):] if key.startswith('transformer/') else key
    if path.startswith(('vision_encoder/', 'embedder/mm_')):
      continue
    path = re.sub(r'(mlp/(gating_einsum|linear))/w$', r'\1', path)
    flat[path] = np.asarray(value)
  return traverse_util.unflatten_dict(flat, sep='/')


def load_gemma_orbax(directory: str, dtype: str = 'float32', config: nn.TransformerConfig | None = None):
  """(config, params, tokenizer) from an official Gemma-2 or Gemma 3 orbax checkpoint directory.

  The tokenizer is the SentencePiece `tokenizer.model` beside or inside the
  directory, if present (None otherwise).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = ocp.PyTreeCheckpointer()
  meta = ckpt.metadata(os.path.abspath(directory))
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one), tree)
  raw = ckpt.restore(os.path.abspath(directory), restore_args=restore_args)
  params = format_gemma_params(raw)
  config = config or infer_gemma_config(params, dtype)
  sp = [p for p in (os.path.join(directory, 'tokenizer.model'),
                    os.path.join(os.path.dirname(os.path.abspath(directory)), 'tokenizer.model'))
        if os.path.exists(p)]
  return config, check_params(params, config, directory), tokenization.from_sentencepiece(sp[0]) if sp else None


def save_gemma_orbax(directory: str, params: Params, layout: str = 'flat') -> None:
  """The official Gemma-2 layouts: 'flat' {'transformer/layer_0/mlp/linear': {'w': ...}, ...}
  or 'nested' {'transformer': {'layer_0': {'mlp': {'linear': {'w': ...}}}}}."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  raw = {}
  for path, v in traverse_util.flatten_dict(params, sep='/').items():
    module, _, leaf = path.rpartition('/')
    if re.search(r'mlp/(gating_einsum|linear)$', path):
      module, leaf = path, 'w'
    raw.setdefault(f'transformer/{module}', {})[leaf] = np.asarray(v)
  if layout == 'nested':
    raw = traverse_util.unflatten_dict(traverse_util.flatten_dict(raw, sep='/'), sep='/')
  elif layout != 'flat':
    raise ValueError(f"layout must be 'flat' or 'nested', got {layout!r}")
  ocp.PyTreeCheckpointer().save(os.path.abspath(directory), raw)
