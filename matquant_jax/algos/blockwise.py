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
              float_targets: bool = False) -> Tree:
  """Runs the block loop; returns the final `state` (the tree saved after every block).

  calibrate_block(i, key, block, state, streams, target, bar) -> state: calibrates block i
  (streams: {r: [n, T, D]}; target: the float block's output on the float stream when
  `float_targets`, else None; bar: the progress bar, advanced by `units_per_block` in all).
  """
  tokens = check_tokens(tokens)
  mngr, done, state = restore(ckpt_dir, state, desc, config.num_layers)
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


def restore(ckpt_dir: str | None, like, desc: str, num_blocks: int):
  """(manager or None, blocks done, tree) for a layer-wise algorithm that saves `like`'s
  structure after every block (step = blocks done): the latest save, restored if present."""
  if not ckpt_dir:
    return None, 0, like
  mngr = checkpoint_manager(ckpt_dir, keep=1)
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
