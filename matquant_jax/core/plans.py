"""Mix'n'Match precision plans: one width per layer, as a small JSON file.

{"format": "matquant-plan", "version": 1, "layer_bits": [4, 4, 8, ...], ...}
With "budget_bits" and "layer_params" (quantized parameters per layer), loading
checks the plan's average bits against the budget. Other keys (how the plan was
found, its KL) are kept but not read.
Evaluation, the sampler and the packed export take the tuple `load` returns.
"""

from __future__ import annotations

import os
from typing import Sequence

from matquant_jax.core import files


FORMAT, VERSION = 'matquant-plan', 1


def check(layer_bits: Sequence[int | None], num_layers: int, max_bits: int = 8,
          source: str = 'plan') -> tuple[int | None, ...]:
  """The plan as a tuple; ValueError unless it has one width in 1..max_bits (or None) per layer."""
  layer_bits = tuple(layer_bits)
  if len(layer_bits) != num_layers:
    raise ValueError(f'{source}: {len(layer_bits)} layer widths for a {num_layers}-layer model')
  for i, b in enumerate(layer_bits):
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= max_bits):
      raise ValueError(f'{source}: layer {i} has width {b!r}; widths are integers in 1..{max_bits}')
  return layer_bits


def save(path: str, layer_bits: Sequence[int | None], **info) -> None:
  """Writes a plan file (atomically); `info` adds descriptive keys."""
  files.write_json(path, {'format': FORMAT, 'version': VERSION, 'layer_bits': list(layer_bits), **info})


def load(path: str, num_layers: int, max_bits: int = 8) -> tuple[int | None, ...]:
  """The per-layer widths of a plan file, checked against the model."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'plan file {path} does not exist')
  plan = files.read_json(path)
  if not isinstance(plan, dict) or plan.get('format') != FORMAT or 'layer_bits' not in plan:
    raise ValueError(f'{path} is not a precision plan (expected "format": "{FORMAT}" and "layer_bits")')
  if plan.get('version') != VERSION:
    raise ValueError(f'{path}: plan version {plan.get("version")!r}; this code reads version {VERSION}')
  layer_bits = check(plan['layer_bits'], num_layers, max_bits, path)
  if 'budget_bits' in plan and 'layer_params' in plan:
    counts = plan['layer_params']
    if len(counts) != len(layer_bits):  # zip would skip the budget check's last layers
      raise ValueError(f'{path}: layer_params has {len(counts)} entries for {len(layer_bits)} layers')
    avg = sum(b * n for b, n in zip(layer_bits, counts)) / sum(counts)
    if avg > plan['budget_bits'] + 1e-9:
      raise ValueError(f'{path}: the plan averages {avg:.3f} bits, over its budget of {plan["budget_bits"]}')
  return layer_bits


def pyramid(num_layers: int) -> tuple[int, ...]:
  """Mix'n'Match Pyramid: int2 in the outer sixth at each end, int8 in the middle third,
  int4 between (spec section 5)."""
  out = []
  for i in range(num_layers):
    d = min(i, num_layers - 1 - i) / (num_layers / 2)  # 0 at the ends, ~1 in the middle
    out.append(2 if d < 1 / 3 else 4 if d < 2 / 3 else 8)
  return tuple(out)
