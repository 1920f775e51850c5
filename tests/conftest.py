import os

# Eight simulated CPU devices for the sharding tests; must precede the first jax import.
# Other tests use the first device only (train() defaults to a one-device mesh).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import pytest  # pylint: disable=g-import-not-at-top

from matquant_jax.data import pipeline

# One shared data cache for the suite (the dataset and tokenizer are built once).
DATA_DIR = os.environ.get('MATQUANT_TEST_DATA', os.path.expanduser('~/.cache/matquant_jax'))


@pytest.fixture(scope='session')
def data_dir():
  return DATA_DIR


@pytest.fixture(scope='session')
def token_data(data_dir):
  return pipeline.load_tokens('shakespeare_plays', data_dir, 512)
