"""A Mix'n'Match plan for a bit budget: one width per layer, sliced from one parent.

1. Sensitivities: KL(reference || model) on calibration tokens with one layer
   at width r and every other layer at the widest allowed width, for every
   layer and allowed width (the reference: the float model, or the parent at
   its widest slice).
2. Allocation: minimise the sum of those KLs subject to the budget, an exact
   multiple-choice knapsack by dynamic programming over bit units (layers of
   equal size make it tiny).
3. Refinement: a short local search on the true KL of whole plans: move bits
   from one layer to another (one width step each way) while the budget holds
   and the KL falls.

The average bits are sum(numel x bits) / sum(numel) over the quantized
weights. Plans are evaluated with one compiled forward: each layer's codes
are sliced to its width before the call (`sliced_variables`), so a new plan
is new arguments, not a new compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax import nn
from matquant_jax.core import quant


Tree = Any


WIDTHS = (2, 3, 4, 6, 8)


@dataclasses.dataclass(frozen=True)
class Plan:
  layer_bits: tuple[int, ...]
  average_bits: float
  kl: float
  search_s: float


def layer_params(variables) -> list[int]:
  """Quantized parameters per layer (the weights held as `QuantizedArray`)."""
  counts = [0] * len([k for k in variables['params'] if k.startswith('layer_')])
  for i in range(len(counts)):
    for leaf in jax.tree.leaves(variables['params'][f'layer_{i}'], is_leaf=nn.is_quantized):
      if nn.is_quantized(leaf):
        counts[i] += math.prod(leaf.shape)
  return counts


def average_bits(layer_bits: Sequence[int], counts: Sequence[int]) -> float:
  return sum(b * n for b, n in zip(layer_bits, counts)) / sum(counts)


@functools.partial(jax.jit, static_argnames=('bits',))
def _slice(qa: quant.QuantizedArray, bits: int) -> quant.QuantizedArray:
  return dataclasses.replace(qa, codes=qa.sliced_codes(bits).astype(jnp.uint8))


def sliced_variables(variables, layer_bits: Sequence[int], memo: dict | None = None):
  """The parent with each layer's codes sliced to its width (still on the parent grid), so a
  forward without a QuantSpec runs the plan. `memo` keeps each (layer, width) slice, so
  evaluating many plans slices every layer at every width once."""
  memo = {} if memo is None else memo
  params = dict(variables['params'])
  for i, b in enumerate(layer_bits):
    key = f'layer_{i}'
    if (i, b) not in memo:
      memo[i, b] = jax.tree.map(lambda x, b=b: _slice(x, b) if nn.is_quantized(x) else x,
                                params[key], is_leaf=nn.is_quantized)
    params[key] = memo[i, b]
  return {**variables, 'params': params}


def _kl_fn(model: nn.Transformer):
  @jax.jit
  def kl(variables, tokens, ref_logp):
    logp = jax.nn.log_softmax(model.apply(variables, tokens).logits, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1))
  return kl


def knapsack(costs: np.ndarray, widths: Sequence[int], counts: Sequence[int], budget: float) -> tuple[int, ...]:
  """The widths (one per layer) minimising sum costs[l, w] with average bits <= budget.

  costs: [layers, len(widths)]. Exact: dynamic programming over bit units of gcd(counts) params.
  """
  unit = functools.reduce(math.gcd, counts)
  sizes = [n // unit for n in counts]
  cap = int(math.floor(budget * sum(sizes) + 1e-9))
  if min(widths) * sum(sizes) > cap:
    raise ValueError(f'budget {budget} bits is below the narrowest allowed width {min(widths)}')
  best = np.full(cap + 1, np.inf)
  best[0] = 0.0
  choice = []
  for l, size in enumerate(sizes):
    new = np.full(cap + 1, np.inf)
    pick = np.full(cap + 1, -1)
    for j, w in enumerate(widths):
      used = w * size
      if used > cap:
        continue
      cand = np.full(cap + 1, np.inf)
      cand[used:] = best[:cap + 1 - used] + costs[l, j]
      better = cand < new
      new[better], pick[better] = cand[better], j
    best = new
    choice.append(pick)
  end = int(np.argmin(best))
  plan = []
  for l in reversed(range(len(sizes))):
    j = int(choice[l][end])
    plan.append(widths[j])
    end -= widths[j] * sizes[l]
  return tuple(reversed(plan))


def search(model: nn.Transformer, variables, tokens: np.ndarray, budget: float,
           widths: Sequence[int] = WIDTHS, reference: str = 'float', float_params=None,
           refine_steps: int = 20) -> Plan:
  """A per-layer plan with average bits <= budget minimising KL to the reference on `tokens`."""
  return search_budgets(model, variables, tokens, (budget,), widths, reference, float_params,
                        refine_steps)[budget]


def search_budgets(model: nn.Transformer, variables, tokens: np.ndarray, budgets: Sequence[float],
                   widths: Sequence[int] = WIDTHS, reference: str = 'float', float_params=None,
                   refine_steps: int = 20) -> dict[float, Plan]:
  """Plans for several budgets from one set of sensitivities.

  variables: a stored parent (`QuantizedArray` weights). reference: 'float' (needs
  float_params) or 'widest' (the parent at max(widths)). Plan.search_s counts the
  shared sensitivities in every plan's time.
  """
  t0 = time.perf_counter()
  widths = tuple(sorted(set(widths)))
  stored = nn.stored_bits(variables)
  if stored is None:
    raise ValueError('the planner slices a stored parent; variables hold no QuantizedArray weights')
  if max(widths) > stored:
    raise ValueError(f'width {max(widths)} is wider than the stored {stored}-bit parent')
  counts = layer_params(variables)
  layers = len(counts)
  tokens = jnp.asarray(tokens)
  if reference == 'float':
    if float_params is None:
      raise ValueError("reference='float' needs float_params")
    ref_logits = model.apply({'params': float_params}, tokens).logits
  elif reference == 'widest':
    ref_logits = model.apply(sliced_variables(variables, (max(widths),) * layers), tokens).logits
  else:
    raise ValueError(f"reference must be 'float' or 'widest', got {reference!r}")
  ref_logp = jax.nn.log_softmax(ref_logits, axis=-1)
  kl_fn = _kl_fn(model)
  memo = {}
  kl = lambda plan: float(kl_fn(sliced_variables(variables, plan, memo), tokens, ref_logp))

  top = max(widths)
  costs = np.zeros((layers, len(widths)))
  base = kl((top,) * layers)
  for l in range(layers):
    for j, w in enumerate(widths):
      costs[l, j] = base if w == top else kl(tuple(w if i == l else top for i in range(layers)))
  shared_s = time.perf_counter() - t0
  logging.info('planner: %d sensitivities in %.1fs', layers * (len(widths) - 1) + 1, shared_s)
  out = {}
  for budget in budgets:
    t1 = time.perf_counter()
    plan = knapsack(costs - base, widths, counts, budget)
    current = kl(plan)
    rng = np.random.default_rng(0)
    index = {w: j for j, w in enumerate(widths)}
    for _ in range(refine_steps):
      up, down = rng.choice(layers, 2, replace=False)
      if index[plan[up]] == len(widths) - 1 or index[plan[down]] == 0:
        continue
      cand = list(plan)
      cand[up], cand[down] = widths[index[plan[up]] + 1], widths[index[plan[down]] - 1]
      if average_bits(cand, counts) > budget + 1e-9:
        continue
      value = kl(tuple(cand))
      if value < current:
        plan, current = tuple(cand), value
    out[budget] = Plan(plan, average_bits(plan, counts), current, shared_s + time.perf_counter() - t1)
  return out
