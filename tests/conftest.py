"""Shared fixtures: eight simulated devices, a temporary data dir, real models loaded once per worker."""

import os
import shutil
import tempfile

# Eight simulated CPU devices for the sharding tests; must precede the first jax import.
# Other tests use the first device only (train() defaults to a one-device mesh).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import pytest  # pylint: disable=g-import-not-at-top

DATA_DIR_ENV = 'MATQUANT_DATA_DIR'  # = pipeline.DATA_DIR_ENV (read before anything imports jax)
_made_data_dir = None


def pytest_configure(config):
  """One data dir for the whole run, made before xdist starts its workers (they inherit it).
  Tests never touch the user's ~/.cache/matquant_jax; MATQUANT_DATA_DIR=<dir> reuses a dir."""
  global _made_data_dir
  if not os.environ.get(DATA_DIR_ENV):
    _made_data_dir = tempfile.mkdtemp(prefix='matquant_test_data_')
    os.environ[DATA_DIR_ENV] = _made_data_dir


def pytest_unconfigure(config):
  if _made_data_dir:
    shutil.rmtree(_made_data_dir, ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir():
  return os.environ[DATA_DIR_ENV]


@pytest.fixture(scope='session')
def token_data(data_dir):
  from matquant_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.load_tokens('shakespeare_plays', data_dir, 512)


@pytest.fixture(scope='session')
def smollm2():
  """(model, variables, tokenizer) of SmolLM2-135M, loaded once per test process."""
  from matquant_jax import ckpts  # pylint: disable=g-import-not-at-top
  return ckpts.load('smollm2-135m')
