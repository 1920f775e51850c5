"""The one block driver the post-training algorithms share (OmniQuant, GPTQ).

Both walk the decoder one block at a time: each width r of the objective has its own
activation stream (the output of the already calibrated blocks at r), the algorithm
calibrates block i from those streams (and, for OmniQuant, the float block's output on
the float model's stream), and the streams advance through the calibrated block. The
driver owns what is the same: the streams, per-block orbax saves and resume (a run stopped
in block i restarts there, with the streams rebuilt through the finished blocks), progress
with rates and ETA, and timing logs. An algorithm supplies `calibrate_block` and `forward`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from matquant_jax import nn
from matquant_jax.core import files

Tree = Any
# forward(i, key, block, state, bits) -> fn(x [n, T, D], tokens [n, T]) -> block output;
# bits None is the float block.
Forward = Callable[[int, str, nn.Block, Tree, Any], Callable]


def check_tokens(tokens) -> np.ndarray:
  """Calibration tokens as int [samples, seq_len], or a named error."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f'calibration tokens must be [samples, seq_len], got shape {tokens.shape}')
  return tokens


def chunked(fn: Callable, x: jax.Array, tokens: np.ndarray, size: int) -> jax.Array:
  """fn over rows of (x, tokens), `size` rows at a time (activation memory only)."""
  return jnp.concatenate([fn(x[i:i + size], tokens[i:i + size]) for i in range(0, len(x), size)])


def calibrate(config: nn.TransformerConfig, params: Tree, tokens: np.ndarray, state: Tree, *,
              widths: Sequence[int], calibrate_block: Callable, forward: Forward, batch_size: int,
              units_per_block: int, ckpt_dir: str | None = None, desc: str = 'calibrate',
              float_targets: bool = False, settings: dict | None = None) -> Tree:
  """Runs the block loop; returns the final `state` (the tree saved after every block).

  calibrate_block(i, key, block, state, streams, target, bar) -> state: calibrates block i
  (streams: {r: [n, T, D]}; target: the float block's output on the float stream when
  `float_targets`, else None; bar: the progress bar, advanced by `units_per_block` in all).
  settings: the algorithm's (objective, spec, options); with the model config and a digest of
  the calibration tokens they key `ckpt_dir` (a resume with other settings is refused).
  """
  tokens = check_tokens(tokens)
  digest = hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]
  settings = {'model': config, 'tokens': {'shape': tokens.shape, 'sha256': digest}, **(settings or {})}
  mngr, done, state = restore(ckpt_dir, state, desc, config.num_layers, settings)
  if done >= config.num_layers:  # finished: no activation streams to rebuild
    mngr.close()
    return state
  bs = batch_size
  x0 = chunked(lambda t, _: nn.embed(config, params, t), tokens, tokens, bs)
  streams, fp = {r: x0 for r in widths}, x0
  layers = nn.blocks(config)
  bar = tqdm.tqdm(total=(len(layers) - done) * units_per_block, desc=desc, mininterval=2.0,
                  dynamic_ncols=True, disable=jax.process_index() != 0)
  t_start = time.perf_counter()
  for i, (key, block) in enumerate(layers):
    target = chunked(forward(i, key, block, state, None), fp, tokens, bs) if float_targets else None
    if i >= done:
      t0 = time.perf_counter()
      bar.set_description(f'{desc} block {i + 1}/{len(layers)}')
      state = calibrate_block(i, key, block, state, streams, target, bar)
      logging.info('%s: block %d/%d in %.1fs', desc, i + 1, len(layers), time.perf_counter() - t0)
    streams = {r: chunked(forward(i, key, block, state, r), streams[r], tokens, bs) for r in widths}
    fp = target
    if mngr is not None and i >= done:
      mngr.save(i + 1, args=ocp.args.StandardSave(state))
      mngr.wait_until_finished()  # a run stopped in the next block finds this one complete
  bar.close()
  if mngr is not None:
    mngr.close()
  logging.info('%s: %d blocks in %.1fs', desc, len(layers) - done, time.perf_counter() - t_start)
  return state


def restore(ckpt_dir: str | None, like, desc: str, num_blocks: int, settings: dict | None = None):
  """(manager or None, blocks done, tree) for a layer-wise algorithm that saves `like`'s
  structure after every block (step = blocks done): the latest save, restored if present.
  `settings` (what decides the saves' contents) must equal those the saves were made with."""
  if not ckpt_dir:
    return None, 0, like
  mngr = checkpoint_manager(ckpt_dir, keep=1)
  check_settings(ckpt_dir, settings or {}, has_checkpoint=mngr.latest_step() is not None)
  done = mngr.latest_step()
  if done is None:
    return mngr, 0, like
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  logging.info('%s: resuming after block %d of %d', desc, done, num_blocks)
  return mngr, done, mngr.restore(done, args=ocp.args.StandardRestore(abstract))


def checkpoint_manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  """An orbax manager keeping the last `keep` steps (saves are atomic)."""
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


SETTINGS_FILE = 'matquant_settings.json'


def as_settings(obj) -> Any:
  """`obj` (dicts, dataclasses, tuples, numbers, strings) as JSON values, the form stored."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
  if isinstance(obj, dict):
    return {str(k): as_settings(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [as_settings(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj if obj is None or isinstance(obj, (bool, int, float, str)) else repr(obj)


def first_difference(old: dict, new: dict, prefix: str = '') -> str | None:
  """The first dotted key (sorted) whose value differs between two nested dicts, or None."""
  for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      found = first_difference(a, b, f'{prefix}{key}.')
      if found:
        return found
    elif a != b:
      return prefix + key
  return None


def lookup(tree: dict, dotted: str):
  for part in dotted.split('.'):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def check_settings(directory: str, settings: dict, has_checkpoint: bool) -> None:
  """Keys a checkpoint directory to what made it: records `settings` in DIRECTORY/SETTINGS_FILE
  and, where checkpoints exist, raises ValueError naming the first field that differs from
  the recorded one (so two runs can never restore each other's state)."""
  settings = as_settings(settings)
  path = os.path.join(directory, SETTINGS_FILE)
  if has_checkpoint and os.path.exists(path):
    before = files.read_json(path)
    key = first_difference(before, settings)
    if key is not None:
      raise ValueError(f'{directory} holds checkpoints made with {key}={lookup(before, key)!r}, but this '
                       f'run has {key}={lookup(settings, key)!r}; use another checkpoint directory '
                       '(or remove this one to start over)')
    return
  if has_checkpoint:
    logging.warning('%s: checkpoints made before settings were recorded; recording these', directory)
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    files.write_json(path, settings, sort_keys=True)
