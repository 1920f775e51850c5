"""Corrupt and hostile input, table-driven: each corruption of a valid tiny stored parent, GGUF
file or Hugging Face directory gives an error naming the file and what is wrong (or, where
stated, a correct result); train states restore only with their settings; a bad config value
is refused before anything is written."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from matquant_jax import nn, parents, testing
from matquant_jax.core import QuantSpec

CFG = nn.TransformerConfig.tiny(num_embed=64)
CODES = 'params/layer_0/mlp/linear/codes'
SCALE = 'params/layer_0/mlp/linear/scale'


@pytest.fixture(scope='module')
def valid(tmp_path_factory):
  model = nn.Transformer(CFG)
  params = testing.init_params(model)
  root = tmp_path_factory.mktemp('parents')
  parent = parents.make_parent(CFG, params, QuantSpec(8, targets=('ffn', 'attn')))
  parents.save(str(root / 'a'), parent, CFG)
  other = parents.make_parent(CFG, testing.init_params(model, 7), QuantSpec(8, targets=('ffn', 'attn')))
  parents.save(str(root / 'b'), other, CFG)
  return root


def _edit_tensors(d, fn, redigest=False):
  path = os.path.join(d, parents.WEIGHTS)
  tensors = dict(safetensors.numpy.load_file(path))
  fn(tensors)
  safetensors.numpy.save_file(tensors, path)
  if redigest:  # as a buggy writer would have recorded it: the value checks must still catch it
    m = json.load(open(os.path.join(d, parents.MANIFEST)))
    from matquant_jax.parents import store  # pylint: disable=g-import-not-at-top
    m['tensors'] = {k: store._tensor_entry(v) for k, v in tensors.items()}  # pylint: disable=protected-access
    json.dump(m, open(os.path.join(d, parents.MANIFEST), 'w'))


def _edit_manifest(d, fn):
  path = os.path.join(d, parents.MANIFEST)
  m = json.load(open(path))
  fn(m)
  json.dump(m, open(path, 'w'))


def _flip(t):
  t[CODES] = t[CODES].copy()
  t[CODES].flat[0] ^= 1


def _set(name, value):
  def edit(t):
    t[name] = t[name].copy()
    t[name].flat[0] = value
  return edit


CASES = {
    'a flipped code byte': (lambda d, v: _edit_tensors(d, _flip), 'SHA-256 mismatch'),
    'another parent\'s weights file': (
        lambda d, v: shutil.copy(os.path.join(v, 'b', parents.WEIGHTS), os.path.join(d, parents.WEIGHTS)),
        'SHA-256 mismatch'),
    'a float32 tensor edited to int32': (
        lambda d, v: _edit_tensors(d, lambda t: t.update({SCALE: t[SCALE].view(np.int32)})),
        r"'params/layer_0/mlp/linear/scale' is int32\[.*the manifest says float32"),
    'a tensor removed': (lambda d, v: _edit_tensors(d, lambda t: t.pop(SCALE)), 'tensors missing'),
    'a NaN scale (digests recomputed)': (
        lambda d, v: _edit_tensors(d, _set(SCALE, np.nan), redigest=True), 'scale that is not finite'),
    'a zero scale (digests recomputed)': (
        lambda d, v: _edit_tensors(d, _set(SCALE, 0.0), redigest=True), 'scale that is not finite and positive'),
    'a NaN embedding value (digests recomputed)': (
        lambda d, v: _edit_tensors(d, _set('params/embedder/input_embedding', np.nan), redigest=True),
        'params/embedder/input_embedding has 1 NaN or infinite'),
    'bits=4 over 8-bit codes': (
        lambda d, v: _edit_manifest(d, lambda m: m['quantized']['layer_0/mlp/linear'].update(bits=4)),
        r"holds code \d+, which does not fit its 4 bits"),
    'bits="8" in the manifest': (
        lambda d, v: _edit_manifest(d, lambda m: m['quantized']['layer_0/mlp/linear'].update(bits='8')),
        "bits='8' in the manifest"),
    'a tokenizer path outside the directory': (
        lambda d, v: _edit_manifest(d, lambda m: m.update(tokenizer={'file': '../../../etc/passwd'})),
        'is not a file of this directory'),
    'an unknown version': (lambda d, v: _edit_manifest(d, lambda m: m.update(version=7)), 'reads versions'),
}


@pytest.mark.parametrize('case', CASES)
def test_corruption_is_a_clear_error(valid, tmp_path, case):
  corrupt, message = CASES[case]
  d = str(tmp_path / 'p')
  shutil.copytree(valid / 'a', d)
  corrupt(d, str(valid))
  with pytest.raises(ValueError, match=message) as e:
    parents.load(d)
  assert d in str(e.value) or 'manifest' in str(e.value), e.value  # names the file


def test_verify_false_skips_only_the_digests(valid, tmp_path):
  d = str(tmp_path / 'p')
  shutil.copytree(valid / 'a', d)
  _edit_tensors(d, _flip)
  _, variables, _ = parents.load(d, verify=False)  # a flipped code is still a valid code
  assert nn.is_quantized(variables['params']['layer_0']['mlp']['linear'])
  _edit_tensors(d, _set(SCALE, np.nan))
  with pytest.raises(ValueError, match='scale that is not finite'):
    parents.load(d, verify=False)


def test_version_1_parents_still_load(valid, tmp_path):
  d = str(tmp_path / 'p')
  shutil.copytree(valid / 'a', d)
  _edit_manifest(d, lambda m: (m.pop('tensors'), m.update(version=1)))
  _, v1, _ = parents.load(d)
  _, v2, _ = parents.load(str(valid / 'a'))
  np.testing.assert_array_equal(v1['params']['layer_0']['mlp']['linear'].codes,
                                v2['params']['layer_0']['mlp']['linear'].codes)


def test_a_killed_saves_leftovers_are_removed_by_the_next_save(valid, tmp_path):
  """A `.tmp_parent_<pid>@<host>@*` directory of a process that no longer exists goes; one of a
  live process (this one) stays."""
  import socket  # pylint: disable=g-import-not-at-top
  host = socket.gethostname()
  dead = tmp_path / f'.tmp_parent_999999999@{host}@abc'
  alive = tmp_path / f'.tmp_parent_{os.getpid()}@{host}@xyz'
  dead.mkdir()
  alive.mkdir()
  _, variables, _ = parents.load(str(valid / 'a'))
  parents.save(str(tmp_path / 'new'), variables, CFG)
  assert not dead.exists() and alive.exists()
  assert sorted(os.listdir(tmp_path)) == sorted(['new', alive.name])


def test_a_tokenizer_larger_than_the_embedding_is_refused(valid, tmp_path, token_data):
  """Ids past the embedding would silently read its last row."""
  _, variables, _ = parents.load(str(valid / 'a'))
  parents.save(str(tmp_path / 't'), variables, CFG, token_data.tokenizer)  # 512 tokens, 64 rows
  with pytest.raises(ValueError, match='the tokenizer has 512 tokens, the model\'s embedding 64 rows'):
    parents.load(str(tmp_path / 't'))


# GGUF files: a valid tiny Llama file written by the exporter, then edited in place.
@pytest.fixture(scope='module')
def gguf_file(tmp_path_factory, token_data):
  from matquant_jax import ckpts  # pylint: disable=g-import-not-at-top
  from matquant_jax.nn import llama  # pylint: disable=g-import-not-at-top
  config = llama.llama_config(num_layers=2, num_embed=512, embed_dim=32, hidden_dim=64, num_heads=2,
                              num_kv_heads=1, head_dim=16, tie_embeddings=True)
  params = testing.init_params(nn.Transformer(config))
  path = str(tmp_path_factory.mktemp('gguf') / 'm.gguf')
  ckpts.export_gguf(path, params, config, token_data.tokenizer, float_type='F32', verify=False)
  return path


def _edit_gguf(path, fn):
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(path, 'r+')  # a writable memory map: edits land in the file
  fn(reader)
  del reader


def _set_field(key, value):
  return lambda r: r.fields[key].parts[-1].__setitem__(0, value)


def _retype(name, ggml_type):
  return lambda r: next(t for t in r.tensors if t.name == name).field.parts[4].__setitem__(0, ggml_type)


def _poison(name):
  return lambda r: next(t for t in r.tensors if t.name == name).data.__setitem__(0, np.nan)


GGUF_CASES = [
    ('truncated', None, 'not a readable GGUF file|needs .* bytes but the file gives it'),
    ('fewer layers in block_count', _set_field('llama.block_count', 1), r'9 tensors are not part of the llama model .* \(1 layers'),
    ('an F32 tensor retyped F16', _retype('blk.0.attn_norm.weight', 1), "tensor 'blk.0.attn_norm.weight' .F16.* needs 64 bytes but the file gives it"),
    ('a NaN weight', _poison('blk.1.ffn_norm.weight'), "tensor 'blk.1.ffn_norm.weight' holds 1 NaN"),
]


@pytest.mark.parametrize('case', GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_gguf_corruption_is_a_clear_error(gguf_file, tmp_path, case):
  from matquant_jax import ckpts  # pylint: disable=g-import-not-at-top
  name, edit, match = case
  path = str(tmp_path / 'x.gguf')
  if edit is None:
    data = open(gguf_file, 'rb').read()
    open(path, 'wb').write(data[:len(data) * 2 // 3])
  else:
    shutil.copy(gguf_file, path)
    _edit_gguf(path, edit)
  with pytest.raises(ValueError, match=match) as e:
    ckpts.load(path)
  assert path in str(e.value)
  ckpts.load(gguf_file)  # the untouched file loads


# Hugging Face directories: a valid tiny Llama directory written by `save_hf`, then edited.
@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  from matquant_jax import ckpts  # pylint: disable=g-import-not-at-top
  from matquant_jax.nn import llama  # pylint: disable=g-import-not-at-top
  config = llama.llama_config(num_layers=2, num_embed=64, embed_dim=32, hidden_dim=64, num_heads=2,
                              num_kv_heads=1, head_dim=16, tie_embeddings=True)
  d = tmp_path_factory.mktemp('hf') / 'm'
  ckpts.save_hf(str(d), testing.init_params(nn.Transformer(config)), config)
  return d


def _hf_tensors(d, fn):
  path = os.path.join(d, 'model.safetensors')
  t = dict(safetensors.numpy.load_file(path))
  fn(t)
  safetensors.numpy.save_file(t, path)


def _hf_config(d, fn):
  path = os.path.join(d, 'config.json')
  c = json.load(open(path))
  fn(c)
  json.dump(c, open(path, 'w'))


def _second_shard(d):
  t = safetensors.numpy.load_file(os.path.join(d, 'model.safetensors'))
  safetensors.numpy.save_file({'model.norm.weight': t['model.norm.weight']}, os.path.join(d, 'model-2.safetensors'))


def _truncate(d):
  path = os.path.join(d, 'model.safetensors')
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


EMBED = 'model.embed_tokens.weight'
HF_CASES = [
    ('fewer layers in num_hidden_layers', lambda d: _hf_config(d, lambda c: c.update(num_hidden_layers=1)),
     r'9 stored tensors are not part of the model config.json describes \(1 layers'),
    ('an extra bias', lambda d: _hf_tensors(d, lambda t: t.update({'model.layers.0.mlp.down_proj.bias': np.zeros(32, np.float32)})),
     "not part of the model.*down_proj.bias"),
    ('a name in two shards', _second_shard, "'model.norm.weight' is stored in two shards, model-2.safetensors and model.safetensors"),
    ('an lm_head beside tied embeddings', lambda d: _hf_tensors(d, lambda t: t.update({'lm_head.weight': t[EMBED] + 1})),
     'ties the embeddings .* holds different weights'),
    ('config.json not JSON', lambda d: open(os.path.join(d, 'config.json'), 'a').write('}'), 'config.json is not valid JSON'),
    ('a truncated shard', _truncate, 'model.safetensors: not a readable safetensors file'),
    ('a NaN weight', lambda d: _hf_tensors(d, _set('model.layers.1.mlp.up_proj.weight', np.nan)),
     "'model.layers.1.mlp.up_proj.weight' holds 1 NaN"),
]


@pytest.mark.parametrize('case', HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_corruption_is_a_clear_error(hf_dir, tmp_path, case):
  from matquant_jax import ckpts  # pylint: disable=g-import-not-at-top
  _, edit, match = case
  d = str(tmp_path / 'm')
  shutil.copytree(hf_dir, d)
  edit(d)
  with pytest.raises(ValueError, match=match) as e:
    ckpts.load(d)
  assert d in str(e.value)


def test_hf_tied_head_equal_to_the_embedding_and_rotary_caches_load(hf_dir, tmp_path):
  from matquant_jax import ckpts  # pylint: disable=g-import-not-at-top
  d = str(tmp_path / 'm')
  shutil.copytree(hf_dir, d)
  _hf_tensors(d, lambda t: t.update({'lm_head.weight': t[EMBED].copy(),
                                     'model.layers.0.self_attn.rotary_emb.inv_freq': np.ones(8, np.float32)}))
  _, got, _ = ckpts.load(d)
  _, want, _ = ckpts.load(str(hf_dir))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


# Train states: keyed to what made them; a diverging loss stops the run.
def _train(ckpt_dir, steps=2, lr=1e-2, seed_batch=3):
  from matquant_jax.algos import qat  # pylint: disable=g-import-not-at-top
  from matquant_jax.core import losses  # pylint: disable=g-import-not-at-top
  model = nn.Transformer(CFG)
  batch = np.asarray(jax.random.randint(jax.random.PRNGKey(seed_batch), (2, 9), 1, 64))
  opts = qat.Options(steps=steps, learning_rate=lr, log_every=1)
  return qat.train(model, testing.init_params(model), losses.parse_objective('8'), lambda s: batch, opts,
                   ckpt_dir, settings={'data': 'batch-3'})


def test_a_train_state_restores_only_with_its_settings(tmp_path):
  d = str(tmp_path / 'ckpt')
  _train(d, steps=3)
  with pytest.raises(ValueError, match=r'made with options.learning_rate=0.01, but this run has options.learning_rate=0.02'):
    _train(d, steps=3, lr=2e-2)
  with pytest.raises(ValueError, match=r"holds step 3, past this run's 2 steps"):
    _train(d, steps=2)
  _train(d, steps=3)  # the same settings resume (here: nothing left to do)


def test_a_diverging_loss_stops_the_run_before_it_is_saved(tmp_path):
  d = str(tmp_path / 'ckpt')
  with pytest.raises(FloatingPointError, match=r'loss .* at step \d+ .*lower the learning rate'):
    _train(d, steps=6, lr=1e12)
  assert not any(n.isdigit() for n in os.listdir(d))  # no checkpoint of the blown-up state


def test_a_shared_float_model_is_keyed_to_its_settings(tmp_path):
  """Studies sharing pretrain.checkpoint_dir: the same float settings share the directory, others
  (steps, learning rate) get a subdirectory each, so none resumes another's model."""
  from matquant_jax.algos import blockwise, qat  # pylint: disable=g-import-not-at-top
  from matquant_jax.core import losses  # pylint: disable=g-import-not-at-top
  from matquant_jax.lab import configs, study  # pylint: disable=g-import-not-at-top
  def cfg(**pretrain):
    c = configs.base_config()
    c.pretrain.update(checkpoint_dir=str(tmp_path / 'float'), **pretrain)
    return c
  a = cfg()
  shared = study.float_dir(a, 'unused')
  assert shared == str(tmp_path / 'float')  # a new shared directory is used as it is
  # what qat.train records when study.pretrain trains there
  settings = qat.run_settings(losses.parse_objective('float'), qat.Options.from_config(a.pretrain),
                              {'float': study.float_settings(a)})
  blockwise.check_settings(shared, settings, has_checkpoint=False)
  assert study.float_dir(cfg(log_every=7, checkpoint_every=9), 'unused') == shared
  longer, faster = study.float_dir(cfg(steps=1600), 'unused'), study.float_dir(cfg(optimizer=configs.optimizer(1e-2, 50)), 'unused')
  assert len({shared, longer, faster}) == 3 and all(os.path.dirname(p) == shared for p in (longer, faster))
  assert study.float_dir(cfg(steps=1600), 'unused') == longer  # stable


def test_a_bad_config_value_is_refused_before_anything_is_written(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from matquant_jax.lab import study  # pylint: disable=g-import-not-at-top
  quick = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'configs', 'quick.py')
  for field, value, match in [('qat.steps', -1, 'train.steps must be an integer >= 1'),
                              ('pretrain.optimizer.learning_rate', float('nan'), 'learning_rate is nan'),
                              ('model.num_layers', 0, 'num_layers must be a positive integer'),
                              ('eval.bits', (9,), r'bits must be an integer in \[1, parent_bits=8\], got 9'),
                              ('qat.quant.group_size', -4, 'group_size must be a positive integer')]:
    spec = importlib.util.spec_from_file_location('quick', quick)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    *path, last = field.split('.')
    node = c
    for p in path:
      node = node[p]
    node[last] = value
    workdir = tmp_path / field
    with pytest.raises(ValueError, match=match):
      study.run_study(c, str(workdir))
    assert not workdir.exists(), field


def test_a_parent_without_a_tokenizer_is_named_by_the_sampler(valid):
  from matquant_jax.text import sampler  # pylint: disable=g-import-not-at-top
  model, variables, tokenizer = parents.load(str(valid / 'a'))  # saved without one
  assert tokenizer is None
  with pytest.raises(ValueError, match='the Sampler needs a tokenizer'):
    sampler.Sampler(model, variables, tokenizer)
