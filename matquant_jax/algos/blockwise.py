"""What the block-by-block algorithms share: per-block resume from an orbax directory."""

from __future__ import annotations

import os

from absl import logging
import jax
import orbax.checkpoint as ocp


def restore_blockwise(ckpt_dir: str | None, like, desc: str, num_blocks: int):
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
