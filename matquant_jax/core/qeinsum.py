"""The one quantized-einsum path every quantizable weight goes through.

Precision is chosen at call time with a `QuantSpec`: one bit-width for all
layers, or one per layer (Mix'n'Match), always sliced from the same parent.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

from matquant_jax.core import packing, quant
from matquant_jax.core.contract import contract


TARGETS = ('ffn', 'attn')


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Call-time quantization settings (hashable, so usable as a jit static):
  `QuantSpec(4)`, `QuantSpec((2, 4, 8, 4), parent_bits=8, targets=('ffn', 'attn'))`.

  bits: an int for every layer, or a tuple with one entry per layer (None in
    the tuple leaves that layer in float).
  targets: which weights are quantized: 'ffn' (default, the paper's setting)
    and/or 'attn'.
  slice_grad: the slice's straight-through gradient in training, 'clamp' or
    'identity' (`quant.slice_ste`); no effect on the forward pass.
  symmetric: zero point fixed at 2^(c-1) (`quant.calibrate`), for formats without an
    offset (GGUF Q8_0 / Q4_0); the paper's grids are asymmetric (the default).
  slice_grid: 'msb' (the paper's slice, the default) or 'regrid' (the range-keeping re-grid,
    `quant.regrid_float`: not nested in the code's top bits, so no resident or packed slices).
  outliers: the fraction of each quantized weight (largest |w|) kept outside the grid in float16
    (fake-quant and every base; `make_parent` keeps the same ones). A stored parent carries its
    own: a nonzero fraction here must be the one it was made with.
  """
  bits: int | tuple[int | None, ...]
  _: dataclasses.KW_ONLY
  parent_bits: int = 8
  extra_precision: bool = False
  group_size: int | None = None
  targets: tuple[str, ...] = ('ffn',)
  slice_grad: str = 'clamp'
  symmetric: bool = False
  slice_grid: str = 'msb'
  outliers: float = 0.0

  def __post_init__(self):
    if isinstance(self.bits, list):
      object.__setattr__(self, 'bits', tuple(self.bits))
    for b in (self.bits if isinstance(self.bits, tuple) else (self.bits,)):
      if b is not None:
        quant.check_bits(b, self.parent_bits)
    g = self.group_size
    if g is not None and (not isinstance(g, numbers.Integral) or isinstance(g, bool) or g < 1):
      raise ValueError(f'group_size must be a positive integer or None (one scale per channel), got {g!r}')
    unknown = set(self.targets) - set(TARGETS)
    if unknown:
      raise ValueError(f'unknown quantization targets {sorted(unknown)}; choose from {TARGETS}')
    quant.check_grid(self.slice_grid, self.extra_precision)
    quant.num_outliers(self.outliers, 1)  # a fraction in [0, 1)
    if self.slice_grad not in quant.SLICE_GRADS:
      raise ValueError(f'slice_grad must be one of {quant.SLICE_GRADS}, got {self.slice_grad!r}')

  def bits_for(self, layer: int, num_layers: int) -> int | None:
    """The bit-width of layer `layer` (None: float)."""
    if isinstance(self.bits, tuple):
      if len(self.bits) != num_layers:
        raise ValueError(f'per-layer bits has {len(self.bits)} entries for a {num_layers}-layer model')
      return self.bits[layer]
    return self.bits


def clipping_factors(aux: dict) -> tuple[jax.Array | None, jax.Array | None]:
  """OmniQuant clipping factors gamma, beta = sigmoid(logit), if aux holds them."""
  get = lambda k: jax.nn.sigmoid(aux[k]) if k in aux else None
  return get('gamma_logit'), get('beta_logit')


def _along(v: jax.Array, ndim: int, axes: Sequence[int]) -> jax.Array:
  """Reshapes a vector over the contraction axes so it broadcasts against a weight."""
  shape = [1] * ndim
  for a, n in zip(sorted(a % ndim for a in axes), v.shape):
    shape[a] = n
  return v.reshape(shape)


def shift_bias(eqn: str, shift: jax.Array, w: jax.Array) -> jax.Array:
  """delta W, shaped like the einsum output with size-1 batch and time axes."""
  return contract(eqn, shift[None, None].astype(jnp.float32), w.astype(jnp.float32))


def quantized_weight(w, reduce_axes: Sequence[int], bits: int | None,
                     spec: QuantSpec | None, aux: dict | None = None) -> jax.Array:
  """w at `bits`, sliced from spec's parent (w itself when bits is None).

  w is a float weight, fake-quantized here (with OmniQuant's clipping factors
  and input scale s from `aux` when given: Q(W * s)), or a stored
  `QuantizedArray` parent (s already folded in), which is sliced and dequantized
  (its own parent_bits, not spec's, define the slice), or a parent held resident
  at a maximum width (`packing.ResidentArray`: None means that width).
  """
  aux = aux or {}
  grid = spec.slice_grid if spec is not None else 'msb'
  if spec is not None and spec.outliers and isinstance(w, (packing.ResidentArray, quant.QuantizedArray)):
    want = quant.num_outliers(spec.outliers, math.prod(w.shape))
    if want != w.num_outliers:
      raise ValueError(f'QuantSpec(outliers={spec.outliers}) asks for {want} kept outliers, but this stored '
                       f'parent keeps {w.num_outliers}; a parent carries its own (pass outliers=0, or '
                       f'make the parent with make_parent(..., outliers={spec.outliers}))')
  if isinstance(w, packing.ResidentArray):  # unpacked inside the step; refused above max_bits
    if grid != 'msb':
      raise ValueError(f"a resident parent keeps only the codes' top bits; slice_grid={grid!r} needs the full parent")
    return w.dequantize(bits, spec is not None and spec.extra_precision)
  if isinstance(w, quant.QuantizedArray):
    if bits is not None and bits > w.parent_bits:
      raise ValueError(f'bits={bits}, but the stored weight has {w.parent_bits} bits')
    ep = spec is not None and spec.extra_precision
    quant.check_slice_grid(w, grid, bits, 'a stored parent')
    return w.dequantize(w.parent_bits if bits is None else bits, ep, grid=grid)
  if 'smooth' in aux:
    w = w.astype(jnp.float32) * _along(aux['smooth'], w.ndim, reduce_axes)
  if spec is None or bits is None:
    return w
  gamma, beta = clipping_factors(aux)
  return quant.fake_quant(w.astype(jnp.float32), bits, parent_bits=spec.parent_bits,
                          reduce_axes=reduce_axes, extra_precision=spec.extra_precision,
                          group_size=spec.group_size, gamma=gamma, beta=beta,
                          stats_grad='smooth' in aux, slice_grad=spec.slice_grad,
                          symmetric=spec.symmetric, slice_grid=spec.slice_grid,
                          outliers=spec.outliers).astype(w.dtype)


def einsum(eqn: str, x: jax.Array, w, *, reduce_axes: Sequence[int],
           bits: int | None = None, spec: QuantSpec | None = None, aux: dict | None = None) -> jax.Array:
  """jnp.einsum(eqn, x, w) with w quantized per output channel over `reduce_axes`, computed by
  `contract` (a dot that reads w in its stored layout).

  With OmniQuant's transform in `aux` (shift delta and scale s over the
  contraction axes, which are x's trailing axes): ((x - delta) / s) Q(W s) + delta W,
  where delta W is `aux['bias']` for a stored parent and computed from the float W otherwise.
  """
  aux = aux or {}
  w_hat = quantized_weight(w, reduce_axes, bits, spec, aux)
  if 'shift' in aux:
    x = x - aux['shift'].astype(x.dtype)
  if 'smooth' in aux:
    x = x / aux['smooth'].astype(x.dtype)
  out = contract(eqn, x, w_hat.astype(x.dtype))
  if 'shift' in aux:
    bias = aux['bias'] if 'bias' in aux else shift_bias(eqn, aux['shift'], w)
    out = out + bias.astype(out.dtype)
  return out


def width_spec(spec: QuantSpec | None, bits) -> QuantSpec | None:
  """`spec` at `bits` (None: float); no spec means the default QuantSpec."""
  if bits is None:
    return None
  return dataclasses.replace(spec, bits=bits) if spec is not None else QuantSpec(bits)
