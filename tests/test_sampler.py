"""KV-cache decoding against full forward passes, per-call precision, padding, sampling, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import nn, parents, testing
from matquant_jax.core import QuantSpec, plans
from matquant_jax.nn import llama, sharding
from matquant_jax.text import sampler

# Window 3 < prompt + generated length, so local layers mask past the window. An untied
# random head gives varied greedy continuations (a tied one mostly repeats the last token).
CFG = nn.TransformerConfig.tiny(num_embed=64, sliding_window_size=3, tie_embeddings=False)
EOS = 1


class CharTokenizer:
  """Characters to ids 4..63 (0 pad, 1 EOS, 2 BOS)."""
  bos_id, eos_id = 2, EOS

  def encode(self, text):
    return [4 + ord(c) % 60 for c in text]

  def decode(self, ids):
    return ''.join(chr(ord('a') + i % 26) for i in ids)


@pytest.fixture(scope='module')
def tiny():
  model = nn.Transformer(CFG)
  params = testing.init_params(model)
  return model, params


def _greedy_reference(model, variables, prompt_ids, n, spec=None, eos=EOS):
  """Greedy tokens by full forward passes without a cache (stops at EOS)."""
  forward = jax.jit(lambda v, t: model.apply(v, t, spec=spec).logits)
  seq, out = list(prompt_ids), []
  width = len(seq) + n  # one shape: causal attention ignores the zeros after the sequence
  for _ in range(n):
    t = int(jnp.argmax(forward(variables, jnp.asarray([seq + [0] * (width - len(seq))]))[0, len(seq) - 1]))
    if t == eos:
      break
    out.append(t)
    seq.append(t)
  return out


def test_cached_logits_match_full_forward_past_the_window(tiny):
  model, params = tiny
  rng = np.random.default_rng(0)
  seq = rng.integers(4, 64, 14)
  prompt, pad = 5, 3
  tokens = np.concatenate([np.zeros(pad, int), seq[:prompt]])[None]
  mask = np.arange(pad + prompt)[None] >= pad
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  cache = nn.init_cache(CFG, 1, 24)
  output = model.apply({'params': params}, jnp.asarray(tokens), jnp.asarray(positions), cache=cache,
                              input_mask=jnp.asarray(mask))
  logits, cache = output.logits, output.cache
  got = [logits[0, -1]]
  for i in range(prompt, len(seq) - 1):
    output = model.apply({'params': params}, jnp.asarray([[seq[i]]]), jnp.asarray([[i]]), cache=cache,
                              input_mask=jnp.ones((1, 1), bool))
    step, cache = output.logits, output.cache
    got.append(step[0, -1])
  full = model.apply({'params': params}, jnp.asarray(seq[None, :-1])).logits[0, prompt - 1:]
  np.testing.assert_allclose(np.stack(got), np.asarray(full), atol=1e-5)



@pytest.mark.parametrize('chunk', [1, 2, 5])  # one slot in place; a wrapping scatter; more than the window
def test_ring_cache_of_the_window_matches_full_forward(tiny, chunk):
  """Sliding-window layers keep a ring of `window` slots (the global ones all 24); feeding the
  sequence `chunk` tokens at a time gives the full forward's logits."""
  model, params = tiny
  cache = nn.init_cache(CFG, 1, 24)
  kinds = CFG.attention_types
  assert nn.cache.ring_size(CFG, 24) == CFG.sliding_window_size == 3
  for i, kind in enumerate(kinds):
    slots = 3 if kind == nn.AttentionType.LOCAL_SLIDING else 24
    assert cache[f'layer_{i}']['k'].shape == (CFG.num_kv_heads, slots, CFG.head_dim)
  seq = np.random.default_rng(3).integers(4, 64, 13)
  got, apply = [], jax.jit(model.apply)
  for start in range(0, len(seq), chunk):
    ids = seq[start:start + chunk]
    out = apply({'params': params}, jnp.asarray(ids[None]), jnp.arange(start, start + len(ids))[None],
                cache=cache, input_mask=jnp.ones((1, len(ids)), bool))
    got.append(out.logits[0])
    cache = out.cache
  full = model.apply({'params': params}, jnp.asarray(seq[None])).logits[0]
  np.testing.assert_allclose(np.concatenate(got), np.asarray(full), atol=1e-5)


OTHER_FAMILIES = {
    'llama (global, no soft caps)': llama.llama_config(num_layers=2, num_embed=64, embed_dim=32,
                                                       hidden_dim=64, num_heads=4, num_kv_heads=2),
    'mistral (window 3 on every layer)': llama.llama_config(num_layers=2, num_embed=64, embed_dim=32,
                                                            hidden_dim=64, num_heads=4, num_kv_heads=1,
                                                            sliding_window=3),
    'gemma2 MHA, transposed gating': dataclasses.replace(CFG, num_kv_heads=4, transpose_gating_einsum=True),
}


@pytest.mark.parametrize('family', [None] + list(OTHER_FAMILIES))
def test_greedy_sampling_equals_argmax_of_full_forward(tiny, family):
  model, params = tiny
  if family is not None:
    model = nn.Transformer(OTHER_FAMILIES[family])
    params = testing.init_params(model, 2)
    params = jax.tree.map(lambda w: 4 * w, params)  # sharper logits: varied greedy continuations
  s = sampler.Sampler(model, params, CharTokenizer(), cache_size=48)
  for bits in (None, 4):
    outs = s.sample(['the quick fox', 'hi'], 12, bits=bits)
    for out, prompt in zip(outs, ['the quick fox', 'hi']):
      ids = [CharTokenizer.bos_id] + CharTokenizer().encode(prompt)
      assert out.tokens == _greedy_reference(model, {'params': params}, ids, 12, s.spec(bits))
      assert out.text == CharTokenizer().decode(out.tokens)
  assert len(set(outs[0].tokens)) > 2  # not a degenerate repetition


def test_resident_parent_equals_fake_quant_and_switches_per_call(tiny):
  model, params = tiny
  stored = parents.make_parent(CFG, params, QuantSpec(8, targets=('ffn', 'attn')))
  spec = lambda b: QuantSpec(b, targets=('ffn', 'attn'))
  live = sampler.Sampler(model, params, CharTokenizer(), cache_size=48)
  resident = sampler.Sampler(model, stored, CharTokenizer(), cache_size=48)
  assert resident.spec(4).targets == ('ffn', 'attn') and resident.spec(4).parent_bits == 8
  prompts = ['to be or not', 'brevity is the soul']
  nucleus = sampler.Sampling(temperature=0.8, top_k=20, top_p=0.9)
  calls = [(8, sampler.GREEDY), (2, sampler.GREEDY), ((2, 8), sampler.GREEDY), (4, nucleus),
           (2, sampler.GREEDY)]
  switched = [resident.sample(prompts, 10, bits=b, sampling=m, rng=7) for b, m in calls]
  for (b, m), got in zip(calls, switched):
    fake = live.sample(prompts, 10, bits=spec(b), sampling=m, rng=7)
    assert [o.tokens for o in got] == [o.tokens for o in fake], b
  # switching leaves nothing behind: int2 after three other precisions, and a fresh sampler's
  # first call at the mixture, give what the same call gave before
  assert [o.tokens for o in switched[4]] == [o.tokens for o in switched[1]]
  fresh = sampler.Sampler(model, stored, CharTokenizer(), cache_size=48).sample(prompts, 10, bits=(2, 8), rng=7)
  assert [o.tokens for o in fresh] == [o.tokens for o in switched[2]]
  assert [o.tokens for o in switched[0]] != [o.tokens for o in switched[1]]  # int8 and int2 differ
  assert resident._generate._cache_size() == 4  # one compilation per distinct precision


def test_plan_file_and_packed_export_serve_the_same_tokens(tiny, tmp_path):
  model, params = tiny
  stored = parents.make_parent(CFG, params, QuantSpec(8))
  plan = str(tmp_path / 'plan.json')
  plans.save(plan, [2, 4], note='test')
  s = sampler.Sampler(model, stored, CharTokenizer(), cache_size=48)
  want = [o.tokens for o in s.sample(['all the world'], 8, bits=(2, 4))]
  assert [o.tokens for o in s.sample(['all the world'], 8, bits=plan)] == want
  parents.export(str(tmp_path / 'packed'), stored, CFG, None, plan)
  m2, v2, _ = parents.load(str(tmp_path / 'packed'))
  assert [o.tokens for o in sampler.Sampler(m2, v2, CharTokenizer(), 48).sample(['all the world'], 8)] == want


def test_padded_prompt_gives_the_same_tokens_as_alone(tiny):
  model, params = tiny
  s = sampler.Sampler(model, params, CharTokenizer(), cache_size=64)
  short, long = 'ab', 'a much longer prompt than the other one'
  batch = s.sample([long, short], 10)
  assert batch[1].tokens == s.sample([short], 10)[0].tokens
  assert batch[0].tokens == s.sample([long], 10)[0].tokens


def test_sampling_filters_match_numpy():
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
  draws = lambda m, n=4000: np.asarray(jax.vmap(lambda k: sampler.sample_logits(logits, k, m)[0])(
      jax.random.split(jax.random.PRNGKey(0), n)))
  p = np.exp(np.asarray(logits[0]) / 0.7)
  p /= p.sum()
  freq = np.bincount(draws(sampler.Sampling(temperature=0.7)), minlength=6) / 4000
  np.testing.assert_allclose(freq, p, atol=0.03)
  assert set(draws(sampler.Sampling(temperature=1.0, top_k=2))) == {0, 1}
  q = np.exp(np.asarray(logits[0]))
  q /= q.sum()  # cumulative 0.56, 0.77, 0.90: top_p=0.8 keeps the first three
  assert set(draws(sampler.Sampling(temperature=1.0, top_p=0.8))) == {0, 1, 2}
  assert int(sampler.sample_logits(logits, jax.random.PRNGKey(1), sampler.GREEDY)[0]) == 0


def test_stops_at_eos_per_row(tiny):
  model, params = tiny
  s = sampler.Sampler(model, params, CharTokenizer(), cache_size=48)
  first = s.sample(['stop here'], 1)[0].tokens[0]
  class StopTokenizer(CharTokenizer):
    eos_id = first
  stopped = sampler.Sampler(model, params, StopTokenizer(), cache_size=48).sample(['stop here', 'go on'], 6)
  assert stopped[0].tokens == [] and len(stopped[1].tokens) >= 1


def test_bad_input_is_a_clear_error(tiny, tmp_path):
  model, params = tiny
  stored = parents.make_parent(CFG, params, QuantSpec(8))
  s = sampler.Sampler(model, stored, CharTokenizer(), cache_size=48)
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    s.sample(['ok', ''], 4)
  with pytest.raises(ValueError, match='non-empty list'):
    s.sample('a string', 4)
  with pytest.raises(ValueError, match='max_new_tokens must be a non-negative'):
    s.sample(['ok'], -1)
  with pytest.raises(ValueError, match=r'bits=9: the stored parent .* give widths 1..8'):
    s.sample(['ok'], 4, bits=9)
  with pytest.raises(ValueError, match='3 layer widths for a 2-layer model'):
    s.sample(['ok'], 4, bits=(2, 4, 8))
  plans.save(str(tmp_path / 'p.json'), [4])
  with pytest.raises(ValueError, match='1 layer widths for a 2-layer model'):
    s.sample(['ok'], 4, bits=str(tmp_path / 'p.json'))
  with pytest.raises(ValueError, match=r'prompt \(16 tokens, padded\) \+ max_new_tokens \(33\) exceeds'):
    s.sample(['ok'], 33)
  parents.export(str(tmp_path / 'int4'), stored, CFG, None, 4)
  m4, v4, _ = parents.load(str(tmp_path / 'int4'))
  with pytest.raises(ValueError, match=r'bits=8: the stored parent \(its narrowest weight has 4 bits\) give widths 1..4'):
    sampler.Sampler(m4, v4, CharTokenizer()).sample(['ok'], 2, bits=8)
  for bad in (-1, float('nan'), float('inf')):
    with pytest.raises(ValueError, match='temperature must be a finite number >= 0'):
      sampler.Sampling(temperature=bad)
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match='top_k must be an integer >= 1'):
      sampler.Sampling(temperature=1.0, top_k=bad)
  with pytest.raises(ValueError, match=r'top_p must be in \(0, 1\]'):
    sampler.Sampling(temperature=1.0, top_p=float('nan'))
  assert sampler.Sampling(temperature=1.0, top_k=np.int64(3)).top_k == 3
  assert s.sample(['ok'], 2, bits=np.int64(4)) == s.sample(['ok'], 2, bits=4)  # numpy ints accepted

  class Silent(CharTokenizer):
    bos_id = None
    encode = staticmethod(lambda text: [])
  with pytest.raises(ValueError, match=r"prompt 0 \('zzz'\) tokenizes to no tokens"):
    sampler.Sampler(model, stored, Silent()).sample(['zzz'], 2)


def test_sharded_parent_samples_like_one_device(tiny):
  model, params = tiny
  stored = parents.make_parent(CFG, params, QuantSpec(8, targets=('ffn', 'attn')))
  one = sampler.Sampler(model, stored, CharTokenizer(), cache_size=48).sample(['sharded', 'x'], 8, bits=4)
  mesh = sharding.make_mesh(sharding.mesh_config(2, 2, 2))
  p = stored['params']
  placed = {'params': jax.device_put(p, sharding.model_shardings(CFG, p, mesh, sharding.DEFAULT_RULES))}
  w = placed['params']['layer_0']['mlp']['gating_einsum'].codes
  assert len(w.sharding.device_set) == 8 and w.addressable_shards[0].data.shape != w.shape
  got = sampler.Sampler(model, placed, CharTokenizer(), cache_size=48).sample(['sharded', 'x'], 8, bits=4)
  assert [o.tokens for o in got] == [o.tokens for o in one]


@pytest.mark.slow
def test_smollm2_cached_greedy_matches_full_forward(smollm2):
  model, variables, tokenizer = smollm2
  s = sampler.Sampler(model, variables, tokenizer, cache_size=48)
  prompt = 'To be, or not to be, that is the'
  out = s.sample([prompt], 4)[0]
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt) if tokenizer.bos_id is not None else tokenizer.encode(prompt)
  assert out.tokens == _greedy_reference(model, variables, ids, 4, eos=tokenizer.eos_id)
  assert out.text.strip()
