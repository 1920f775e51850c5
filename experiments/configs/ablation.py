"""MatQuant-only ablations on the default model (no baselines), picked by a config argument.

  --config=experiments/configs/ablation.py:qat        QAT MatQuant [8,4,2], lambda (0.1, 0.1, 1)
  --config=experiments/configs/ablation.py:omniquant  OmniQuant MatQuant [8,4,2], lambda (0.1, 0.1, 1)
  --config=experiments/configs/ablation.py:omniquant_lambda  OmniQuant, lambda8 = lambda4 in {1, 0.3, 0.1}

Combine with --config.qat.quant.slice_grad=identity, --config.omniquant.balance=True,
--config.omniquant.aug_loss=True, ..., and --config.pretrain.checkpoint_dir=<a pretrained
float model> to reuse a study's pretraining; compare with that study's baselines.
"""

from matquant_jax.lab import configs


def get_config(runs: str = 'qat'):
  c = configs.base_config()
  omni = dict(algo='omniquant')
  choices = {
      'qat': [configs.run('matquant', 'MatQuant', '8,4,2', (0.1, 0.1, 1.0))],
      'omniquant': [configs.run('matquant', 'MatQuant', '8,4,2', (0.1, 0.1, 1.0), **omni)],
      'omniquant_lambda': [
          configs.run(f'matquant_l{lam:g}', f'MatQuant lambda ({lam:g}, {lam:g}, 1)', '8,4,2',
                      (lam, lam, 1.0), **omni) for lam in (1.0, 0.3, 0.1)],
  }
  if runs not in choices:
    raise ValueError(f'unknown ablation {runs!r}; choose from {sorted(choices)}')
  c.runs = choices[runs]
  c.eval.mixnmatch = {}
  return c
