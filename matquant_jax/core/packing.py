"""A stored parent held resident at a maximum width: fewer bytes per code, the same slices.

The r-bit slice S(q, r) reads only the top r + 1 bits of a code (its r bits
and the rounding bit below them), and so does every narrower slice. So a
parent that will only be served at widths <= r can drop the rest: each code
keeps t = q >> (c - r), packed into a w-bit field (w = 1, 2, 4 or 8, the
smallest >= r), and the rounding bit, packed 8 to a byte. Unpacked inside the
jitted step, (t << (c - r)) | (bit << (c - r - 1)) has exactly q's slices at
every width <= r, made by the one dequantize function.

Bytes per code: r = 1: 2/8, r = 2: 3/8, r = 3 or 4: 5/8, r = 5..7: 9/8 (no
saving, refused). The packing runs along the codes' last axis, in blocks of
8 codes ([..., n / 8, w + 1] bytes), so a mesh axis that shards the last axis
shards the packed bytes the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.core import quant


def field_bits(bits: int) -> int:
  """The packed field width for the top `bits` bits of a code."""
  return next(w for w in (1, 2, 4, 8) if w >= bits)


def check_resident(bits: int, parent_bits: int, last_axis: int) -> None:
  """Raises ValueError unless a parent with these codes can be held at `bits`."""
  quant.check_bits(bits, parent_bits)
  if bits >= parent_bits or field_bits(bits) + 1 > 8:
    raise ValueError(f'resident_bits={bits} saves nothing over {parent_bits}-bit codes; '
                     'choose 1..4 (or keep the parent as stored)')
  if last_axis % 8:
    raise ValueError(f'codes whose last axis ({last_axis}) is not a multiple of 8 cannot be packed')


def pack(codes, bits: int, parent_bits: int = 8) -> np.ndarray:
  """uint8 codes [..., n] -> packed bytes [..., n / 8, w + 1] (the top `bits` bits of each
  code in w-bit fields, then the rounding-bit byte)."""
  codes = np.asarray(codes, np.uint8)
  check_resident(bits, parent_bits, codes.shape[-1])
  w, shift = field_bits(bits), parent_bits - bits
  blocks = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 8, 8)).astype(np.uint32)
  top = (blocks >> shift).reshape(blocks.shape[:-1] + (w, 8 // w))
  fields = np.sum(top << (w * np.arange(8 // w, dtype=np.uint32)), axis=-1)  # [..., n/8, w]
  rounding = np.sum(((blocks >> (shift - 1)) & 1) << np.arange(8, dtype=np.uint32), axis=-1)
  return np.concatenate([fields, rounding[..., None]], axis=-1).astype(np.uint8)


def unpack(packed: jax.Array, bits: int, parent_bits: int = 8) -> jax.Array:
  """Packed bytes [..., n / 8, w + 1] -> uint8 codes [..., n] with every slice <= `bits` of the
  originals (the bits below the rounding bit are zero)."""
  w, shift = field_bits(bits), parent_bits - bits
  fields, rounding = packed[..., :w], packed[..., w]
  top = (fields[..., None] >> (w * jnp.arange(8 // w, dtype=jnp.uint8))) & jnp.uint8(2**w - 1)
  top = top.reshape(top.shape[:-2] + (8,))
  bit = (rounding[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & jnp.uint8(1)
  codes = (top << shift) | (bit << (shift - 1))
  return codes.reshape(codes.shape[:-2] + (codes.shape[-2] * 8,))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResidentArray:
  """A `QuantizedArray` held for widths up to `max_bits` only: packed bytes, the parent's scale
  and zero point. Serves the same slices as the parent it came from at every width <= max_bits."""
  packed: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  parent_bits: int = dataclasses.field(metadata=dict(static=True), default=8)
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
  max_bits: int = dataclasses.field(metadata=dict(static=True), default=4)
  outlier_index: jax.Array | None = None  # the parent's kept outliers, restored at every width
  outlier_value: jax.Array | None = None

  @classmethod
  def from_parent(cls, parent: quant.QuantizedArray, bits: int) -> 'ResidentArray':
    quant.check_slice_grid(parent, 'msb', bits, f'holding it resident at {bits} bits', quant.TOP_BITS_FIX)
    packed = pack(np.asarray(parent.codes), bits, parent.parent_bits)
    return cls(jnp.asarray(packed), parent.scale, parent.zero_point, parent.parent_bits, parent.shape, bits,
               parent.outlier_index, parent.outlier_value)

  @property
  def num_outliers(self) -> int:
    return quant.kept_outliers(self)

  @property
  def codes(self) -> jax.Array:
    """The codes with every slice <= max_bits of the parent's (uint8, the grouped shape)."""
    return unpack(self.packed, self.max_bits, self.parent_bits)

  def as_parent(self) -> quant.QuantizedArray:
    """A `QuantizedArray` with these codes (exact at widths <= max_bits only)."""
    return quant.QuantizedArray(self.codes, self.scale, self.zero_point, self.parent_bits, self.shape,
                                self.outlier_index, self.outlier_value)

  def dequantize(self, bits: int | None = None, extra_precision: bool = False,
                 dtype=jnp.float32) -> jax.Array:
    """The float weight at `bits` (default: max_bits), as the parent gives it."""
    bits = self.max_bits if bits is None else bits
    if bits > self.max_bits:
      raise ValueError(f'bits={bits}, but this weight is held resident for widths up to {self.max_bits}')
    return self.as_parent().dequantize(bits, extra_precision, dtype)

  def average_bits(self, bits: int, extra_precision: bool = False) -> float:
    return self.as_parent().average_bits(bits, extra_precision)

  @property
  def group_size(self) -> int | None:
    return self.as_parent().group_size
