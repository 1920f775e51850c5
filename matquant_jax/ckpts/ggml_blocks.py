"""ggml's block formats written from integer codes (pure numpy), so a slice lands in a GGUF
tensor without re-quantization.

Blocks of consecutive weights along a row (the input axis; 32 unless said) with fp16
constants; layouts follow ggml-common.h / ggml-quants.c (`quantize_row_*_ref`):
  Q4_0  d, 16 nibble bytes        w = d (q - 8),   q in 0..15
  Q4_1  d, m, 16 nibble bytes     w = d q + m,     q in 0..15
  Q5_0  d, qh[4], 16 nibbles      w = d (q - 16),  q in 0..31 (bit 4 of element j is bit j of qh)
  Q5_1  d, m, qh[4], 16 nibbles   w = d q + m,     q in 0..31
  Q8_0  d, 32 int8                w = d q,         q in -128..127
  Q2_0  d, 16 bytes (64 weights)  w = d (q - 1),   q in 0..3 (element j: bits 2 (j % 4) of byte j // 4)
Nibble byte j holds element j (low) and element j + 16 (high). Q2_0 (ggml type 42, blocks of
64) is newer than the `gguf` package: it has no numpy decoder there and its reader refuses the
type, so only llama.cpp reads such files.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
Q2_0_TYPE = 42  # GGML_TYPE_Q2_0 in ggml.h

SIZES = {'Q4_0': 18, 'Q4_1': 20, 'Q5_0': 22, 'Q5_1': 24, 'Q8_0': 34, 'Q2_0': 18}
LEVELS = {'Q4_0': 16, 'Q4_1': 16, 'Q5_0': 32, 'Q5_1': 32, 'Q8_0': 256, 'Q2_0': 4}
CENTRE = {'Q4_0': 8, 'Q5_0': 16, 'Q8_0': 0, 'Q2_0': 1}
BLOCKS = {'Q2_0': 64}  # weights per block where not BLOCK


def bits_per_weight(kind: str) -> float:
  """Bits on disk per weight of a block type (F16: 16, F32: 32)."""
  return {'F16': 16.0, 'BF16': 16.0, 'F32': 32.0}.get(kind) or SIZES[kind] * 8 / block(kind)


def block(kind: str) -> int:
  """Weights per block of a type."""
  return BLOCKS.get(kind, BLOCK)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
  """[..., nb] float -> [..., nb, 2] little-endian fp16 bytes; refuses values fp16 cannot hold."""
  h = np.asarray(x, np.float32).astype(np.float16)
  if not np.all(np.isfinite(h)):
    raise ValueError('a block constant overflows fp16 (|value| > 65504): this weight cannot be '
                     'written in a ggml block format; export it as F32')
  return np.ascontiguousarray(h, '<f2').view(np.uint8).reshape(*h.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
  """[rows, nb, 32] codes -> [rows, nb, 16] bytes: element j low, element j + 16 high."""
  q = q.astype(np.uint8)
  return (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
  """[rows, nb, 32] 5-bit codes -> [rows, nb, 4] bytes: bit j of the uint32 = bit 4 of element j."""
  bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32)
  return np.ascontiguousarray(np.sum(bits, axis=-1, dtype=np.uint32)[..., None], '<u4').view(np.uint8)


def pack(kind: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
  """Block bytes [rows, n / block * size] of codes q [rows, n] with per-block d (and m)
  [rows, n / block].

  q holds the stored code: 0..LEVELS-1 for Q2/Q4/Q5 (the centre is subtracted on decode),
  -128..127 for Q8_0.
  """
  if kind not in SIZES:
    raise ValueError(f'unknown block type {kind!r}; one of {sorted(SIZES)}')
  rows, n = q.shape
  size = block(kind)
  if n % size:
    raise ValueError(f'rows of {n} weights are not a whole number of {size}-weight {kind} blocks')
  lo, hi = (-128, 127) if kind == 'Q8_0' else (0, LEVELS[kind] - 1)
  if q.size and (q.min() < lo or q.max() > hi):
    raise ValueError(f'{kind} codes must lie in {lo}..{hi}, got {q.min()}..{q.max()}')
  qb = q.reshape(rows, n // size, size)
  parts = [_fp16_bytes(d)]
  if kind in ('Q4_1', 'Q5_1'):
    parts.append(_fp16_bytes(m))
  if kind == 'Q2_0':
    q4 = qb.astype(np.uint8).reshape(rows, n // size, size // 4, 4)
    parts.append(np.bitwise_or.reduce(q4 << (2 * np.arange(4, dtype=np.uint8)), axis=-1))
  elif kind == 'Q8_0':
    parts.append(qb.astype(np.int8).view(np.uint8))
  else:
    if kind in ('Q5_0', 'Q5_1'):
      parts.append(_high_bits(qb))
    parts.append(_nibbles(qb))
  out = np.concatenate(parts, axis=-1)
  assert out.shape[-1] == SIZES[kind], (kind, out.shape)
  return out.reshape(rows, -1)


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """ggml's reference Q8_0 of float rows [rows, n]: (codes [rows, n], d [rows, n / 32]);
  d = max|w| / 127 per block, codes round(w / d) with halves away from zero (C's roundf)."""
  rows, n = w.shape
  wb = np.asarray(w, np.float32).reshape(rows, n // BLOCK, BLOCK)
  d = np.max(np.abs(wb), axis=-1) / 127.0
  inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
  x = wb * inv[..., None]
  q = (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int8)
  return q.reshape(rows, n), d.astype(np.float32)


# K-quants: super-blocks of 256 weights, sub-block scales and mins quantized against fp16
# super-block constants: w = d sc q - dmin m (sc, m unsigned: 4 bits in Q2_K, 6 in Q4_K).
QK_K = 256
K_SUB = {'Q2_K': 16, 'Q4_K': 32}  # weights per sub-block
K_SIZES = {'Q2_K': 84, 'Q4_K': 144}
K_LEVELS = {'Q2_K': 4, 'Q4_K': 16}


def _k_constants(step: np.ndarray, mins: np.ndarray, top: int):
  """Sub-block (step, min) [rows, nsb, subs] -> fp16 (d, dmin) per super-block and integer
  (sc, m) in 0..top: the nearest on the grid d * sc, dmin * m (the codes are kept)."""
  d = (np.max(step, axis=-1) / top).astype(np.float16).astype(np.float32)
  dmin = (np.max(mins, axis=-1) / top).astype(np.float16).astype(np.float32)
  ratio = lambda x, s: np.where(s[..., None] > 0, x / np.where(s[..., None] > 0, s[..., None], 1), 0)
  sc = np.clip(np.round(ratio(step, d)), 0, top).astype(np.uint8)
  m = np.clip(np.round(ratio(mins, dmin)), 0, top).astype(np.uint8)
  return d, dmin, sc, m


def pack_k(kind: str, q: np.ndarray, step: np.ndarray, mins: np.ndarray) -> np.ndarray:
  """K-quant bytes [rows, n / 256 * size] of codes q [rows, n] (0..3 for Q2_K, 0..15 for
  Q4_K) with per-sub-block step and min [rows, n / sub] (w = step q - min, min >= 0). Only the
  sub-block constants are rounded (to 4 or 6 bits against the super-block's fp16 d, dmin);
  layouts as ggml-quants.c's quantize_row_q{2,4}_K_ref write them."""
  rows, n = q.shape
  if n % QK_K:
    raise ValueError(f'{kind} needs rows that are a multiple of {QK_K} weights, got {n}')
  if q.min() < 0 or q.max() >= K_LEVELS[kind] or mins.min() < 0:
    raise ValueError(f'{kind} holds codes 0..{K_LEVELS[kind] - 1} and offsets <= 0 only')
  nsb, subs = n // QK_K, QK_K // K_SUB[kind]
  top = 15 if kind == 'Q2_K' else 63
  d, dmin, sc, m = _k_constants(step.reshape(rows, nsb, subs), mins.reshape(rows, nsb, subs), top)
  qb = q.astype(np.uint8).reshape(rows, nsb, QK_K)
  dm = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin)], axis=-1)
  if kind == 'Q2_K':
    scales = sc | (m << 4)  # [rows, nsb, 16]
    # element 128 h + 32 j + l sits in byte 32 h + l at bits 2 j
    e = qb.reshape(rows, nsb, 2, 4, 32)
    qs = np.bitwise_or.reduce(e << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=-2).reshape(rows, nsb, 64)
    out = np.concatenate([scales, qs, dm], axis=-1)
  else:
    scales = np.zeros((rows, nsb, 12), np.uint8)
    scales[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    scales[..., 4:8] = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    # each 64 weights: byte l = element l (low) | element l + 32 (high)
    e = qb.reshape(rows, nsb, 4, 2, 32)
    qs = (e[..., 0, :] | (e[..., 1, :] << 4)).reshape(rows, nsb, 128)
    out = np.concatenate([dm, scales, qs], axis=-1)
  assert out.shape[-1] == K_SIZES[kind], (kind, out.shape)
  return out.reshape(rows, -1)
