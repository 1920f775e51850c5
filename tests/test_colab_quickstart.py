"""The quickstart notebook runs top to bottom at its smallest size (one file per notebook, so the
suite's workers run the two notebooks side by side)."""

import os

import pytest

from notebooks import outputs, run_notebook, text  # tests/ is on sys.path (rootdir conftest)


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
  nb = run_notebook('quickstart.ipynb', tmp_path, monkeypatch)
  out = text(nb)
  assert '| MatQuant parent |' in out and out.count('--- bits=') == 4, out[-2000:]
  assert any('image/png' in o.data for o in outputs(nb, 'display_data')), 'no inline plot'
  assert os.path.exists(tmp_path / 'smollm2_matquant_parent' / 'manifest.json')
