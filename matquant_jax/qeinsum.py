"""The one quantized-einsum path every quantizable weight goes through.

Precision is chosen at call time with a `QuantSpec`: one bit-width for all
layers, or one per layer (Mix'n'Match), always sliced from the same parent.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from matquant_jax import quant

TARGETS = ('ffn', 'attn')


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Call-time quantization settings (hashable, so usable as a jit static).

  bits: an int for every layer, or a tuple with one entry per layer (None in
    the tuple leaves that layer in float).
  targets: which weights are quantized: 'ffn' (default, the paper's setting)
    and/or 'attn'.
  """
  bits: int | tuple[int | None, ...]
  parent_bits: int = 8
  extra_precision: bool = False
  group_size: int | None = None
  targets: tuple[str, ...] = ('ffn',)

  def __post_init__(self):
    if isinstance(self.bits, list):
      object.__setattr__(self, 'bits', tuple(self.bits))
    for b in (self.bits if isinstance(self.bits, tuple) else (self.bits,)):
      if b is not None:
        quant.check_bits(b, self.parent_bits)
    unknown = set(self.targets) - set(TARGETS)
    if unknown:
      raise ValueError(f'unknown quantization targets {sorted(unknown)}; choose from {TARGETS}')

  def bits_for(self, layer: int, num_layers: int) -> int | None:
    """The bit-width of layer `layer` (None: float)."""
    if isinstance(self.bits, tuple):
      if len(self.bits) != num_layers:
        raise ValueError(f'per-layer bits has {len(self.bits)} entries for a {num_layers}-layer model')
      return self.bits[layer]
    return self.bits


def quantized_weight(w: jax.Array, reduce_axes: Sequence[int], bits: int | None,
                     spec: QuantSpec | None) -> jax.Array:
  """w fake-quantized at `bits` (from spec's parent), or w itself when bits is None."""
  if spec is None or bits is None:
    return w
  return quant.fake_quant(w.astype(jnp.float32), bits, parent_bits=spec.parent_bits,
                          reduce_axes=reduce_axes, extra_precision=spec.extra_precision,
                          group_size=spec.group_size).astype(w.dtype)


def einsum(eqn: str, x: jax.Array, w: jax.Array, *, reduce_axes: Sequence[int],
           bits: int | None = None, spec: QuantSpec | None = None) -> jax.Array:
  """jnp.einsum(eqn, x, w) with w quantized per output channel over `reduce_axes`."""
  w = quantized_weight(w, reduce_axes, bits, spec)
  return jnp.einsum(eqn, x, w.astype(x.dtype))
