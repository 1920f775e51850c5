r"""Runs a MatQuant study from an ml_collections config file.

  python experiments/main.py --config=experiments/configs/default.py --workdir=runs/default

Re-running the same command with the same --workdir resumes: finished runs are
restored from their orbax checkpoints, unfinished ones continue. On several
hosts (TPU pod slice, multi-host GPU) every host runs the same command; see
launch/ and the README.
"""

import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from matquant_jax.lab import logs, study

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/default.py',
                                          'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and results go (on several '
                               'hosts: a path every host sees).', required=True)
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Call jax.distributed.initialize() (on several hosts). auto: when a multi-host environment '
    'is detected (Cloud TPU pod worker list, SLURM, or JAX_COORDINATOR_ADDRESS).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 '
                                   '(multi-host GPU without SLURM); None: auto-detect.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes; None: auto-detect.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process; None: auto-detect.')


def _init_distributed() -> None:
  """jax.distributed.initialize() when asked, or (auto) when a multi-host environment is seen."""
  want = _DISTRIBUTED.value
  if want == 'auto':
    hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
    want = 'on' if (_COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
                    or ',' in hosts or int(os.environ.get('SLURM_NTASKS', '1')) > 1) else 'off'
  if want == 'on':
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value or os.environ.get(
        'JAX_COORDINATOR_ADDRESS'), num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  del argv
  logs.setup()
  _init_distributed()
  study.run_study(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
