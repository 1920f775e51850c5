"""GGUF export of parent slices, checked by an implementation independent of the exporter: the
`gguf` package's numpy dequantizer, and our own GGUF loader's forward pass."""

import dataclasses
import functools
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import ckpts, nn, parents, testing
from matquant_jax.ckpts import ggml_blocks, gguf_export
from matquant_jax.core import QuantSpec
from matquant_jax.nn import gemma3, llama
from matquant_jax.text import tokenization

EPS16 = 2.0**-11  # fp16's relative rounding bound

# One set of sizes for every family (the eager ops compile once per shape): rows of 64 (not a
# multiple of 256) and ffn_down's 256 (one: K-quants apply there only).
SIZES = dict(num_layers=2, num_embed=300, embed_dim=64, hidden_dim=256, num_heads=2, head_dim=32,
             num_kv_heads=1)
LLAMA = llama.llama_config(**SIZES, rope_base=10_000.0, tie_embeddings=False)
GEMMA3 = gemma3.gemma3_config(**SIZES, sliding_window=4)
GEMMA2 = nn.TransformerConfig(**SIZES, sliding_window_size=4)  # soft caps, alternating windows
ALL = ('ffn', 'attn')


@pytest.fixture(scope='module')
def bpe():
  """A byte-level BPE tokenizer ('gpt-2' pre-tokenizer in llama.cpp) of 256 bytes + 4 merges."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {t: i for i, t in enumerate(sorted(alphabet))}
  merges = [('Ġ', 't'), ('h', 'e'), ('Ġt', 'he'), ('i', 'n')]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tk = tokenizers.Tokenizer(models.BPE(vocab, merges))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens(['<|end|>'])
  return tokenization.HFTokenizer(tk, bos_id=None, eos_id=len(vocab))


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
  from matquant_jax.data import vocab  # pylint: disable=g-import-not-at-top
  texts = ['To be, or not to be, that is the question:', 'Whether tis nobler in the mind to suffer',
           'The slings and arrows of outrageous fortune,'] * 20
  return tokenization.wrap(vocab.train_or_load(str(tmp_path_factory.mktemp('spm') / 'sp.model'), texts, 290))


@functools.lru_cache(maxsize=None)
def _parent(config, seed=0, targets=ALL, **spec):
  params = testing.init_params(nn.Transformer(config), seed)
  return params, parents.make_parent(config, params, QuantSpec(8, targets=targets, **spec))


@pytest.mark.parametrize('kind', ['Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0'])
def test_block_bytes_decode_with_gguf(kind):
  rng = np.random.default_rng(0)
  lo, hi = (-128, 127) if kind == 'Q8_0' else (0, ggml_blocks.LEVELS[kind] - 1)
  q = rng.integers(lo, hi + 1, (3, 96))
  d, m = rng.normal(size=(3, 3)).astype(np.float32), rng.normal(size=(3, 3)).astype(np.float32)
  raw = ggml_blocks.pack(kind, q, d, m)
  got = gguf.dequantize(raw, gguf.GGMLQuantizationType[kind])
  d16, m16 = (np.repeat(x.astype(np.float16).astype(np.float32), 32, axis=1) for x in (d, m))
  want = d16 * (q - ggml_blocks.CENTRE.get(kind, 0)) + (m16 if kind in ('Q4_1', 'Q5_1') else 0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert raw.nbytes * 8 / q.size == ggml_blocks.bits_per_weight(kind)


@pytest.mark.parametrize('kind,top', [('Q2_K', 15), ('Q4_K', 63)])
def test_k_quant_bytes_decode_with_gguf(kind, top):
  """Sub-block constants on the K-quant grid (d sc, dmin m with d, dmin powers of two): the
  gguf package's decoder gives w = d sc q - dmin m exactly, so the layout is ggml's."""
  rng = np.random.default_rng(2)
  sub = ggml_blocks.K_SUB[kind]
  q = rng.integers(0, ggml_blocks.K_LEVELS[kind], (3, 512))
  sc, m = (rng.integers(0, top + 1, (3, 512 // sub)) for _ in range(2))
  sc[:, ::8] = m[:, ::8] = top  # each super-block's largest constant sets d, dmin
  step, mins = (sc * 2.0**-6).astype(np.float32), (m * 2.0**-5).astype(np.float32)
  got = gguf.dequantize(ggml_blocks.pack_k(kind, q, step, mins), gguf.GGMLQuantizationType[kind])
  np.testing.assert_array_equal(got, np.repeat(step, sub, 1) * q - np.repeat(mins, sub, 1))


def _decoded(path):
  return {t.name: (t.tensor_type.name, np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32))
          for t in gguf.GGUFReader(path).tensors}


def _expected(config, parent, bits, ep=False):
  """Our weights at the slice, in GGUF names and layout (the loader's inverse, by a second route:
  permute_rope on the [out, in] rows of the dequantized tree)."""
  tree = {p: (np.asarray(v.dequantize(bits, ep)) if nn.is_quantized(v) else np.asarray(v))
          for p, v in nn.flat_leaves(parent['params']).items()}
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  tree = traverse_util.unflatten_dict(tree, sep='/')
  if config.qk_norm:
    out = ckpts.checkpoint_tensors(tree, config, ckpts.GGUF_GEMMA3, ckpts.GGUF_GEMMA3_NORMS, 1.0)
  else:
    out = ckpts.checkpoint_tensors(tree, config, ckpts.GGUF_LLAMA)
    for i in range(config.num_layers):
      for n, h in (('q', config.num_heads), ('k', config.num_kv_heads)):
        name = f'blk.{i}.attn_{n}.weight'
        out[name] = ckpts.permute_rope(out[name], h)
  return out


# forward: also load the file back and compare logits (the slow part: a few cases)
@pytest.mark.parametrize('bits,symmetric,ep,want,forward', [
    (4, False, False, 'Q4_1', True), (2, False, False, 'Q4_1', False), (3, False, True, 'Q4_1', False),
    (4, False, True, 'Q5_1', True), (5, False, False, 'Q5_1', False), (8, True, False, 'Q8_0', False),
    (4, True, False, 'Q4_0', False), (2, True, False, 'Q4_0', True)])
def test_llama_slice_is_exact_and_loads_back(bits, symmetric, ep, want, forward, bpe, tmp_path):
  params, parent = _parent(LLAMA, group_size=32, symmetric=symmetric)
  path = str(tmp_path / 'm.gguf')
  report = ckpts.export_gguf(path, parent, LLAMA, bpe, bits, extra_precision=ep)
  assert os.listdir(tmp_path) == ['m.gguf']
  got, want_w = _decoded(path), _expected(LLAMA, parent, bits, ep)
  assert sorted(got) == sorted(want_w)
  quantized = [n for n in got if n.startswith('blk.') and not n.endswith('norm.weight')]
  assert len(quantized) == 14 and {got[n][0] for n in quantized} == {want}
  for name, (kind, x) in got.items():
    ref = want_w[name]
    if name in quantized:
      # w = d q + m with d, m rounded to fp16: |error| <= 2^-11 (|d q| + |m|) <= 2^-11 * 2 max|w|
      # per block; checked per tensor against the largest |w|
      assert np.max(np.abs(x - ref)) <= EPS16 * 2.02 * np.max(np.abs(ref)), name
    elif kind == 'F32':
      np.testing.assert_array_equal(x, ref)
    else:  # F16 embeddings
      np.testing.assert_allclose(x, ref, rtol=EPS16, atol=1e-7)
  assert max(r['rel_err'] for r in report['tensors']) <= EPS16 * 2.02
  if not forward:
    return
  model, variables, tok = ckpts.load(path)
  assert dataclasses.replace(model.config, norm_eps=LLAMA.norm_eps) == LLAMA  # eps stored as float32
  back, ours = tokenization.gguf_vocab(tok, 300), tokenization.gguf_vocab(bpe, 300)
  assert back['tokens'] == ours['tokens'] and back['merges'] == ours['merges'] and back['pre'] == 'gpt-2'
  assert tok.encode('the thin end<|end|>') == bpe.encode('the thin end<|end|>')
  ids = jnp.asarray([[5, 17, 200, 3, 260, 9, 44, 1]])
  spec = nn.resolve_spec(bits, parent, LLAMA, extra_precision=ep)
  a = nn.Transformer(LLAMA).apply(parent, ids, spec=spec).logits
  b = model.apply(variables, ids).logits
  # weights within 2^-10 of their largest |w| (fp16 block constants, F16 embeddings), through two
  # layers and the head: 1e-2 of the logits' scale (a wrong Q/K order or norm moves them by O(1))
  np.testing.assert_allclose(b, a, atol=1e-2 * float(jnp.max(jnp.abs(a))))


def test_gemma3_int4_round_trip_and_norms(spm, tmp_path):
  params, parent = _parent(GEMMA3, seed=1, group_size=32)
  path = str(tmp_path / 'g.gguf')
  ckpts.export_gguf(path, parent, GEMMA3, spm, 4, float_type='F32')
  got = _decoded(path)
  np.testing.assert_array_equal(got['blk.0.attn_q_norm.weight'][1],
                                np.asarray(params['layer_0']['attn']['_query_norm']['scale']) + 1)
  model, variables, tok = ckpts.load(path)
  assert dataclasses.replace(model.config, norm_eps=GEMMA3.norm_eps) == GEMMA3
  assert tok.encode('To be, or not') == spm.encode('To be, or not')
  ids = jnp.asarray([[2, 17, 100, 3, 60, 9, 44, 1]])
  a = nn.Transformer(GEMMA3).apply(parent, ids, spec=nn.resolve_spec(4, parent, GEMMA3)).logits
  b = model.apply(variables, ids).logits
  np.testing.assert_allclose(b, a, atol=1e-2 * float(jnp.max(jnp.abs(a))))


def test_gemma2_per_channel_round_trip(spm, tmp_path):
  config = GEMMA2
  _, parent = _parent(config, seed=2)
  path = str(tmp_path / 'g2.gguf')
  ckpts.export_gguf(path, parent, config, spm, 4)
  model, variables, _ = ckpts.load(path)
  assert dataclasses.replace(model.config, norm_eps=config.norm_eps) == config
  ids = jnp.asarray([[2, 17, 100, 3, 60, 9, 44, 1]])
  a = nn.Transformer(config).apply(parent, ids, spec=nn.resolve_spec(4, parent, config)).logits
  b = model.apply(variables, ids).logits
  np.testing.assert_allclose(b, a, atol=1e-2 * float(jnp.max(jnp.abs(a))))


def test_plan_gives_per_layer_types(bpe, tmp_path):
  _, parent = _parent(LLAMA, group_size=32)
  report = ckpts.export_gguf(str(tmp_path / 'p.gguf'), parent, LLAMA, bpe, (8, 2), wide='F16')
  types = {r['name']: r['type'] for r in report['tensors']}
  assert types['blk.0.ffn_down.weight'] == 'F16' and types['blk.1.ffn_down.weight'] == 'Q4_1'
  assert types['blk.0.attn_k.weight'] == 'F16' and types['blk.1.attn_output.weight'] == 'Q4_1'
  assert types['token_embd.weight'] == 'F16' and types['blk.0.attn_norm.weight'] == 'F32'


def test_per_channel_parent_and_q8_requantized(bpe, tmp_path):
  _, parent = _parent(LLAMA)  # one scale per output channel: constant over every block
  report = ckpts.export_gguf(str(tmp_path / 'c.gguf'), parent, LLAMA, bpe, 8, float_type='Q8_0')
  by = {r['name']: r for r in report['tensors']}
  assert by['blk.0.ffn_up.weight']['type'] == 'Q8_0' and by['output.weight']['type'] == 'Q8_0'
  # re-quantized to Q8_0: within half a Q8_0 step (max|w| / 127 / 2) plus fp16 rounding
  assert 0 < by['blk.0.ffn_up.weight']['rel_err'] <= 0.5 / 127 + 2 * EPS16


def test_vocab_round_trips_smollm2_gguf():
  reader = gguf.GGUFReader(ckpts.smollm2_path())
  field = lambda k: reader.fields[k].contents()
  v = tokenization.gguf_vocab(tokenization.from_gguf(reader), 49152)
  assert v['pre'] == 'smollm' and v['tokens'] == field('tokenizer.ggml.tokens')
  assert v['types'] == field('tokenizer.ggml.token_type') and v['merges'] == field('tokenizer.ggml.merges')


def test_bad_requests_name_the_problem(bpe, tmp_path):
  path = str(tmp_path / 'x.gguf')
  _, parent = _parent(LLAMA, targets=('ffn',), group_size=16)
  with pytest.raises(ValueError, match='group_size must be a multiple of 32'):
    ckpts.export_gguf(path, parent, LLAMA, bpe, 4)
  assert os.listdir(tmp_path) == []  # nothing half-written
  params, parent = _parent(LLAMA, group_size=32)
  with pytest.raises(ValueError, match='needs a stored parent'):
    ckpts.export_gguf(path, params, LLAMA, bpe, 4)
  with pytest.raises(ValueError, match="OmniQuant's shift/bias"):
    ckpts.export_gguf(path, {**parent, 'quant': {'x': 1}}, LLAMA, bpe, 4)
  with pytest.raises(ValueError, match='no sliding window'):
    ckpts.export_gguf(path, parent, llama.llama_config(**SIZES, sliding_window=8), bpe, 4)
  with pytest.raises(ValueError, match='not Gemma 2'):
    ckpts.export_gguf(path, parent, nn.TransformerConfig.tiny(attention_pattern='global'), bpe, 4)
  with pytest.raises(ValueError, match='float_type must be one of'):
    ckpts.export_gguf(path, parent, LLAMA, bpe, 4, float_type='Q4_0')
  with pytest.raises(ValueError, match='bits=9'):
    ckpts.export_gguf(path, parent, LLAMA, bpe, 9)
  with pytest.raises(ValueError, match='the model embeds only 100'):
    tokenization.gguf_vocab(bpe, 100)
  assert os.listdir(tmp_path) == []
  assert gguf_export.slice_type(2, True, True) == 'Q4_0' and gguf_export.slice_type(6, False, True) == 'Q8_0'



def test_q2_0_bytes_follow_ggml_reference():
  """Q2_0 (newer than the gguf package): decoded by a transcription of ggml-quants.c's
  dequantize_row_q2_0: y = ((qs[j / 4] >> 2 (j % 4)) & 3) - 1) * d."""
  rng = np.random.default_rng(1)
  q, d = rng.integers(0, 4, (2, 128)), rng.normal(size=(2, 2)).astype(np.float32)
  raw = ggml_blocks.pack('Q2_0', q, d).reshape(2, 2, 18)
  d16 = raw[..., :2].copy().view('<f2')[..., 0].astype(np.float32)
  qs = raw[..., 2:]
  j = np.arange(64)
  got = ((((qs[..., j // 4] >> (2 * (j % 4))) & 3).astype(np.int32) - 1) * d16[..., None]).reshape(2, 128)
  np.testing.assert_array_equal(got, (q - 1) * np.repeat(d.astype(np.float16).astype(np.float32), 64, axis=1))
  assert ggml_blocks.bits_per_weight('Q2_0') == 2.25


def test_symmetric_int2_as_q2_0_needs_blocks_of_64(bpe, tmp_path):
  _, parent = _parent(LLAMA, group_size=32, symmetric=True)
  with pytest.raises(ValueError, match='multiple of 64'):
    ckpts.export_gguf(str(tmp_path / 'a.gguf'), parent, LLAMA, bpe, 2, two_bit='Q2_0')
  _, parent = _parent(LLAMA, targets=('ffn',), symmetric=True)  # per channel: 64-blocks are constant
  report = ckpts.export_gguf(str(tmp_path / 'b.gguf'), parent, LLAMA, bpe, 2, two_bit='Q2_0')
  assert report['params_by_type']['Q2_0'] == 2 * 3 * 64 * 256 and 'unverified' in report


def test_k_quants_keep_the_codes_where_rows_allow(bpe, tmp_path):
  """Rows of 256 (ffn_down's input): Q4_K / Q2_K with the slice's codes, only the sub-block
  constants rounded; 64-wide rows stay exact Q4_1."""
  config = LLAMA
  _, parent = _parent(config, targets=('ffn',), group_size=32)
  for bits, kind in ((4, 'Q4_K'), (2, 'Q2_K')):
    path = str(tmp_path / f'k{bits}.gguf')
    report = ckpts.export_gguf(path, parent, config, bpe, bits, k_quants=True)
    by = {r['name']: r for r in report['tensors']}
    assert by['blk.0.ffn_down.weight']['type'] == kind and by['blk.0.ffn_up.weight']['type'] == 'Q4_1'
    got, want = _decoded(path), _expected(config, parent, bits)
    assert np.max(np.abs(got['blk.1.ffn_up.weight'][1] - want['blk.1.ffn_up.weight'])) <= \
        EPS16 * 2.02 * np.max(np.abs(want['blk.1.ffn_up.weight']))
    # the K-quant's codes are the slice's: its error is at most half a sub-block scale step
    # (1/30 of the super-block's largest step for 4-bit, 1/126 for 6-bit) times the code, plus the
    # same for the offset
    x, ref = got['blk.1.ffn_down.weight'][1], want['blk.1.ffn_down.weight']
    assert 0 < by['blk.1.ffn_down.weight']['rel_err'] < (0.07 if bits == 2 else 0.02)
    assert np.max(np.abs(x - ref)) == pytest.approx(by['blk.1.ffn_down.weight']['max_abs_err'])
