"""The QAT train step and its checkpoint resume, on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import evals, nn, testing
from matquant_jax.algos import qat
from matquant_jax.evals import perplexity
from matquant_jax.core import QuantSpec, losses

CFG = nn.TransformerConfig.tiny(num_embed=64)


def _setup():
  model = nn.Transformer(CFG)
  batch = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (4, 17), 1, 64))
  params = testing.init_params(model)
  return model, params, batch


def _cfg(steps, trainable='ffn', lr=1e-2):
  return qat.Options(steps=steps, learning_rate=lr, warmup_steps=2, trainable=trainable,
                       checkpoint_every=3, log_every=1)


def test_matquant_step_lowers_loss_and_trains_only_ffn():
  model, params, batch = _setup()
  obj = losses.parse_objective('8,4,2', (0.1, 0.1, 1.0))
  evaluate = evals.make_eval_fn(model)
  before = evaluate(params, [batch], QuantSpec(2))
  new, metrics = qat.train(model, params, obj, lambda step: batch, _cfg(15))
  after = evaluate(new, [batch], QuantSpec(2))
  assert after < before - 0.3, (before, after)
  assert set(metrics) >= {'loss', 'ce_int8', 'ce_int4', 'ce_int2', 'grad_norm'}
  flat_old = jax.tree_util.tree_leaves_with_path(params)
  flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
  for path, old in flat_old:
    changed = not np.array_equal(old, flat_new[path])
    assert changed == ('mlp' in jax.tree_util.keystr(path)), path


def test_split_and_merge_params():
  _, params, _ = _setup()
  a, b = qat.split_params(params, 'ffn')
  assert set(a) == {'layer_0', 'layer_1'} and set(a['layer_0']) == {'mlp'}
  merged = qat.merge_params(a, b)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  with pytest.raises(ValueError, match='selects no parameter'):
    qat.split_params(params, 'nothing_matches_this')


class Interrupt(Exception):
  pass


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
  model, params, _ = _setup()
  obj = losses.parse_objective('8,4,2', (0.1, 0.1, 1.0))
  batches = lambda step: np.asarray(jax.random.randint(jax.random.PRNGKey(step), (4, 17), 1, 64))
  full, _ = qat.train(model, params, obj, batches, _cfg(7), str(tmp_path / 'a'))

  def crashing(step):
    if step == 4:
      raise Interrupt()
    return batches(step)
  with pytest.raises(Interrupt):
    qat.train(model, params, obj, crashing, _cfg(7), str(tmp_path / 'b'))
  resumed, _ = qat.train(model, params, obj, batches, _cfg(7), str(tmp_path / 'b'))
  for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(x, y)


def test_token_logprobs_in_row_chunks_match_one_pass(monkeypatch):
  """Evaluation bounds its logits memory (a 262k vocabulary) by rows; the numbers do not change."""
  c = nn.TransformerConfig.tiny()
  model = nn.Transformer(c)
  x = jnp.asarray(np.random.default_rng(0).integers(4, 256, (5, 9)))
  variables = model.init(jax.random.PRNGKey(0), x)
  whole = evals.token_logprobs(model, variables, x[:, :-1], x[:, 1:], None)
  monkeypatch.setattr(perplexity, 'LOGITS_BYTES', 2 * 8 * c.num_embed * 4)  # two rows at a time
  chunked = evals.token_logprobs(model, variables, x[:, :-1], x[:, 1:], None)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-5)
