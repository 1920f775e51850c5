"""The MatQuant objective: parsing, lambda weighting, co-distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.core import losses


def test_parse_paper_objectives():
  o = losses.parse_objective('8,4,2', (0.1, 0.1, 1.0))
  assert (o.widths, o.data, o.distill, o.lambdas) == ((8, 4, 2), (8, 4, 2), (), (0.1, 0.1, 1.0))
  o = losses.parse_objective('8,4,8->2', (0.1, 0.1, 1.0))
  assert (o.widths, o.data, o.distill) == ((8, 4, 2), (8, 4), ((8, 2),))
  o = losses.parse_objective('8,4,2,8->4;2', (0.1, 0.1, 1.0))
  assert (o.widths, o.distill, o.teachers) == ((8, 4, 2), ((8, 4), (8, 2)), (8,))
  assert losses.parse_objective('float').widths == (None,)
  assert losses.parse_objective('2').lambdas == (1.0,)


@pytest.mark.parametrize('spec,lambdas,match', [
    ('8,4,2', (0.1, 1.0), r'lambdas \(0.1, 1.0\) do not match the bit-widths \(8, 4, 2\)'),
    ('8,4,2', (0.1, 0.1, -1.0), 'non-negative'),
    ('8,9', None, 'bits must be an integer'),
    ('8,x', None, "bad bit-width 'x'"),
    ('8,,2', None, 'empty term'),
    ('8,8->8', None, 'distillation student'),
])
def test_parse_errors(spec, lambdas, match):
  with pytest.raises(ValueError, match=match):
    losses.parse_objective(spec, lambdas)


def _np_ce(logits, targets):
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.mean(np.take_along_axis(logp, targets[..., None], -1))


def test_lambda_weighted_sum_of_slice_losses():
  rng = np.random.default_rng(0)
  targets = rng.integers(0, 7, (2, 5))
  per_bits = {b: rng.normal(size=(2, 5, 7)).astype(np.float32) for b in (8, 4, 2)}
  obj = losses.parse_objective('8,4,2', (0.1, 0.3, 1.0))
  total, metrics = losses.matquant_loss(lambda b: jnp.asarray(per_bits[b]), jnp.asarray(targets),
                                        jnp.ones((2, 5)), obj)
  want = 0.1 * _np_ce(per_bits[8], targets) + 0.3 * _np_ce(per_bits[4], targets) + _np_ce(per_bits[2], targets)
  assert float(total) == pytest.approx(want, rel=1e-5)
  assert float(metrics['ce_int2']) == pytest.approx(_np_ce(per_bits[2], targets), rel=1e-5)


def test_codistillation_terms_and_stop_gradient():
  rng = np.random.default_rng(1)
  targets = jnp.asarray(rng.integers(0, 7, (2, 5)))
  t = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  s = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  mask = jnp.ones((2, 5))
  obj = losses.parse_objective('8,2,8->2', (0.5, 2.0))
  def f(t, s):
    return losses.matquant_loss(lambda b: t if b == 8 else s, targets, mask, obj)
  total, m = f(t, s)
  pt = np.exp(np.asarray(t, np.float64)); pt /= pt.sum(-1, keepdims=True)
  ps = np.exp(np.asarray(s, np.float64)); ps /= ps.sum(-1, keepdims=True)
  kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
  assert float(m['kl_int8_to_int2']) == pytest.approx(kl, rel=1e-5)
  want = 0.5 * _np_ce(t, np.asarray(targets)) + 2.0 * (_np_ce(s, np.asarray(targets)) + kl)
  assert float(total) == pytest.approx(want, rel=1e-5)
  # the teacher gets gradient only from its own data term, never from the KL
  gt = jax.grad(lambda t: f(t, s)[0])(t)
  gt_data = jax.grad(lambda t: 0.5 * losses.cross_entropy(t, targets, mask))(t)
  np.testing.assert_allclose(gt, gt_data, atol=1e-7)


def test_cross_entropy_respects_mask():
  logits = jnp.zeros((1, 3, 4)).at[0, 2].set(jnp.array([9.0, 0, 0, 0]))
  ce = losses.cross_entropy(logits, jnp.array([[1, 1, 1]]), jnp.array([[1.0, 1.0, 0.0]]))
  assert float(ce) == pytest.approx(np.log(4))


def test_scales_balance_each_width():
  outs = {8: jnp.array([[1.0]]), 4: jnp.array([[2.0]]), 2: jnp.array([[4.0]])}
  obj = losses.parse_objective('8,4,2', (0.1, 0.1, 1.0))
  sq = lambda o, t, m: jnp.sum(jnp.square(o - t) * m)
  total, metrics = losses.matquant_loss(outs.get, jnp.zeros((1, 1)), jnp.ones((1, 1)), obj, sq, sq,
                                        scales={8: 0.5, 4: 2.0, 2: 8.0})
  # 0.1 * 1 / 0.5 + 0.1 * 4 / 2 + 1 * 16 / 8; metrics stay unscaled
  assert float(total) == pytest.approx(0.2 + 0.2 + 2.0)
  assert float(metrics['ce_int2']) == 16.0
