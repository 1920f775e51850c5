"""Reading compiled HLO: which ops copy or transpose large arrays (a weight, a whole cache)."""

from __future__ import annotations

import math
import re

# `%name = f32[2,576,1536]{2,1,0} transpose(...)`: the result type, its shape and the op.
_OP = re.compile(r'=\s+(\w+)\[([\d,]*)\](?:\{[^}]*\})?\s+(transpose|copy)\(')


def large_copies(hlo_text: str, min_elements: int) -> list[tuple[str, str, tuple[int, ...]]]:
  """(op, dtype, shape) of every transpose or copy in `hlo_text` (a compiled module's
  `as_text()`, fusion bodies included) whose result has at least `min_elements` elements."""
  out = []
  for m in _OP.finditer(hlo_text):
    shape = tuple(int(d) for d in m.group(2).split(',') if d)
    if math.prod(shape) >= min_elements:
      out.append((m.group(3), m.group(1), shape))
  return out


_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$', re.M)
_CALLEE = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?(%[\w.\-]+(?:,\s*%[\w.\-]+)*)\}?')


def computations(hlo_text: str) -> dict[str, str]:
  """Name -> text of every computation in a module's `as_text()`."""
  starts = [(m.group(1), m.start()) for m in _COMPUTATION.finditer(hlo_text)]
  ends = [s for _, s in starts[1:]] + [len(hlo_text)]
  return {name: hlo_text[s:e] for (name, s), e in zip(starts, ends)}


def loop_bodies(hlo_text: str) -> str:
  """The text of every while loop's body and condition, with everything they call: what runs
  once per iteration (a decode step)."""
  comps = computations(hlo_text)
  todo = [n for text in comps.values() for n in re.findall(r'body=(%[\w.\-]+)', text)]
  todo += [n for text in comps.values() for n in re.findall(r'condition=(%[\w.\-]+)', text)]
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for group in _CALLEE.findall(comps[name]):
      todo.extend(n.strip() for n in group.split(','))
  return '\n'.join(comps[n] for n in sorted(seen))
