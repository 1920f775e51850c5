"""The MatQuant objective: sum over r of lambda_r * (data loss_r + distillation_r).

Objectives are written as in the paper: '8,4,2' (MatQuant), '2' (a baseline
or, from an 8-bit parent, Single Precision MatQuant), '8,4,8->2',
'8,4,2,8->2', '8,4,2,8->4;2' (co-distillation: the teacher slice's output,
under stop-gradient, supervises the student slices), and 'float' (no
quantization, for pretraining).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from matquant_jax.core import quant


Bits = int | None  # None: the float model


@dataclasses.dataclass(frozen=True)
class Objective:
  """widths: every bit-width with a loss term, in order; lambdas aligned with it.

  data: the widths trained against the data; distill: (teacher, student) pairs.
  """
  widths: tuple[Bits, ...]
  lambdas: tuple[float, ...]
  data: tuple[Bits, ...]
  distill: tuple[tuple[int, int], ...] = ()

  @property
  def teachers(self) -> tuple[int, ...]:
    return tuple(dict.fromkeys(t for t, _ in self.distill))


def _parse_bits(token: str, parent_bits: int) -> Bits:
  if token == 'float':
    return None
  try:
    bits = int(token)
  except ValueError:
    raise ValueError(f'bad bit-width {token!r} in objective: expected an integer or "float"') from None
  quant.check_bits(bits, parent_bits)
  return bits


def parse_objective(spec: str, lambdas: Sequence[float] | None = None, parent_bits: int = 8) -> Objective:
  """Parses '8,4,2,8->4;2'-style objectives; lambdas default to 1 for every width."""
  data, distill, widths = [], [], []
  for term in (t.strip() for t in str(spec).split(',')):
    if not term:
      raise ValueError(f'empty term in objective {spec!r}')
    if '->' in term:
      teacher, students = term.split('->', 1)
      t = _parse_bits(teacher.strip(), parent_bits)
      if t is None:
        raise ValueError(f'a teacher must be a bit-width, got {term!r}')
      for s in students.split(';'):
        r = _parse_bits(s.strip(), parent_bits)
        if r is None or r == t:
          raise ValueError(f'bad distillation student in {term!r}')
        distill.append((t, r))
        widths.append(r)
    else:
      r = _parse_bits(term, parent_bits)
      data.append(r)
      widths.append(r)
  widths = tuple(dict.fromkeys(widths))
  if lambdas is None:
    lambdas = (1.0,) * len(widths)
  lambdas = tuple(float(x) for x in lambdas)
  if len(lambdas) != len(widths):
    raise ValueError(f'lambdas {lambdas} do not match the bit-widths {widths} of objective '
                     f'{spec!r}: give one lambda per bit-width, in that order')
  if any(x < 0 for x in lambdas):
    raise ValueError(f'lambdas must be non-negative, got {lambdas}')
  return Objective(widths, lambdas, tuple(data), tuple(distill))


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean next-token negative log-likelihood (nats) over mask."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def distillation(teacher_logits: jax.Array, student_logits: jax.Array, mask: jax.Array) -> jax.Array:
  """KL(teacher || student) per token, teacher under stop-gradient."""
  t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1)


def _name(bits: Bits) -> str:
  return 'float' if bits is None else f'int{bits}'


def mse(output: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error over the feature axis and the masked tokens (OmniQuant's L2)."""
  err = jnp.mean(jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1)


def mse_distillation(teacher: jax.Array, student: jax.Array, mask: jax.Array) -> jax.Array:
  """L2 between the teacher slice's output (stop-gradient) and the student's."""
  return mse(student, jax.lax.stop_gradient(teacher), mask)


def matquant_loss(outputs_fn: Callable[[Bits], jax.Array], targets: jax.Array, mask: jax.Array,
                  objective: Objective, data_loss=cross_entropy, distill_loss=distillation,
                  names: tuple[str, str] = ('ce', 'kl'), scales: dict | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_r lambda_r * (data_loss_r if r is a data term + sum of distill_loss(teacher -> r)) / scale_r.

  outputs_fn(bits) runs the model with its weights sliced to `bits` (logits
  for QAT; a layer's output for OmniQuant, with mse / mse_distillation); each
  slice is run once per step. scales: {r: positive scale} to balance widths
  whose raw losses differ by orders of magnitude (metrics stay unscaled).
  """
  outputs = {}
  def get(bits):
    if bits not in outputs:
      outputs[bits] = outputs_fn(bits)
    return outputs[bits]

  total, metrics = 0.0, {}
  for r, lam in zip(objective.widths, objective.lambdas):
    term = 0.0
    if r in objective.data:
      loss = data_loss(get(r), targets, mask)
      metrics[f'{names[0]}_{_name(r)}'] = loss
      term += loss
    for t, s in objective.distill:
      if s == r:
        loss = distill_loss(get(t), get(r), mask)
        metrics[f'{names[1]}_{_name(t)}_to_{_name(r)}'] = loss
        term += loss
    total += lam * term / (1.0 if scales is None else scales[r])
  metrics['loss'] = total
  return total, metrics
