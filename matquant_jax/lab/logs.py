"""Console logging for the command-line scripts (call from their main(), never on import)."""

import logging as std_logging

from absl import logging


class _QuietLibraries(std_logging.Filter):
  """Keeps per-save orbax and per-shard TFDS chatter out of the progress log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        lib in record.pathname for lib in ('orbax', 'tensorflow_datasets', 'xla_bridge'))


def setup() -> None:
  """INFO from this project, warnings and errors only from orbax, TFDS and the XLA bridge;
  no TFDS progress bars (the project's own bars show rates and ETA)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
