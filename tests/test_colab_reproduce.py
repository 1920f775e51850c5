"""The reproduce notebook runs top to bottom at its smallest size (one file per notebook, so the
suite's workers run the two notebooks side by side)."""

import os

import pytest

from notebooks import outputs, run_notebook  # tests/ is on sys.path (rootdir conftest)


@pytest.mark.slow
def test_reproduce_runs(tmp_path, monkeypatch):
  nb = run_notebook('reproduce.ipynb', tmp_path, monkeypatch)
  shown = outputs(nb, 'display_data')
  assert sum('image/png' in o.data for o in shown) == 2 and sum('text/markdown' in o.data for o in shown) == 2
  for study in ('qat_quick', 'omniquant_quick'):
    assert os.path.exists(tmp_path / study / 'results.json')
