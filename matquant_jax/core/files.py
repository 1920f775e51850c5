"""Small files read and written safely: JSON errors name the file; writes are whole or absent."""

from __future__ import annotations

import json
import os

_REQUIRED = object()


def read_json(path: str, default=_REQUIRED):
  """The JSON value at `path`; `default` when the file does not exist (if given, else
  FileNotFoundError). A file that is not valid JSON is a ValueError naming it."""
  if not os.path.exists(path):
    if default is _REQUIRED:
      raise FileNotFoundError(f'{path} does not exist')
    return default
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e}); repair or remove it') from None


def write_text(path: str, text: str) -> None:
  """`text` to `path` through a temporary sibling, fsync and a rename: never half a file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, obj, **dump_kw) -> None:
  write_text(path, json.dumps(obj, indent=1, **dump_kw))
