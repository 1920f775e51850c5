"""A slice of a stored parent as one GGUF file llama.cpp runs (architectures 'llama', 'gemma2',
'gemma3').

Each quantized weight's slice codes go into a ggml block type that holds them exactly, so the
file is the model the project evaluates up to the fp16 rounding of the block constants:
  asymmetric parent, width r: w = (alpha 2^(c-r)) s + (-alpha z), s < 16 -> Q4_1, s < 32 -> Q5_1
    (int4 and the narrower widths in Q4_1, int5 and E.P. int4 in Q5_1), wider -> `wide`
    (Q8_0 re-quantized from the slice, or F16; the added error is in the report);
  symmetric parent (z = 2^(c-1)): w = (alpha 2^(c-r)) (s - 2^(r-1)) -> Q4_0 / Q5_0 / Q8_0.
Block constants must be constant over each block of 32 along a row: the parent's groups must
be a multiple of 32 (or per channel). Optional compact forms: a symmetric int2 in llama.cpp's
Q2_0 (2.25 bits), asymmetric int2 / int4 in Q2_K / Q4_K where rows are multiples of 256
(codes kept, sub-block constants rounded: the one lossy step, measured in the report).
Weights the parent does not quantize are written in `float_type`, norms in F32. Llama's Q/K rows are permuted back to llama.cpp's RoPE order and
Gemma's norms stored as 1 + scale, the inverse of what `load_gguf` undoes.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping

from flax import traverse_util
import numpy as np

from matquant_jax import nn
from matquant_jax.ckpts import ggml_blocks
from matquant_jax.ckpts.layouts import (GGUF_GEMMA2_NORMS, GGUF_GEMMA3, GGUF_GEMMA3_NORMS, GGUF_LLAMA,
                                        checkpoint_tensors, permute_rope)
from matquant_jax.core import packing, quant
from matquant_jax.text import tokenization

# Our quantizable weights -> the [out, in] roles of `layouts.linear_from_params`.
ROLES = {'attn/q_einsum/w': ('q',), 'attn/kv_einsum/w': ('k', 'v'), 'attn/qkv_einsum/w': ('q', 'k', 'v'),
         'attn/attn_vec_einsum/w': ('o',), 'mlp/gating_einsum': ('gate', 'up'), 'mlp/linear': ('down',)}
FLOAT_TYPES = ('F32', 'F16', 'Q8_0')
WIDE_TYPES = ('Q8_0', 'F16')


def architecture(config: nn.TransformerConfig) -> str:
  """'llama', 'gemma2' or 'gemma3', after checking llama.cpp's graph for it is this config's model."""
  def need(cond, what):
    if not cond:
      raise ValueError(f'cannot export to GGUF: {what}')

  def query_scale(family: str, layers_27b: int):
    # llama.cpp derives it: (D / heads)^-0.5 for the 27B layer count, head_dim^-0.5 otherwise
    scale = (config.embed_dim // config.num_heads)**-0.5 if config.num_layers == layers_27b else config.head_dim**-0.5
    need(abs(config.query_scale - scale) < 1e-9 * scale,
         f'llama.cpp scales {family} queries by {scale:.6g} for {config.num_layers} layers, '
         f'this model by {config.query_scale:.6g}')

  if config.norm_plus_one and not config.qk_norm:
    need(config.attention_pattern == 'alternating' and config.post_norms and config.embed_scale
         and config.tie_embeddings and config.ffn_activation == 'gelu_tanh' and config.rope_local_base is None
         and config.rope_global_scale == 1.0,
         'a Gemma-style model that is not Gemma 2 (llama.cpp\'s gemma2 graph)')
    # llama.cpp's gemma2 graph always caps (50 and 30 unless the file says otherwise)
    need(config.attn_logits_soft_cap and config.final_logit_softcap,
         'llama.cpp\'s gemma2 graph always applies both soft caps; this model lacks one')
    query_scale('Gemma 2', 46)
    return 'gemma2'
  if config.qk_norm:
    need(config.attention_pattern == 'gemma3' and config.post_norms and config.norm_plus_one
         and config.embed_scale and config.tie_embeddings and config.ffn_activation == 'gelu_tanh'
         and config.attn_logits_soft_cap is None,
         'a QK-norm model that is not Gemma 3 (llama.cpp\'s gemma3 graph)')
    query_scale('Gemma 3', 62)
    return 'gemma3'
  need(not config.norm_plus_one and not config.post_norms and not config.embed_scale
       and config.ffn_activation == 'silu' and config.attn_logits_soft_cap is None
       and config.final_logit_softcap is None,
       'only the Llama family, Gemma 2 and Gemma 3 are written')
  need(config.attention_pattern == 'global',
       'llama.cpp\'s llama graph has no sliding window (a Mistral-style config)')
  return 'llama'


def _hparams(w, arch: str, c: nn.TransformerConfig, context_length: int) -> None:
  w.add_block_count(c.num_layers)
  w.add_context_length(context_length)
  w.add_embedding_length(c.embed_dim)
  w.add_feed_forward_length(c.hidden_dim)
  w.add_head_count(c.num_heads)
  w.add_head_count_kv(c.num_kv_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_freq_base(c.rope_base)
  w.add_layer_norm_rms_eps(c.norm_eps)
  if arch == 'llama':
    w.add_vocab_size(c.num_embed)
    w.add_rope_dimension_count(c.head_dim)
  elif arch == 'gemma2':
    w.add_sliding_window(c.sliding_window_size)
    w.add_attn_logit_softcapping(c.attn_logits_soft_cap)
    w.add_final_logit_softcapping(c.final_logit_softcap)
  else:
    w.add_sliding_window(c.sliding_window_size)
    w.add_rope_freq_base_swa(c.rope_local_base or 10_000.0)
    if c.rope_global_scale != 1.0:
      import gguf  # pylint: disable=g-import-not-at-top
      w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      w.add_rope_scaling_factor(c.rope_global_scale)
    if c.final_logit_softcap:
      w.add_final_logit_softcapping(c.final_logit_softcap)


def _vocab(w, v: dict, add_bos: bool) -> None:
  w.add_tokenizer_model(v['model'])
  w.add_tokenizer_pre(v['pre'])
  w.add_token_list(v['tokens'])
  w.add_token_types(v['types'])
  if v['scores'] is not None:
    w.add_token_scores(v['scores'])
  if v['merges'] is not None:
    w.add_token_merges(v['merges'])
  for key, add in (('bos', w.add_bos_token_id), ('eos', w.add_eos_token_id), ('unk', w.add_unk_token_id),
                   ('pad', w.add_pad_token_id)):
    if v[key] is not None:
      add(v[key])
  w.add_add_bos_token(add_bos)
  w.add_add_space_prefix(v['add_space_prefix'])


def _add_metadata(w, metadata: Mapping[str, Any]) -> None:
  """Extra key/values (general.*, a chat template): str, bool, int (uint32), float, list of str."""
  for key, value in metadata.items():
    if isinstance(value, bool):
      w.add_bool(key, value)
    elif isinstance(value, int):
      w.add_uint32(key, value)
    elif isinstance(value, float):
      w.add_float32(key, value)
    elif isinstance(value, str):
      w.add_string(key, value)
    elif isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
      w.add_array(key, list(value))
    else:
      raise ValueError(f'metadata {key!r}: a {type(value).__name__} cannot be written (str, bool, '
                       'int, float or a list of str)')


def _slice_arrays(qa: quant.QuantizedArray, bits: int, extra_precision: bool):
  """(slice index s, scale alpha, zero z), each in the weight's own shape: w = alpha (2^(c-r) s - z)."""
  s = np.asarray(qa.sliced_codes(bits, extra_precision)) >> (qa.parent_bits - bits)
  full = lambda x: np.broadcast_to(np.asarray(x, np.float32), qa.codes.shape).reshape(qa.shape)
  return s.reshape(qa.shape), full(qa.scale), full(qa.zero_point)


def _block_constant(x: np.ndarray, name: str, size: int = ggml_blocks.BLOCK) -> np.ndarray:
  """[rows, n] values constant over each block of `size` -> [rows, n / size]; refuses anything else."""
  rows, n = x.shape
  if n % size:
    raise ValueError(f'{name}: rows of {n} weights are not whole {size}-weight GGUF blocks')
  b = x.reshape(rows, n // size, size)
  if not np.all(b == b[..., :1]):
    raise ValueError(f'{name}: the parent\'s scales change inside a {size}-weight GGUF block: its '
                     f'group_size must be a multiple of {size} (or per channel) to be written exactly')
  return b[..., 0]


def _check_symmetric(zero, parent_bits: int, kind: str, name: str) -> None:
  if not np.all(zero == 2**(parent_bits - 1)):
    raise ValueError(f'{name}: {kind} has no offset; only a symmetric parent (QuantSpec(symmetric=True)) '
                     'is written in it exactly')


CENTRED_RANGE = {'Q4_0': (-8, 7), 'Q5_0': (-16, 15), 'Q8_0': (-128, 127)}


def slice_type(bits: int, extra_precision: bool, symmetric: bool, wide: str = 'Q8_0',
               two_bit: str = 'Q4_0') -> str:
  """The ggml type that holds width `bits` of a parent exactly ('wide' for asymmetric widths
  of more than 32 levels, which no offset block type holds: re-quantized or F16).
  two_bit='Q2_0': a symmetric int2 slice in llama.cpp's 2.25-bit Q2_0 rather than Q4_0."""
  levels = 2**bits + (1 if extra_precision else 0)
  if symmetric and bits == 2 and not extra_precision and two_bit == 'Q2_0':
    return 'Q2_0'
  if symmetric:  # centred codes s - 2^(r-1)
    lo, hi = -(2**(bits - 1)), levels - 1 - 2**(bits - 1)
    return next(k for k, (a, b) in CENTRED_RANGE.items() if a <= lo and hi <= b)
  return next((k for k in ('Q4_1', 'Q5_1') if levels <= ggml_blocks.LEVELS[k]), wide)


def encode_slice(kind: str, s, alpha, zero, bits: int, parent_bits: int, name: str) -> np.ndarray:
  """Block bytes of one [out, in] slice (s, alpha, z as `_slice_arrays`) in `kind`."""
  step = alpha * 2.0**(parent_bits - bits)
  if kind in ('Q4_1', 'Q5_1'):
    return ggml_blocks.pack(kind, s, _block_constant(step, name), _block_constant(-alpha * zero, name))
  if kind == 'Q2_0':  # d (q - 1) with q = 3 - s and d = -step: the codes mirrored
    _check_symmetric(zero, parent_bits, kind, name)
    return ggml_blocks.pack(kind, 3 - s, -_block_constant(step, name, ggml_blocks.block(kind)))
  if kind in CENTRED_RANGE:
    _check_symmetric(zero, parent_bits, kind, name)
    return ggml_blocks.pack(kind, s - 2**(bits - 1) + ggml_blocks.CENTRE[kind], _block_constant(step, name))
  raise ValueError(f'{name}: {kind} is not an exact slice type')


K_QUANTS = {2: 'Q2_K', 4: 'Q4_K'}  # the compact K-quant of an asymmetric width


def k_quant(bits: int, extra_precision: bool, s, zero) -> str | None:
  """The K-quant that keeps this slice's codes (only its sub-block constants are rounded), or
  None: width 2 or 4, rows of a multiple of 256 weights, every offset -alpha z <= 0."""
  kind = K_QUANTS.get(bits)
  if kind is None or extra_precision or s.shape[1] % ggml_blocks.QK_K or np.any(zero < 0):
    return None
  return kind


def encode_k(kind: str, s, alpha, zero, bits: int, parent_bits: int, name: str) -> np.ndarray:
  sub = ggml_blocks.K_SUB[kind]
  step = _block_constant(alpha * 2.0**(parent_bits - bits), name, sub)
  return ggml_blocks.pack_k(kind, s, step, _block_constant(alpha * zero, name, sub))


FILE_TYPES = {'F32': 0, 'F16': 1, 'Q4_0': 2, 'Q4_1': 3, 'Q8_0': 7, 'Q5_0': 8, 'Q5_1': 9, 'Q2_K': 10,
              'Q4_K': 15, 'Q2_0': 41}  # LlamaFileType


def _float_tensor(kind: str, x: np.ndarray):
  """(array, raw ggml type or None) of a float tensor written as F32, F16 or re-quantized Q8_0."""
  if kind == 'F32' or x.ndim == 1:  # norms stay F32, as llama.cpp's converters write them
    return np.ascontiguousarray(x, np.float32), None
  if kind == 'F16':
    return np.ascontiguousarray(x, np.float16), None
  if kind != 'Q8_0':
    raise ValueError(f'float_type must be one of {FLOAT_TYPES}, got {kind!r}')
  return ggml_blocks.pack('Q8_0', *ggml_blocks.quantize_q8_0(x)), 'Q8_0'


def export_gguf(path: str, variables, config: nn.TransformerConfig, tokenizer, bits=None, *,
                extra_precision: bool = False, float_type: str = 'F16', wide: str = 'Q8_0',
                two_bit: str = 'Q4_0', k_quants: bool = False, context_length: int = 8192,
                tokenizer_pre: str | None = None,
                metadata: Mapping[str, Any] | None = None, verify: bool = True) -> dict:
  """Writes `variables` at `bits` as one GGUF file at `path` (atomically) and returns a report.

  variables: a stored parent (its quantized weights as `QuantizedArray`s) or float weights
    (then everything is written in float_type: a plain conversion).
  bits: a width, per-layer widths or a plan file (`nn.resolve_spec`); None: the parent's width.
  extra_precision: write the E.P. slice (int2/int3 -> Q4_1, int4 -> Q5_1: exact).
  float_type: weights the parent does not quantize ('F16', 'F32', or 'Q8_0' re-quantized).
  wide: asymmetric widths above 5 bits, which no offset block holds: 'Q8_0' (re-quantized from
    the slice) or 'F16'.
  two_bit: a symmetric parent's int2 slice in 'Q4_0' (4.5 bits on disk, read by every GGUF tool)
    or 'Q2_0' (2.25 bits, blocks of 64: group_size a multiple of 64; only llama.cpp reads it,
    the `gguf` package does not know the type, so `verify` skips those tensors).
  k_quants: asymmetric int2 / int4 slices in Q2_K (2.625 bits) / Q4_K (4.5 bits) where a
    tensor's rows are a multiple of 256 weights: the codes are kept, the sub-block scales and
    offsets rounded to 4 / 6 bits (the added error is in the report); other tensors stay exact.
  context_length: llama.cpp's n_ctx_train (its default context; the weights do not depend on it).
  metadata: extra key/values (general.name, tokenizer.chat_template, ...).
  verify: decode every written tensor with the `gguf` package and report its largest error
    against the project's own weight at this slice.
  Returns {'path', 'bytes', 'tensors': [{name, type, shape, bits_per_weight, max_abs_err,
  rel_err}], 'params_by_type'}.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  arch = architecture(config)
  if two_bit not in ('Q4_0', 'Q2_0'):
    raise ValueError(f"two_bit must be 'Q4_0' or 'Q2_0', got {two_bit!r}")
  if wide not in WIDE_TYPES:
    raise ValueError(f'wide must be one of {WIDE_TYPES}, got {wide!r}')
  if float_type not in FLOAT_TYPES:
    raise ValueError(f'float_type must be one of {FLOAT_TYPES}, got {float_type!r}')
  variables = nn.as_variables(variables)
  extra = sorted(k for k, v in variables.items() if k != 'params' and v)
  if extra:
    raise ValueError(f'cannot export to GGUF: the variables carry {extra} (OmniQuant\'s shift/bias '
                     'or scales outside the weights), which llama.cpp\'s graph has no place for; '
                     'export a parent calibrated without LET shifts (let=False)')
  flat = {p: (v.as_parent() if isinstance(v, packing.ResidentArray) else v)
          for p, v in nn.flat_leaves(variables['params']).items()}
  stored = nn.stored_bits(variables)
  if stored is None and bits is not None:
    raise ValueError(f'bits={bits!r} needs a stored parent: make one first (mq.make_parent)')
  spec = nn.resolve_spec(stored if bits is None else bits, variables, config,
                         extra_precision=extra_precision) if stored else None

  tensors, quantized = slice_tensors(flat, spec, config, arch, extra_precision)
  vocab = tokenization.gguf_vocab(tokenizer, config.num_embed, tokenizer_pre)
  tmp = f'{path}.tmp'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  written, counts = {}, collections.Counter()
  try:
    w = gguf.GGUFWriter(tmp, arch)
    meta = {'general.name': 'matquant', **(metadata or {})}
    _add_metadata(w, {k: v for k, v in meta.items() if k != 'general.architecture'})
    _hparams(w, arch, config, context_length)
    _vocab(w, vocab, config.bos_per_sequence)
    for name, x in tensors['w'].items():
      if name in quantized:
        kind, data = _quantized_tensor(name, tensors, quantized[name], wide, two_bit, k_quants)
      else:
        data, raw = _float_tensor(float_type, x)
        kind = raw or ('F32' if data.dtype == np.float32 else 'F16')
      if kind == 'Q2_0':  # a type gguf 0.19 does not know: logical shape given, bytes as uint16
        w.add_tensor(name, data.view(np.uint16), raw_shape=x.shape, raw_dtype=ggml_blocks.Q2_0_TYPE)
      else:
        w.add_tensor(name, data, raw_dtype=None if kind in ('F32', 'F16') else gguf.GGMLQuantizationType[kind])
      written[name] = kind
      if x.ndim == 2:
        counts[kind] += x.size
    w.add_file_type(FILE_TYPES[counts.most_common(1)[0][0]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  report = {'path': path, 'bytes': os.path.getsize(path), 'params_by_type': dict(counts), 'tensors': []}
  if verify and 'Q2_0' in counts:
    report['unverified'] = 'Q2_0 tensors: the gguf package cannot read them (llama.cpp can)'
  elif verify:
    report['tensors'] = _decode_errors(path, tensors['w'], written)
  return report


def slice_tensors(flat: dict, spec, config: nn.TransformerConfig, arch: str, extra_precision: bool):
  """The file's tensors by GGUF name, in its [out, in] layout: {'w': the weight at its slice
  (floats as they are), 's', 'alpha', 'zero': the slice codes and the parent's constants}, and
  {name: (bits, E.P., symmetric, parent bits)} of the quantized ones."""
  trees = {k: {} for k in ('w', 's', 'alpha', 'zero')}
  quantized = {}
  names, norms, shift = {'llama': (GGUF_LLAMA, None, 0.0), 'gemma2': (GGUF_GEMMA3, GGUF_GEMMA2_NORMS, 1.0),
                         'gemma3': (GGUF_GEMMA3, GGUF_GEMMA3_NORMS, 1.0)}[arch]
  for p, leaf in flat.items():
    if not nn.is_quantized(leaf):
      for t in trees.values():
        t[p] = np.asarray(leaf, np.float32)
      continue
    if leaf.outlier_index is not None:
      raise ValueError(f'{p} keeps {leaf.outlier_index.shape[0]} outliers outside its grid, which no GGUF '
                       'block type can carry; export a parent made without outliers (outliers=0)')
    layer, _, suffix = p.partition('/')
    r = spec.bits_for(int(layer[6:]), config.num_layers) or leaf.parent_bits
    quant.check_slice_grid(leaf, 'msb', r, f'{p}: a GGUF int{r} slice', quant.TOP_BITS_FIX)
    ep = extra_precision and r < leaf.parent_bits
    trees['w'][p] = np.asarray(leaf.dequantize(r, ep))
    trees['s'][p], trees['alpha'][p], trees['zero'][p] = _slice_arrays(leaf, r, ep)
    for role in ROLES[suffix]:
      quantized[names[role].format(i=int(layer[6:]))] = (r, ep, leaf.symmetric, leaf.parent_bits)
  tensors = {k: checkpoint_tensors(traverse_util.unflatten_dict(t, sep='/'), config, names, norms, shift)
             for k, t in trees.items()}
  if arch == 'llama':  # back to llama.cpp's interleaved RoPE order (load_gguf undoes it)
    for i in range(config.num_layers):
      for role, heads in (('attn_q', config.num_heads), ('attn_k', config.num_kv_heads)):
        for t in tensors.values():
          t[f'blk.{i}.{role}.weight'] = permute_rope(t[f'blk.{i}.{role}.weight'], heads)
  return tensors, quantized


def _quantized_tensor(name: str, tensors: dict, how: tuple, wide: str, two_bit: str, k_quants: bool):
  """(ggml type, bytes or float array) of one quantized weight's slice."""
  r, ep, symmetric, c = how
  kind = slice_type(r, ep, symmetric, wide, two_bit)
  args = (tensors['s'][name], tensors['alpha'][name], tensors['zero'][name], r, c)
  compact = k_quant(r, ep, args[0], args[2]) if k_quants and not symmetric else None
  if compact:
    return compact, encode_k(compact, *args, name)
  if kind == 'F16' or (kind == 'Q8_0' and not symmetric):  # no exact block: re-quantized or F16
    return kind, _float_tensor(kind, tensors['w'][name])[0]
  return kind, encode_slice(kind, *args, name)


def _decode_errors(path: str, want: dict, written: dict) -> list[dict]:
  """Each tensor of the file decoded by the `gguf` package against the project's own weight."""
  import gguf  # pylint: disable=g-import-not-at-top
  rows = []
  for t in gguf.GGUFReader(path).tensors:
    x = want[t.name]
    got = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(x.shape)
    err = float(np.max(np.abs(got - x)))
    rows.append(dict(name=t.name, type=written[t.name], shape=tuple(x.shape), max_abs_err=err,
                     rel_err=err / max(float(np.max(np.abs(x))), 1e-30),
                     bits_per_weight=8.0 * int(t.n_bytes) / x.size))
  return rows


def gguf_source_metadata(path: str) -> tuple[dict, int]:
  """(general.* and tokenizer.chat_template key/values, context length) of a source GGUF, to
  carry into an export of a model made from it (what the file is, its licence, its template)."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(path)
  arch = reader.fields['general.architecture'].contents()
  skip = {'general.architecture', 'general.file_type', 'general.quantization_version', 'general.alignment'}
  meta = {k: f.contents() for k, f in reader.fields.items()
          if (k.startswith('general.') and k not in skip) or k == 'tokenizer.chat_template'}
  context = reader.fields.get(f'{arch}.context_length')
  return meta, int(context.contents()) if context else 8192
