"""The main job end to end on the quick config, and config validation."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from matquant_jax import evals, nn, parents, testing
from matquant_jax.core import QuantSpec
from matquant_jax.data import pipeline
from matquant_jax.lab import configs, report, study
from matquant_jax.text import sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir):
  return subprocess.run(
      [sys.executable, 'experiments/main.py', '--config=experiments/configs/quick.py',
       f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_main_job_end_to_end_and_resume(tmp_path):
  proc = _run(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.load(open(tmp_path / 'results.json'))
  ll = out['log_pplx']
  assert set(ll) == {'float', 'float_qat', 'baseline_int8', 'baseline_int4', 'baseline_int2', 'matquant'}
  assert set(ll['float_qat']) == {'float'}  # the float model trained on the QAT tokens
  assert set(ll['matquant']) == {'int8', 'int6', 'int4', 'int3', 'int2', 'mix:pyramid'}
  assert 0 < ll['float']['float'] < math.log(512) - 0.5  # it learned more than a uniform guess
  rows = {(r.data_type, r.run): r for r in report.read_rows(str(tmp_path / 'results.json'))}
  assert rows["Mix'n'Match pyramid", 'matquant'].bits_per_weight == pytest.approx(5.0)  # (2+8+8+2)/4
  assert rows['float32', 'float'] == report.Row('float32', 'Pretrained (no quantization)', ll['float']['float'],
                                                32.0, run='float', base='float')
  assert rows['int2', 'matquant'] == report.Row('int2', 'MatQuant', ll['matquant']['int2'], 2.0,
                                                run='matquant', base='qat')
  assert rows['int2', 'float'].base == 'ptq' and rows['int4', 'baseline_int8'].method == 'Sliced int8'
  table = open(tmp_path / 'table.md').read()
  assert '| int2 | Sliced int8 |' in table and '| int2 | MatQuant |' in table
  assert os.path.getsize(tmp_path / 'plot.png') > 10_000
  assert os.listdir(tmp_path / 'tensorboard')
  # each run's stored parent reloads as a model that evaluates and samples as the study measured
  check_stored_parent(tmp_path / 'parents' / 'matquant', ll['matquant'])
  # the same command again restores every finished run instead of training it
  again = _run(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count('resumed at step') == 6
  assert json.load(open(tmp_path / 'results.json'))['log_pplx'] == ll


def test_unknown_config_fields_are_rejected():
  c = configs.base_config()
  with pytest.raises(AttributeError, match='"learnig_rate" does not exist'):
    c.qat.learnig_rate = 1.0
  loose = ml_collections.ConfigDict(c.to_dict())  # e.g. rebuilt from a workdir's config.json
  loose.qat.learnig_rate = 1.0
  with pytest.raises(ValueError, match='unknown config field: .*"learnig_rate"'):
    configs.check_config(loose)
  c = configs.base_config()
  c.runs = c.runs + [dict(configs.baseline(3), lamdas=(1.0,))]
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['lamdas'\]"):
    configs.check_config(c)
  c = configs.base_config()
  c.runs = c.runs + [configs.baseline(4)]
  with pytest.raises(ValueError, match='repeated'):
    configs.check_config(c)


def test_all_config_files_are_valid():
  import importlib.util
  for name in ('default', 'quick', 'long', 'lambda_ablation', 'omniquant', 'omniquant_paper_lr', 'gptq', 'gptq_lambda',
               'ablation:qat', 'ablation:omniquant', 'ablation:omniquant_lambda'):
    name, _, arg = name.partition(':')
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'experiments', 'configs', name + '.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    configs.check_config(mod.get_config(arg) if arg else mod.get_config())


def test_workdir_config_mismatch_is_named(tmp_path):
  c = configs.base_config()
  study.check_workdir(str(tmp_path), c)
  c.runs = c.runs + [configs.baseline(3)]
  study.check_workdir(str(tmp_path), c)  # adding a run is fine
  c.model.embed_dim = 256
  with pytest.raises(ValueError, match=r'made with model.embed_dim=128, but the config says 256'):
    study.check_workdir(str(tmp_path), c)
  c = configs.base_config()
  c.runs[4]['lambdas'] = (0.5, 0.5, 1.0)
  with pytest.raises(ValueError, match=r"runs.matquant.lambdas=\[0.1, 0.1, 1.0\], but the config says \[0.5, 0.5, 1.0\]"):
    study.check_workdir(str(tmp_path), c)


def test_bits_per_weight_counts_the_extra_bucket():
  import numpy as np
  cfg = nn.TransformerConfig.tiny()
  p = testing.init_params(nn.Transformer(cfg))
  # numpy reference: codes of an 8-bit min-max parent per output channel; int2 extra bucket is q >= 224
  extra, total = 0, 0
  for i in range(cfg.num_layers):
    for w, ax in ((p[f'layer_{i}']['mlp']['gating_einsum'], 1), (p[f'layer_{i}']['mlp']['linear'], 0)):
      w = np.asarray(w)
      mn, mx = w.min(ax, keepdims=True), w.max(ax, keepdims=True)
      alpha = (mx - mn) / np.float32(255)
      q = np.clip(np.round(w / alpha + np.round(-mn / alpha)), 0, 255)
      extra, total = extra + np.sum(q >= 224), total + w.size
  got = nn.bits_per_weight(p, QuantSpec(2, extra_precision=True), cfg)
  assert got == pytest.approx(2 + extra / total, abs=1e-6)
  assert nn.bits_per_weight(p, QuantSpec((2, None)), cfg) == pytest.approx(17.0)
  assert nn.bits_per_weight(p, None, cfg, float_bits=16) == 16.0


def test_gap_closure_and_seed_aggregation_by_hand():
  def table(b2, m2, ref):  # labels are display text only: the logic reads `run`
    return [report.Row('float32', 'a float label', ref, 32.0, run='float_qat', base='float'),
            report.Row('int8', 'an int8 label', ref + 0.1, 8.0, run='baseline_int8'),
            report.Row('int2', 'an int2 label', b2, 2.0, run='baseline_int2'),
            report.Row('int2', 'MatQuant', m2, 2.0, run='matquant')]
  # (5.0 - 4.6) / (5.0 - 4.0) = 0.4 against the float row; (5.0 - 4.6) / (5.0 - 4.1) = 0.444 against int8
  got = report.gap_closure(table(5.0, 4.6, 4.0))
  assert got == pytest.approx({'float_same_tokens': 0.4, 'int8_baseline': 0.4 / 0.9})
  rows = {(r.data_type, r.run): r for r in report.aggregate([table(5.0, 4.6, 4.0), table(5.2, 4.6, 4.0)])}
  assert rows[('int2', 'baseline_int2')].log_pplx == pytest.approx(5.1)
  assert rows[('int2', 'baseline_int2')].std == pytest.approx(0.1 * 2 ** 0.5)  # sample std of 5.0, 5.2
  assert rows[('int2', 'matquant')].std == 0.0 and rows[('int2', 'matquant')].n == 2


def test_results_files_are_replaced_whole(tmp_path):
  path = str(tmp_path / 'results.json')
  assert report.read_json(path, {'rows': []}) == {'rows': []}
  report.write_json(path, {'rows': [1]})
  report.write_json(path, {'rows': [1, 2]})
  assert report.read_json(path, None) == {'rows': [1, 2]}
  assert os.listdir(tmp_path) == ['results.json']  # no temporary file left behind
  rows = [report.Row('float32', 'Pretrained float', 4.0, 32.0, run='float', base='float'),
          report.Row('int2', 'Baseline', 5.0, 2.0, run='baseline_int2', tasks={'next_line': 0.5})]
  report.write(str(tmp_path), rows, 'title', 'a note', settings={'steps': 1})
  assert sorted(os.listdir(tmp_path)) == ['plot.png', 'results.json', 'table.md']
  assert report.read_rows(str(tmp_path / 'results.json')) == rows
  assert report.read_json(str(tmp_path / 'results.json'), None)['settings'] == {'steps': 1}
  assert open(tmp_path / 'table.md').read() == (
      'title\n\n| data type | method | bits / weight | log pplx | next_line |\n|---|---|---|---|---|\n'
      '| float32 | Pretrained float | 32.000 | 4.000 | - |\n| int2 | Baseline | 2.000 | 5.000 | 50.0 |\n\na note')
  with pytest.raises(ValueError, match="unknown row fields \\['ffn_bits'\\]"):
    report.Row.from_dict({'data_type': 'int2', 'method': 'm', 'log_pplx': 1.0, 'ffn_bits': 2.0})


def check_stored_parent(directory, measured):
  import runpy
  cfg = runpy.run_path(os.path.join(ROOT, 'experiments/configs/quick.py'))['get_config']()
  model, variables, tokenizer = parents.load(str(directory))
  assert parents.read_manifest(str(directory))['run']['name'] == 'matquant'
  data = pipeline.load_tokens(cfg.data.name, cfg.data.data_dir, cfg.data.vocab_size)
  val = pipeline.eval_batches(data.validation, cfg.data.eval_batch_size, cfg.data.seq_len,
                              cfg.data.eval_batches)
  got = evals.make_eval_fn(model)(variables, val, QuantSpec(2))
  assert got == pytest.approx(measured['int2'], abs=1e-4)
  out = sampler.Sampler(model, variables, tokenizer, cache_size=64).sample(['To be, or not'], 4, bits=2)
  assert len(out[0].tokens) <= 4 and isinstance(out[0].text, str)


def test_resumed_results_must_be_of_the_same_setup(tmp_path):
  workdir = str(tmp_path / 'run')
  results, save = report.open_results(workdir, model='smollm2-135m', settings={'steps': 64})
  results['rows'].append({'log_pplx': 3.7})
  save()
  again, _ = report.open_results(workdir, model='smollm2-135m', settings={'steps': 64})
  assert again == {'rows': [{'log_pplx': 3.7}], 'model': 'smollm2-135m', 'settings': {'steps': 64}}
  with pytest.raises(ValueError, match=r"settings=\{'steps': 64\}, not \{'steps': 128\}"):
    report.open_results(workdir, model='smollm2-135m', settings={'steps': 128})


def test_stored_results_files_hold_rows_of_the_one_schema():
  """Every results file under docs/results (the default study's oldest one aside, which has no
  rows) reads as report.Row, so `experiments/replot.py` remakes its table and plot."""
  import glob
  paths = [p for p in glob.glob(os.path.join(ROOT, 'docs', 'results', '*.json'))
           if not p.endswith('default_results.json')]
  assert len(paths) >= 12
  for path in paths:
    rows = report.read_rows(path)
    assert rows and all(r.run and r.base in ('float', 'ptq', 'qat', 'omniquant', 'gptq') for r in rows), path


def test_group_size_is_settable_from_the_command_line(tmp_path):
  """Its default is 0 (one scale per channel), an int, so absl's config flags can override it; the
  value reaches the config and is validated before anything is written."""
  workdir = tmp_path / 'w'
  done = subprocess.run([sys.executable, 'experiments/main.py', '--config=experiments/configs/quick.py',
                         '--config.qat.quant.group_size=-4', f'--workdir={workdir}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and 'group_size must be a positive integer or None' in done.stderr, done.stderr[-2000:]
  assert not workdir.exists()
  c = configs.base_config()
  assert study.run_spec(c, c.runs[-1]).group_size is None
  c.qat.quant.group_size = 32
  assert study.run_spec(c, c.runs[-1]).group_size == 32
