"""GPTQ: against round-to-nearest, the identity-Hessian case, brute-force code choice, a tiny model, resume."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import nn, parents, testing
from matquant_jax.algos import gptq
from matquant_jax.core import QuantSpec, losses, quant

LINEAR = nn.WeightInfo('BTH,HD->BTD', (0,), 'ffn', ('mlp', 'embed'))


def _layer(seed=0, n_in=64, n_out=48):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(n_in, n_out)).astype(np.float32)
  x = (rng.normal(size=(512, n_in)) @ rng.normal(size=(n_in, n_in)) * 0.3).astype(np.float32)  # correlated
  return w, x


@pytest.mark.parametrize('bits', [4, 2])
def test_gptq_beats_round_to_nearest_on_a_random_layer(bits):
  w, x = _layer()
  obj, spec = losses.parse_objective(str(bits), None, bits), QuantSpec(bits, parent_bits=bits)
  qa = gptq.quantize_weight(w, jnp.asarray(x.T @ x), LINEAR, obj, spec, gptq.Options())
  rtn = quant.QuantizedArray.from_float(w, bits, (0,))
  err = lambda q: np.linalg.norm(x @ w - x @ np.asarray(q.dequantize()))
  assert err(qa) < 0.85 * err(rtn), (err(qa), err(rtn))  # measured 0.71 (int4), 0.75 (int2)
  assert qa.parent_bits == bits and np.array_equal(np.asarray(qa.scale), np.asarray(rtn.scale))


@pytest.mark.parametrize('group_size', [None, 16])
def test_identity_hessian_is_round_to_nearest(group_size):
  w, _ = _layer(1)
  for bits in (8, 4, 2):
    obj, spec = losses.parse_objective(str(bits), None, bits), QuantSpec(bits, parent_bits=bits, group_size=group_size)
    qa = gptq.quantize_weight(w, jnp.eye(64), LINEAR, obj, spec, gptq.Options(damp=0.0, act_order=True))
    rtn = quant.QuantizedArray.from_float(w, bits, (0,), group_size)
    np.testing.assert_array_equal(np.asarray(qa.codes), np.asarray(rtn.codes))


def test_kept_outliers_in_gptq_are_exact_and_feed_nothing_back():
  """Identity Hessian: round-to-nearest over the non-outliers, the kept weights as they were;
  a correlated Hessian: the kept weights carry GPTQ's updates and lower the output error."""
  w, x = _layer(3)
  w[5, 7], w[40, 2] = 9.0, -8.0
  obj, spec = losses.parse_objective('4', None, 4), QuantSpec(4, parent_bits=4)
  opts = gptq.Options(damp=0.0, outliers=2 / w.size)
  qa = gptq.quantize_weight(w, jnp.eye(64), LINEAR, obj, spec, opts)
  rtn = quant.QuantizedArray.from_float(w, 4, (0,), outliers=2 / w.size)
  np.testing.assert_array_equal(np.asarray(qa.codes), np.asarray(rtn.codes))
  np.testing.assert_array_equal(np.asarray(qa.outlier_index), [5 * 48 + 7, 40 * 48 + 2])
  np.testing.assert_array_equal(np.asarray(qa.outlier_value), np.float16([9.0, -8.0]))
  h = jnp.asarray(x.T @ x)
  kept = gptq.quantize_weight(w, h, LINEAR, obj, spec, gptq.Options(outliers=2 / w.size))
  plain = gptq.quantize_weight(w, h, LINEAR, obj, spec, gptq.Options())
  err = lambda q: np.linalg.norm(x @ w - x @ np.asarray(q.dequantize()))
  assert err(kept) < 0.97 * err(plain), (err(kept), err(plain))  # measured 189 vs 202 (two channels of 48)
  assert not np.array_equal(np.asarray(kept.outlier_value), np.float16([9.0, -8.0]))  # updated by GPTQ


def test_gptq_parent_records_the_slice_grid_it_chose_codes_for():
  w, x = _layer(4)
  obj = losses.parse_objective('8,4,2', (1.0, 1.0, 0.1), 8)
  h = jnp.asarray(x.T @ x)
  for grid in ('msb', 'regrid'):
    qa = gptq.quantize_weight(w, h, LINEAR, obj, QuantSpec(8, slice_grid=grid), gptq.Options())
    assert qa.slice_grid == grid


def test_per_width_feedback_with_a_zero_lambda_is_that_widths_gptq():
  """lambda (1, 0): the int8 stream is plain GPTQ int8 on its own Hessian, whatever the int4
  stream's Hessian and targets do."""
  w, x = _layer(6)
  _, x2 = _layer(7)
  h, h2 = jnp.asarray(x.T @ x), jnp.asarray(x2.T @ x2)
  spec, opts = QuantSpec(8), gptq.Options(feedback='per_width', act_order=False)
  nested = gptq.quantize_weight(w, jnp.stack([h, h2]), LINEAR, losses.parse_objective('8,4', (1.0, 0.0)), spec, opts)
  plain = gptq.quantize_weight(w, h, LINEAR, losses.parse_objective('8'), spec, gptq.Options())
  np.testing.assert_array_equal(np.asarray(nested.codes), np.asarray(plain.codes))


def test_per_width_code_choice_equals_brute_force():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(3, 5)).astype(np.float32)  # a target per width
  scale, zero = np.full(5, 0.02, np.float32), np.full(5, 120.0, np.float32)
  widths, lambdas, d = (8, 4, 2), np.float32([1.0, 0.3, 0.05]), np.float32([0.5, 0.8, 1.3])
  table = gptq.code_table(widths, 8)
  q, resid = gptq.choose_codes(jnp.asarray(w), jnp.asarray(scale), jnp.asarray(zero), jnp.asarray(table),
                               jnp.asarray(lambdas), jnp.asarray(d))
  for j in range(5):
    def err(c, k):
      return w[k, j] - scale[j] * (int(quant.slice_codes(np.array(c), widths[k])) - zero[j])
    best = min(range(256), key=lambda c: sum(lambdas[k] * err(c, k)**2 / d[k]**2 for k in range(3)))
    assert int(q[j]) == best
    np.testing.assert_allclose(np.asarray(resid[:, j]), [err(best, k) for k in range(3)], rtol=1e-5, atol=1e-6)


def test_per_width_feedback_lowers_every_widths_output_error_on_a_random_layer():
  w, x = _layer(5, 128, 64)
  h = jnp.asarray(x.T @ x)
  obj, spec = losses.parse_objective('8,4,2', (1.0, 1.0, 0.01)), QuantSpec(8, slice_grid='regrid')
  err = lambda qa, b: np.linalg.norm(x @ w - x @ np.asarray(qa.dequantize(b, grid='regrid')))
  mean = gptq.quantize_weight(w, h, LINEAR, obj, spec, gptq.Options(act_order=True))
  own = gptq.quantize_weight(w, jnp.stack([h] * 3), LINEAR, obj, spec, gptq.Options(act_order=True, feedback='per_width'))
  for b, ratio in ((8, 0.8), (4, 0.95)):  # measured 0.65 (int8), 0.90 (int4)
    assert err(own, b) < ratio * err(mean, b), (b, err(own, b), err(mean, b))
  with pytest.raises(ValueError, match="feedback must be one of"):
    gptq.Options(feedback='sum')


def test_balanced_width_weights_by_hand():
  np.testing.assert_allclose(gptq.width_weights((8, 4, 2), (1.0, 1.0, 1.0), 8, False), [1 / 3] * 3)
  raw = np.array([1.0, 1 / 256, 1 / 4096])  # lambda / 4^(8 - r)
  np.testing.assert_allclose(gptq.width_weights((8, 4, 2), (1.0, 1.0, 1.0), 8, True), raw / raw.sum(), rtol=1e-6)


def test_matquant_code_choice_equals_brute_force():
  rng = np.random.default_rng(2)
  w = rng.normal(size=7).astype(np.float32)
  scale, zero = np.full(7, 0.02, np.float32), np.full(7, 128.0, np.float32)
  widths, lambdas = (8, 4, 2), (0.1, 0.3, 1.0)
  table = gptq.code_table(widths, 8)
  q, resid = gptq.choose_codes(jnp.asarray(w), jnp.asarray(scale), jnp.asarray(zero), jnp.asarray(table),
                               jnp.asarray(lambdas, jnp.float32))
  for j in range(7):
    def cost(c):
      return sum(l * (w[j] - scale[j] * (int(quant.slice_codes(np.array(c), r)) - zero[j])) ** 2
                 for r, l in zip(widths, lambdas))
    best = min(range(256), key=cost)
    assert int(q[j]) == best
    expect = sum(l * (w[j] - scale[j] * (int(quant.slice_codes(np.array(best), r)) - zero[j]))
                 for r, l in zip(widths, lambdas)) / sum(lambdas)
    np.testing.assert_allclose(float(resid[j]), expect, rtol=1e-5, atol=1e-7)


def test_matrix_layout_round_trips():
  x = jnp.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
  for axes in [(0,), (2,), (0, 1), (1, 2)]:
    m = gptq.as_matrix(x, axes)
    assert m.shape[0] == np.prod([x.shape[a] for a in axes])
    np.testing.assert_array_equal(gptq.from_matrix(m, x.shape, axes), x)


CFG = nn.TransformerConfig.tiny(num_embed=64)


@pytest.fixture(scope='module')
def tiny():
  model = nn.Transformer(CFG)
  tokens = np.random.default_rng(0).integers(4, 64, (16, 12)).astype(np.int32)
  params = testing.init_params(model)
  return model, params, tokens


def _output_error(model, variables, params, tokens, spec):
  return float(jnp.mean((model.apply(variables, tokens, spec=spec).logits - model.apply({'params': params}, tokens).logits) ** 2))


def test_tiny_model_gptq_beats_minmax_and_resumes(tiny, tmp_path, monkeypatch):
  model, params, tokens = tiny
  spec = QuantSpec(4, parent_bits=4, targets=('ffn', 'attn'))
  obj = losses.parse_objective('4', None, 4)
  parent = gptq.calibrate(CFG, params, tokens, obj, spec, gptq.Options(batch_size=4))
  minmax = parents.make_parent(CFG, params, spec)
  assert _output_error(model, parent, params, tokens, None) < 0.8 * _output_error(model, minmax, params, tokens, None)
  # Killed after the first block, then rerun: the same parent as without the interruption.
  calls = itertools.count()
  real = gptq.quantize_weight
  def dies_in_block_two(*a, **k):
    if next(calls) == 6:  # 5 weights per block (q, kv, attn_vec, gating, linear): dies in block 2
      raise KeyboardInterrupt
    return real(*a, **k)
  monkeypatch.setattr(gptq, 'quantize_weight', dies_in_block_two)
  with pytest.raises(KeyboardInterrupt):
    gptq.calibrate(CFG, params, tokens, obj, spec, gptq.Options(batch_size=4), str(tmp_path))
  monkeypatch.setattr(gptq, 'quantize_weight', real)
  resumed = gptq.calibrate(CFG, params, tokens, obj, spec, gptq.Options(batch_size=4), str(tmp_path))
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(parent)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_matquant_gptq_parent_slices(tiny):
  model, params, tokens = tiny
  spec = QuantSpec(8)
  parent = gptq.calibrate(CFG, params, tokens, losses.parse_objective('8,4,2', (1.0, 1.0, 1.0)), spec,
                          gptq.Options(batch_size=4))
  qa = parent['params']['layer_1']['mlp']['linear']
  assert qa.parent_bits == 8 and qa.codes.dtype == jnp.uint8
  minmax = parents.make_parent(CFG, params, spec)
  err = lambda v, b: _output_error(model, v, params, tokens, QuantSpec(b))
  assert err(parent, 2) < err(minmax, 2)  # int2 gains from the nested objective
  own = gptq.calibrate(CFG, params, tokens, losses.parse_objective('8,4,2', (1.0, 1.0, 1.0)), spec,
                       gptq.Options(batch_size=4, feedback='per_width'))  # a Hessian per width's stream
  assert err(own, 2) < err(minmax, 2) and err(own, 8) < err(parent, 8)
  with pytest.raises(ValueError, match='GPTQ takes quantized data widths only'):
    gptq.calibrate(CFG, params, tokens, losses.parse_objective('8,8->2'), spec)
