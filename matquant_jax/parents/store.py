"""The stored parent: one directory a user ships, reloads and serves at any width.

    <dir>/manifest.json       format, version, family, widths, the quantized paths, the run
    <dir>/config.json         the TransformerConfig fields
    <dir>/weights.safetensors 'params/<path>' float weights (stored dtype);
                              'params/<path>/{codes,scale,zero_point}' per quantized weight
                              (+ outlier_index int32, outlier_value float16 when kept);
                              'quant/<path>/<leaf>' OmniQuant's shift, smooth and bias
    <dir>/tokenizer.model or tokenizer.json

`save` writes a uint8 parent (every width sliceable from it); `export` writes
one width, or one per layer, with the codes packed densely: ceil(N * r / 8)
bytes for N codes at r bits, for every r in 1..8 (bit planes, little-endian,
so 3- and 6-bit codes cross byte boundaries and nothing is padded). A packed
r-bit weight loads as an r-bit parent, scale * 2^(8-r) and zero point / 2^(8-r),
which dequantizes bit-identically to the 8-bit parent sliced at r. (Slicing it
further rounds twice, so it is not the 8-bit parent's narrower slice.) `load`
returns (model, variables, tokenizer); a missing, truncated or foreign entry is
an error naming it.

Each quantized weight records the slice grid it was made for (version 4,
`QuantizedArray.slice_grid`); a packed export below the parent's width keeps the
top bits, the MSB slice, and refuses a parent made for another grid.

Integrity (version 2): the manifest records every tensor's dtype, shape and
SHA-256 and the tokenizer file's SHA-256; `load` verifies them (`verify=False`
skips the digests, for speed) and always checks what must hold: finite,
positive scales; finite zero points; codes that fit the weight's bits; finite
float weights; a tokenizer file inside the directory whose vocabulary fits the
embedding. Files are fsynced before the directory is renamed into place, and
a save removes what a killed save on this host left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Mapping, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from matquant_jax import nn
from matquant_jax.core import files, quant
from matquant_jax.parents.make import resident
from matquant_jax.text import tokenization


FORMAT, VERSION = 'matquant-parent', 4  # 3: kept outliers; 4: each weight's slice grid
READS = (1, 2, 3, 4)  # version 1 parents (before per-tensor digests) still load
_TMP = '.tmp_parent_'


_ITEMSIZE = {'U8': 1, 'I8': 1, 'BF16': 2, 'F16': 2, 'F32': 4, 'I32': 4, 'F64': 8, 'I64': 8}


WEIGHTS, MANIFEST, CONFIG = 'weights.safetensors', 'manifest.json', 'config.json'


def family(config: nn.TransformerConfig) -> str:
  """The model family a config describes (recorded in the manifest)."""
  if config.norm_plus_one:
    return 'gemma3' if config.qk_norm else 'gemma2'
  return 'mistral' if config.attention_pattern == 'sliding' else 'llama'


def is_parent(directory: str) -> bool:
  """Whether `directory` holds a stored parent (its manifest names this format)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    try:
      return json.load(f).get('format') == FORMAT
    except json.JSONDecodeError:
      return False


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Codes < 2**bits, any shape -> ceil(size * bits / 8) bytes (bit planes, little-endian)."""
  codes = np.asarray(codes, np.uint8).reshape(-1, 1)
  if codes.size and int(codes.max()) >= 2**bits:
    raise ValueError(f'a code {int(codes.max())} does not fit in {bits} bits')
  planes = np.unpackbits(codes, axis=1, bitorder='little')[:, :bits]
  return np.packbits(planes.reshape(-1), bitorder='little')


def unpack(packed: np.ndarray, bits: int, shape: Sequence[int]) -> np.ndarray:
  """The inverse of `pack`: uint8 codes of `shape`."""
  n = math.prod(shape)
  if packed.size != -(-n * bits // 8):
    raise ValueError(f'{packed.size} packed bytes cannot hold {n} codes of {bits} bits')
  planes = np.unpackbits(packed, bitorder='little')[:n * bits].reshape(n, bits)
  planes = np.pad(planes, ((0, 0), (0, 8 - bits)))
  return np.packbits(planes, axis=1, bitorder='little').reshape(shape)


def _layer_of(path: str) -> int:
  m = re.match(r'layer_(\d+)/', path)
  if m is None:
    raise ValueError(f'quantized weight {path!r} is not inside a layer')
  return int(m.group(1))


def _tensors(variables, layer_bits: Sequence[int] | None, float_dtype):
  """Named numpy arrays and the manifest's per-weight entries."""
  tensors, quantized = {}, {}
  for collection, tree in variables.items():
    for path, leaf in nn.flat_leaves(tree).items():
      name = f'{collection}/{path}'
      if not nn.is_quantized(leaf):
        a = np.asarray(leaf)
        tensors[name] = a.astype(float_dtype) if float_dtype and collection == 'params' else a
        continue
      if hasattr(leaf, 'max_bits'):
        raise ValueError(f'{name} is held resident for widths up to {leaf.max_bits} (parents.resident); '
                         'save or export the full parent, then hold it resident after loading')
      entry = {'shape': list(leaf.shape), 'codes_shape': list(leaf.codes.shape),
               'bits': leaf.parent_bits, 'group_size': leaf.group_size, 'packed': False,
               'slice_grid': leaf.slice_grid}
      codes, scale, zero = np.asarray(leaf.codes), np.asarray(leaf.scale), np.asarray(leaf.zero_point)
      if layer_bits is not None:
        r = layer_bits[_layer_of(path)]
        if r > leaf.parent_bits:
          raise ValueError(f'{path}: width {r} is wider than its stored {leaf.parent_bits}-bit parent')
        quant.check_slice_grid(leaf, 'msb', r, f'{path}: a packed int{r} export', quant.TOP_BITS_FIX)
        shift = leaf.parent_bits - r
        codes = np.asarray(leaf.sliced_codes(r), np.int32) >> shift  # 0 .. 2^r - 1
        scale, zero = scale * np.float32(2**shift), zero / np.float32(2**shift)
        codes = pack(codes, r)
        entry.update(bits=r, packed=True)
      tensors[f'{name}/codes'] = np.asarray(codes, np.uint8)
      tensors[f'{name}/scale'] = np.asarray(scale, np.float32)
      tensors[f'{name}/zero_point'] = np.asarray(zero, np.float32)
      if leaf.outlier_index is not None:  # restored at every width, the packed one too
        tensors[f'{name}/outlier_index'] = np.asarray(leaf.outlier_index, np.int32)
        tensors[f'{name}/outlier_value'] = np.asarray(leaf.outlier_value, np.float16)
        entry['outliers'] = int(leaf.outlier_index.shape[0])
      quantized[path] = entry
  return tensors, quantized


def _write(directory: str, variables, config: nn.TransformerConfig, tokenizer, manifest: dict,
           layer_bits, float_dtype) -> None:
  """Writes into a fresh temporary directory, then renames it into place (nothing half-written)."""
  if 'params' not in variables:
    variables = {'params': variables}
  tensors, quantized = _tensors(variables, layer_bits, float_dtype)
  if not quantized:
    raise ValueError('variables hold no QuantizedArray weights; make a parent first '
                     '(omniquant.make_parent)')
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f'{directory} exists; choose a new directory or remove it')
  parent_dir = os.path.dirname(directory)
  os.makedirs(parent_dir, exist_ok=True)
  _remove_stale_temporaries(parent_dir)
  tmp = tempfile.mkdtemp(prefix=f'{_TMP}{os.getpid()}@{socket.gethostname()}@', dir=parent_dir)
  try:
    safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS))
    tok_entry = _save_tokenizer(tmp, tokenizer)
    if tok_entry is not None:
      tok_entry['sha256'] = _file_digest(os.path.join(tmp, tok_entry['file']))
    widths = sorted({e['bits'] for e in quantized.values()})
    groups = sorted({e['group_size'] or 0 for e in quantized.values()})
    manifest = {'format': FORMAT, 'version': VERSION, 'family': family(config),
                'parent_bits': max(widths), 'widths': widths,
                'group_size': (groups[0] or None) if len(groups) == 1 else 'mixed',
                'quantized': quantized, 'tokenizer': tok_entry,
                'tensors': {name: _tensor_entry(a) for name, a in sorted(tensors.items())}, **manifest}
    with open(os.path.join(tmp, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=1)
    with open(os.path.join(tmp, CONFIG), 'w') as f:
      json.dump(dataclasses.asdict(config), f, indent=1)
    for name in os.listdir(tmp):  # on disk before the rename makes the directory visible
      with open(os.path.join(tmp, name), 'rb') as f:
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    os.replace(tmp, directory)
    _fsync_dir(parent_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _tensor_entry(a: np.ndarray) -> dict:
  a = np.ascontiguousarray(a)
  return {'dtype': a.dtype.name, 'shape': list(a.shape), 'sha256': hashlib.sha256(a.tobytes()).hexdigest()}


def _file_digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # platforms without directory handles
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _remove_stale_temporaries(parent_dir: str) -> None:
  """Removes `.tmp_parent_<pid>@<host>@*` siblings whose writer (a process of this host) is gone."""
  host = socket.gethostname()
  for name in os.listdir(parent_dir):
    m = re.fullmatch(rf'{re.escape(_TMP)}(\d+)@(.+)@\w+', name)
    if not m or m.group(2) != host:
      continue
    try:
      os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent_dir, name), ignore_errors=True)
    except PermissionError:  # alive, another user's
      pass


def _save_tokenizer(directory: str, tokenizer) -> dict | None:
  if tokenizer is None:
    return None
  tokenizer = tokenization.wrap(tokenizer)
  entry = {'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id}
  if isinstance(tokenizer, tokenization.SentencePieceTokenizer):
    with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
      f.write(tokenizer.sp.serialized_model_proto())
    return {'file': 'tokenizer.model', **entry}
  if isinstance(tokenizer, tokenization.HFTokenizer):
    with open(os.path.join(directory, 'tokenizer.json'), 'w') as f:
      f.write(tokenizer.tk.to_str())
    return {'file': 'tokenizer.json', **entry}
  raise TypeError(f'cannot store a tokenizer of type {type(tokenizer).__name__}')


def save(directory: str, variables, config: nn.TransformerConfig, tokenizer=None, *,
         run: Mapping[str, Any] | None = None, float_dtype=None) -> None:
  """Writes a stored parent: variables {'params', optional 'quant'} with `QuantizedArray`
  weights (as `omniquant.make_parent` makes them). `run` describes how it was made;
  float_dtype (e.g. jnp.bfloat16) recasts the other weights, default as they are."""
  _write(directory, variables, config, tokenizer, {'kind': 'parent', 'run': dict(run or {})},
         None, float_dtype)


def export(directory: str, variables, config: nn.TransformerConfig, tokenizer, bits, *,
           run: Mapping[str, Any] | None = None, float_dtype=None) -> None:
  """Writes the parent sliced to `bits` (anything `nn.resolve_spec` takes: a width, a per-layer
  tuple, a plan file), codes packed densely. Extra-precision slices are not exported: their
  2^r + 1 levels need r + 1 bits, so export width r + 1 instead."""
  if bits is None:
    raise ValueError('export needs bits: a width, a per-layer tuple or a plan file')
  spec = nn.resolve_spec(bits, variables, config)
  layer_bits = tuple(spec.bits_for(i, config.num_layers) for i in range(config.num_layers))
  if None in layer_bits:
    raise ValueError('a packed export needs a width for every layer (None would mean float weights)')
  _write(directory, variables, config, tokenizer,
         {'kind': 'packed', 'layer_bits': list(layer_bits), 'run': dict(run or {})}, layer_bits,
         float_dtype)


def read_manifest(directory: str) -> dict:
  """The manifest, checked to be this format and version."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'parent directory {directory} does not exist')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory} is not a stored parent: {MANIFEST} is missing')
  manifest = files.read_json(path)
  if manifest.get('format') != FORMAT:
    raise ValueError(f'{path}: format {manifest.get("format")!r}, expected {FORMAT!r} '
                     '(a foreign directory?)')
  if manifest.get('version') not in READS:
    raise ValueError(f'{path}: version {manifest.get("version")!r}; this code reads versions {READS}')
  return manifest


def read_config(directory: str) -> nn.TransformerConfig:
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory}: {CONFIG} is missing')
  fields = files.read_json(path)
  known = {f.name for f in dataclasses.fields(nn.TransformerConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'{path}: unknown config fields {unknown}')
  return nn.TransformerConfig(**fields)


def _load_tokenizer(directory: str, entry: dict | None, verify: bool = True):
  if entry is None:
    return None
  path = os.path.realpath(os.path.join(directory, entry['file']))
  if os.path.dirname(path) != os.path.realpath(directory):
    raise ValueError(f'{directory}: the manifest\'s tokenizer file {entry["file"]!r} is not a file of '
                     'this directory')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory}: tokenizer file {entry["file"]} is missing')
  if verify and 'sha256' in entry and _file_digest(path) != entry['sha256']:
    raise ValueError(f'{path}: SHA-256 differs from the manifest\'s (changed or replaced after saving)')
  if entry['file'].endswith('.model'):
    return tokenization.from_sentencepiece(path)
  return tokenization.from_tokenizer_json(path, entry.get('bos_id'), entry.get('eos_id'))


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing')
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # the library raises its own error types for a damaged file
    raise ValueError(f'{path} cannot be read ({e}); is it truncated?') from None


def load(directory: str, resident_bits: int | None = None, *, verify: bool = True):
  """(model, variables, tokenizer) of a stored parent or packed export.

  The stored weights stay quantized in `variables` (`QuantizedArray` leaves on
  the default device); the model slices them per call (`spec=QuantSpec(...)`).
  resident_bits: hold them for widths up to this only, in fewer bytes (`make.resident`).
  verify: check every tensor's SHA-256 against the manifest (the value checks always run).
  """
  directory = os.path.abspath(directory)
  manifest = read_manifest(directory)
  config = read_config(directory)
  weights = os.path.join(directory, WEIGHTS)
  tensors = _read_tensors(weights)
  _check_tensors(weights, tensors, manifest, verify)

  def take(name, shape=None):
    if name not in tensors:
      raise ValueError(f'{weights}: tensor {name!r} is missing')
    a = tensors.pop(name)
    if shape is not None and tuple(a.shape) != tuple(shape):
      raise ValueError(f'{weights}: tensor {name!r} has shape {a.shape}, expected {tuple(shape)}')
    return a

  quantized = manifest['quantized']
  # before version 4 only the run metadata (when its maker recorded it) says which slice a parent is for
  made_for = (manifest.get('run') or {}).get('slice_grid', 'msb')
  params = {}
  for path, want in nn.param_shapes(config).items():
    if path not in quantized:
      a = take(f'params/{path}', want.shape)
      bad = a.size - np.count_nonzero(np.isfinite(a))
      if bad:
        raise ValueError(f'{weights}: tensor params/{path} has {bad} NaN or infinite values')
      params[path] = jnp.asarray(a)
      continue
    e = quantized[path]
    if tuple(e['shape']) != want.shape:
      raise ValueError(f'{directory}: quantized weight {path!r} has shape {tuple(e["shape"])}, '
                       f'the config expects {want.shape}')
    codes = take(f'params/{path}/codes')
    if e['packed']:
      codes = unpack(codes, e['bits'], e['codes_shape'])
    elif tuple(codes.shape) != tuple(e['codes_shape']):
      raise ValueError(f'{weights}: codes of {path!r} have shape {codes.shape}, '
                       f'the manifest says {tuple(e["codes_shape"])}')
    stats = quant.stats_shape(e['shape'], nn.weight_info(config, path).reduce_axes, e['group_size'])
    scale, zero = take(f'params/{path}/scale', stats), take(f'params/{path}/zero_point', stats)
    _check_values(weights, path, e['bits'], codes, scale, zero)
    kept = (None, None)
    if e.get('outliers'):
      kept = (take(f'params/{path}/outlier_index', (e['outliers'],)), take(f'params/{path}/outlier_value', (e['outliers'],)))
      _check_outliers(weights, path, e['shape'], *kept)
      kept = tuple(jnp.asarray(a) for a in kept)
    grid = e.get('slice_grid', made_for)
    if grid not in quant.SLICE_GRIDS:
      raise ValueError(f'{directory}: quantized weight {path!r} has slice_grid {grid!r}; '
                       f'this code knows {quant.SLICE_GRIDS}')
    params[path] = quant.QuantizedArray(jnp.asarray(codes, jnp.uint8), jnp.asarray(scale),
                                        jnp.asarray(zero), e['bits'], tuple(e['shape']), *kept, grid)
  unknown = sorted(set(quantized) - set(params))
  if unknown:
    raise ValueError(f'{directory}: the manifest names quantized weights the model does not have: {unknown}')
  aux = {name[len('quant/'):]: jnp.asarray(tensors.pop(name)) for name in list(tensors)
         if name.startswith('quant/')}
  if tensors:
    raise ValueError(f'{weights}: unexpected tensors {sorted(tensors)[:5]}')
  variables = {'params': traverse_util.unflatten_dict(params, sep='/')}
  if resident_bits is not None:
    variables = resident(variables, resident_bits)
  if aux:
    variables['quant'] = traverse_util.unflatten_dict(aux, sep='/')
  tokenizer = _load_tokenizer(directory, manifest.get('tokenizer'), verify)
  if tokenizer is not None and tokenizer.vocab_size() > config.num_embed:
    raise ValueError(f'{directory}: the tokenizer has {tokenizer.vocab_size()} tokens, the model\'s '
                     f'embedding {config.num_embed} rows (ids past it would read the wrong row)')
  return nn.Transformer(config), variables, tokenizer


def _check_tensors(path: str, tensors: Mapping[str, np.ndarray], manifest: dict, verify: bool) -> None:
  """The file's tensors are exactly the manifest's, with its dtypes, shapes (and digests)."""
  want = manifest.get('tensors')
  if want is None:
    logging.info('%s: a version %s parent carries no digests; not verified', path, manifest['version'])
    return
  missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
  if missing or extra:
    raise ValueError(f'{path}: tensors missing {missing[:5]} / not in the manifest {extra[:5]} '
                     '(a weights file from another parent?)')
  for name, e in want.items():
    a = np.ascontiguousarray(tensors[name])
    if a.dtype.name != e['dtype'] or list(a.shape) != e['shape']:
      raise ValueError(f'{path}: tensor {name!r} is {a.dtype.name}{list(a.shape)}, the manifest says '
                       f'{e["dtype"]}{e["shape"]}')
    if verify and hashlib.sha256(a.tobytes()).hexdigest() != e['sha256']:
      raise ValueError(f'{path}: tensor {name!r} differs from what was saved (SHA-256 mismatch: '
                       'a changed byte, or another parent\'s file)')


def _check_values(path: str, name: str, bits, codes, scale, zero) -> None:
  """What a stored weight must satisfy whatever its digests say."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= quant.MAX_PARENT_BITS:
    raise ValueError(f'{path}: weight {name!r} has bits={bits!r} in the manifest; expected an integer 1..8')
  if codes.size and int(np.max(codes)) >= 2**bits:
    raise ValueError(f'{path}: weight {name!r} holds code {int(np.max(codes))}, which does not fit its '
                     f'{bits} bits (the manifest\'s bits are wrong)')
  if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
    raise ValueError(f'{path}: weight {name!r} has a scale that is not finite and positive')
  if not np.all(np.isfinite(zero)):
    raise ValueError(f'{path}: weight {name!r} has a zero point that is not finite')


def _check_outliers(path: str, name: str, shape, index, value) -> None:
  if index.dtype != np.int32 or value.dtype != np.float16:
    raise ValueError(f'{path}: outliers of {name!r} are {index.dtype}/{value.dtype}, expected int32/float16')
  if index.size and (int(index.min()) < 0 or int(index.max()) >= math.prod(shape) or np.any(np.diff(index) <= 0)):
    raise ValueError(f'{path}: outlier indices of {name!r} are not distinct, sorted and inside its {tuple(shape)} weight')
  if not np.all(np.isfinite(value)):
    raise ValueError(f'{path}: weight {name!r} has a kept outlier that is not finite')


def weight_bytes(variables) -> dict[str, int]:
  """Resident bytes of `variables`: 'quantized' (codes, scales, zero points), 'other', 'total'."""
  q = o = 0
  for leaf in nn.flat_leaves(variables).values():
    if nn.is_quantized(leaf):
      q += sum(np.asarray(x).nbytes for x in jax.tree.leaves(leaf))  # codes (or packed), scales
    else:
      o += np.asarray(leaf).nbytes
  return {'quantized': q, 'other': o, 'total': q + o}


def file_bytes(directory: str) -> dict[str, int]:
  """Bytes on disk of a stored directory: 'codes', 'scales' (scale + zero point), 'outliers', 'other'
  tensors, and 'total' (every file, headers and tokenizer included)."""
  quantized = {f'params/{p}' for p in read_manifest(directory)['quantized']}
  out = {'codes': 0, 'scales': 0, 'outliers': 0, 'other': 0}
  with safetensors.safe_open(os.path.join(directory, WEIGHTS), 'numpy') as f:  # header only
    for name in f.keys():
      t = f.get_slice(name)
      base, _, leaf = name.rpartition('/')
      kind = ('other' if base not in quantized else 'codes' if leaf == 'codes'
              else 'outliers' if leaf.startswith('outlier_') else 'scales')
      out[kind] += math.prod(t.get_shape()) * _ITEMSIZE[t.get_dtype()]
  out['total'] = sum(os.path.getsize(os.path.join(directory, p)) for p in os.listdir(directory))
  return out
