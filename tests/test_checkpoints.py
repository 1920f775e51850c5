"""Loading real checkpoints: SmolLM2 GGUF against a numpy reference, round trips, errors."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import ckpts, nn, testing
from matquant_jax.data import shakespeare
from matquant_jax.nn import llama
from matquant_jax.testing import reference

TOKENS = jnp.asarray(np.random.default_rng(0).integers(4, 256, (2, 9)))


@pytest.fixture(scope='module')
def smollm2_ids(smollm2):
  model, variables, tokenizer = smollm2
  params = variables['params']
  text = open(os.path.join(shakespeare.texts_dir(), 'hamlet_gut.txt'), encoding='utf-8').read()
  ids = np.array(tokenizer.encode(text[20000:24000])[:128])
  return model, params, tokenizer, ids


def _nll(logits, ids):
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:-1], axis=-1)
  return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids)[1:, None], axis=-1)))


def test_smollm2_matches_numpy_reference_on_held_out_shakespeare(smollm2_ids):
  model, params, tokenizer, ids = smollm2_ids
  assert model.config.norm_eps == pytest.approx(1e-5)  # stored as float32 in the file
  assert model.config == dataclasses.replace(llama.smollm2_135m(), norm_eps=model.config.norm_eps)
  assert tokenizer.decode(tokenizer.encode('To be, or not to be')) == 'To be, or not to be'
  ours = _nll(model.apply({'params': params}, jnp.asarray(ids)[None]).logits[0], ids)
  ref = reference.gguf_llama_nll(ckpts.smollm2_path(), ids)
  assert abs(ours - ref) < 0.01, (ours, ref)
  assert ours < 4.5  # nats/token on 128 tokens of Hamlet; a uniform guess is log(49152) = 10.8


def test_wrong_qk_order_costs_nats(smollm2_ids):
  """Top-1 agreement hides a wrong un-permutation; the NLL does not."""
  model, params, _, ids = smollm2_ids
  c = model.config
  def repermute(w, heads):  # our [heads, D, hd] back to GGUF row order
    rows = np.asarray(w).transpose(0, 2, 1).reshape(-1, c.embed_dim)
    return ckpts.permute_rope(rows, heads).reshape(heads, c.head_dim, c.embed_dim).transpose(0, 2, 1)
  raw = jax.tree.map(lambda a: a, params)
  for i in range(c.num_layers):
    a = raw[f'layer_{i}']['attn']
    a['q_einsum'] = {'w': repermute(a['q_einsum']['w'], c.num_heads)}
    kv = np.asarray(a['kv_einsum']['w'])
    a['kv_einsum'] = {'w': np.stack([repermute(kv[0], c.num_kv_heads), kv[1]])}
  right = _nll(model.apply({'params': params}, jnp.asarray(ids)[None]).logits[0], ids)
  wrong = _nll(model.apply({'params': raw}, jnp.asarray(ids)[None]).logits[0], ids)
  assert wrong > right + 1.0, (right, wrong)


def test_rope_permutation_inverts():
  w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
  np.testing.assert_array_equal(ckpts.unpermute_rope(ckpts.permute_rope(w, 4), 4), w)
  # Within a head of 8 rows, interleaved pairs (0,1), (2,3), ... become halves (0..3 | 4..7).
  assert ckpts.unpermute_rope(w, 4)[:8, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21]


CONFIGS = {
    'gemma2': nn.TransformerConfig.tiny(),
    'gemma2 9b-style transposed gating, MHA': nn.TransformerConfig.tiny(transpose_gating_einsum=True,
                                                                            num_kv_heads=4),
    'llama untied': llama.llama_config(num_layers=2, num_embed=256, embed_dim=32, hidden_dim=64,
                                       num_heads=4, num_kv_heads=2),
    'mistral tied': llama.llama_config(num_layers=2, num_embed=256, embed_dim=32, hidden_dim=64,
                                       num_heads=4, num_kv_heads=2, sliding_window=4, tie_embeddings=True),
}


def _random_params(c):
  m = nn.Transformer(c)
  p = testing.init_params(m, 1)
  noise = lambda a, k: a + 0.02 * jax.random.normal(k, a.shape)
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  return m, jax.tree.unflatten(tree, [noise(a, k) for a, k in zip(leaves, keys)])


@pytest.mark.parametrize('name', list(CONFIGS))
def test_hugging_face_round_trip(name, tmp_path):
  c = CONFIGS[name]
  model, params = _random_params(c)
  ckpts.save_hf(str(tmp_path), params, c)
  loaded, v2, _ = ckpts.load(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(loaded.apply(v2, TOKENS).logits),
                                np.asarray(model.apply({'params': params}, TOKENS).logits))


def test_hugging_face_bfloat16_safetensors(tmp_path):
  c = CONFIGS['llama untied']
  model, params = _random_params(c)
  import ml_dtypes
  ckpts.save_hf(str(tmp_path), params, c, dtype=ml_dtypes.bfloat16)
  _, v2, _ = ckpts.load(str(tmp_path))
  w = v2['params']['layer_1']['mlp']['linear']
  assert w.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(w), np.asarray(params['layer_1']['mlp']['linear']).astype(
      ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize('layout', ['flat', 'nested'])
@pytest.mark.parametrize('name', ['gemma2', 'gemma2 9b-style transposed gating, MHA'])
def test_official_gemma_orbax_layouts(name, layout, tmp_path):
  c = CONFIGS[name]
  model, params = _random_params(c)
  ckpts.save_gemma_orbax(str(tmp_path / 'ckpt'), params, layout)
  import orbax.checkpoint as ocp
  raw = ocp.PyTreeCheckpointer().metadata(str(tmp_path / 'ckpt'))
  raw = getattr(getattr(raw, 'item_metadata', raw), 'tree', raw)
  if layout == 'flat':
    assert 'w' in raw['transformer/layer_0/mlp/gating_einsum']  # the official flat layout
  config, p2, _ = ckpts.load_gemma_orbax(str(tmp_path / 'ckpt'), config=c)
  assert ckpts.load_gemma_orbax(str(tmp_path / 'ckpt'))[0].transpose_gating_einsum == (
      c.transpose_gating_einsum)  # read off the shapes when no config is given
  np.testing.assert_array_equal(np.asarray(nn.Transformer(config).apply({'params': p2}, TOKENS).logits),
                                np.asarray(model.apply({'params': params}, TOKENS).logits))


def test_official_preset_is_recognised_by_shapes():
  c = nn.TransformerConfig.gemma2_9b()
  shapes = jax.eval_shape(nn.Transformer(c).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  fake = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes['params'])  # no memory
  assert ckpts.infer_gemma_config(fake, 'float32') == c


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a checkpoint directory, a .gguf file'):
    ckpts.load(str(tmp_path / 'nothing'))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ckpts.load(str(tmp_path / 'missing.gguf'))
  c = CONFIGS['llama untied']
  _, params = _random_params(c)
  bad = jax.tree.map(lambda a: a, params)
  bad['layer_1']['mlp']['linear'] = bad['layer_1']['mlp']['linear'][:-1]
  with pytest.raises(ValueError, match=r"parameter 'layer_1/mlp/linear' has shape \(63, 32\), the config "
                     r'expects \(64, 32\)'):
    ckpts.check_params(bad, c)
  ckpts.save_hf(str(tmp_path / 'hf'), params, c)
  import json
  cfg = json.load(open(tmp_path / 'hf' / 'config.json'))
  json.dump(dict(cfg, intermediate_size=96), open(tmp_path / 'hf' / 'config.json', 'w'))
  with pytest.raises(ValueError, match="'layer_0/mlp/gating_einsum' has shape"):
    ckpts.load(str(tmp_path / 'hf'))
  json.dump(dict(cfg, architectures=['GPTNeoXForCausalLM']), open(tmp_path / 'hf' / 'config.json', 'w'))
  with pytest.raises(ValueError, match="unknown architecture 'GPTNeoXForCausalLM'"):
    ckpts.load(str(tmp_path / 'hf'))
