"""Running a Colab notebook top to bottom with the project's environment (smallest size)."""

import os

import nbformat
from nbclient import NotebookClient

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
