"""Side-by-side timing for the benchmarks: interleaved repeats, median reported."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def interleaved_medians(runners: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
  """Median seconds per call of each runner; one warm-up call each (compilation), then the
  runners take turns so that machine noise hits all of them alike."""
  for run in runners.values():
    run()
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def step_runner(prepared, batch, steps: int) -> Callable[[], None]:
  """Runs `steps` train steps of a `train.Prepared` on one batch, keeping the state it advances."""
  state = prepared.state
  def run():
    nonlocal state
    for _ in range(steps):
      state, _ = prepared.step_fn(state, prepared.frozen, batch)
    jax.block_until_ready(state)
  return run
