"""QAT from a stored parent: the float weights give back the parent's codes exactly, its outputs to float rounding."""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import nn, parents, testing
from matquant_jax.algos import omniquant, qat, warm_start
from matquant_jax.core import QuantSpec, losses

GROUP = 16


def _parent(cfg, seed=0):
  """A tiny model's parent with random OmniQuant transforms (clipping, shift, scale) on the FFN."""
  tokens = np.random.default_rng(seed).integers(4, cfg.num_embed, (2, 12)).astype(np.int32)
  model = nn.Transformer(cfg)
  params = testing.init_params(model, seed)
  spec = QuantSpec(8, group_size=GROUP)
  flat = traverse_util.flatten_dict(omniquant.init_transforms(cfg, params, spec))
  rng = np.random.default_rng(seed + 1)
  for k, v in flat.items():
    flat[k] = jnp.asarray({'gamma_logit': rng.uniform(0.5, 3.0, v.shape), 'beta_logit': rng.uniform(0.5, 3.0, v.shape),
                           'shift': rng.normal(0, 0.2, v.shape), 'smooth': np.exp(rng.normal(0, 0.4, v.shape))}[k[-1]],
                          jnp.float32)
  parent = parents.make_parent(cfg, params, spec, traverse_util.unflatten_dict(flat))
  return model, parent, tokens


@pytest.mark.parametrize('cfg', [nn.TransformerConfig.tiny(),
                                 nn.TransformerConfig.tiny(norm_plus_one=False, ffn_activation='silu'),
                                 nn.TransformerConfig.tiny(transpose_gating_einsum=True)],
                         ids=['gemma', 'llama', 'transposed'])
def test_float_weights_reproduce_the_parent(cfg):
  model, parent, tokens = _parent(cfg)
  warm = warm_start.float_variables(cfg, parent)
  assert warm_start.code_agreement(cfg, parent, warm) == 1.0
  assert set(warm['quant']['layer_0']['mlp']['linear']) == {'shift', 'bias'}
  for bits, ep in ((8, False), (4, False), (2, False), (2, True)):
    a = model.apply(parent, tokens, spec=QuantSpec(bits, extra_precision=ep)).logits
    b = model.apply(warm, tokens, spec=QuantSpec(bits, group_size=GROUP, extra_precision=ep)).logits
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-4, rtol=1e-4, err_msg=f'int{bits} ep={ep}')


def test_qat_keeps_the_quant_collection_and_trains_the_ffn():
  cfg = nn.TransformerConfig.tiny()
  model, parent, tokens = _parent(cfg, seed=3)
  warm = warm_start.float_variables(cfg, parent)
  batch = np.random.default_rng(4).integers(4, cfg.num_embed, (2, 13)).astype(np.int32)
  opts = qat.Options(steps=2, learning_rate=1e-2, spec=QuantSpec(8, group_size=GROUP))
  out, metrics = qat.train(model, warm, losses.parse_objective('8,4,2', (1.0, 1.0, 1.0)), lambda s: batch, opts)
  assert np.isfinite(metrics['loss'])
  jax.tree.map(np.testing.assert_array_equal, out['quant'], warm['quant'])
  before, after = warm['params']['layer_0']['mlp']['linear'], out['params']['layer_0']['mlp']['linear']
  assert not np.allclose(np.asarray(before), np.asarray(after))
  np.testing.assert_array_equal(np.asarray(out['params']['final_norm']['scale']),
                                np.asarray(warm['params']['final_norm']['scale']))


def test_attention_transforms_are_refused():
  cfg = nn.TransformerConfig.tiny()
  _, parent, _ = _parent(cfg)
  parent = {**parent, 'quant': {**parent['quant'], 'layer_0': {**parent['quant']['layer_0'],
                                                                'attn': {'q_einsum': {'smooth': jnp.ones(32)}}}}}
  with pytest.raises(ValueError, match='FFN weights only'):
    warm_start.float_variables(cfg, parent)
