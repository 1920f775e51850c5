"""The Colab notebooks run top to bottom with the project's environment (smallest size)."""

import os

import nbformat
from nbclient import NotebookClient
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name, workdir, monkeypatch):
  monkeypatch.setenv('MATQUANT_NOTEBOOK_SIZE', 'quick')
  monkeypatch.setenv('MATQUANT_NOTEBOOK_WORKDIR', str(workdir))
  path = os.path.join(ROOT, 'colabs', name)
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), f'{name}: outputs not stripped'
  # A cell error raises CellExecutionError naming the cell.
  NotebookClient(nb, timeout=900, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  return nb


def outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == kind]


def text(nb):
  return ''.join(o.get('text', '') for o in outputs(nb, 'stream'))


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
  nb = run_notebook('quickstart.ipynb', tmp_path, monkeypatch)
  out = text(nb)
  assert '| MatQuant parent |' in out and out.count('--- bits=') == 4, out[-2000:]
  assert any('image/png' in o.data for o in outputs(nb, 'display_data')), 'no inline plot'
  assert os.path.exists(tmp_path / 'smollm2_matquant_parent' / 'manifest.json')


@pytest.mark.slow
def test_reproduce_runs(tmp_path, monkeypatch):
  nb = run_notebook('reproduce.ipynb', tmp_path, monkeypatch)
  shown = outputs(nb, 'display_data')
  assert sum('image/png' in o.data for o in shown) == 2 and sum('text/markdown' in o.data for o in shown) == 2
  for study in ('qat_quick', 'omniquant_quick'):
    assert os.path.exists(tmp_path / study / 'results.json')
