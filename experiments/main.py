r"""Runs a MatQuant study from an ml_collections config file.

  python experiments/main.py --config=experiments/configs/default.py --workdir=runs/default

Re-running the same command with the same --workdir resumes: finished runs are
restored from their orbax checkpoints, unfinished ones continue.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from matquant_jax import study

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/default.py',
                                          'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and results go.', required=True)


class _QuietLibraries(std_logging.Filter):
  """Keeps per-save orbax and per-shard TFDS chatter out of the progress log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        lib in record.pathname for lib in ('orbax', 'tensorflow_datasets', 'xla_bridge'))


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  study.run_study(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
