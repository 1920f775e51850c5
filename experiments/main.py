r"""Runs a MatQuant study from an ml_collections config file.

  python experiments/main.py --config=experiments/configs/default.py --workdir=runs/default

Re-running the same command with the same --workdir resumes: finished runs are
restored from their orbax checkpoints, unfinished ones continue.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from matquant_jax import study

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/default.py',
                                          'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and results go.', required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  study.run_study(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
