"""Which precision a model runs at: stored parents in a variables tree, params vs. variables."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np

from matquant_jax.core import packing, plans, quant
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.nn.config import TransformerConfig
from matquant_jax.nn.weights import WeightInfo, quantizable_weights, targeted_weights


def is_quantized(x) -> bool:
  """Whether a variables leaf is a stored parent (`QuantizedArray`, or one held resident at a
  maximum width, `packing.ResidentArray`)."""
  return isinstance(x, (quant.QuantizedArray, packing.ResidentArray))


def flat_leaves(tree) -> dict[str, Any]:
  """{'a/b/c': leaf} of a variables tree, stored parents (`QuantizedArray`) kept whole."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): v for path, v in leaves}


def weight_info(config: TransformerConfig, path: str) -> WeightInfo:
  """The quantizable-weight table's entry for params path `path` ('layer_i/...')."""
  suffix = re.sub(r'^layer_\d+/', '', path)
  infos = quantizable_weights(config)
  if suffix not in infos:
    raise ValueError(f'{path!r} is not a quantizable weight of this model')
  return infos[suffix]


def quantized_targets(variables, config: TransformerConfig) -> tuple[str, ...]:
  """The QuantSpec targets ('ffn', 'attn') whose weights are stored parents in `variables`."""
  found = {weight_info(config, path).target for path, leaf in flat_leaves(variables['params']).items()
           if is_quantized(leaf)}
  return tuple(t for t in ('ffn', 'attn') if t in found)


def stored_bits(variables) -> int | None:
  """The widest width every stored weight can give (None without stored parents)."""
  widths = [getattr(leaf, 'max_bits', leaf.parent_bits) for leaf in flat_leaves(variables).values()
            if is_quantized(leaf)]
  return min(widths) if widths else None


def as_variables(params_or_variables) -> dict:
  """{'params': ...} plus an optional 'quant' collection (OmniQuant transforms)."""
  if 'params' in params_or_variables:
    return params_or_variables
  return {'params': params_or_variables}


def resolve_spec(bits, variables, config: TransformerConfig, *,
                 extra_precision: bool = False) -> QuantSpec | None:
  """The one way what a user passes becomes the spec a model is applied with.

  bits: None (float weights stay float, a stored parent runs at its own width), an int,
  a per-layer tuple, a plan file (`plans.save`) or a `QuantSpec` (returned as given).
  With stored parents in `variables`, their bits, quantized targets and slice grid win; with float
  weights the spec is min-max at `quant.MAX_PARENT_BITS` on the FFN.
  """
  if bits is None or isinstance(bits, QuantSpec):
    return bits
  if isinstance(bits, np.integer):  # np.int64(4) from a numpy loop or array
    bits = int(bits)
  variables = as_variables(variables)
  stored = stored_bits(variables)
  widest = stored or quant.MAX_PARENT_BITS
  stored_leaves = [leaf for leaf in flat_leaves(variables).values() if is_quantized(leaf)]
  parent_bits = min(leaf.parent_bits for leaf in stored_leaves) if stored_leaves else quant.MAX_PARENT_BITS
  layers = config.num_layers
  if isinstance(bits, str):
    bits = plans.load(bits, layers, widest)
  elif isinstance(bits, (tuple, list)):
    bits = plans.check(bits, layers, widest, 'per-layer bits')
  elif not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= widest:
    source = (f'the stored parent (its narrowest weight has {stored} bits)' if stored
              else f'float weights (sliced from a {widest}-bit parent)')
    raise ValueError(f'bits={bits!r}: {source} give widths 1..{widest}')
  targets = quantized_targets(variables, config) or ('ffn',)
  grids = sorted({getattr(leaf, 'slice_grid', 'msb') for leaf in stored_leaves})
  if len(grids) > 1:
    raise ValueError(f'the stored weights were made for different slice grids {grids}; '
                     'a model is served on one (pass a QuantSpec to choose)')
  return QuantSpec(bits, parent_bits=parent_bits, extra_precision=extra_precision, targets=targets,
                   slice_grid=grids[0] if grids else 'msb')


def bits_per_weight(variables, spec: QuantSpec | None, config: TransformerConfig,
                    float_bits: float = 32.0) -> float:
  """Bits per weight of spec's targets, the one count every results row uses: r per layer at
  width r, plus the extra bucket's share with extra precision (`QuantizedArray.average_bits`);
  `float_bits` for weights left in float (no spec, or a layer at None).

  variables: float params (or variables), or a stored parent whose weights are QuantizedArrays.
  """
  params = as_variables(variables)['params']
  targets = spec.targets if spec is not None else ('ffn',)
  infos = targeted_weights(config, targets)
  total, count = 0.0, 0
  for layer in range(config.num_layers):
    bits = spec.bits_for(layer, config.num_layers) if spec is not None else None
    flat = flat_leaves(params[f'layer_{layer}'])
    for path, info in infos.items():
      w = flat[path]
      size = math.prod(w.shape)
      if bits is None:
        b = float_bits
      elif spec.extra_precision:
        if not is_quantized(w):
          w = quant.QuantizedArray.from_float(w, spec.parent_bits, info.reduce_axes, spec.group_size,
                                                  symmetric=spec.symmetric)
        b = w.average_bits(bits, extra_precision=True)
      else:
        b = float(bits)
      if bits is not None and is_quantized(w):  # kept outliers: index + value each
        b += quant.outlier_bits(w)
      elif bits is not None and spec.outliers:  # fake-quant keeps the ones the parent would
        b += quant.OUTLIER_BITS * quant.num_outliers(spec.outliers, size) / size
      total, count = total + b * size, count + size
  return total / count
