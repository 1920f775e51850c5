"""Matryoshka quantization numerics as small pure functions.

calibrate -> quantize -> slice_codes -> dequantize, plus `fake_quant` which
chains them for training. Gradient behaviour lives in two `jax.custom_vjp`
straight-through primitives, `round_clip_ste` and `slice_ste`; everything else
is ordinary JAX, so gradients reach OmniQuant clipping factors through the
scale and zero point. See spec sections 2-4.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


MAX_PARENT_BITS = 8  # codes are stored as uint8


SCALE_FLOOR = 1e-8  # guards max == min channels against division by zero


def check_bits(bits: int, parent_bits: int = 8) -> None:
  """Raises ValueError unless 1 <= bits <= parent_bits <= 8 are integers."""
  if not isinstance(parent_bits, (int, np.integer)) or not 1 <= parent_bits <= MAX_PARENT_BITS:
    raise ValueError(f'parent_bits must be an integer in [1, {MAX_PARENT_BITS}], got {parent_bits!r}')
  if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= parent_bits:
    raise ValueError(f'bits must be an integer in [1, parent_bits={parent_bits}], got {bits!r}')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def round_clip_ste(x: jax.Array, lo: float, hi: float) -> jax.Array:
  """clip(round(x), lo, hi); backward passes the gradient where not clipped."""
  return jnp.clip(jnp.round(x), lo, hi)


def _round_clip_fwd(x, lo, hi):
  r = jnp.round(x)
  return jnp.clip(r, lo, hi), (r >= lo) & (r <= hi)


def _round_clip_bwd(lo, hi, inside, g):
  del lo, hi
  return (g * inside.astype(g.dtype),)


round_clip_ste.defvjp(_round_clip_fwd, _round_clip_bwd)


@jax.custom_vjp
def round_ste(x: jax.Array) -> jax.Array:
  """round(x) with an identity gradient."""
  return jnp.round(x)


round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


SLICE_GRIDS = ('msb', 'regrid')  # the paper's MSB slice; the range-keeping re-grid (`regrid_float`)


def check_grid(grid: str, extra_precision: bool = False) -> None:
  if grid not in SLICE_GRIDS:
    raise ValueError(f'slice_grid must be one of {SLICE_GRIDS}, got {grid!r}')
  if grid == 'regrid' and extra_precision:
    raise ValueError("extra precision is an MSB-slice option; slice_grid='regrid' has no extra bucket")


TOP_BITS_FIX = ('keeping the top bits of a code gives its MSB slice only; serve this parent whole '
                'with QuantSpec(..., slice_grid={grid!r}), or export its full width')


def check_slice_grid(qa, grid: str, bits: int | None, where: str, fix: str | None = None) -> None:
  """Refuses qa's narrower width `bits` on another slice grid than the one qa was made for
  (the codes were chosen, or trained, for that grid's values)."""
  made = getattr(qa, 'slice_grid', 'msb')
  if bits is None or bits >= qa.parent_bits or grid == made:
    return
  fix = (fix or 'pass QuantSpec({bits}, slice_grid={grid!r})').format(bits=bits, grid=made)
  raise ValueError(f"{where}: this parent was made for slice_grid={made!r}, and its int{bits} on "
                   f"slice_grid={grid!r} is not the model it was made as; {fix}")


def _slice_float(q, bits: int, parent_bits: int, extra_precision: bool, grid: str = 'msb'):
  """S(q, r) on float-valued codes (exact for integers below 2**24), or the re-grid."""
  if bits == parent_bits:
    return q
  if grid == 'regrid':
    top, r_top = float(2**parent_bits - 1), float(2**bits - 1)
    return jnp.floor(q * r_top / top + 0.5) * (top / r_top)
  step = float(2 ** (parent_bits - bits))
  s = jnp.floor(q / step + 0.5)  # round half up
  if not extra_precision:
    s = jnp.minimum(s, 2**bits - 1)
  return s * step


SLICE_GRADS = ('clamp', 'identity')


def _slice_fwd(q, bits, parent_bits, extra_precision, grad, grid):
  s = _slice_float(q, bits, parent_bits, extra_precision, grid)
  if grad == 'identity' or extra_precision or bits == parent_bits or grid == 'regrid':  # no clamp
    return s, None
  step = float(2 ** (parent_bits - bits))
  return s, jnp.floor(q / step + 0.5) <= 2**bits - 1  # False where the slice clamped


def _slice_bwd(bits, parent_bits, extra_precision, grad, grid, inside, g):
  del bits, parent_bits, extra_precision, grad, grid
  return (g if inside is None else g * inside.astype(g.dtype),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _slice_ste(q, bits, parent_bits, extra_precision, grad, grid):
  return _slice_float(q, bits, parent_bits, extra_precision, grid)


_slice_ste.defvjp(lambda q, *a: _slice_fwd(q, *a), _slice_bwd)


def slice_ste(q: jax.Array, bits: int, parent_bits: int = 8, extra_precision: bool = False,
              grad: str = 'clamp', grid: str = 'msb') -> jax.Array:
  """The Matryoshka slice S(q, r) on float codes, straight-through.

  grad='clamp': identity gradient except for codes the slice clamps into its
  top bucket (int2: 224..255 -> 192), which get zero, as `round_clip_ste` does
  for the parent's clamp. grad='identity': the gradient passes everywhere.
  grid='regrid': the range-keeping re-grid (`regrid_float`); it clamps nothing, so its
  gradient is the identity.
  """
  check_bits(bits, parent_bits)
  check_grid(grid, extra_precision)
  if grad not in SLICE_GRADS:
    raise ValueError(f'slice gradient must be one of {SLICE_GRADS}, got {grad!r}')
  return _slice_ste(q, bits, parent_bits, extra_precision, grad, grid)


def slice_codes(q, bits: int, parent_bits: int = 8, extra_precision: bool = False):
  """S(q, bits) on integer codes, as integers on the parent's grid.

  s = min(2^r - 1, (q >> (c-r)) + ((q >> (c-r-1)) & 1)) << (c-r); the min is
  dropped with extra precision (an r-bit slice then has 2^r + 1 levels).
  Returns int32 (extra precision can reach 2**parent_bits).
  """
  check_bits(bits, parent_bits)
  xp = jnp if isinstance(q, jax.Array) else np
  q = xp.asarray(q).astype(xp.int32)
  if bits == parent_bits:
    return q
  shift = parent_bits - bits
  s = (q >> shift) + ((q >> (shift - 1)) & 1)
  if not extra_precision:
    s = xp.minimum(s, 2**bits - 1)
  return s << shift


def _sliced_float(codes: jax.Array, bits: int, parent_bits: int, extra_precision: bool,
                  grid: str = 'msb') -> jax.Array:
  """`slice_codes` as float32, computed in the codes' own (uint8) integer type: the
  decode step runs this over every weight, so it is kept to a few byte-wide ops."""
  check_bits(bits, parent_bits)
  check_grid(grid, extra_precision)
  shift = parent_bits - bits
  if shift == 0:
    return codes.astype(jnp.float32)
  if grid == 'regrid':
    return regrid_float(codes, bits, parent_bits)
  s = (codes >> shift) + ((codes >> (shift - 1)) & 1)  # <= 2^bits, fits the code type
  if not extra_precision:
    s = jnp.minimum(s, 2**bits - 1)
  return s.astype(jnp.float32) * float(2**shift)


def regrid_float(codes: jax.Array, bits: int, parent_bits: int = 8) -> jax.Array:
  """The range-keeping slice, on the parent's scale (float32): s = round(q (2^r - 1) / (2^c - 1))
  (half up), returned as s (2^c - 1) / (2^r - 1). Dequantized with the parent's scale and zero
  point it is the r-bit grid spanning the parent's whole range (0 and 2^c - 1 stay the ends),
  which the MSB slice's 2^r levels 2^(c-r) codes apart (the top one clamped) do not. Storage-free
  like the MSB slice, but its codes are not the top bits: an r-bit server recomputes them."""
  check_bits(bits, parent_bits)
  return _slice_float(codes.astype(jnp.float32), bits, parent_bits, False, 'regrid')


def _norm_axes(reduce_axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = tuple(sorted(a % ndim for a in reduce_axes))
  if len(set(axes)) != len(axes) or not axes:
    raise ValueError(f'reduce_axes must be distinct and non-empty, got {reduce_axes!r}')
  return axes


def group(w: jax.Array, reduce_axes: Sequence[int], group_size: int | None):
  """Splits the contraction into groups of `group_size` consecutive weights.

  With one contraction axis, that axis becomes (n // group_size, group_size). With several
  (the output projection's (heads, head_dim)) they must be adjacent, and the groups run over
  their flattened order, as GGUF's row blocks do: group_size must divide the innermost axis,
  so a group never spans two heads, and only the innermost axis is split. Returns the grouped
  array and the reduce axes in it (the group axis); a no-op when group_size is None.
  """
  axes = _norm_axes(reduce_axes, w.ndim)
  if group_size is None:
    return w, axes
  if axes != tuple(range(axes[0], axes[0] + len(axes))):
    raise ValueError(f'group_size needs adjacent contraction axes, got reduce_axes={reduce_axes!r}')
  ax = axes[-1]
  n = w.shape[ax]
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0 \
      or n % group_size:
    where = (f'the innermost contraction axis (size {n}; groups over a flattened '
             f'{tuple(w.shape[a] for a in axes)} contraction stay inside one row of it)'
             if len(axes) > 1 else f'the contraction axis of size {n}')
    raise ValueError(f'group_size={group_size!r} must be a positive integer dividing {where}')
  shape = w.shape[:ax] + (n // group_size, group_size) + w.shape[ax + 1:]
  if isinstance(w, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(shape, w.dtype), (ax + 1,)
  return w.reshape(shape), (ax + 1,)


def stats_shape(shape: Sequence[int], reduce_axes: Sequence[int], group_size: int | None = None):
  """Shape of the per-channel (or per-group) scale, zero point and clipping factors."""
  wg, axes = group(jax.ShapeDtypeStruct(tuple(shape), jnp.float32), reduce_axes, group_size)
  return tuple(1 if a in axes else n for a, n in enumerate(wg.shape))


def calibrate(w, bits: int, reduce_axes: Sequence[int], gamma=None, beta=None,
              stats_grad: bool = False, symmetric: bool = False, exclude=None):
  """Asymmetric min-max scale and rounded zero point over `reduce_axes`.

  With OmniQuant clipping factors gamma, beta in (0, 1) (broadcastable to the
  keepdims statistics): alpha = (gamma max - beta min) / (2^c - 1),
  z = round(-beta min / alpha). By default the statistics of w are constants
  to the gradient (so fake_quant's gradient w.r.t. w is the identity); gamma
  and beta get gradients through alpha and z. `stats_grad=True` lets the
  gradient through min/max too (OmniQuant's scale s acts on w through them).

  symmetric=True: z = 2^(c-1) and alpha = gamma max|w| / (2^(c-1) - 1) (beta unused), so
  every slice is symmetric too: GGUF's Q8_0 / Q4_0 hold the int8 / int4 slices exactly.
  exclude: a boolean mask like w of weights left out of the statistics (kept outliers).
  """
  axes = _norm_axes(reduce_axes, jnp.ndim(w))
  ws = w if stats_grad else jax.lax.stop_gradient(w)
  if exclude is not None:  # a group of outliers only gets the range [0, 0]
    lo = jnp.where(exclude, jnp.inf, ws)
    lo = jnp.where(jnp.all(exclude, axis=axes, keepdims=True), 0.0, lo)
    ws = jnp.where(exclude, jnp.min(lo, axis=axes, keepdims=True), ws)  # min: moves no max or min
  if symmetric:
    if bits < 2:
      raise ValueError(f'a symmetric grid needs at least 2 bits, got {bits}')
    amax = jnp.max(jnp.abs(ws), axis=axes, keepdims=True)
    if gamma is not None:
      amax = gamma * amax
    scale = jnp.maximum(amax / (2**(bits - 1) - 1), SCALE_FLOOR)
    return scale, jnp.full_like(scale, 2**(bits - 1))
  wmax = jnp.max(ws, axis=axes, keepdims=True)
  wmin = jnp.min(ws, axis=axes, keepdims=True)
  if gamma is not None:
    wmax = gamma * wmax
  if beta is not None:
    wmin = beta * wmin
  scale = jnp.maximum((wmax - wmin) / (2**bits - 1), SCALE_FLOOR)
  zero_point = round_ste(-wmin / scale)
  return scale, zero_point


def quantize(w, scale, zero_point, bits: int):
  """Unsigned codes clamp(round(w / scale + z), 0, 2^bits - 1), as floats."""
  return round_clip_ste(w / scale + zero_point, 0.0, float(2**bits - 1))


def dequantize(q, scale, zero_point):
  """scale * (q - z); slices use the parent's scale and zero point."""
  return scale * (q - zero_point)


def fake_quant(w, bits: int, *, parent_bits: int = 8, reduce_axes: Sequence[int] = (0,),
               extra_precision: bool = False, group_size: int | None = None,
               gamma=None, beta=None, stats_grad: bool = False, slice_grad: str = 'clamp',
               symmetric: bool = False, slice_grid: str = 'msb', outliers: float = 0.0):
  """Quantize w to a parent_bits parent, slice to `bits`, dequantize; `outliers` (a fraction, the
  largest |w|) are left out of the statistics and pass through at float16, as a stored parent's.

  Statistics are taken over `reduce_axes` (the contraction axes: one scale per
  output channel), optionally in groups of `group_size` along the one
  contraction axis. The gradient w.r.t. w is the identity wherever the code is
  not clipped (always, without clipping factors), plus, with `stats_grad`, the
  path through the min/max statistics. `slice_grad`, `slice_grid`: see `slice_ste`.
  """
  check_bits(bits, parent_bits)
  shape, dtype = jnp.shape(w), jnp.asarray(w).dtype
  # statistics, scale and codes in float32 whatever the weight's dtype: a float16 range of
  # +-6e4 overflows (max - min) / 255, and bfloat16 rounding moves codes by half a level
  w32 = jnp.asarray(w).astype(jnp.float32)
  wg, axes = group(w32, reduce_axes, group_size)
  mask = outlier_mask(w32, outliers) if outliers else None
  exclude = None if mask is None else group(mask, reduce_axes, group_size)[0]
  scale, zero = calibrate(wg, parent_bits, axes, gamma, beta, stats_grad, symmetric, exclude)
  q = slice_ste(quantize(wg, scale, zero, parent_bits), bits, parent_bits, extra_precision, slice_grad,
                slice_grid)
  out = dequantize(q, scale, zero).reshape(shape)
  if mask is not None:  # kept at float16 (identity gradient), as the stored parent keeps them
    out = jnp.where(mask, w32 + jax.lax.stop_gradient(w32.astype(OUTLIER_DTYPE).astype(jnp.float32) - w32), out)
  return out.astype(dtype)


OUTLIER_DTYPE = jnp.float16  # a kept outlier: int32 flat index + float16 value = 48 bits
OUTLIER_BITS = 48


def num_outliers(fraction: float, size: int) -> int:
  """round(fraction * size): how many weights of a `size`-weight tensor are kept outside the grid."""
  if not (isinstance(fraction, (int, float, np.floating)) and 0 <= fraction < 1) or isinstance(fraction, bool):
    raise ValueError(f'outliers must be a fraction in [0, 1) of each weight, got {fraction!r}')
  return int(round(float(fraction) * size))


def outlier_indices(w, fraction: float) -> np.ndarray:
  """Flat indices (int32, sorted) of the round(fraction * size) largest-magnitude weights of w:
  the super weights and outliers kept out of the grid (Yu et al. 2024; SpQR)."""
  a = np.abs(np.asarray(w, np.float32)).ravel()
  k = num_outliers(fraction, a.size)
  if k == 0:
    return np.zeros((0,), np.int32)
  return np.sort(np.argpartition(-a, k - 1)[:k]).astype(np.int32)


def outlier_mask(w, fraction: float):
  """A bool mask like w of its round(fraction * size) largest |w| (traceable, for fake-quant:
  the set `outlier_indices` picks, up to ties), or None when that is none."""
  k = num_outliers(fraction, math.prod(jnp.shape(w)))
  if k == 0:
    return None
  a = jnp.abs(jax.lax.stop_gradient(jnp.asarray(w))).reshape(-1)
  return jnp.zeros(a.shape, bool).at[jax.lax.top_k(a, k)[1]].set(True).reshape(jnp.shape(w))


def kept_outliers(qa) -> int:
  """How many outliers a parent (or a resident one) keeps."""
  return 0 if qa.outlier_index is None else int(qa.outlier_index.shape[0])


def outlier_bits(qa) -> float:
  """A parent's kept outliers in bits per weight (OUTLIER_BITS each; 0 without outliers)."""
  return OUTLIER_BITS * kept_outliers(qa) / math.prod(qa.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """An int-c parent: uint8 codes plus per-channel (or per-group) scale and zero point, and
  optionally kept outliers restored at every width.

  `codes` has the grouped shape when group_size is set; `shape` is the
  original weight shape. outlier_index (int32 [k], flat into `shape`) and outlier_value
  (float16 [k]): weights left out of the grid and its statistics; None when there are none.
  slice_grid: the slice its codes were made for ('msb', the paper's; 'regrid'): the narrower
  widths are only right on that grid, and only the MSB slice survives keeping the top bits
  (resident, packed and GGUF exports), so those refuse another (`check_slice_grid`).
  """
  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  parent_bits: int = dataclasses.field(metadata=dict(static=True), default=8)
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
  outlier_index: jax.Array | None = None
  outlier_value: jax.Array | None = None
  slice_grid: str = dataclasses.field(metadata=dict(static=True), default='msb')

  def __post_init__(self):
    check_grid(self.slice_grid)

  @classmethod
  def from_float(cls, w, parent_bits: int = 8, reduce_axes: Sequence[int] = (0,),
                 group_size: int | None = None, gamma=None, beta=None,
                 symmetric: bool = False, outliers: float = 0.0, slice_grid: str = 'msb') -> 'QuantizedArray':
    """Calibrates and quantizes a float weight into a stored parent; `outliers` (a fraction of
    its weights, largest magnitude first) are kept in float16 outside the grid; `slice_grid`: the
    slice it is made for."""
    check_bits(parent_bits, parent_bits)
    w = jnp.asarray(w, jnp.float32)
    index = outlier_indices(w, outliers) if outliers else np.zeros((0,), np.int32)
    exclude = None
    if index.size:
      exclude, _ = group(jnp.zeros(w.size, bool).at[index].set(True).reshape(w.shape), reduce_axes, group_size)
    wg, axes = group(w, reduce_axes, group_size)
    scale, zero = calibrate(wg, parent_bits, axes, gamma, beta, symmetric=symmetric, exclude=exclude)
    codes = quantize(wg, scale, zero, parent_bits).astype(jnp.uint8)
    if not index.size:
      return cls(codes, scale, zero, parent_bits, tuple(jnp.shape(w)), slice_grid=slice_grid)
    value = w.reshape(-1)[index].astype(OUTLIER_DTYPE)
    return cls(codes, scale, zero, parent_bits, tuple(jnp.shape(w)), jnp.asarray(index), value, slice_grid)

  @property
  def num_outliers(self) -> int:
    return kept_outliers(self)

  def outlier_bits(self) -> float:
    return outlier_bits(self)

  def restore_outliers(self, w: jax.Array) -> jax.Array:
    """w (this array's shape) with the kept outliers written back, as at every width."""
    if self.outlier_index is None:
      return w
    return w.reshape(-1).at[self.outlier_index].set(self.outlier_value.astype(w.dtype)).reshape(w.shape)

  def sliced_codes(self, bits: int, extra_precision: bool = False) -> jax.Array:
    """Integer codes S(q, bits) on the parent grid (int32)."""
    return slice_codes(self.codes, bits, self.parent_bits, extra_precision)

  def dequantize(self, bits: int | None = None, extra_precision: bool = False,
                 dtype=jnp.float32, grid: str = 'msb') -> jax.Array:
    """The float weight at `bits` (default: the parent) on the slice `grid`, in the original shape."""
    q = _sliced_float(self.codes, bits or self.parent_bits, self.parent_bits, extra_precision, grid)
    w = dequantize(q, self.scale, self.zero_point)
    return self.restore_outliers(w.reshape(self.shape)).astype(dtype)

  @property
  def group_size(self) -> int | None:
    """Weights per scale along the contraction axis (None: one scale per output channel)."""
    if self.codes.ndim == len(self.shape):
      return None
    ax = next(i for i, (a, b) in enumerate(zip(self.codes.shape, self.shape)) if a != b)
    return int(self.codes.shape[ax + 1])

  @property
  def symmetric(self) -> bool:
    """Whether every zero point is 2^(c-1) (a symmetric grid; reads the zero points on host)."""
    return bool(np.all(np.asarray(self.zero_point) == 2**(self.parent_bits - 1)))

  def average_bits(self, bits: int, extra_precision: bool = False) -> float:
    """bits + the fraction of weights in the extra bucket (extra precision only)."""
    if not extra_precision or bits == self.parent_bits:
      return float(bits)
    top = 2**self.parent_bits
    return float(bits) + float(jnp.mean(self.sliced_codes(bits, True) == top))
