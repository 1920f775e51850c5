"""OmniQuant: LWC numerics, the shift/scale identity, calibration, the stored parent, resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from matquant_jax import nn, parents, testing
from matquant_jax.algos import blockwise, omniquant
from matquant_jax.core import QuantSpec, losses, qeinsum, quant
from matquant_jax.lab import configs

CFG = nn.TransformerConfig.tiny()
OPTS = omniquant.Options(epochs=4, batch_size=4, lwc_lr=5e-2, let_lr=5e-2)


def _logit(p):
  return float(np.log(p / (1 - p)))


@pytest.fixture(scope='module')
def setup():
  tokens = np.random.default_rng(0).integers(4, CFG.num_embed, (16, 16)).astype(np.int32)
  model = nn.Transformer(CFG)
  params = testing.init_params(model)
  return model, params, tokens


@pytest.fixture(scope='module')
def calibrated(setup):
  _, params, tokens = setup
  objective = losses.parse_objective('8,4,2', (0.1, 0.1, 1.0))
  qtree = omniquant.calibrate(CFG, params, tokens, objective, QuantSpec(8), OPTS)
  return objective, qtree


def test_lwc_scale_and_zero_point_by_hand():
  w = jnp.array([[-1.0], [0.5], [2.0]])  # one output channel, contraction axis 0
  gamma, beta = 0.5, 0.8
  aux = {'gamma_logit': jnp.full((1, 1), _logit(gamma)), 'beta_logit': jnp.full((1, 1), _logit(beta))}
  alpha = (0.5 * 2.0 - 0.8 * -1.0) / 255  # 1.8 / 255
  z = round(0.8 / alpha)  # 113.33 -> 113
  codes = [0, 184, 255]  # -28.7 -> 0; 70.8 + 113 = 183.8 -> 184; 283.3 + 113 -> 255
  scale, zero = quant.calibrate(w, 8, (0,), gamma=jnp.float32(gamma), beta=jnp.float32(beta))
  np.testing.assert_allclose(float(scale[0, 0]), alpha, rtol=1e-6)
  assert float(zero[0, 0]) == z
  qa = quant.QuantizedArray.from_float(w, 8, (0,), gamma=jnp.float32(gamma), beta=jnp.float32(beta))
  assert qa.codes[:, 0].tolist() == codes
  # The einsum path with the logits in 'quant' gives alpha * (q - z).
  w_hat = qeinsum.quantized_weight(w, (0,), 8, QuantSpec(8), aux)
  np.testing.assert_allclose(np.asarray(w_hat[:, 0]), alpha * (np.array(codes) - z), rtol=1e-5)


def test_transform_is_exact_identity_without_quantization(setup):
  model, params, tokens = setup
  qtree = omniquant.init_transforms(CFG, params, QuantSpec(8))
  rng = np.random.default_rng(1)
  qtree = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape) if p[-1].key == 'smooth' else
                               rng.normal(size=v.shape) if p[-1].key == 'shift' else v, jnp.float32),
      qtree)
  plain = model.apply({'params': params}, tokens).logits
  transformed = model.apply({'params': params, 'quant': qtree}, tokens).logits
  np.testing.assert_allclose(np.asarray(transformed), np.asarray(plain), atol=2e-5)


def test_calibration_lowers_int2_block_error(setup, calibrated):
  _, params, tokens = setup
  _, qtree = calibrated
  key, block = nn.blocks(CFG)[0]
  x = nn.embed(CFG, params, tokens)
  pos, mask = nn.attention_inputs(CFG, jnp.asarray(tokens))
  target = block.apply({'params': params[key]}, x, pos, mask)[0]
  def err(q):
    out = block.apply({'params': params[key], 'quant': q[key]}, x, pos, mask, 2, QuantSpec(2))[0]
    return float(jnp.mean((out - target) ** 2))
  minmax = err(omniquant.init_transforms(CFG, params, QuantSpec(8)))
  learned = err(qtree)
  assert learned < 0.95 * minmax, (learned, minmax)


def test_gradient_reaches_clipping_and_scale(setup):
  _, params, tokens = setup
  qtree = omniquant.init_transforms(CFG, params, QuantSpec(8))
  key, block = nn.blocks(CFG)[0]
  x = nn.embed(CFG, params, tokens)
  pos, mask = nn.attention_inputs(CFG, jnp.asarray(tokens))
  def loss(q):
    return jnp.mean(block.apply({'params': params[key], 'quant': q}, x, pos, mask, 2, QuantSpec(2))[0] ** 2)
  g = jax.grad(loss)(qtree[key])['mlp']['linear']
  for name in ('gamma_logit', 'beta_logit', 'shift', 'smooth'):
    assert float(jnp.max(jnp.abs(g[name]))) > 0, name


def test_lambda_weighted_mse_loss_matches_numpy():
  rng = np.random.default_rng(2)
  target = rng.normal(size=(2, 3, 4)).astype(np.float32)
  outs = {b: rng.normal(size=(2, 3, 4)).astype(np.float32) for b in (8, 4, 2)}
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  def ref(a, b):
    return float(((a - b) ** 2).mean(-1)[mask > 0].mean())
  obj = losses.parse_objective('8,4,2,8->2', (0.1, 0.2, 1.0))
  total, metrics = losses.matquant_loss(lambda b: jnp.asarray(outs[b]), jnp.asarray(target),
                                        jnp.asarray(mask), obj, losses.mse, losses.mse_distillation,
                                        ('mse', 'l2'))
  expect = (0.1 * ref(outs[8], target) + 0.2 * ref(outs[4], target)
            + 1.0 * (ref(outs[2], target) + ref(outs[2], outs[8])))
  np.testing.assert_allclose(float(total), expect, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['l2_int8_to_int2']), ref(outs[2], outs[8]), rtol=1e-5)


def test_exported_parent_matches_fake_quant_and_round_trips(setup, calibrated, tmp_path):
  model, params, tokens = setup
  _, qtree = calibrated
  parent = parents.make_parent(CFG, params, QuantSpec(8), qtree)
  qa = parent['params']['layer_1']['mlp']['linear']
  assert isinstance(qa, quant.QuantizedArray) and qa.codes.dtype == jnp.uint8
  assert set(parent['quant']['layer_0']['mlp']['gating_einsum']) == {'shift', 'smooth', 'bias'}
  live = {'params': params, 'quant': qtree}
  for spec in (QuantSpec(8), QuantSpec(3), QuantSpec(2), QuantSpec((2, 8)),
               QuantSpec(2, extra_precision=True)):
    a = model.apply(live, tokens, spec=spec).logits
    b = model.apply(parent, tokens, spec=spec).logits
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, err_msg=str(spec))
  mngr = blockwise.checkpoint_manager(tmp_path / 'parent')
  mngr.save(0, args=ocp.args.StandardSave(parent))
  mngr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, parent)
  restored = mngr.restore(0, args=ocp.args.StandardRestore(abstract))
  np.testing.assert_array_equal(np.asarray(model.apply(restored, tokens, spec=QuantSpec(2)).logits),
                                np.asarray(model.apply(parent, tokens, spec=QuantSpec(2)).logits))
  int4 = jax.tree.map(lambda x: x, parent)  # a stored int4 weight cannot give 8 bits
  int4['params']['layer_0']['mlp']['linear'] = dataclasses.replace(qa, parent_bits=4)
  with pytest.raises(ValueError, match='bits=8, but the stored weight has 4 bits'):
    model.apply(int4, tokens, spec=QuantSpec(8)).logits


def test_kept_outliers_calibrate_and_fold_into_the_parent(setup):
  """QuantSpec.outliers through OmniQuant: the calibration sees them kept, the parent keeps the same
  ones (largest |W s|), and its slices are the fake-quant model's; a spec asking for others is refused."""
  model, params, tokens = setup
  spec = QuantSpec(8, outliers=0.002)
  qtree = omniquant.calibrate(CFG, params, tokens, losses.parse_objective('8,2', (0.1, 1.0)), spec,
                              dataclasses.replace(OPTS, epochs=1))
  parent = parents.make_parent(CFG, params, spec, qtree)
  qa = parent['params']['layer_1']['mlp']['linear']
  assert qa.num_outliers == round(0.002 * qa.codes.size) > 0
  live = {'params': params, 'quant': qtree}
  for bits in (8, 2):
    a = model.apply(live, tokens, spec=QuantSpec(bits, outliers=0.002)).logits
    b = model.apply(parent, tokens, spec=QuantSpec(bits, outliers=0.002)).logits
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
  assert nn.bits_per_weight(live, QuantSpec(2, outliers=0.002), CFG) == pytest.approx(
      nn.bits_per_weight(parent, QuantSpec(2), CFG))
  with pytest.raises(ValueError, match=r'asks for \d+ kept outliers, but this stored parent keeps'):
    model.apply(parent, tokens, spec=QuantSpec(2, outliers=0.01))


class _StopAfterFirstBlock:
  """A summary writer that raises once the second block reports (block 1 is saved by then)."""

  def add_scalar(self, tag, value, step):
    del tag, value
    if step == 2:
      raise KeyboardInterrupt('interrupted between blocks')


def test_resume_between_blocks_gives_the_same_parent(setup, calibrated, tmp_path):
  _, params, tokens = setup
  objective, uninterrupted = calibrated
  opts = OPTS
  with pytest.raises(KeyboardInterrupt):
    omniquant.calibrate(CFG, params, tokens, objective, QuantSpec(8), opts, str(tmp_path),
                        writer=_StopAfterFirstBlock())
  resumed = omniquant.calibrate(CFG, params, tokens, objective, QuantSpec(8), opts, str(tmp_path))
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('change, match', [
    (dict(batch_size=32), 'batch_size=32 exceeds omniquant.samples=16'),
    (dict(epochs=0), 'omniquant.epochs must be a positive integer'),
    (dict(lwc=False, let=False), 'needs something to learn'),
    (dict(lwc_lr=0.0), 'lwc_lr must be positive'),
    (dict(skip_tokens=-1), 'skip_tokens must be a non-negative integer'),
])
def test_bad_options_are_named(setup, change, match):
  _, params, tokens = setup
  with pytest.raises(ValueError, match=match):
    omniquant.calibrate(CFG, params, tokens, losses.parse_objective('2'), QuantSpec(8),
                        dataclasses.replace(OPTS, **change))


def test_float_in_objective_and_bad_algo_are_rejected(setup):
  _, params, tokens = setup
  with pytest.raises(ValueError, match='may not contain "float"'):
    omniquant.calibrate(CFG, params, tokens, losses.parse_objective('8,float'), QuantSpec(8), OPTS)
  cfg = configs.base_config()
  cfg.runs = [configs.run('x', 'X', '2', algo='awq')]
  with pytest.raises(ValueError, match="algo must be one of \\('qat', 'omniquant', 'gptq'\\), got 'awq'"):
    configs.check_config(cfg)


def test_parameter_groups_get_their_own_learning_rate():
  tx = omniquant.optimizer(omniquant.Options(lwc_lr=0.1, let_lr=0.01))
  aux = {'mlp': {'linear': {'gamma_logit': jnp.ones(3), 'beta_logit': jnp.ones(3),
                            'shift': jnp.ones(2), 'smooth': jnp.ones(2)}}}
  grads = jax.tree.map(lambda x: 0.5 * x, aux)
  updates, _ = tx.update(grads, tx.init(aux), aux)
  u = updates['mlp']['linear']
  # Adam's first step is -lr * g / (|g| + eps) = -lr
  for name, lr in (('gamma_logit', 0.1), ('beta_logit', 0.1), ('shift', 0.01), ('smooth', 0.01)):
    np.testing.assert_allclose(np.asarray(u[name]), -lr, rtol=2e-5)


def test_loss_mask_skips_leading_positions_and_padding():
  tokens = jnp.array([[2, 5, 6, 0], [2, 7, 8, 9]])  # pad id 0
  np.testing.assert_array_equal(omniquant.loss_mask(CFG, tokens, 1), [[0, 1, 1, 0], [0, 1, 1, 1]])
  np.testing.assert_array_equal(omniquant.loss_mask(CFG, tokens), [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_balanced_aug_loss_calibration_lowers_int2_error(setup):
  _, params, tokens = setup
  opts = dataclasses.replace(OPTS, balance=True, aug_loss=True, skip_tokens=1)
  qtree = omniquant.calibrate(CFG, params, tokens, losses.parse_objective('8,4,2', (0.1, 0.1, 1.0)),
                              QuantSpec(8), opts)
  model = nn.Transformer(CFG)
  plain = model.apply({'params': params}, tokens).logits
  def err(variables):
    return float(jnp.mean((model.apply(variables, tokens, spec=QuantSpec(2)).logits - plain) ** 2))
  assert err({'params': params, 'quant': qtree}) < err(
      {'params': params, 'quant': omniquant.init_transforms(CFG, params, QuantSpec(8))})
