"""`contract` against jnp.einsum (values and gradients) for every weight of every family, the
model under both contraction modes, and the compiled decode loop: no weight or cache copied."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import nn, parents, testing
from matquant_jax.core import QuantSpec, contract
from matquant_jax.nn import llama
from matquant_jax.testing import hlo
from matquant_jax.text import sampler

FAMILIES = {
    'gemma2 (GQA)': nn.TransformerConfig.tiny(),
    'gemma2 (MHA, stacked qkv)': nn.TransformerConfig.tiny(num_kv_heads=4),
    'gemma3 (transposed gating, QK norm)': nn.TransformerConfig.tiny(
        transpose_gating_einsum=True, qk_norm=True, attention_pattern='gemma3'),
    'llama (GQA)': llama.llama_config(num_layers=2, num_embed=64, embed_dim=32, hidden_dim=64,
                                      num_heads=4, num_kv_heads=2),
    'mistral (one kv head)': llama.llama_config(num_layers=2, num_embed=64, embed_dim=32, hidden_dim=64,
                                                num_heads=4, num_kv_heads=1, sliding_window=3),
}
# float32 sums in a different order: agreement to a few ulps of the largest entry
TOL = dict(rtol=1e-5, atol=1e-5)


def _close(got, want, msg=''):
  """Within 1e-5 of the largest |entry| (sums of up to a few hundred float32 terms)."""
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))), err_msg=msg)


def _x_shape(eqn, w_shape, rows):
  xs, ws = eqn.split('->')[0].split(',')
  size = dict(zip(ws, w_shape))
  return tuple(rows if a in 'BTS' and a not in size else size.get(a, 1) for a in xs)


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('rows', [1, 16])  # decoding (x broadcast) and training (weight transposed)
def test_every_weight_matches_einsum_values_and_gradients(family, rows):
  config = FAMILIES[family]
  shapes = nn.param_shapes(config)
  rng = np.random.default_rng(0)
  for path, info in nn.quantizable_weights(config).items():
    w = jnp.asarray(rng.normal(size=shapes[f'layer_0/{path}'].shape), jnp.float32)
    x = jnp.asarray(rng.normal(size=_x_shape(info.eqn, w.shape, rows)), jnp.float32)
    _close(contract.contract(info.eqn, x, w), jnp.einsum(info.eqn, x, w), path)
    cot = jnp.asarray(rng.normal(size=jnp.einsum(info.eqn, x, w).shape), jnp.float32)
    got = jax.grad(lambda x, w: jnp.sum(cot * contract.contract(info.eqn, x, w)), (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(cot * jnp.einsum(info.eqn, x, w)), (0, 1))(x, w)
    for g, r, name in zip(got, want, ('x', 'w')):
      _close(g, r, f'{path} d{name}')


def test_head_and_other_forms():
  rng = np.random.default_rng(1)
  x, table = jnp.asarray(rng.normal(size=(2, 3, 8))), jnp.asarray(rng.normal(size=(11, 8)))
  np.testing.assert_allclose(contract.contract('BTD,VD->BTV', x, table), x @ table.T, **TOL)
  assert contract._plan('BTD,VD->BTV', 3, 2)[2] is False  # the table is read as [V, D], not transposed
  # forms outside the dot pattern fall back to einsum: a batch axis kept, x contracted first
  y = jnp.asarray(rng.normal(size=(2, 8)))
  assert contract._plan('BD,BD->B', 2, 2) is None
  np.testing.assert_allclose(contract.contract('BD,BD->B', y, y), jnp.sum(y * y, -1), **TOL)
  assert contract._plan('DB,DH->BH', 2, 2) is None


@pytest.mark.parametrize('family', ['gemma2 (MHA, stacked qkv)', 'gemma3 (transposed gating, QK norm)'])
def test_model_logits_and_gradients_match_the_einsum_path(family):
  """The whole model (float, fake-quantized int4 training path, and a stored parent at int2)
  gives the same logits and gradients with `contract` as with plain einsums."""
  config = FAMILIES[family]
  model = nn.Transformer(config)
  params = testing.init_params(model)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, config.num_embed, (2, 12)))
  spec = QuantSpec(4, targets=('ffn', 'attn'))
  stored = nn.as_variables(parents.make_parent(config, params, QuantSpec(8, targets=('ffn', 'attn'))))

  def run(params, stored):
    loss = lambda p: jnp.mean(model.apply({'params': p}, tokens, spec=spec).logits ** 2)
    return (model.apply({'params': params}, tokens).logits, jax.grad(loss)(params),
            model.apply(stored, tokens, spec=QuantSpec(2, targets=('ffn', 'attn'))).logits)

  fn = jax.jit(run)
  got = fn(params, stored)
  with contract.use('einsum'):  # the same jitted function, traced again for this path
    want = fn(params, stored)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(a, b)


# Weights and caches much larger than any decode-step activation, so a copy of either shows.
DECODE = llama.llama_config(num_layers=2, num_embed=128, embed_dim=64, hidden_dim=256, num_heads=4,
                            num_kv_heads=2)
RING = dataclasses.replace(nn.TransformerConfig.tiny(num_embed=128, embed_dim=64, hidden_dim=256,
                                                     head_dim=16, sliding_window_size=8),
                           attention_pattern='gemma3', transpose_gating_einsum=True)


class _Ids:
  bos_id, eos_id = 1, 2
  encode = staticmethod(lambda text: [3 + ord(c) % 100 for c in text])
  decode = staticmethod(lambda ids: ''.join('x' for _ in ids))


def _decode_loop_copies(config, stored: bool, bits=None):
  model = nn.Transformer(config)
  params = testing.init_params(model)
  variables = parents.make_parent(config, params, QuantSpec(8, targets=('ffn', 'attn'))) if stored else params
  s = sampler.Sampler(model, variables, _Ids(), cache_size=128)
  tokens, mask = s.encode(['a prompt'])
  text = s._generate.lower(s.variables, tokens, mask, jnp.int32(4), jax.random.PRNGKey(0),
                           spec=s.spec(bits), sampling=sampler.GREEDY, cache_size=128,
                           eos_id=-1).compile().as_text()
  weights = [np.prod(v.shape) for p, v in nn.param_shapes(config).items() if 'layer_0/' in p and v.ndim > 1]
  kv = config.num_kv_heads * 128 * config.head_dim
  body = hlo.loop_bodies(text)
  assert 'dot(' in body or 'fusion' in body  # the loop body was found
  return hlo.large_copies(body, min(min(weights), kv))


@pytest.mark.parametrize('config,stored,bits', [(DECODE, False, None), (DECODE, True, 4), (RING, True, 2),
                                                (RING, False, None)])
def test_decode_loop_copies_no_weight_and_no_cache(config, stored, bits):
  assert _decode_loop_copies(config, stored, bits) == []


def test_the_copy_check_sees_the_old_einsum_copies():
  """The check can fail: with plain einsums XLA transposes the weights inside the decode loop."""
  with contract.use('einsum'):
    copies = _decode_loop_copies(DECODE, False)
  assert any(op == 'transpose' for op, _, _ in copies), copies
