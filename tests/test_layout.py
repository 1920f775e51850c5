"""The house's import rules, read from the code: each subpackage imports only the rooms below it."""

import ast
import pathlib

import matquant_jax

ROOT = pathlib.Path(matquant_jax.__file__).parent
# What each subpackage may import of ours. core imports nothing; nn only core; algorithms never
# import each other (only the shared `algos.blockwise`); evaluation never imports algorithms;
# lab (studies, configs, results) is the only room that may import them all.
ALLOWED = {
    'core': set(),
    'nn': {'core'},
    'text': {'core', 'nn'},
    'data': {'core', 'nn'},
    'parents': {'core', 'nn', 'text'},
    'ckpts': {'core', 'nn', 'text', 'parents'},
    'evals': {'core', 'nn', 'text', 'data'},
    'algos': {'core', 'nn', 'parents'},
    'lab': {'core', 'nn', 'text', 'data', 'parents', 'ckpts', 'algos', 'evals'},
    'testing': {'core', 'nn', 'text', 'ckpts'},
}
ALGO_SHARED = {'blockwise'}


def ours(path: pathlib.Path):
  """(subpackage, module) of every `matquant_jax...` import in a file, at any depth."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('matquant_jax'):
      parts = node.module.split('.')[1:]
      if not parts:  # from matquant_jax import nn, parents
        for alias in node.names:
          yield alias.name, None
      else:
        mods = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        for m in mods:
          yield parts[0], m
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('matquant_jax.'):
          parts = alias.name.split('.')[1:]
          yield parts[0], parts[1] if len(parts) > 1 else None


def test_every_module_lives_in_a_room():
  loose = sorted(p.name for p in ROOT.glob('*.py') if p.name != '__init__.py')
  assert not loose, f'modules outside the subpackages: {loose}'
  rooms = sorted(p.name for p in ROOT.iterdir() if (p / '__init__.py').exists())
  assert rooms == sorted(ALLOWED), rooms
  assert set(matquant_jax.SUBPACKAGES) == set(ALLOWED)


def test_imports_follow_the_rules():
  bad = []
  for pkg, allowed in ALLOWED.items():
    for path in sorted((ROOT / pkg).glob('*.py')):
      for dep, module in ours(path):
        where = f'{pkg}/{path.name} imports {dep}' + (f'.{module}' if module else '')
        if dep == pkg:
          if (pkg == 'algos' and path.stem not in ALGO_SHARED | {'__init__'} and module is not None
              and module not in ALGO_SHARED and module != path.stem):
            bad.append(where + ' (an algorithm imports only algos.blockwise)')
          continue
        if dep not in allowed:
          bad.append(where)
  assert not bad, 'import rules broken:\n' + '\n'.join(bad)


def test_the_rule_reader_sees_imports():
  """The reader itself: every form of import in the tree is found (so the rules can fail)."""
  found = set(ours(ROOT / 'lab' / 'study.py'))
  assert ('algos', 'qat') in found and ('nn', None) in found
  found = set(ours(ROOT / 'algos' / 'gptq.py'))
  assert ('algos', 'blockwise') in found and ('parents', None) in found
