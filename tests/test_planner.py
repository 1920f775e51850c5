"""The bit-budget planner: the knapsack against brute force, budgets, one width, a random plan."""

import itertools
import json

import jax
import numpy as np
import pytest

from matquant_jax import nn, parents, testing
from matquant_jax.core import QuantSpec, plans
from matquant_jax.parents import planner


def test_knapsack_equals_brute_force():
  rng = np.random.default_rng(0)
  widths, counts = (2, 3, 4, 8), [4, 4, 8, 4]
  costs = rng.uniform(0, 1, (4, 4)) * np.array([8, 4, 2, 0])[None]  # narrower costs more
  for budget in (2.0, 2.6, 3.5, 5.0, 8.0):
    got = planner.knapsack(costs, widths, counts, budget)
    feasible = [p for p in itertools.product(widths, repeat=4) if planner.average_bits(p, counts) <= budget]
    best = min(feasible, key=lambda p: sum(costs[l, widths.index(w)] for l, w in enumerate(p)))
    assert np.isclose(sum(costs[l, widths.index(w)] for l, w in enumerate(got)),
                      sum(costs[l, widths.index(w)] for l, w in enumerate(best)))
    assert planner.average_bits(got, counts) <= budget
  with pytest.raises(ValueError, match='below the narrowest allowed width 2'):
    planner.knapsack(costs, widths, counts, 1.5)


CFG = nn.TransformerConfig.tiny(num_embed=64, num_layers=4, tie_embeddings=False)


@pytest.fixture(scope='module')
def tiny():
  model = nn.Transformer(CFG)
  tokens = np.random.default_rng(0).integers(4, 64, (8, 16)).astype(np.int32)
  params = testing.init_params(model)
  params = jax.tree.map(lambda w: 3 * w, params)
  stored = parents.make_parent(CFG, params, QuantSpec(8, targets=('ffn', 'attn')))
  return model, params, stored, tokens


def test_sliced_variables_run_the_plan(tiny):
  model, _, stored, tokens = tiny
  plan = (2, 8, 4, 3)
  want = model.apply(stored, tokens, spec=QuantSpec(plan, targets=('ffn', 'attn'))).logits
  np.testing.assert_array_equal(np.asarray(model.apply(planner.sliced_variables(stored, plan), tokens).logits),
                                np.asarray(want))


def test_planner_respects_budget_and_beats_a_random_plan(tiny, tmp_path):
  model, params, stored, tokens = tiny
  counts = planner.layer_params(stored)
  kl_fn = planner._kl_fn(model)
  ref = jax.nn.log_softmax(model.apply({'params': params}, tokens).logits, axis=-1)
  kl = lambda p: float(kl_fn(planner.sliced_variables(stored, p), tokens, ref))
  rng = np.random.default_rng(1)
  for budget in (2.5, 3.0, 4.5):
    plan = planner.search(model, stored, tokens, budget, float_params=params, refine_steps=10)
    assert plan.average_bits <= budget and len(plan.layer_bits) == 4
    assert plan.kl == pytest.approx(kl(plan.layer_bits), rel=1e-5)
    randoms = [p for p in (tuple(rng.choice(planner.WIDTHS, 4)) for _ in range(400))
               if budget - 0.5 <= planner.average_bits(p, counts) <= budget][:5]
    assert randoms and all(plan.kl <= kl(p) for p in randoms), (plan, [(p, kl(p)) for p in randoms])
  one = planner.search(model, stored, tokens, 3.7, widths=(3,), float_params=params, refine_steps=5)
  assert one.layer_bits == (3, 3, 3, 3)


def test_plan_files_check_the_budget(tmp_path):
  path = str(tmp_path / 'p.json')
  plans.save(path, [2, 4, 4, 2], budget_bits=3.0, layer_params=[10, 10, 10, 10])
  assert plans.load(path, 4) == (2, 4, 4, 2)
  plans.save(path, [4, 4, 4, 2], budget_bits=3.0, layer_params=[10, 10, 10, 10])
  with pytest.raises(ValueError, match='averages 3.500 bits, over its budget of 3.0'):
    plans.load(path, 4)
  json.dump({'format': 'other'}, open(path, 'w'))
  with pytest.raises(ValueError, match='is not a precision plan'):
    plans.load(path, 4)
  plans.save(path, [4, 4, 4, 4], budget_bits=3.0, layer_params=[10, 10, 10])  # one entry short
  with pytest.raises(ValueError, match='layer_params has 3 entries for 4 layers'):
    plans.load(path, 4)
  open(path, 'w').write('{"format": ')  # truncated
  with pytest.raises(ValueError, match=r'p\.json is not valid JSON'):
    plans.load(path, 4)
