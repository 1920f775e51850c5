"""Parameter checks and the mapping between checkpoint layouts ([out, in] names) and our tree."""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from matquant_jax import nn


Params = Any


def check_params(params: Params, config: nn.TransformerConfig, source: str = 'checkpoint') -> Params:
  """Raises ValueError naming the first missing, unexpected or mis-shaped parameter; casts to float32."""
  want = nn.param_shapes(config)
  got = traverse_util.flatten_dict(params, sep='/')
  for path in sorted(want.keys() | got.keys()):
    if path not in got:
      raise ValueError(f'{source}: parameter {path!r} is missing (expected shape {want[path].shape})')
    if path not in want:
      raise ValueError(f'{source}: unexpected parameter {path!r} with shape {np.shape(got[path])}')
    if tuple(np.shape(got[path])) != want[path].shape:
      raise ValueError(f'{source}: parameter {path!r} has shape {tuple(np.shape(got[path]))}, '
                       f'the config expects {want[path].shape}')
    if not jnp.issubdtype(np.asarray(got[path]).dtype, jnp.floating):
      raise ValueError(f'{source}: parameter {path!r} has dtype {np.asarray(got[path]).dtype}, '
                       'expected a floating type')
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in got.items()}, sep='/')


def tensor_reader(source: str, tensors: Mapping[str, Any], decode=lambda t: t):
  """(get, read): get(name) is tensor `name` decoded to float32, a missing one or one holding
  NaN/Inf an error naming `source` and the tensor; `read` collects the names got, so a loader
  can refuse what it did not read."""
  read = set()

  def get(name):
    if name not in tensors:
      raise ValueError(f'{source}: tensor {name!r} is missing')
    read.add(name)
    w = np.asarray(decode(tensors[name]), np.float32)
    if not np.all(np.isfinite(w)):
      raise ValueError(f'{source}: tensor {name!r} holds {int(np.sum(~np.isfinite(w)))} NaN or infinite values')
    return w
  return get, read


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of Q/K ([heads * head_dim, in], interleaved RoPE) so
  half-split RoPE applies: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...)."""
  out, d_in = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permutation (for writing GGUF-layout test files); inverse of unpermute_rope."""
  out, d_in = w.shape
  return w.reshape(n_heads, 2, out // n_heads // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _attn_from_linear(q, k, v, o, c: nn.TransformerConfig) -> dict:
  """[out, in] projections -> the q/kv/attn_vec (or qkv) einsum weights."""
  n, kh, d, h = c.num_heads, c.num_kv_heads, c.embed_dim, c.head_dim
  heads = lambda w, m: np.asarray(w).reshape(m, h, d).transpose(0, 2, 1)  # [m*h, d] -> [m, d, h]
  out = {'attn_vec_einsum': {'w': np.asarray(o).reshape(d, n, h).transpose(1, 2, 0)}}
  if n == kh:
    out['qkv_einsum'] = {'w': np.stack([heads(q, n), heads(k, kh), heads(v, kh)])}
  else:
    out['q_einsum'] = {'w': heads(q, n)}
    out['kv_einsum'] = {'w': np.stack([heads(k, kh), heads(v, kh)])}
  return out


def _mlp_from_linear(gate, up, down, c: nn.TransformerConfig) -> dict:
  g = np.stack([np.asarray(gate), np.asarray(up)])  # [2, F, D]
  return {'gating_einsum': g if c.transpose_gating_einsum else g.transpose(0, 2, 1),
          'linear': np.asarray(down).T}


def llama_params(get, c: nn.TransformerConfig, names: Mapping[str, str]) -> Params:
  """Our tree from a Llama-family checkpoint; `get(name)` gives a [out, in] array by the
  checkpoint's name, `names` maps our roles to name templates with {i}."""
  p = {'embedder': {'input_embedding': get(names['embed'])}, 'final_norm': {'scale': get(names['norm'])}}
  if not c.tie_embeddings:
    p['embedder']['output_embedding'] = get(names['head'])
  for i in range(c.num_layers):
    n = {k: v.format(i=i) for k, v in names.items()}
    p[f'layer_{i}'] = {
        'attn': _attn_from_linear(get(n['q']), get(n['k']), get(n['v']), get(n['o']), c),
        'mlp': _mlp_from_linear(get(n['gate']), get(n['up']), get(n['down']), c),
        'pre_attention_norm': {'scale': get(n['attn_norm'])},
        'pre_ffw_norm': {'scale': get(n['ffn_norm'])}}
  return p


HF_LLAMA = dict(embed='model.embed_tokens.weight', norm='model.norm.weight', head='lm_head.weight',
                q='model.layers.{i}.self_attn.q_proj.weight', k='model.layers.{i}.self_attn.k_proj.weight',
                v='model.layers.{i}.self_attn.v_proj.weight', o='model.layers.{i}.self_attn.o_proj.weight',
                gate='model.layers.{i}.mlp.gate_proj.weight', up='model.layers.{i}.mlp.up_proj.weight',
                down='model.layers.{i}.mlp.down_proj.weight',
                attn_norm='model.layers.{i}.input_layernorm.weight',
                ffn_norm='model.layers.{i}.post_attention_layernorm.weight')


GGUF_LLAMA = dict(embed='token_embd.weight', norm='output_norm.weight', head='output.weight',
                  q='blk.{i}.attn_q.weight', k='blk.{i}.attn_k.weight', v='blk.{i}.attn_v.weight',
                  o='blk.{i}.attn_output.weight', gate='blk.{i}.ffn_gate.weight',
                  up='blk.{i}.ffn_up.weight', down='blk.{i}.ffn_down.weight',
                  attn_norm='blk.{i}.attn_norm.weight', ffn_norm='blk.{i}.ffn_norm.weight')


HF_GEMMA_NORMS = {'pre_attention_norm': 'model.layers.{i}.input_layernorm.weight',
                  'post_attention_norm': 'model.layers.{i}.post_attention_layernorm.weight',
                  'pre_ffw_norm': 'model.layers.{i}.pre_feedforward_layernorm.weight',
                  'post_ffw_norm': 'model.layers.{i}.post_feedforward_layernorm.weight'}


HF_GEMMA3_NORMS = {**HF_GEMMA_NORMS, 'attn/_query_norm': 'model.layers.{i}.self_attn.q_norm.weight',
                   'attn/_key_norm': 'model.layers.{i}.self_attn.k_norm.weight'}


# llama.cpp's Gemma 3 names; its converter stores every norm weight as 1 + scale.
GGUF_GEMMA3 = {k: GGUF_LLAMA[k] for k in ('embed', 'norm', 'q', 'k', 'v', 'o', 'gate', 'up', 'down')}


GGUF_GEMMA2_NORMS = {'pre_attention_norm': 'blk.{i}.attn_norm.weight',
                     'post_attention_norm': 'blk.{i}.post_attention_norm.weight',
                     'pre_ffw_norm': 'blk.{i}.ffn_norm.weight', 'post_ffw_norm': 'blk.{i}.post_ffw_norm.weight'}


GGUF_GEMMA3_NORMS = {**GGUF_GEMMA2_NORMS,
                     'attn/_query_norm': 'blk.{i}.attn_q_norm.weight',
                     'attn/_key_norm': 'blk.{i}.attn_k_norm.weight'}


def gemma_params(get, c: nn.TransformerConfig, names: Mapping[str, str], norms: Mapping[str, str],
                 norm_shift: float = 0.0) -> Params:
  """Our tree from a Gemma-2/3 checkpoint in [out, in] layout (Hugging Face, GGUF): `names` as in
  llama_params, `norms` maps our block-relative norm paths to name templates. Norm weights are
  stored scale + `-norm_shift` (GGUF: 1 + scale, so norm_shift -1; Hugging Face: scale)."""
  norm = lambda name: {'scale': get(name) + norm_shift}
  p = {'embedder': {'input_embedding': get(names['embed'])}, 'final_norm': norm(names['norm'])}
  for i in range(c.num_layers):
    n = {k: v.format(i=i) for k, v in names.items()}
    layer = {'attn': _attn_from_linear(get(n['q']), get(n['k']), get(n['v']), get(n['o']), c),
             'mlp': _mlp_from_linear(get(n['gate']), get(n['up']), get(n['down']), c)}
    for ours, theirs in norms.items():
      *parents, leaf = ours.split('/')
      node = layer
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = norm(theirs.format(i=i))
    p[f'layer_{i}'] = layer
  return p


def linear_from_params(layer: Params, c: nn.TransformerConfig) -> dict[str, np.ndarray]:
  """Our block params -> [out, in] q, k, v, o, gate, up, down matrices (the inverse of
  `_attn_from_linear` and `_mlp_from_linear`; any array leaves: floats, codes, scales)."""
  a, m = layer['attn'], layer['mlp']
  rows = lambda w: np.asarray(w).transpose(0, 2, 1).reshape(-1, c.embed_dim)  # [m, d, h] -> [m*h, d]
  if 'qkv_einsum' in a:
    q, k, v = (rows(x) for x in np.asarray(a['qkv_einsum']['w']))
  else:
    q = rows(a['q_einsum']['w'])
    k, v = (rows(x) for x in np.asarray(a['kv_einsum']['w']))
  o = np.asarray(a['attn_vec_einsum']['w']).transpose(2, 0, 1).reshape(c.embed_dim, -1)
  g = np.asarray(m['gating_einsum'])
  g = g if c.transpose_gating_einsum else g.transpose(0, 2, 1)  # [2, F, D]
  return dict(q=q, k=k, v=v, o=o, gate=g[0], up=g[1], down=np.asarray(m['linear']).T)


def checkpoint_tensors(params: Params, c: nn.TransformerConfig, names: Mapping[str, str],
                       norms: Mapping[str, str] | None = None, norm_shift: float = 0.0) -> dict[str, np.ndarray]:
  """Checkpoint names -> [out, in] arrays of our tree (the inverse of `llama_params`, or of
  `gemma_params` when `norms` is given: norm weights written as scale + norm_shift)."""
  out = {names['embed']: params['embedder']['input_embedding'],
         names['norm']: np.asarray(params['final_norm']['scale']) + norm_shift}
  if not c.tie_embeddings:
    out[names['head']] = params['embedder']['output_embedding']
  for i in range(c.num_layers):
    layer = params[f'layer_{i}']
    for role, w in linear_from_params(layer, c).items():
      out[names[role].format(i=i)] = w
    flat = traverse_util.flatten_dict(layer, sep='/')
    block_norms = norms or {'pre_attention_norm': names['attn_norm'], 'pre_ffw_norm': names['ffn_norm']}
    for ours, theirs in block_norms.items():
      out[theirs.format(i=i)] = np.asarray(flat[f'{ours}/scale']) + norm_shift
  return {k: np.asarray(v) for k, v in out.items()}
