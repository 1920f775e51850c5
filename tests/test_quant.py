"""Quantizer numerics against integer formulas, hand-worked examples and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.core import QuantSpec, quant


def ref_slice(q: int, r: int, c: int = 8, clamp: bool = True) -> int:
  """S(q, r) by the spec's arithmetic definition, in plain Python integers."""
  step = 2 ** (c - r)
  s = (2 * q + step) // (2 * step)  # round half up of q / step
  if clamp:
    s = min(s, 2**r - 1)
  return s * step


@pytest.mark.parametrize('extra', [False, True])
def test_slice_all_codes_all_widths(extra):
  codes = np.arange(256)
  for r in range(1, 9):
    want = np.array([ref_slice(int(q), r, clamp=not extra) for q in codes])
    got = quant.slice_codes(codes, r, extra_precision=extra)
    np.testing.assert_array_equal(got, want, err_msg=f'r={r}')
    np.testing.assert_array_equal(quant.slice_codes(jnp.asarray(codes), r, extra_precision=extra), want)
    # the float STE slice used in training agrees with the integer one
    np.testing.assert_array_equal(quant.slice_ste(jnp.asarray(codes, jnp.float32), r, 8, extra), want)
    assert np.all(got % 2 ** (8 - r) == 0)


def test_worked_examples():
  got = quant.slice_codes(np.array([53, 240, 234, 95, 31, 32]), 2)
  np.testing.assert_array_equal(got, [64, 192, 192, 64, 0, 64])
  assert int(quant.slice_codes(np.array(224), 2, extra_precision=True)) == 256
  assert int(quant.slice_codes(np.array(223), 2, extra_precision=True)) == 192
  # slicing int2 from int4 is not slicing from the parent
  via_int4 = quant.slice_codes(quant.slice_codes(np.array(95), 4), 2)
  assert int(via_int4) == 128 and int(quant.slice_codes(np.array(95), 2)) == 64
  np.testing.assert_array_equal(quant.slice_codes(np.arange(256), 8), np.arange(256))


def np_fake_quant(w, bits, c=8, axis=0):
  """Independent numpy min-max quantizer + slice + dequantize (float32, like the model)."""
  w = np.asarray(w, np.float32)
  mx, mn = w.max(axis, keepdims=True), w.min(axis, keepdims=True)
  alpha = np.maximum((mx - mn) / np.float32(2**c - 1), np.float32(1e-8))
  z = np.round(-mn / alpha)
  q = np.clip(np.round(w / alpha + z), 0, 2**c - 1).astype(int)
  s = np.vectorize(lambda v: ref_slice(int(v), bits, c))(q)
  return alpha * (s - z), alpha, z, q


@pytest.mark.parametrize('bits', [8, 6, 4, 3, 2])
def test_fake_quant_matches_numpy(bits):
  w = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
  want, alpha, _, _ = np_fake_quant(w, bits)
  got = quant.fake_quant(jnp.asarray(w), bits)
  np.testing.assert_allclose(got, want, atol=1e-5)
  if bits == 8:  # round trip: error at most half a step per channel
    assert np.all(np.abs(np.asarray(got) - w) <= alpha / 2 + 1e-6)


def test_quantized_array_round_trip_and_average_bits():
  w = np.random.default_rng(1).normal(size=(128, 16)).astype(np.float32)
  qa = quant.QuantizedArray.from_float(w, reduce_axes=(0,))
  _, alpha, z, q = np_fake_quant(w, 8)
  assert qa.codes.dtype == jnp.uint8
  np.testing.assert_array_equal(qa.codes, q)
  np.testing.assert_allclose(qa.scale, alpha, rtol=1e-6)
  np.testing.assert_array_equal(qa.zero_point, z)
  for r in (8, 4, 2):
    np.testing.assert_allclose(qa.dequantize(r), quant.fake_quant(jnp.asarray(w), r), atol=1e-6)
  # extra precision: the fraction of codes in the extra bucket (q >= 224 for r = 2)
  assert qa.average_bits(2, extra_precision=True) == pytest.approx(2 + np.mean(q >= 224))
  assert qa.average_bits(4, extra_precision=True) == pytest.approx(4 + np.mean(q >= 248))
  assert qa.average_bits(2) == 2.0
  # a QuantizedArray is a pytree that goes through jit
  np.testing.assert_allclose(jax.jit(lambda a: a.dequantize(4))(qa), qa.dequantize(4))


def test_group_size():
  w = np.random.default_rng(2).normal(size=(32, 6)).astype(np.float32)
  got = quant.fake_quant(jnp.asarray(w), 4, group_size=8)
  want = np.concatenate([np_fake_quant(w[i:i + 8], 4)[0] for i in range(0, 32, 8)])
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match='group_size=5 must be a positive integer dividing the contraction axis of size 32'):
    quant.fake_quant(jnp.asarray(w), 4, group_size=5)


def test_groups_over_a_flattened_two_axis_contraction():
  # [heads, head_dim, out] (attn_vec_einsum) in groups of 4 along the flattened (heads, head_dim):
  # the same numbers as [heads * head_dim, out] grouped along its rows
  w = np.random.default_rng(3).normal(size=(3, 8, 5)).astype(np.float32)
  got = quant.fake_quant(jnp.asarray(w), 4, reduce_axes=(0, 1), group_size=4)
  flat = w.reshape(24, 5)
  want = np.concatenate([np_fake_quant(flat[i:i + 4], 4)[0] for i in range(0, 24, 4)]).reshape(3, 8, 5)
  np.testing.assert_allclose(got, want, atol=1e-5)
  qa = quant.QuantizedArray.from_float(w, 8, (0, 1), 4)
  assert qa.codes.shape == (3, 2, 4, 5) and qa.group_size == 4
  np.testing.assert_allclose(qa.dequantize(4), got, atol=1e-6)
  with pytest.raises(ValueError, match='innermost contraction axis .size 8; groups over a flattened'):
    quant.fake_quant(jnp.asarray(w), 4, reduce_axes=(0, 1), group_size=16)


def test_symmetric_grid():
  w = np.random.default_rng(4).normal(size=(64, 3)).astype(np.float32)
  qa = quant.QuantizedArray.from_float(w, 8, (0,), symmetric=True)
  alpha = np.max(np.abs(w), 0, keepdims=True) / 127
  np.testing.assert_allclose(qa.scale, alpha, rtol=1e-6)
  assert qa.symmetric and not quant.QuantizedArray.from_float(w, 8, (0,)).symmetric
  np.testing.assert_array_equal(qa.codes, np.clip(np.round(w / alpha + 128), 0, 255))
  # int4: 16 alpha (round-half-up(q / 16) - 8), clamped to 15 at the top: symmetric about 0
  s = np.minimum(np.floor(np.asarray(qa.codes, np.float64) / 16 + 0.5), 15)
  np.testing.assert_allclose(qa.dequantize(4), 16 * alpha * (s - 8), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(quant.fake_quant(jnp.asarray(w), 4, symmetric=True), qa.dequantize(4), atol=1e-6)


@pytest.mark.parametrize('bits', [8, 4, 2])
@pytest.mark.parametrize('slice_grad', ['identity', 'clamp'])
def test_ste_gradient_wrt_w(bits, slice_grad):
  """Identity, except (clamp) where S(q, r) clamps: round(q / 2^(8-r)) > 2^r - 1, from numpy codes."""
  w = jax.random.normal(jax.random.PRNGKey(0), (32, 8))
  cot = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
  g = jax.grad(lambda w: jnp.sum(quant.fake_quant(w, bits, slice_grad=slice_grad) * cot))(w)
  wn = np.asarray(w, np.float64)
  scale = (wn.max(0) - wn.min(0)) / 255
  codes = np.clip(np.round(wn / scale + np.round(-wn.min(0) / scale)), 0, 255)
  clamped = np.floor(codes / 2 ** (8 - bits) + 0.5) > 2**bits - 1
  expect = np.where(clamped & (slice_grad == 'clamp'), 0.0, np.asarray(cot))
  assert (bits == 8) == (not clamped.any())  # int4/int2 clamp the top codes of every channel
  np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)


def test_slice_gradient_by_hand():
  q = jnp.array([53.0, 240.0, 234.0, 31.0, 200.0, 223.0])  # int2 buckets 1, 4->3, 4->3, 0, 3, 3
  grad = lambda **kw: np.asarray(jax.grad(lambda q: jnp.sum(quant.slice_ste(q, 2, **kw) * 2.0))(q))
  np.testing.assert_array_equal(grad(grad='identity'), [2, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(grad(grad='clamp'), [2, 0, 0, 2, 2, 2])
  np.testing.assert_array_equal(grad(grad='clamp', extra_precision=True), [2, 2, 2, 2, 2, 2])
  with pytest.raises(ValueError, match="slice gradient must be one of"):
    quant.slice_ste(q, 2, grad='zero')


def test_gradient_reaches_clipping_factors():
  w = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  def loss(gamma, beta):
    return jnp.sum((quant.fake_quant(w, 2, gamma=gamma, beta=beta) - w) ** 2)
  ones = jnp.full((1, 8), 0.9)
  gg, gb = jax.grad(loss, argnums=(0, 1))(ones, ones)
  assert np.all(np.isfinite(gg)) and np.all(np.isfinite(gb))
  assert np.all(np.abs(gg) > 0) and np.all(np.abs(gb) > 0)
  # LWC scale and zero point against a hand computation
  scale, zero = quant.calibrate(w, 8, (0,), gamma=ones, beta=ones)
  mx, mn = np.max(w, 0), np.min(w, 0)
  np.testing.assert_allclose(scale[0], (0.9 * mx - 0.9 * mn) / 255, rtol=1e-6)
  np.testing.assert_array_equal(zero[0], np.round(-0.9 * mn / np.asarray(scale[0])))


def test_constant_channel_guard():
  w = np.random.default_rng(3).normal(size=(16, 3)).astype(np.float32)
  w[:, 1] = 0.75
  w[:, 2] = 0.0
  for bits in (8, 2):
    out = np.asarray(quant.fake_quant(jnp.asarray(w), bits))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 1], 0.75, rtol=1e-5)
    np.testing.assert_array_equal(out[:, 2], 0.0)
  g = jax.grad(lambda w: jnp.sum(quant.fake_quant(w, 2)))(jnp.asarray(w))
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize('bits,parent', [(0, 8), (9, 8), (2.5, 8), (4, 2), (2, 9), (True, 8)])
def test_bad_bit_widths(bits, parent):
  with pytest.raises(ValueError, match='bits'):
    quant.slice_codes(np.arange(4), bits, parent)
  with pytest.raises(ValueError, match='bits'):
    quant.fake_quant(jnp.ones((4, 2)), bits, parent_bits=parent)


def test_group_size_is_read_off_the_codes_shape():
  w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  assert quant.QuantizedArray.from_float(w, 8, (0,), 16).group_size == 16  # codes [4, 16, 8]
  assert quant.QuantizedArray.from_float(w, 8, (0,)).group_size is None


def test_low_precision_inputs_are_calibrated_in_float32():
  """float16 channels spanning +-6e4 stay finite ((max - min) / 255 overflows in float16), and a
  bfloat16 weight gets exactly the codes `QuantizedArray.from_float` (float32) gives it."""
  rng = np.random.default_rng(0)
  w16 = jnp.asarray(np.concatenate([rng.uniform(-6e4, 6e4, (64, 3)), [[-6e4] * 3, [6e4] * 3]]), jnp.float16)
  assert bool(jnp.all(jnp.isfinite(quant.fake_quant(w16, 4, reduce_axes=(0,)))))
  wb = jnp.asarray(rng.normal(size=(64, 8)), jnp.bfloat16)
  for bits in (8, 4, 2):
    want = quant.QuantizedArray.from_float(wb, 8, (0,)).dequantize(bits).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(quant.fake_quant(wb, bits, reduce_axes=(0,)), np.float32),
                                  np.asarray(want, np.float32))


@pytest.mark.parametrize('bits', [8, 4, 2])
def test_kept_outliers_leave_the_statistics_and_come_back_at_every_width(bits):
  """numpy reference: min-max over the non-outliers of each channel, every weight quantized and
  sliced, then the outliers written back in float16."""
  w = np.random.default_rng(5).normal(size=(64, 12)).astype(np.float32)
  w[7, 3], w[20, 9], w[0, 0] = 25.0, -18.0, 9.0  # the three largest magnitudes
  qa = quant.QuantizedArray.from_float(jnp.asarray(w), 8, (0,), outliers=3 / w.size)
  index = np.sort(np.ravel_multi_index(([7, 20, 0], [3, 9, 0]), w.shape))
  np.testing.assert_array_equal(np.asarray(qa.outlier_index), index)
  mask = np.zeros(w.size, bool)
  mask[index] = True
  mask = mask.reshape(w.shape)
  mx, mn = np.where(mask, -np.inf, w).max(0, keepdims=True), np.where(mask, np.inf, w).min(0, keepdims=True)
  alpha = (mx - mn) / np.float32(255)
  z = np.round(-mn / alpha)
  q = np.clip(np.round(w / alpha + z), 0, 255).astype(int)
  want = alpha * (np.vectorize(lambda v: ref_slice(int(v), bits))(q) - z)
  want[mask] = w[mask].astype(np.float16)
  np.testing.assert_allclose(np.asarray(qa.dequantize(bits)), want, atol=2e-6)
  assert qa.outlier_bits() == 48 * 3 / w.size
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a.dequantize(bits))(qa)), np.asarray(qa.dequantize(bits)))
  for bad in (-0.1, 1.0, float('nan'), True):
    with pytest.raises(ValueError, match='outliers must be a fraction'):
      quant.QuantizedArray.from_float(w, 8, (0,), outliers=bad)
  # fake-quant (QAT, OmniQuant) keeps the same weights, the same way, with the identity gradient there
  fq = lambda x: quant.fake_quant(x, bits, reduce_axes=(0,), outliers=3 / w.size)
  np.testing.assert_allclose(np.asarray(fq(jnp.asarray(w))), want, atol=2e-6)
  g = np.asarray(jax.grad(lambda x: jnp.sum(fq(x) * jnp.arange(x.size).reshape(x.shape)))(jnp.asarray(w)))
  np.testing.assert_array_equal(g[mask], np.arange(w.size).reshape(w.shape)[mask])
  with pytest.raises(ValueError, match='outliers must be a fraction'):
    QuantSpec(bits, outliers=1.5)


@pytest.mark.parametrize('bits', [6, 4, 3, 2])
def test_regrid_slice_by_the_integer_formula(bits):
  """round_half_up(q (2^r - 1) / 255) in plain integers, returned on the parent's scale; the
  ends 0 and 255 stay, and the STE gradient is the identity (it clamps nothing)."""
  top, rt = 255, 2**bits - 1
  q = np.arange(256)
  s = (2 * q * rt + top) // (2 * top)
  got = np.asarray(quant.regrid_float(jnp.asarray(q, jnp.uint8), bits))
  np.testing.assert_allclose(got, s * top / rt, rtol=1e-6)
  assert got[0] == 0 and got[-1] == pytest.approx(255)
  g = jax.grad(lambda x: jnp.sum(quant.slice_ste(x, bits, grid='regrid')))(jnp.asarray(q, jnp.float32))
  np.testing.assert_array_equal(np.asarray(g), np.ones(256))
  qa = quant.QuantizedArray.from_float(np.random.default_rng(0).normal(size=(64, 8)), 8, (0,))
  np.testing.assert_allclose(np.asarray(qa.dequantize(bits, grid='regrid')),
                             np.asarray(qa.scale * (got[np.asarray(qa.codes)] - qa.zero_point)), rtol=1e-6)
  with pytest.raises(ValueError, match='no extra bucket'):
    quant.slice_ste(jnp.asarray(q, jnp.float32), bits, extra_precision=True, grid='regrid')
