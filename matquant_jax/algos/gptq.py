"""GPTQ as MatQuant's third base algorithm: one-shot, block by block, no training.

For every quantized weight W (its contraction axes flattened to `in`, the rest
to `out`) and its inputs X from the already quantized prefix, H = X^T X (the
GPTQ Hessian up to a factor 2), damped by `damp` x mean(diag H). Columns (input
channels) are quantized in order (or by decreasing diag H, act-order), in
blocks of `block_size` with lazy batch updates; each column's error, scaled by
the inverse Hessian's Cholesky factor, is fed back to the columns not yet
quantized (Frantar et al., 2022).

The code of a column is searched exhaustively over the parent's 2^c codes:
argmin_q sum_r lambda_r (w - deq(S(q, r)))^2 with the objective's widths and
lambdas (MatQuant mode), or over the 2^r codes of an r-bit grid (the GPTQ
baseline at r, `'r'` with parent_bits r); the residual fed back is the
lambda-weighted mean of the widths' errors (with `Options.balance`, each width's error is measured in
units of its own step first, so lambda weighs the widths as it says; `Options.outliers` keeps the
largest weights in float16 outside the grid, with no error to feed back). With several widths, each width has
its own activation stream (its quantized prefix) and H = sum_r lambda_r H_r / sum
lambda. With `Options.feedback='per_width'` each width instead keeps its own target weights and
Hessian H_r: a code minimises sum_r lambda_r (its GPTQ loss at width r), and each width's own
residual is fed back to its own target, so int8 does not carry int2's compensation. Scales and
zero points are min-max of the original weights, per output channel or per group, fixed before the column loop (GPTQ's static groups), so
act-order and groups combine. Inside a block, weights are quantized in GPTQ's
true-sequential order (q/k/v, then the attention output, then gate/up, then
down), each group's inputs taken with the earlier groups already quantized.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax import nn, parents
from matquant_jax.algos import blockwise
from matquant_jax.core import losses, quant
from matquant_jax.core.qeinsum import QuantSpec


Tree = Any


# GPTQ's true-sequential order inside a block: each group's inputs see the earlier groups quantized.
ORDER = {'attn/qkv_einsum/w': 0, 'attn/q_einsum/w': 0, 'attn/kv_einsum/w': 0,
         'attn/attn_vec_einsum/w': 1, 'mlp/gating_einsum': 2, 'mlp/linear': 3}


FEEDBACK = ('mean', 'per_width')


@dataclasses.dataclass(frozen=True)
class Options:
  """damp: added to diag H, as a fraction of its mean. block_size: columns per lazy
  batch update. act_order: quantize columns by decreasing diag H. batch_size:
  calibration sequences per forward pass (memory only). balance: each width's squared
  error in units of its own step (divided by 4^(c-r)), so lambda weighs widths as it says
  (raw, int2's error is 4096x int8's and lambda (1, 1, 1) optimises int2 alone). outliers:
  the fraction of each weight (largest |w|) kept in float16 outside the grid: their error is
  zero (nothing fed back) and they keep the value GPTQ's updates gave them. feedback: 'mean'
  (one target for every width, the lambda-weighted mean residual fed back, as MatGPTQ) or
  'per_width' (each width its own target and Hessian, its own residual fed back; `quantize_matrix`)."""
  damp: float = 0.01
  block_size: int = 128
  act_order: bool = False
  batch_size: int = 8
  balance: bool = False
  outliers: float = 0.0
  feedback: str = 'mean'

  def __post_init__(self):
    if self.feedback not in FEEDBACK:
      raise ValueError(f'gptq feedback must be one of {FEEDBACK}, got {self.feedback!r}')
    if not 0 <= self.damp < 1:
      raise ValueError(f'gptq damp must be in [0, 1), got {self.damp}')
    if self.block_size < 1 or self.batch_size < 1:
      raise ValueError('gptq block_size and batch_size must be >= 1')

  @classmethod
  def from_config(cls, cfg, **overrides) -> 'Options':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in cfg.items() if k in fields}, **overrides})


def as_matrix(w: jax.Array, reduce_axes) -> jax.Array:
  """A weight as [in, out]: its contraction axes first (flattened), the others after."""
  axes = tuple(sorted(a % w.ndim for a in reduce_axes))
  perm = axes + tuple(a for a in range(w.ndim) if a not in axes)
  n_in = math.prod(w.shape[a] for a in axes)
  return jnp.transpose(w, perm).reshape(n_in, -1)


def from_matrix(m: jax.Array, shape, reduce_axes) -> jax.Array:
  """The inverse of `as_matrix`."""
  axes = tuple(sorted(a % len(shape) for a in reduce_axes))
  perm = axes + tuple(a for a in range(len(shape)) if a not in axes)
  return jnp.transpose(m.reshape([shape[a] for a in perm]), np.argsort(perm))


def code_table(widths, parent_bits: int, extra_precision: bool = False, grid: str = 'msb') -> np.ndarray:
  """[R, 2^c]: the value on the parent grid that each candidate code q takes at each width
  (the MSB slice, or the re-grid's float value)."""
  q = np.arange(2**parent_bits)
  if grid == 'regrid':
    quant.check_grid(grid, extra_precision)
    return np.stack([np.asarray(quant.regrid_float(jnp.asarray(q), r, parent_bits)) for r in widths]).astype(np.float32)
  return np.stack([quant.slice_codes(q, r, parent_bits, extra_precision) for r in widths]).astype(np.float32)


def choose_codes(w, scale, zero, table, lambdas, d=None):
  """Per output channel, argmin_q sum_r lambda_r (w_r - scale (table[r, q] - zero))^2 / d_r^2.

  w: [out] (one target for every width) or [R, out] (each width's own target, with d [R]: its
  inverse Hessian's diagonal at this column, so each term is that width's GPTQ loss); scale,
  zero: [out]. Returns (codes [out] int32, the lambda-weighted mean residual [out]) for one
  target, (codes, each width's residual [R, out]) for per-width targets.
  """
  deq = scale[None, :, None] * (table[:, None, :] - zero[None, :, None])  # [R, out, C]
  err = (w if w.ndim == 2 else w[None])[:, :, None] - deq
  weights = lambdas if d is None else lambdas / d**2
  q = jnp.argmin(jnp.einsum('r,roc->oc', weights, err**2), axis=-1)
  picked = jnp.take_along_axis(err, q[None, :, None], axis=-1)[..., 0]  # [R, out]
  if w.ndim == 2:
    return q.astype(jnp.int32), picked
  return q.astype(jnp.int32), jnp.einsum('r,ro->o', lambdas, picked) / jnp.sum(lambdas)


def width_weights(widths, lambdas, parent_bits: int, balance: bool) -> np.ndarray:
  """The objective's per-width weights in `choose_codes`: lambda, or with `balance` lambda /
  4^(c-r) (each width's squared error in units of its own step), normalised to sum 1."""
  w = np.asarray(lambdas, np.float64)
  if balance:
    w = w / 4.0 ** (parent_bits - np.asarray(widths, np.float64))
  return (w / w.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=('block_size', 'act_order'))
def quantize_matrix(W, H, scale, zero, table, lambdas, damp: float, block_size: int = 128,
                    act_order: bool = False, keep=None):
  """GPTQ codes [in, out] (int32, on the parent grid) for W [in, out], and the weights as updated
  when each was reached ([in, out], or [R, in, out] with per-width feedback: kept outliers' values).

  H: [in, in], one Hessian: the residual fed back is the lambda-weighted mean of the widths'
  errors (one target for every width, as MatGPTQ); or [R, in, in], one per width (its own
  quantized prefix): each width keeps its own target, updated by its own error through its own
  inverse Hessian, and a code weighs the widths' GPTQ losses (per-width feedback).
  scale, zero: [in, out] (each column's statistics; per-channel ones repeat over in).
  keep: bool [in, out], weights kept exactly (no error, nothing fed back), or None.
  """
  per_width = H.ndim == 3
  H = H if per_width else H[None]  # [S, in, in]: S streams of targets
  keep = jnp.zeros(W.shape, bool) if keep is None else keep
  n = W.shape[0]
  diag = jnp.diagonal(H, axis1=1, axis2=2)  # [S, in]
  dead = jnp.all(diag == 0, axis=0)
  H = H + jnp.diag(jnp.where(dead, 1.0, 0.0))[None]
  W = jnp.where(dead[:, None], 0.0, W)
  perm = jnp.argsort(-jnp.sum(diag, axis=0)) if act_order else jnp.arange(n)
  W, scale, zero, H, keep = W[perm], scale[perm], zero[perm], H[:, perm][:, :, perm], keep[perm]
  damping = damp * jnp.mean(jnp.diagonal(H, axis1=1, axis2=2), axis=1)
  H = H + damping[:, None, None] * jnp.eye(n, dtype=H.dtype)
  Hinv = jax.vmap(lambda h: jnp.linalg.cholesky(jnp.linalg.inv(h)).T)(H)  # upper U, U^T U = H^-1
  W = jnp.broadcast_to(W, (H.shape[0],) + W.shape)
  codes = jnp.zeros(W.shape[1:], jnp.int32)
  for b0 in range(0, n, block_size):
    b1 = min(b0 + block_size, n)
    H1 = Hinv[:, b0:b1, b0:b1]

    def column(i, carry, b0=b0, H1=H1):
      W1, Q1, E1 = carry
      d = H1[:, i, i]  # [S]
      if per_width:
        q, err = choose_codes(W1[:, i], scale[b0 + i], zero[b0 + i], table, lambdas, d)
      else:
        q, err = choose_codes(W1[0, i], scale[b0 + i], zero[b0 + i], table, lambdas)
        err = err[None]
      e = jnp.where(keep[b0 + i][None], 0.0, err) / d[:, None]
      W1 = W1 - H1[:, i][:, :, None] * e[:, None, :]  # rows below i (H1 is upper triangular)
      return W1, Q1.at[i].set(q), E1.at[:, i].set(e)

    W1, Q1, E1 = jax.lax.fori_loop(0, b1 - b0, column, (W[:, b0:b1], codes[b0:b1], jnp.zeros_like(W[:, b0:b1])))
    codes = codes.at[b0:b1].set(Q1)
    W = W.at[:, b0:b1].set(W1)  # a row is never updated after its turn: W ends as each weight was reached
    W = W.at[:, b1:].add(-jnp.einsum('sbk,sbo->sko', Hinv[:, b0:b1, b1:], E1))
  inv = jnp.argsort(perm)
  return codes[inv], (W[:, inv] if per_width else W[0, inv])


def quantize_weight(w, x_hessian, info: nn.WeightInfo, objective: losses.Objective, spec: QuantSpec,
                    opts: Options) -> quant.QuantizedArray:
  """A stored parent of float weight w (its einsum `info`) from its input Hessian ([in, in], or
  one per objective width [R, in, in] for per-width feedback, `quantize_matrix`)."""
  w = jnp.asarray(w, jnp.float32)
  if opts.outliers and spec.outliers and opts.outliers != spec.outliers:
    raise ValueError(f'gptq.Options(outliers={opts.outliers}) and QuantSpec(outliers={spec.outliers}) '
                     'disagree; set one')
  stats = quant.QuantizedArray.from_float(w, spec.parent_bits, info.reduce_axes, spec.group_size,
                                         symmetric=spec.symmetric, outliers=opts.outliers or spec.outliers,
                                         slice_grid=spec.slice_grid)
  full = lambda s: jnp.broadcast_to(s, stats.codes.shape).reshape(w.shape)
  scale, zero = (as_matrix(full(s), info.reduce_axes) for s in (stats.scale, stats.zero_point))
  table = jnp.asarray(code_table(objective.widths, spec.parent_bits, spec.extra_precision, spec.slice_grid))
  lambdas = jnp.asarray(width_weights(objective.widths, objective.lambdas, spec.parent_bits, opts.balance))
  keep = None
  if stats.outlier_index is not None:
    keep = as_matrix(jnp.zeros(w.size, bool).at[stats.outlier_index].set(True).reshape(w.shape), info.reduce_axes)
  codes, reached = quantize_matrix(as_matrix(w, info.reduce_axes), x_hessian, scale, zero, table, lambdas,
                                   opts.damp, opts.block_size, opts.act_order, keep)
  if reached.ndim == 3:  # per-width targets: the kept outliers take the widest width's
    reached = reached[int(np.argmax(objective.widths))]
  codes = from_matrix(codes, w.shape, info.reduce_axes)
  grouped, _ = quant.group(codes, info.reduce_axes, spec.group_size)
  out = dataclasses.replace(stats, codes=grouped.astype(jnp.uint8))
  if keep is None:
    return out
  value = from_matrix(reached, w.shape, info.reduce_axes).reshape(-1)[stats.outlier_index]
  return dataclasses.replace(out, outlier_value=value.astype(quant.OUTLIER_DTYPE))


@functools.partial(jax.jit, static_argnames=('block', 'dims'))
def _hessian_batch(block, lp, x, tokens, dims: tuple[tuple[str, int], ...]):
  positions, mask = nn.attention_inputs(block.config, tokens)
  _, state = block.apply({'params': lp}, x, positions, mask, mutable=['einsum_inputs'])
  flat = traverse_util.flatten_dict(state['einsum_inputs'], sep='/')
  return {p: (lambda a: a.T @ a)(flat[p][0].reshape(-1, n).astype(jnp.float32)) for p, n in dims}


@functools.partial(jax.jit, static_argnames=('block',))
def _block_forward(block, lp, x, tokens):
  return block.apply({'params': lp}, x, *nn.attention_inputs(block.config, tokens))[0]


def _hessians(block, lp, dims: dict[str, int], xs, tokens, batch_size):
  """{weight path: X^T X} of the einsum inputs of the block's weights `dims` (path -> in size),
  on inputs xs [n, T, D] with float block weights lp."""
  total = None
  for i in range(0, len(xs), batch_size):
    h = _hessian_batch(block, lp, xs[i:i + batch_size], tokens[i:i + batch_size], tuple(dims.items()))
    total = h if total is None else jax.tree.map(jnp.add, total, h)
  return total


def _at_width(lp, done: dict, r: int, extra_precision: bool, grid: str = 'msb'):
  """Block params with the already quantized weights replaced by their float value at width r."""
  flat = traverse_util.flatten_dict(lp, sep='/')
  for path, qa in done.items():
    flat[path] = qa.dequantize(min(r, qa.parent_bits), extra_precision, grid=grid)
  return traverse_util.unflatten_dict(flat, sep='/')


def calibrate(config: nn.TransformerConfig, params: Tree, tokens: np.ndarray,
              objective: losses.Objective, spec: QuantSpec, opts: Options = Options(),
              ckpt_dir: str | None = None, desc: str = 'gptq') -> dict[str, Tree]:
  """A stored parent {'params': ...} (QuantizedArray for spec.targets) made by GPTQ, block by
  block (`blockwise.calibrate`).

  tokens: int [samples, seq_len] calibration sequences. With `ckpt_dir`, the
  parent is saved after every block and a rerun resumes after the last one.
  """
  if objective.distill or None in objective.widths:
    raise ValueError('GPTQ takes quantized data widths only (no "float", no "->" distillation)')
  tokens = blockwise.check_tokens(tokens)
  infos = nn.targeted_weights(config, spec.targets)
  widths, ep, bs = objective.widths, spec.extra_precision, opts.batch_size
  lam = dict(zip(widths, objective.lambdas))
  groups = sorted({ORDER[p] for p in infos})

  def forward(i, key, block, parent, bits):
    lp = params[key]
    if bits is not None:
      block_q = {p: traverse_util.flatten_dict(parent['params'][key], sep='/')[p] for p in infos}
      lp = _at_width(lp, block_q, bits, ep, spec.slice_grid)
    return lambda x, t: _block_forward(block, lp, x, t)

  def calibrate_block(i, key, block, parent, streams, target, bar):
    lp = params[key]
    flat_lp = traverse_util.flatten_dict(lp, sep='/')
    done = {}
    for g in groups:
      paths = [p for p in infos if ORDER[p] == g]
      dims = {p: math.prod(np.shape(flat_lp[p])[a] for a in infos[p].reduce_axes) for p in paths}
      hs = [_hessians(block, _at_width(lp, done, r, ep, spec.slice_grid), dims, streams[r], tokens, bs)
            for r in widths]  # one per width, each on its own quantized prefix
      if opts.feedback == 'per_width':  # [R, in, in], in the objective's width order
        hess = {p: jnp.stack([h[p] for h in hs]) for p in paths}
      else:
        hess = {p: sum(lam[r] / sum(objective.lambdas) * h[p] for r, h in zip(widths, hs)) for p in paths}
      for p in paths:
        done[p] = quantize_weight(flat_lp[p], hess[p], infos[p], objective, spec, opts)
        bar.update()
    block_params = traverse_util.flatten_dict(parent['params'][key], sep='/') | done
    return {'params': {**parent['params'], key: traverse_util.unflatten_dict(block_params, sep='/')}}

  return blockwise.calibrate(
      config, params, tokens, parents.make_parent(config, params, spec),  # min-max, replaced block by block
      widths=widths, calibrate_block=calibrate_block, forward=forward, batch_size=bs,
      units_per_block=len(infos), ckpt_dir=ckpt_dir, desc=desc,
      settings={'objective': objective, 'spec': spec, 'options': opts})
