"""Gemma-2: official shapes via eval_shape, and the forward pass against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import nn, testing
from matquant_jax.core import QuantSpec, quant

# spec section 10 (2B, 9B); 27B from the official config (D 4608, H 36864, 32/16 heads, head dim 128)
SHAPES = {
    'gemma2_2b': dict(layers=26, emb=(256128, 2304), q=(8, 2304, 256), kv=(2, 4, 2304, 256),
                      out=(8, 256, 2304), gating=(2, 2304, 9216), linear=(9216, 2304), norm=(2304,),
                      total=2_614_636_800),
    'gemma2_9b': dict(layers=42, emb=(256128, 3584), q=(16, 3584, 256), kv=(2, 8, 3584, 256),
                      out=(16, 256, 3584), gating=(2, 14336, 3584), linear=(14336, 3584), norm=(3584,),
                      total=9_242_164_736),
    'gemma2_27b': dict(layers=46, emb=(256128, 4608), q=(32, 4608, 128), kv=(2, 16, 4608, 128),
                       out=(32, 128, 4608), gating=(2, 36864, 4608), linear=(36864, 4608), norm=(4608,),
                       total=None),
}


@pytest.mark.parametrize('name', sorted(SHAPES))
def test_official_parameter_shapes(name):
  want = SHAPES[name]
  cfg = getattr(nn.TransformerConfig, name)()
  p = jax.eval_shape(nn.Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert set(p) == {'embedder', 'final_norm'} | {f'layer_{i}' for i in range(want['layers'])}
  assert p['embedder']['input_embedding'].shape == want['emb']
  assert p['final_norm']['scale'].shape == want['norm']
  for i in (0, want['layers'] - 1):
    layer = p[f'layer_{i}']
    assert layer['attn']['q_einsum']['w'].shape == want['q']
    assert layer['attn']['kv_einsum']['w'].shape == want['kv']
    assert layer['attn']['attn_vec_einsum']['w'].shape == want['out']
    assert layer['mlp']['gating_einsum'].shape == want['gating']  # a bare array, no 'w'
    assert layer['mlp']['linear'].shape == want['linear']
    for norm in ('pre_attention_norm', 'post_attention_norm', 'pre_ffw_norm', 'post_ffw_norm'):
      assert layer[norm]['scale'].shape == want['norm']
  if want['total']:
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) == want['total']


def test_published_constants():
  c2, c9 = nn.TransformerConfig.gemma2_2b(), nn.TransformerConfig.gemma2_9b()
  assert c2.attention_types[:2] == (nn.AttentionType.LOCAL_SLIDING, nn.AttentionType.GLOBAL)
  assert (c2.sliding_window_size, c2.attn_logits_soft_cap, c2.final_logit_softcap) == (4096, 50.0, 30.0)
  assert c9.transpose_gating_einsum and not c2.transpose_gating_einsum
  assert nn.TransformerConfig.gemma2_27b().query_scale == pytest.approx(144**-0.5)
  # the embedding normalizer is cast to the activation dtype (bf16: 48.0 for 2B, 59.75 for 9B)
  assert float(jnp.sqrt(2304).astype(jnp.bfloat16)) == 48.0
  assert float(jnp.sqrt(3584).astype(jnp.bfloat16)) == 59.75


def np_forward(p, tokens, c: nn.TransformerConfig, ffn_weights=None):
  """Gemma-2 forward in float64 numpy, written from the spec, independent of the Flax code."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, t = tokens.shape
  pos = np.arange(t)
  def rms(x, s):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * (1 + s)
  def rope(x):
    half = x.shape[-1] // 2
    ang = pos[:, None] / 10000.0 ** (2 * np.arange(half) / x.shape[-1])
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    return np.concatenate([x[..., :half] * cos - x[..., half:] * sin,
                           x[..., half:] * cos + x[..., :half] * sin], -1)
  def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  emb = p['embedder']['input_embedding']
  x = emb[tokens] * np.sqrt(c.embed_dim)
  g = c.num_heads // c.num_kv_heads
  for i in range(c.num_layers):
    lp = p[f'layer_{i}']
    h = rms(x, lp['pre_attention_norm']['scale'])
    q = rope(np.einsum('btd,ndh->btnh', h, lp['attn']['q_einsum']['w'])) * c.head_dim**-0.5
    k, v = np.einsum('btd,ckdh->cbtkh', h, lp['attn']['kv_einsum']['w'])
    k, v = np.repeat(rope(k), g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum('btnh,bsnh->bnts', q, k)
    logits = np.tanh(logits / 50) * 50
    allowed = pos[:, None] >= pos[None, :]
    if i % 2 == 0:  # even layers: sliding window
      allowed &= pos[:, None] - pos[None, :] < c.sliding_window_size
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    a = np.einsum('btnh,nhd->btd', np.einsum('bnts,bsnh->btnh', probs, v), lp['attn']['attn_vec_einsum']['w'])
    x = x + rms(a, lp['post_attention_norm']['scale'])
    f = rms(x, lp['pre_ffw_norm']['scale'])
    wg, wl = (ffn_weights or {}).get(i, (lp['mlp']['gating_einsum'], lp['mlp']['linear']))
    gate = np.einsum('btd,fdh->fbth', f, wg)
    x = x + rms((gelu(gate[0]) * gate[1]) @ wl, lp['post_ffw_norm']['scale'])
  logits = rms(x, p['final_norm']['scale']) @ emb.T
  return np.tanh(logits / 30) * 30


def _tiny(**kw):
  cfg = nn.TransformerConfig.tiny(num_layers=3, **kw)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 1, cfg.num_embed)
  params = testing.init_params(nn.Transformer(cfg))
  # non-zero norm scales so (1 + scale) is exercised
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(path))), x.shape)
      if 'norm' in str(path) else x, params)
  return cfg, params, tokens


def test_forward_matches_numpy_reference():
  cfg, params, tokens = _tiny()
  got = nn.Transformer(cfg).apply({'params': params}, tokens).logits
  np.testing.assert_allclose(got, np_forward(params, np.asarray(tokens), cfg), rtol=2e-4, atol=2e-4)


def test_quantization_off_is_bit_identical():
  cfg, params, tokens = _tiny()
  model = nn.Transformer(cfg)
  ref = model.apply({'params': params}, tokens).logits
  off = model.apply({'params': params}, tokens, spec=QuantSpec(bits=(None,) * cfg.num_layers)).logits
  np.testing.assert_array_equal(ref, off)
  attn_only = model.apply({'params': params}, tokens, spec=QuantSpec(bits=2, targets=())).logits
  np.testing.assert_array_equal(ref, attn_only)


@pytest.mark.parametrize('layer_bits', [(2, 2, 2), (2, None, 8)])
def test_quantized_ffn_and_mixnmatch_match_manual_fake_quant(layer_bits):
  """Per-output-channel axes: gating reduces over D, linear over H; per-layer bits."""
  cfg, params, tokens = _tiny()
  spec = QuantSpec(bits=layer_bits if layer_bits[1] is None else 2)
  got = nn.Transformer(cfg).apply({'params': params}, tokens, spec=spec).logits
  ffn = {}
  for i in range(cfg.num_layers):
    bits = spec.bits_for(i, cfg.num_layers)
    mlp = params[f'layer_{i}']['mlp']
    if bits is not None:
      ffn[i] = (quant.fake_quant(mlp['gating_einsum'], bits, reduce_axes=(1,)),
                quant.fake_quant(mlp['linear'], bits, reduce_axes=(0,)))
  np.testing.assert_allclose(got, np_forward(params, np.asarray(tokens), cfg, ffn), rtol=2e-4, atol=2e-4)
  assert not np.allclose(got, nn.Transformer(cfg).apply({'params': params}, tokens).logits, atol=1e-3)


def test_transposed_gating_quantizes_over_embed_axis():
  cfg, params, tokens = _tiny()
  tcfg = nn.TransformerConfig.tiny(num_layers=3, transpose_gating_einsum=True)
  tparams = jax.tree.map(lambda x: x, params)
  for i in range(3):
    tparams[f'layer_{i}']['mlp']['gating_einsum'] = jnp.swapaxes(params[f'layer_{i}']['mlp']['gating_einsum'], 1, 2)
  for spec in (None, QuantSpec(2)):
    a = nn.Transformer(cfg).apply({'params': params}, tokens, spec=spec).logits
    b = nn.Transformer(tcfg).apply({'params': tparams}, tokens, spec=spec).logits
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_activations_run_close_to_float():
  cfg, params, tokens = _tiny()
  ref = nn.Transformer(cfg).apply({'params': params}, tokens).logits
  bf = nn.Transformer(nn.TransformerConfig.tiny(num_layers=3, dtype='bfloat16')).apply(
      {'params': params}, tokens).logits
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(bf, ref, atol=0.15)


def test_bad_quant_specs():
  with pytest.raises(ValueError, match='bits'):
    QuantSpec(bits=9)
  with pytest.raises(ValueError, match='targets'):
    QuantSpec(bits=4, targets=('mlp',))
  cfg, params, tokens = _tiny()
  with pytest.raises(ValueError, match='per-layer bits has 2 entries for a 3-layer model'):
    nn.Transformer(cfg).apply({'params': params}, tokens, spec=QuantSpec(bits=(2, 4))).logits


def test_one_preset_registry_covers_every_family():
  """Every released architecture by name, its size against an outside count (Gemma-2 2B's from
  spec section 10 above, Gemma-3-270M's model card, the SmolLM2 GGUF's own tensors), and an
  error that lists the names."""
  import gguf  # pylint: disable=g-import-not-at-top
  from matquant_jax import ckpts  # pylint: disable=g-import-not-at-top
  smollm2 = sum(int(t.n_elements) for t in gguf.GGUFReader(ckpts.smollm2_path()).tensors)
  want = {'gemma2_2b': SHAPES['gemma2_2b']['total'], 'gemma3_270m': 268_098_176, 'smollm2_135m': smollm2}
  for name, n in want.items():
    shapes = nn.param_shapes(nn.preset(name))
    assert sum(int(np.prod(s.shape)) for s in shapes.values()) == n, name
  assert nn.preset('gemma3_1b', dtype='bfloat16').dtype == 'bfloat16'
  assert set(nn.presets.GEMMA) < set(nn.PRESETS) and 'smollm2_135m' not in nn.presets.GEMMA
  with pytest.raises(ValueError, match=r"unknown preset 'gemma4'; choose from \['gemma2_27b'"):
    nn.preset('gemma4')
