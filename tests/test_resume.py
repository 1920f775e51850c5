"""The main job as a real process: SIGKILL and resume, and two processes (multi-host) vs one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow  # real processes of the main job
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMD = [sys.executable, 'experiments/main.py', '--config=tests/configs/resume.py']


def _final_params(workdir):
  """The last saved train state, restored onto one device whatever mesh or processes saved it."""
  path = os.path.join(workdir, 'checkpoints', 'float', str(max(_saved_steps(workdir))), 'default')
  ckpt = ocp.StandardCheckpointer()
  tree = ckpt.metadata(path).item_metadata
  tree = getattr(tree, 'tree', tree)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return ckpt.restore(path, jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree))


def _saved_steps(workdir):
  d = os.path.join(workdir, 'checkpoints', 'float')
  return [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """One uninterrupted single-process run. The test process simulates 8 devices (conftest), and
  so does the job: data-parallel over 8."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  done = subprocess.run(CMD + [f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def test_sigkill_mid_run_then_resume_gives_identical_parameters(straight, tmp_path):
  killed = str(tmp_path / 'killed')

  proc = subprocess.Popen(CMD + [f'--workdir={killed}'], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while max(_saved_steps(killed), default=0) < 12 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)  # a real, unannounced interrupt, possibly mid-save
  assert proc.wait() == -signal.SIGKILL, 'the job finished before it could be killed'
  saved = max(_saved_steps(killed))
  assert 12 <= saved < 120 and not os.path.exists(os.path.join(killed, 'results.json'))

  resumed = subprocess.run(CMD + [f'--workdir={killed}'], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'float: resumed at step' in resumed.stderr
  a, b = _final_params(straight), _final_params(killed)
  assert int(a['step']) == int(b['step']) == 120
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_two_processes_match_one(straight, tmp_path):
  """jax.distributed over 2 local processes x 4 CPU devices = the 8-device single-process run."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / 'two')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs = [subprocess.Popen(CMD + [f'--workdir={workdir}', '--distributed=on',
                                   f'--coordinator_address=localhost:{port}', '--num_processes=2',
                                   f'--process_id={i}'], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert 'process 1 of 2, 4 local / 8 global devices' in outs[1][1]
  a, b = _final_params(straight), _final_params(workdir)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, err_msg=jax.tree_util.keystr(path))
  one = json.load(open(os.path.join(straight, 'results.json')))['log_pplx']
  two = json.load(open(os.path.join(workdir, 'results.json')))['log_pplx']
  assert two['float']['float'] == pytest.approx(one['float']['float'], abs=1e-4)
