"""Making a parent from float weights: min-max, or with an algorithm's transforms folded in."""

from __future__ import annotations

from typing import Any

from flax import traverse_util
import jax
import numpy as np

from matquant_jax import nn
from matquant_jax.core import packing, qeinsum, quant
from matquant_jax.core.qeinsum import QuantSpec

Tree = Any


def by_weight(qtree: Tree) -> dict[str, dict]:
  """{'layer_i/mlp/linear': {'shift': ..., 'smooth': ..., ...}}: a transform tree (or a parent's
  'quant' collection) keyed by the weight it belongs to."""
  out = {}
  for k, v in traverse_util.flatten_dict(qtree, sep='/').items():
    weight, _, leaf = k.rpartition('/')
    out.setdefault(weight, {})[leaf] = v
  return out


def make_parent(config: nn.TransformerConfig, params: Tree, spec: QuantSpec,
                transforms: Tree | None = None, outliers: float | None = None) -> dict[str, Tree]:
  """A stored parent, {'params', 'quant'} variables, from float weights at `spec`.

  Every quantized weight (spec.targets) becomes a `QuantizedArray` of Q(W s)
  (uint8 codes, per-channel scale and zero point, clipped by gamma, beta;
  plain min-max without `transforms`, e.g. after QAT; OmniQuant's transform tree
  otherwise); the 'quant' collection
  keeps what cannot be folded into W: shift delta, scale s (for the input)
  and the bias delta W. Evaluation, slicing and Mix'n'Match use the result
  through `model.apply(variables, tokens, spec=...).logits`.
  outliers: the fraction of each quantized weight (largest |W s| first) kept in float16 outside
  the grid and its statistics, restored at every width (`QuantizedArray.outlier_index`);
  default spec.outliers (what QAT and OmniQuant trained with). The parent is made for
  spec.slice_grid (`QuantizedArray.slice_grid`): its narrower widths are served on that grid only.
  """
  outliers = spec.outliers if outliers is None else outliers
  flat_p = traverse_util.flatten_dict(params, sep='/')
  by_name = by_weight(transforms or {})
  flat_q = {}
  for key, _ in nn.blocks(config):
    for path, info in nn.targeted_weights(config, spec.targets).items():
      name = f'{key}/{path}'
      aux = by_name.get(name, {})
      w = flat_p[name]
      bad = int(np.size(w) - np.count_nonzero(np.isfinite(np.asarray(w))))
      if bad:  # one NaN would silently poison its whole channel's scale
        raise ValueError(f'{name}: {bad} of {np.size(w)} weights are NaN or infinite; '
                         'a parent needs finite weights (check the checkpoint or the training run)')
      ws = qeinsum.quantized_weight(w, info.reduce_axes, None, None, aux)  # W * s
      gamma, beta = qeinsum.clipping_factors(aux)
      flat_p[name] = quant.QuantizedArray.from_float(
          ws, spec.parent_bits, info.reduce_axes, spec.group_size, gamma, beta, spec.symmetric, outliers,
          spec.slice_grid)
      if 'shift' in aux:
        flat_q[name] = {'shift': aux['shift'], 'smooth': aux['smooth'],
                        'bias': qeinsum.shift_bias(info.eqn, aux['shift'], w)}
  out = {'params': traverse_util.unflatten_dict(flat_p, sep='/')}
  if flat_q:
    out['quant'] = traverse_util.unflatten_dict(flat_q, sep='/')
  return out


def resident(variables, bits: int):
  """`variables` with every stored parent held for widths up to `bits` only
  (`packing.ResidentArray`: (w + 1) / 8 bytes per code instead of 1, the same slices at every
  width <= bits); weights already at <= `bits` stay as they are."""
  def hold(leaf):
    if isinstance(leaf, quant.QuantizedArray) and bits < leaf.parent_bits:
      return packing.ResidentArray.from_parent(leaf, bits)
    if isinstance(leaf, packing.ResidentArray) and bits > leaf.max_bits:
      raise ValueError(f'bits={bits}: a weight is already held for widths up to {leaf.max_bits}')
    return leaf
  return jax.tree.map(hold, variables, is_leaf=nn.is_quantized)
