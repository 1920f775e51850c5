"""Parents held resident at a maximum width: every slice <= that width exactly as the full
parent gives it (every code 0..255), the bytes it takes, errors, the model, and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import nn, parents, testing
from matquant_jax.core import QuantSpec, QuantizedArray, packing, slice_codes
from matquant_jax.nn import sharding

ALL_CODES = np.tile(np.arange(256, dtype=np.uint8), 2).reshape(2, 256)  # every code, twice


@pytest.mark.parametrize('resident', [1, 2, 3, 4])
def test_every_slice_up_to_the_resident_width_is_the_parents(resident):
  held = packing.unpack(jnp.asarray(packing.pack(ALL_CODES, resident)), resident)
  assert held.dtype == jnp.uint8 and held.shape == ALL_CODES.shape
  for bits in range(1, resident + 1):
    for ep in (False, True):
      np.testing.assert_array_equal(slice_codes(np.asarray(held), bits, extra_precision=ep),
                                    slice_codes(ALL_CODES, bits, extra_precision=ep))
  # the bytes: (w + 1) bits per code, w the packed field of the top `resident` bits
  w = {1: 1, 2: 2, 3: 4, 4: 4}[resident]
  assert packing.pack(ALL_CODES, resident).nbytes == ALL_CODES.size * (w + 1) // 8


def test_the_held_codes_are_the_top_bits_plus_the_rounding_bit():
  """By hand for one code: 0b10110111 held at 2 bits keeps 10 and the rounding bit 1; at 4
  bits 1011 and the rounding bit 0."""
  codes = np.full((1, 8), 0b10110111, np.uint8)
  np.testing.assert_array_equal(packing.unpack(jnp.asarray(packing.pack(codes, 2)), 2), 0b10100000)
  np.testing.assert_array_equal(packing.unpack(jnp.asarray(packing.pack(codes, 4)), 4), 0b10110000)


def test_resident_array_dequantizes_as_the_parent():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 24)), jnp.float32)
  parent = QuantizedArray.from_float(w, 8, reduce_axes=(0,), group_size=32)
  held = packing.ResidentArray.from_parent(parent, 4)
  for bits in (1, 2, 3, 4):
    np.testing.assert_array_equal(held.dequantize(bits), parent.dequantize(bits))
  np.testing.assert_array_equal(held.dequantize(2, True), parent.dequantize(2, True))
  with pytest.raises(ValueError, match='held resident for widths up to 4'):
    held.dequantize(8)


def test_refusals():
  with pytest.raises(ValueError, match='saves nothing'):
    packing.pack(ALL_CODES, 5)
  with pytest.raises(ValueError, match='not a multiple of 8'):
    packing.pack(np.zeros((3, 12), np.uint8), 2)


CFG = nn.TransformerConfig.tiny(num_embed=64)


@pytest.fixture(scope='module')
def stored():
  model = nn.Transformer(CFG)
  params = testing.init_params(model)
  return model, parents.make_parent(CFG, params, QuantSpec(8, targets=('ffn', 'attn')))


def test_model_logits_equal_the_full_parents_at_every_held_width(stored, tmp_path):
  model, parent = stored
  held = parents.resident(parent, 4)
  assert all(isinstance(x, packing.ResidentArray) for x in jax.tree.leaves(held['params'], is_leaf=nn.is_quantized)
             if nn.is_quantized(x))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 10)))
  for bits in (4, 2, (2, 4)):
    spec_full = nn.resolve_spec(bits, parent, CFG)
    spec_held = nn.resolve_spec(bits, held, CFG)
    np.testing.assert_array_equal(model.apply(held, tokens, spec=spec_held).logits,
                                  model.apply(parent, tokens, spec=spec_full).logits)
  with pytest.raises(ValueError, match='widths 1..4'):
    nn.resolve_spec(8, held, CFG)
  q_full, q_held = parents.weight_bytes(parent)['quantized'], parents.weight_bytes(held)['quantized']
  codes = sum(x.codes.size for x in jax.tree.leaves(parent['params'], is_leaf=nn.is_quantized)
              if nn.is_quantized(x))
  assert q_full - q_held == codes - codes * 5 // 8  # 5/8 byte per code at 4 bits
  with pytest.raises(ValueError, match='held resident'):
    parents.save(str(tmp_path / 'held'), held, model.config)
  assert not (tmp_path / 'held').exists()


def test_resident_parent_shards_like_the_weight(stored):
  """On the 8 simulated devices, packed codes are split over the weight's sharded axis."""
  _, parent = stored
  held = parents.resident(parent, 2)
  mesh = sharding.make_mesh(sharding.mesh_config(1, 1, 8))
  rules = sharding.DEFAULT_RULES
  sh = sharding.model_shardings(CFG, held['params'], mesh, rules)
  leaf = held['params']['layer_0']['mlp']['linear']  # [hidden, embed] -> packed [hidden, embed/8, 3]
  spec = sh['layer_0']['mlp']['linear'].packed.spec
  assert leaf.packed.shape == (CFG.hidden_dim, CFG.embed_dim // 8, 3) and spec[0] == 'tensor', spec
  placed = jax.device_put(held['params'], sh)
  assert len(placed['layer_0']['mlp']['linear'].packed.sharding.device_set) == 8
