"""Mesh, logical axis rules, sharded train step vs one device, cross-mesh restore (8 CPU devices)."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from matquant_jax import nn, testing
from matquant_jax.algos import omniquant, qat
from matquant_jax.core import QuantSpec, losses
from matquant_jax.data import pipeline
from matquant_jax.nn import sharding

CFG = nn.TransformerConfig.tiny()
OBJ = losses.parse_objective('8,4,2', (0.1, 0.1, 1.0))


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(sharding.mesh_config(data, fsdp, tensor), jax.devices()[:data * fsdp * tensor])


def _cfg(steps, trainable='ffn'):
  return qat.Options(steps=steps, learning_rate=1e-2, warmup_steps=1, trainable=trainable,
                       checkpoint_every=2, log_every=1)


@pytest.fixture(scope='module')
def problem():
  rng = np.random.default_rng(0)
  batches = [rng.integers(4, CFG.num_embed, (8, 17)).astype(np.int32) for _ in range(4)]
  model = nn.Transformer(CFG)
  params = testing.init_params(model)
  return model, params, batches


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8, 'tests/conftest.py sets XLA_FLAGS before jax is imported'


def test_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh(sharding.mesh_config(2, -1, 2)).shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert dict(sharding.make_mesh(sharding.mesh_config()).shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  with pytest.raises(ValueError, match='does not divide the 8 devices'):
    sharding.make_mesh(sharding.mesh_config(3, 1, 1))
  with pytest.raises(ValueError, match='uses 4 devices, but there are 8'):
    sharding.make_mesh(sharding.mesh_config(2, 2, 1))
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    sharding.make_mesh(sharding.mesh_config(-1, -1, 1))
  with pytest.raises(ValueError, match="names mesh axis 'model'; the mesh has \\('data', 'fsdp', 'tensor'\\)"):
    sharding.check_rules((('mlp', 'model'),), _mesh(1, 1, 1))


def test_gemma2_2b_logical_rules():
  mesh = sharding.make_mesh(sharding.mesh_config(1, 4, 2))
  cfg = nn.TransformerConfig.gemma2_2b()
  model = nn.Transformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  sh = sharding.model_shardings(cfg, abstract, mesh, sharding.DEFAULT_RULES)
  layer = sh['layer_0']
  assert sh['embedder']['input_embedding'].spec == P('tensor', 'fsdp')
  assert layer['mlp']['gating_einsum'].spec == P(None, 'fsdp', 'tensor')
  assert layer['mlp']['linear'].spec == P('tensor', 'fsdp')
  assert layer['attn']['q_einsum']['w'].spec == P('tensor', 'fsdp', None)
  assert layer['attn']['kv_einsum']['w'].spec == P(None, 'tensor', 'fsdp', None)
  assert layer['attn']['attn_vec_einsum']['w'].spec == P('tensor', None, 'fsdp')
  assert layer['pre_ffw_norm']['scale'].spec == P(None)
  # OmniQuant transforms follow their weight: clipping per output channel, shift/scale per input channel.
  qtree = jax.eval_shape(lambda p: omniquant.init_transforms(cfg, p, QuantSpec(8)), abstract)
  qsh = sharding.model_shardings(cfg, qtree, mesh, sharding.DEFAULT_RULES)['layer_3']['mlp']
  assert qsh['gating_einsum']['gamma_logit'].spec == P(None, None, 'tensor')
  assert qsh['gating_einsum']['shift'].spec == P('fsdp')
  assert qsh['linear']['smooth'].spec == P('tensor')
  assert qsh['linear']['beta_logit'].spec == P(None, 'fsdp')


@pytest.mark.parametrize('shape', [(2, 4, 1), (2, 2, 2)], ids=['data x fsdp', 'data x fsdp x tensor'])
def test_sharded_matquant_step_matches_one_device(problem, shape):
  model, params, batches = problem
  ref, ref_m = qat.train(model, params, OBJ, lambda s: batches[s], _cfg(3), mesh=_mesh(1, 1, 1))
  got, got_m = qat.train(model, params, OBJ, lambda s: batches[s], _cfg(3), mesh=_mesh(*shape))
  np.testing.assert_allclose(got_m['loss'], ref_m['loss'], rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=jax.tree_util.keystr(path))
  w = got['layer_0']['mlp']['gating_einsum']  # (2, D=32, H=64): embed over fsdp, mlp over tensor
  expect = P(None, 'fsdp', 'tensor' if shape[2] > 1 else None)
  assert w.sharding.spec == expect
  assert w.addressable_shards[0].data.shape == (2, 32 // shape[1], 64 // shape[2])


def test_checkpoint_restores_onto_other_meshes(problem, tmp_path):
  model, params, batches = problem
  saved, _ = qat.train(model, params, OBJ, lambda s: batches[s], _cfg(2), str(tmp_path), mesh=_mesh(2, 4, 1))
  for shape in [(1, 1, 1), (1, 2, 2)]:
    mesh = _mesh(*shape)
    restored, _ = qat.train(model, params, OBJ, lambda s: batches[s], _cfg(2), str(tmp_path), mesh=mesh)
    w = restored['layer_1']['mlp']['linear']
    assert w.sharding.mesh.shape == mesh.shape
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And training continues on the new mesh from the restored state.
  more, _ = qat.train(model, params, OBJ, lambda s: batches[s], _cfg(4), str(tmp_path), mesh=_mesh(1, 2, 2))
  assert not np.array_equal(np.asarray(more['layer_1']['mlp']['linear']), np.asarray(saved['layer_1']['mlp']['linear']))


def test_batch_rows_per_process():
  stream = np.arange(1000, dtype=np.int32)
  full = pipeline.train_batch(stream, 3, 8, 5, 0)
  parts = [pipeline.train_batch(stream, 3, 8, 5, 0, i, 4) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), full)
  with pytest.raises(ValueError, match='batch_size=8 is not divisible by the 3 processes'):
    pipeline.train_batch(stream, 3, 8, 5, 0, 0, 3)
