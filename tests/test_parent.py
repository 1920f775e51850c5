"""The stored parent: bit-exact round trip, dense packing, packed exports, sizes, errors."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from matquant_jax import ckpts, nn, parents, testing
from matquant_jax.algos import omniquant
from matquant_jax.core import QuantSpec, plans
from matquant_jax.text import tokenization

CFG = nn.TransformerConfig.tiny(num_embed=512)  # the 512-token test tokenizer fits its embedding
TOKENS = jnp.asarray(np.random.default_rng(0).integers(4, 64, (2, 9)))


def _hf_tokenizer():
  import tokenizers
  from tokenizers import models, pre_tokenizers
  tk = tokenizers.Tokenizer(models.WordLevel({'<pad>': 0, '</s>': 1, '<s>': 2, '[UNK]': 3, 'to': 4,
                                              'be': 5}, unk_token='[UNK]'))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  return tokenization.HFTokenizer(tk, 2, 1)


@pytest.fixture(scope='module')
def stored():
  """An OmniQuant-transformed parent (codes, scales, shift/smooth/bias) and its float params."""
  model = nn.Transformer(CFG)
  params = testing.init_params(model)
  spec = QuantSpec(8, targets=('ffn', 'attn'))
  qtree = omniquant.init_transforms(CFG, params, spec, lwc=True, let=True)
  rng = np.random.default_rng(1)
  qtree = jax.tree.map(lambda v: jnp.asarray(v + 0.1 * rng.normal(size=v.shape), jnp.float32), qtree)
  return model, params, parents.make_parent(CFG, params, spec, qtree)


def _equal(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


def test_pack_matches_a_hand_computation():
  # 2-bit codes 1, 2, 3 -> bits (LSB first) 10 01 11 -> 0b111001 = 57
  np.testing.assert_array_equal(parents.pack(np.array([1, 2, 3]), 2), [57])
  # 3-bit codes cross bytes: 5, 7, 1 -> 101 111 100 -> byte 0 = 0b01111101 = 125, byte 1 = 0
  np.testing.assert_array_equal(parents.pack(np.array([5, 7, 1]), 3), [125, 0])
  rng = np.random.default_rng(0)
  for bits in range(1, 9):
    codes = rng.integers(0, 2**bits, (3, 5, 7)).astype(np.uint8)
    packed = parents.pack(codes, bits)
    assert packed.size == math.ceil(codes.size * bits / 8)
    np.testing.assert_array_equal(parents.unpack(packed, bits, codes.shape), codes)
  with pytest.raises(ValueError, match='a code 4 does not fit in 2 bits'):
    parents.pack(np.array([4]), 2)


def test_round_trip_is_bit_exact_with_tokenizer(stored, tmp_path, token_data):
  model, _, variables = stored
  parents.save(str(tmp_path / 'a'), variables, CFG, token_data.tokenizer, run={'name': 'test'})
  m2, v2, tok = parents.load(str(tmp_path / 'a'))
  assert m2.config == CFG and _equal(v2, variables) and set(v2) == {'params', 'quant'}
  assert tok.encode('To be, or not to be') == token_data.tokenizer.encode('To be, or not to be')
  manifest = json.load(open(tmp_path / 'a' / 'manifest.json'))
  assert manifest['family'] == 'gemma2' and manifest['parent_bits'] == 8 and manifest['run'] == {'name': 'test'}
  assert 'layer_1/mlp/linear' in manifest['quantized'] and 'layer_0/attn/q_einsum/w' in manifest['quantized']
  np.testing.assert_array_equal(np.asarray(m2.apply(v2, TOKENS, spec=QuantSpec(2, targets=('ffn', 'attn'))).logits),
                                np.asarray(model.apply(variables, TOKENS, spec=QuantSpec(2, targets=('ffn', 'attn'))).logits))
  # One entry point for every model source.
  m3, v3, _ = ckpts.load(str(tmp_path / 'a'))
  assert _equal(v3, variables)
  # A Hugging Face tokenizer (tokenizer.json) and a grouped parent, bf16 float weights.
  p = parents.make_parent(CFG, stored[1], QuantSpec(8, group_size=16))
  parents.save(str(tmp_path / 'b'), p, CFG, _hf_tokenizer(), float_dtype=jnp.bfloat16)
  _, vb, tb = parents.load(str(tmp_path / 'b'))
  assert tb.encode('to be') == [4, 5] and (tb.bos_id, tb.eos_id) == (2, 1)
  assert vb['params']['layer_0']['mlp']['linear'].codes.shape == (4, 16, 32)
  assert vb['params']['final_norm']['scale'].dtype == jnp.bfloat16
  assert json.load(open(tmp_path / 'b' / 'manifest.json'))['group_size'] == 16


@pytest.mark.parametrize('bits', [8, 6, 4, 3, 2, 1, (2, 4)])
def test_packed_export_sizes_and_logits(stored, tmp_path, bits):
  model, _, variables = stored
  parents.export(str(tmp_path / 'e'), variables, CFG, None, bits)
  _, v, _ = parents.load(str(tmp_path / 'e'))
  targets = ('ffn', 'attn')
  want = model.apply(variables, TOKENS, spec=QuantSpec(bits, targets=targets)).logits
  got = model.apply(v, TOKENS).logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  layer_bits = bits if isinstance(bits, tuple) else (bits,) * CFG.num_layers
  tensors = safetensors.numpy.load_file(str(tmp_path / 'e' / 'weights.safetensors'))
  for path, w in nn.param_shapes(CFG).items():
    if f'params/{path}/codes' in tensors:
      r = layer_bits[int(path.split('/')[0].split('_')[1])]
      assert tensors[f'params/{path}/codes'].nbytes == math.ceil(math.prod(w.shape) * r / 8), path


def test_export_from_a_plan_file(stored, tmp_path):
  _, _, variables = stored
  plans.save(str(tmp_path / 'plan.json'), [4, 2], found_by='hand')
  parents.export(str(tmp_path / 'e'), variables, CFG, None, str(tmp_path / 'plan.json'))
  assert json.load(open(tmp_path / 'e' / 'manifest.json'))['layer_bits'] == [4, 2]
  with pytest.raises(ValueError, match='3 layer widths for a 2-layer model'):
    parents.export(str(tmp_path / 'f'), variables, CFG, None, (4, 2, 8))
  with pytest.raises(ValueError, match=r'bits=8: the stored parent \(its narrowest weight has 2 bits\) give widths 1..2'):
    _, v4, _ = parents.load(str(tmp_path / 'e'))
    parents.export(str(tmp_path / 'g'), v4, CFG, None, 8)
  assert not os.path.exists(tmp_path / 'f') and not os.path.exists(tmp_path / 'g')


def test_sizes_table_arithmetic(stored, tmp_path):
  _, params, variables = stored
  parents.save(str(tmp_path / 'p'), variables, CFG)
  parents.export(str(tmp_path / 'e2'), variables, CFG, None, 2)
  p8, e2 = parents.file_bytes(str(tmp_path / 'p')), parents.file_bytes(str(tmp_path / 'e2'))
  assert p8['codes'] == 4 * e2['codes'] and p8['scales'] == e2['scales'] and p8['other'] == e2['other']
  resident = parents.weight_bytes(variables)
  assert resident['quantized'] == p8['codes'] + p8['scales']
  assert parents.weight_bytes({'params': params})['quantized'] == 0


def test_bad_directories_are_clear_errors(stored, tmp_path):
  _, _, variables = stored
  with pytest.raises(FileNotFoundError, match='does not exist'):
    parents.load(str(tmp_path / 'none'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='manifest.json is missing'):
    parents.load(str(tmp_path / 'empty'))
  d = tmp_path / 'p'
  parents.save(str(d), variables, CFG)
  with pytest.raises(FileExistsError, match='exists'):
    parents.save(str(d), variables, CFG)
  with pytest.raises(ValueError, match='no QuantizedArray weights'):
    parents.save(str(tmp_path / 'float'), {'params': stored[1]}, CFG)
  assert not os.path.exists(tmp_path / 'float')
  weights = d / 'weights.safetensors'
  whole = open(weights, 'rb').read()
  open(weights, 'wb').write(whole[:len(whole) // 2])
  with pytest.raises(ValueError, match='cannot be read .* truncated'):
    parents.load(str(d))
  tensors = safetensors.numpy.load_file(_save_and_path(variables, tmp_path / 'q'))
  del tensors['params/layer_1/mlp/linear/scale']
  safetensors.numpy.save_file(tensors, str(tmp_path / 'q' / 'weights.safetensors'))
  with pytest.raises(ValueError, match=r"tensors missing \['params/layer_1/mlp/linear/scale'\]"):
    parents.load(str(tmp_path / 'q'))
  manifest = json.load(open(d / 'manifest.json'))
  json.dump({**manifest, 'format': 'something-else'}, open(d / 'manifest.json', 'w'))
  with pytest.raises(ValueError, match="format 'something-else'.*foreign"):
    parents.load(str(d))
  c = tmp_path / 'c'
  _save_and_path(variables, c)
  cfg = json.load(open(c / 'config.json'))
  json.dump({**cfg, 'num_layers': 3}, open(c / 'config.json', 'w'))
  with pytest.raises(ValueError, match="'params/layer_2/.*' is missing"):
    parents.load(str(c))
  json.dump({**cfg, 'num_layerz': 3}, open(c / 'config.json', 'w'))
  with pytest.raises(ValueError, match=r"unknown config fields \['num_layerz'\]"):
    parents.load(str(c))


def _save_and_path(variables, d):
  parents.save(str(d), variables, CFG)
  return str(d / 'weights.safetensors')


def test_non_finite_weights_are_refused_by_name(stored):
  _, params, _ = stored
  bad = jax.tree.map(lambda x: x, params)
  w = np.array(bad['layer_1']['mlp']['linear'])
  w[0, :3] = [np.nan, np.inf, -np.inf]
  bad['layer_1']['mlp']['linear'] = jnp.asarray(w)
  with pytest.raises(ValueError, match=r'layer_1/mlp/linear: 3 of \d+ weights are NaN or infinite'):
    parents.make_parent(CFG, bad, QuantSpec(8))


def test_kept_outliers_travel_with_the_parent(stored, tmp_path, token_data):
  """Saved, loaded, held resident and exported packed, every width keeps them; bits per weight
  counts 48 bits each; GGUF, which cannot carry them, refuses."""
  model, params, _ = stored
  spec = QuantSpec(8, group_size=16)
  p = parents.make_parent(CFG, params, spec, outliers=0.01)
  leaves = [v for v in nn.flat_leaves(p['params']).values() if nn.is_quantized(v)]
  assert all(v.num_outliers == round(0.01 * math.prod(v.shape)) for v in leaves)
  parents.save(str(tmp_path / 'o'), p, CFG, token_data.tokenizer)
  _, loaded, _ = parents.load(str(tmp_path / 'o'))
  assert _equal(loaded, p)
  parents.export(str(tmp_path / 'e4'), p, CFG, None, 4)
  _, packed, _ = parents.load(str(tmp_path / 'e4'))
  for bits, variables in [(4, loaded), (4, parents.resident(loaded, 4)), (2, parents.resident(loaded, 4)), (None, packed)]:
    want = model.apply(p, TOKENS, spec=QuantSpec(bits or 4)).logits
    got = model.apply(variables, TOKENS, spec=QuantSpec(bits) if bits else None).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  without = model.apply(parents.make_parent(CFG, params, spec), TOKENS, spec=QuantSpec(4)).logits
  assert not np.allclose(np.asarray(without), np.asarray(model.apply(p, TOKENS, spec=QuantSpec(4)).logits))
  extra = 48 * sum(v.num_outliers for v in leaves) / sum(math.prod(v.shape) for v in leaves)
  assert nn.bits_per_weight(p, QuantSpec(4), CFG) == pytest.approx(4 + extra)
  assert parents.file_bytes(str(tmp_path / 'o'))['outliers'] == 6 * sum(v.num_outliers for v in leaves)
  with pytest.raises(ValueError, match='outliers outside its grid, which no GGUF block type can carry'):
    ckpts.export_gguf(str(tmp_path / 'x.gguf'), p, CFG, token_data.tokenizer, 4)


def test_regrid_spec_runs_fake_quant_and_stored_parents_alike_and_refuses_resident(stored):
  model, params, _ = stored
  spec = QuantSpec(2, slice_grid='regrid')
  parent = parents.make_parent(CFG, params, QuantSpec(8, slice_grid='regrid'))
  a = model.apply({'params': params}, TOKENS, spec=spec).logits  # fake-quant of the float weights
  b = model.apply(parent, TOKENS, spec=spec).logits
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  msb = parents.make_parent(CFG, params, QuantSpec(8))
  assert not np.allclose(np.asarray(b), np.asarray(model.apply(msb, TOKENS, spec=QuantSpec(2)).logits))
  with pytest.raises(ValueError, match="keeps only the codes' top bits"):
    model.apply(parents.resident(msb, 4), TOKENS, spec=QuantSpec(2, slice_grid='regrid'))
  with pytest.raises(ValueError, match='slice_grid must be one of'):
    QuantSpec(2, slice_grid='lsb')


def test_a_qat_spec_with_outliers_gives_the_parent_it_trained(stored):
  """QAT trains float weights under QuantSpec(outliers=f) and its parent is make_parent(params, spec):
  the parent's slices are the model QAT saw (the same weights kept, at float16)."""
  model, params, _ = stored
  spec = QuantSpec(8, outliers=0.01)
  parent = parents.make_parent(CFG, params, spec)
  for bits in (4, 2):
    a = model.apply({'params': params}, TOKENS, spec=QuantSpec(bits, outliers=0.01)).logits
    np.testing.assert_array_equal(np.asarray(model.apply(parent, TOKENS, spec=QuantSpec(bits)).logits), np.asarray(a))
  assert parents.make_parent(CFG, params, spec, outliers=0.0)['params']['layer_0']['mlp']['linear'].num_outliers == 0


def test_a_parent_made_for_the_regrid_is_served_and_exported_on_it_only(stored, tmp_path, token_data):
  """The slice grid travels with the parent (array, manifest, resolve_spec); every path that would
  silently serve another grid's int4 (a spec on the MSB slice, resident, packed or GGUF slices) refuses."""
  model, params, _ = stored
  p = parents.make_parent(CFG, params, QuantSpec(8, slice_grid='regrid'))
  assert {v.slice_grid for v in jax.tree.leaves(p, is_leaf=nn.is_quantized) if nn.is_quantized(v)} == {'regrid'}
  parents.save(str(tmp_path / 'r'), p, CFG, token_data.tokenizer)
  manifest = json.load(open(tmp_path / 'r' / 'manifest.json'))
  assert {e['slice_grid'] for e in manifest['quantized'].values()} == {'regrid'}
  _, loaded, _ = parents.load(str(tmp_path / 'r'))
  assert _equal(loaded, p)
  spec = nn.resolve_spec(4, loaded, CFG)  # what the Sampler, export and log_perplexity get from bits=4
  assert spec.slice_grid == 'regrid'
  want = model.apply(p, TOKENS, spec=QuantSpec(4, slice_grid='regrid')).logits
  np.testing.assert_array_equal(np.asarray(model.apply(loaded, TOKENS, spec=spec).logits), np.asarray(want))
  with pytest.raises(ValueError, match=r"made for slice_grid='regrid', and its int4 on slice_grid='msb'.*"
                                       r"QuantSpec\(4, slice_grid='regrid'\)"):
    model.apply(loaded, TOKENS, spec=QuantSpec(4))
  model.apply(loaded, TOKENS, spec=QuantSpec(8))  # the full width is the same on every grid
  top_bits = "keeping the top bits of a code gives its MSB slice only"
  with pytest.raises(ValueError, match='holding it resident at 4 bits.*' + top_bits):
    parents.resident(loaded, 4)
  with pytest.raises(ValueError, match='a packed int4 export.*' + top_bits):
    parents.export(str(tmp_path / 'e4'), loaded, CFG, None, 4)
  assert not os.path.exists(tmp_path / 'e4')
  with pytest.raises(ValueError, match='a GGUF int4 slice.*' + top_bits):
    ckpts.export_gguf(str(tmp_path / 'x.gguf'), loaded, CFG, token_data.tokenizer, 4)
  parents.export(str(tmp_path / 'e8'), loaded, CFG, None, 8)  # the full width exports
  assert {e['slice_grid'] for e in json.load(open(tmp_path / 'e8' / 'manifest.json'))['quantized'].values()} == {'regrid'}
  # a version-3 parent carries no per-weight grid; the run metadata its maker recorded is read
  parents.save(str(tmp_path / 'v3'), p, CFG, None, run={'slice_grid': 'regrid'})
  m = json.load(open(tmp_path / 'v3' / 'manifest.json'))
  m['version'] = 3
  for e in m['quantized'].values():
    del e['slice_grid']
  json.dump(m, open(tmp_path / 'v3' / 'manifest.json', 'w'))
  assert nn.resolve_spec(2, parents.load(str(tmp_path / 'v3'))[1], CFG).slice_grid == 'regrid'
  mixed = {'params': {**p['params'], 'layer_0': parents.make_parent(CFG, params, QuantSpec(8))['params']['layer_0']}}
  with pytest.raises(ValueError, match=r"made for different slice grids \['msb', 'regrid'\]"):
    nn.resolve_spec(4, mixed, CFG)
