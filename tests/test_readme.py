"""The README's examples as written: every Python block parses, uses no undefined name, and every
`mq.` name it uses exists; every command names a script, config and flags that exist."""

import ast
import builtins
import os
import re

import matquant_jax as mq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()


def blocks(lang):
  return re.findall(rf'```{lang}\n(.*?)```', README, re.S)


def undefined_names(tree: ast.AST) -> set[str]:
  """Names loaded but never bound anywhere in the block (a flat, order-blind check)."""
  bound = set(dir(builtins))
  for node in ast.walk(tree):
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
      bound.add(node.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      bound |= {(a.asname or a.name).split('.')[0] for a in node.names}
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      bound.add(node.name)
  loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
  return loaded - bound


def mq_chains(tree: ast.AST):
  """Every dotted name under `mq`, e.g. ('nn', 'TransformerConfig', 'tiny')."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      parts, n = [], node
      while isinstance(n, ast.Attribute):
        parts.append(n.attr)
        n = n.value
      if isinstance(n, ast.Name) and n.id == 'mq':
        yield tuple(reversed(parts))


def test_python_examples_use_only_defined_and_public_names():
  found = blocks('python')
  assert len(found) >= 2
  for code in found:
    tree = ast.parse(code)
    assert not undefined_names(tree), undefined_names(tree)
    for chain in set(mq_chains(tree)):
      obj = mq
      for i, attr in enumerate(chain):
        if i and not hasattr(obj, attr) and isinstance(obj, type):
          break  # an attribute of an instance the example makes (e.g. .logits); checked at run time
        assert hasattr(obj, attr), f"mq.{'.'.join(chain[:i + 1])} does not exist"
        obj = getattr(obj, attr)


def test_commands_name_existing_scripts_configs_and_flags():
  commands = [l for b in blocks('sh') for l in b.splitlines() if 'experiments/' in l]
  assert len(commands) >= 10
  for line in commands:
    line = line.split('  #')[0]
    script = re.search(r'(experiments/\w+\.py)', line).group(1)
    source = open(os.path.join(ROOT, script)).read()
    flags = set(re.findall(r"DEFINE_\w+\('(\w+)'", source)) | {'config', 'workdir'}
    for flag in re.findall(r'--(\w+)', line):
      base = flag.removeprefix('no')
      assert flag in flags or base in flags, f'{script} has no flag --{flag}'
    for config in re.findall(r'--config=(\S+\.py)', line):
      assert os.path.exists(os.path.join(ROOT, config)), config
    for path in re.findall(r'(docs/results/\S+\.json)', line):
      assert os.path.exists(os.path.join(ROOT, path)), path
