"""Einsums of an activation with a weight, as the dot XLA runs at memory speed.

`jnp.einsum('BTD,FDH->FBTH', x, w)` contracts an axis in the middle of the
weight, and XLA:CPU then copies (transposes) the whole weight into a 2-D
matrix on every call: a decode step spent most of its time copying weights.
`contract` gives the same product with the weight read in its stored
(official checkpoint) layout: the weight's leading free axes become dot
batch axes (the small activation is broadcast over them), the rest is one
[K, R] or [R, K] matrix per batch entry; only the activation-sized result is
transposed to the equation's output order.

`MATQUANT_CONTRACTION=einsum` (read at import) or `with contract.use('einsum'):`
restores plain `jnp.einsum`, kept so benchmarks can time the two side by side.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import jax
import jax.numpy as jnp


MODES = ('dot', 'einsum')
_DEFAULT = os.environ.get('MATQUANT_CONTRACTION', 'dot')
if _DEFAULT not in MODES:
  raise ValueError(f'MATQUANT_CONTRACTION must be one of {MODES}, got {_DEFAULT!r}')
try:  # a jax config state is part of every jit cache key: switching it re-traces
  from jax._src import config as _jax_config  # pylint: disable=g-import-not-at-top
  _STATE = _jax_config.enum_state('matquant_contraction', MODES, _DEFAULT, 'core.contract path',
                                  include_in_jit_key=True, include_in_trace_context=True)
except (ImportError, AttributeError, TypeError):  # a jax without it: the import-time choice only
  _STATE = None


def mode() -> str:
  """The contraction path in effect: 'dot' (`contract`) or 'einsum' (plain jnp.einsum)."""
  return _STATE.value if _STATE is not None else _DEFAULT


@contextlib.contextmanager
def use(name: str):
  """Traces inside use contraction path `name` (jitted functions are traced again for it)."""
  if name not in MODES:
    raise ValueError(f'contraction mode must be one of {MODES}, got {name!r}')
  if _STATE is None:
    raise RuntimeError('this jax cannot switch contraction paths at run time; set MATQUANT_CONTRACTION')
  with _STATE(name):
    yield


@functools.lru_cache(maxsize=None)
def _plan(eqn: str, x_ndim: int, w_ndim: int):
  """(len G, len K, weight contracted first?, out permutation), or None if the form does not apply.

  Applies when x's contracted axes K are its trailing axes, in the weight's order, and the weight
  is [G..., K..., R...] or [G..., R..., K...], G its free axes before the first contracted one.
  """
  ins, out = eqn.replace(' ', '').split('->')
  xs, ws = ins.split(',')
  if len(xs) != x_ndim or len(ws) != w_ndim or len(set(xs)) != len(xs) or len(set(ws)) != len(ws):
    return None
  shared = [a for a in ws if a in xs]
  if not shared or any(a in out for a in shared):
    return None  # no contraction, or a shared axis kept in the output (a batch axis)
  k = ''.join(shared)
  if not xs.endswith(k):
    return None
  if ws.endswith(k):  # [R..., K...]: one matrix contracted on its last axes
    g, r, k_first = '', ws[:len(ws) - len(k)], False
  else:
    g, rest = ws[:ws.index(k[0])], ws[ws.index(k[0]):]
    if not rest.startswith(k):
      return None
    r, k_first = rest[len(k):], True
  natural = g + xs[:len(xs) - len(k)] + r  # the dot's output order
  if sorted(natural) != sorted(out):
    return None
  return len(g), len(k), k_first, tuple(natural.index(a) for a in out)


def contract(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(eqn, x, w)` for an activation x and a weight w, without copying w.

  A weight [R..., K...] is one [R, K] matrix (a 2-D dot contracted on its
  last axes). A weight [G..., K..., R...] with leading free axes G is read
  as G [K, R] matrices by a batched dot over x broadcast to G copies, if that
  copies less than transposing the weight would (G * x rows < R: decoding);
  otherwise (large training batches) the weight is transposed, the cheaper
  copy of the two.
  """
  plan = _plan(eqn, x.ndim, w.ndim) if mode() == 'dot' else None
  if plan is None:
    return jnp.einsum(eqn, x, w)
  n_g, n_k, k_first, perm = plan
  g_shape, free_x = w.shape[:n_g], x.shape[:x.ndim - n_k]
  k_shape = x.shape[x.ndim - n_k:]
  r_shape = w.shape[n_g + n_k:] if k_first else w.shape[n_g:w.ndim - n_k]
  G, K, R, M = math.prod(g_shape), math.prod(k_shape), math.prod(r_shape), math.prod(free_x)
  x2 = x.reshape(M, K)
  if not k_first:
    y = jax.lax.dot_general(x2, w.reshape(R, K), (((1,), (1,)), ((), ())))  # [M, R]
  elif G == 1:
    y = jax.lax.dot_general(x2, w.reshape(K, R), (((1,), (0,)), ((), ())))[None]
  elif G * M < R:
    xb = jnp.broadcast_to(x2, (G, M, K))
    y = jax.lax.dot_general(xb, w.reshape(G, K, R), (((2,), (1,)), ((0,), (0,))))  # [G, M, R]
  else:
    wt = jnp.moveaxis(w.reshape(G, K, R), 0, 1).reshape(K, G * R)
    y = jnp.moveaxis(jnp.dot(x2, wt).reshape(M, G, R), 1, 0)
  y = y.reshape(g_shape + free_x + r_shape)
  return y if perm == tuple(range(y.ndim)) else jnp.transpose(y, perm)
