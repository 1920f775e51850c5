"""The base experiment config; every config file starts from it and is checked against it."""

from __future__ import annotations

import math

import ml_collections

from matquant_jax import nn
from matquant_jax.algos import gptq, omniquant, qat
from matquant_jax.core import losses, plans
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.data import pipeline
from matquant_jax.nn import sharding


def quant_spec(bits: int | None, quant: ml_collections.ConfigDict | None) -> QuantSpec | None:
  """The QuantSpec for `bits` (an int, a per-layer tuple, or None for float) from a config's
  quantizer subtree (parent_bits, extra_precision, group_size, targets, slice_grad, symmetric,
  slice_grid, outliers)."""
  if bits is None:
    return None
  q = quant or {}
  return QuantSpec(bits=bits, parent_bits=q.get('parent_bits', 8),
                   extra_precision=q.get('extra_precision', False),
                   group_size=q.get('group_size') or None, targets=tuple(q.get('targets', ('ffn',))),
                   slice_grad=q.get('slice_grad', 'clamp'), symmetric=q.get('symmetric', False),
                   slice_grid=q.get('slice_grid', 'msb'), outliers=q.get('outliers', 0.0))


RUN_FIELDS = {'name', 'label', 'objective', 'lambdas', 'parent_bits', 'extra_precision', 'algo', 'budget'}


ALGOS = ('qat', 'omniquant', 'gptq')


def optimizer(learning_rate: float, warmup_steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=warmup_steps,
                                        end_lr_fraction=0.1, grad_clip=1.0, weight_decay=0.0))


def run(name: str, label: str, objective: str, lambdas=None, parent_bits: int = 8,
        extra_precision: bool = False, algo: str = 'qat', budget: float = 1.0) -> dict:
  """One run of the study; all start from the same pretrained float model.

  algo: 'qat' (cfg.qat), 'omniquant' (cfg.omniquant) or 'gptq' (cfg.gptq); budget
  multiplies the QAT steps or the OmniQuant epochs (GPTQ is one-shot and ignores it).
  """
  return dict(name=name, label=label, objective=objective, lambdas=lambdas,
              parent_bits=parent_bits, extra_precision=extra_precision, algo=algo, budget=budget)


def baseline(bits: int, algo: str = 'qat') -> dict:
  """One precision: a `bits`-bit min-max quantizer (parent_bits = bits).

  The OmniQuant int2 baseline gets twice the budget, as in the paper.
  """
  budget = 2.0 if algo == 'omniquant' and bits == 2 else 1.0
  return run(f'baseline_int{bits}', 'Baseline', str(bits), (1.0,), parent_bits=bits,
             algo=algo, budget=budget)


def float_same_tokens() -> dict:
  """The float model trained like a QAT run (same tokens, steps, lr): the fair reference."""
  return run('float_qat', 'Float, same tokens', 'float', (1.0,))


def omniquant_table_runs() -> list[dict]:
  """The paper's Table 1 with OmniQuant: baselines 8/4/2/6/3, MatQuant, S.P. and E.P. MatQuant."""
  omni = dict(algo='omniquant')
  return [baseline(b, 'omniquant') for b in (8, 4, 2, 6, 3)] + [
      run('matquant', 'MatQuant', '8,4,2', (0.1, 0.1, 1.0), **omni),
      run('sp_matquant', 'S.P. MatQuant', '2', (1.0,), **omni),
      run('ep_matquant', 'E.P. MatQuant', '8,4,2', (1.0, 1.0, 1.0), extra_precision=True, **omni),
  ]


def gptq_table_runs(lambdas=(1.0, 1.0, 1.0)) -> list[dict]:
  """Per width the GPTQ baseline (8, 6, 4, 3, 2; the int8 one is also sliced) and MatQuant-GPTQ."""
  return [baseline(b, 'gptq') for b in (8, 6, 4, 3, 2)] + [
      run('matquant', 'MatQuant', '8,4,2', lambdas, algo='gptq')]


def run_spec(cfg: ml_collections.ConfigDict, r: dict, bits=None) -> QuantSpec:
  """The QuantSpec of run `r` at `bits` (default: its parent), from the config's quantizer."""
  return quant_spec(r['parent_bits'] if bits is None else bits,
                    dict(cfg.qat.quant, parent_bits=r['parent_bits'], extra_precision=r['extra_precision']))


def is_sliced(run: dict) -> bool:
  """A run evaluated at every eval width: not a one-precision baseline ('baseline_int<r>'), not float."""
  return not run['name'].startswith('baseline_') and run['objective'] != 'float'


def base_config() -> ml_collections.ConfigDict:
  """The default study: small Gemma-2 on Shakespeare, baselines 8/4/2 and MatQuant [8,4,2]."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(name='shakespeare_plays', data_dir=pipeline.default_data_dir(), vocab_size=2048,
                seq_len=128, batch_size=16, eval_batch_size=16, eval_batches=24)
  c.model = dict(num_layers=4, embed_dim=128, hidden_dim=512, num_heads=4, head_dim=32,
                 num_kv_heads=2, sliding_window_size=64, dtype='float32')
  # pretrain.checkpoint_dir: '' keeps the float model in WORKDIR/checkpoints/float; a path
  # shares one pretrained model between studies (experiments/seeds.py).
  c.pretrain = dict(steps=800, trainable='all', checkpoint_every=200, log_every=20,
                    optimizer=optimizer(3e-3, 50), checkpoint_dir='')
  # QAT batches are their own stream (seed, 1, data_seed), not a replay of pretraining's. lr 3e-5:
  # at 3e-4 the int8 baseline gains from the extra training itself and MatQuant's int8/int4 lag it
  # by ~0.035 nats (docs/results.md). quant.slice_grad: the slice's straight-through gradient
  # ('clamp' or 'identity'), for QAT and OmniQuant; quant.symmetric: zero point fixed at 2^(c-1)
  # (every base; exports to GGUF Q8_0/Q4_0 exactly), off for the paper's results; quant.group_size:
  # weights per scale along the contraction axes, 0 for one per output channel (the paper's);
  # quant.slice_grid: 'msb' (the paper's slice) or 'regrid' (QuantSpec.slice_grid); quant.outliers:
  # the fraction of each weight kept outside the grid in float16 (QuantSpec.outliers), 0 for the paper's.
  c.qat = dict(steps=250, trainable='ffn', checkpoint_every=250, log_every=10,
               optimizer=optimizer(3e-5, 25), data_seed=0,
               quant=dict(group_size=0, targets=('ffn',), slice_grad='clamp', symmetric=False,
                          slice_grid='msb', outliers=0.0))
  # OmniQuant calibration (the paper: 128 x 2048 C4 tokens, batch 4, 10M tokens seen, about 40
  # passes over the calibration set, so 40 epochs here). Learning rates per parameter group as in
  # OmniQuant's code; the rest of the fields: omniquant.Options.
  c.omniquant = dict(samples=128, seq_len=128, batch_size=4, epochs=40, lwc_lr=1e-2, let_lr=5e-3,
                     weight_decay=0.0, lwc=True, let=True, aug_loss=False, balance=False,
                     skip_tokens=0)
  # GPTQ (gptq.Options): calibration sequences as for OmniQuant; damping as a fraction of mean
  # diag H (the GPTQ default), lazy-batch block of 128 columns, act-order off by default;
  # balance, outliers and feedback: gptq.Options (off / 'mean', MatGPTQ's: the recorded results;
  # feedback='per_width' is better on SmolLM2, docs/results.md).
  c.gptq = dict(samples=128, seq_len=128, damp=0.01, block_size=128, act_order=False, batch_size=8,
                balance=False, outliers=0.0, feedback='mean')
  c.runs = [float_same_tokens(), baseline(8), baseline(4), baseline(2),
            run('matquant', 'MatQuant', '8,4,2', (0.1, 0.1, 1.0))]
  # Device mesh (data, fsdp, tensor; -1 = the rest) and logical-to-mesh rules. Not part of a
  # workdir's identity: a run saved on one mesh resumes on another.
  c.mesh = sharding.mesh_config()
  c.eval = dict(bits=(8, 6, 4, 3, 2), mixnmatch={'pyramid': (2, 8, 8, 2), 'pyramid_3bit': (2, 4, 4, 2)})
  # Locked: a misspelled field (in a config file or a --config.x flag) is an error naming it.
  # Mix'n'Match plans are free-form names.
  c.lock()
  c.eval.mixnmatch.unlock()
  return c


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field: one the base config does not know, a NaN or
  infinite number, a bad run, or a value any stage would refuse (model sizes, steps, learning
  rates, objectives, specs, eval bits, Mix'n'Match plans). Called before anything is written."""
  check_finite(cfg.to_dict())
  try:
    base_config().update(cfg)  # locked: an unknown key is a KeyError naming it
  except (KeyError, AttributeError) as e:
    raise ValueError(f'unknown config field: {e.args[0]}') from None
  names = set()
  for r in cfg.runs:
    unknown = set(r) - RUN_FIELDS
    if unknown:
      raise ValueError(f'unknown field(s) {sorted(unknown)} in run {r.get("name")!r}; known: {sorted(RUN_FIELDS)}')
    if r.get('algo', 'qat') not in ALGOS:
      raise ValueError(f'run {r["name"]!r}: algo must be one of {ALGOS}, got {r.get("algo")!r}')
    if not r.get('budget', 1.0) > 0:
      raise ValueError(f'run {r["name"]!r}: budget must be positive, got {r.get("budget")!r}')
    if r['name'] in names or r['name'] == 'float':
      raise ValueError(f'run name {r["name"]!r} is repeated or reserved')
    names.add(r['name'])

  check_values(cfg)


def check_finite(tree, prefix: str = '') -> None:
  """ValueError naming the first NaN or infinite number in a nested config."""
  items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'config field {name} is {value}; numbers must be finite')
    check_finite(value, f'{name}.')


def check_values(cfg: ml_collections.ConfigDict) -> None:
  """Builds every object the stages will build, so a bad value fails now, not after training."""
  try:
    mcfg = nn.TransformerConfig(num_embed=cfg.data.vocab_size, **cfg.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.model: {e}') from None
  for key in ('seq_len', 'batch_size', 'eval_batch_size', 'eval_batches', 'vocab_size'):
    value = cfg.data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'config field data.{key} must be a positive integer, got {value!r}')
  def named(section, build):
    try:
      return build()
    except (TypeError, ValueError) as e:
      raise ValueError(f'config.{section}: {e}') from None
  named('pretrain', lambda: qat.Options.from_config(cfg.pretrain))
  named('omniquant', lambda: omniquant.Options.from_config(cfg.omniquant))
  named('gptq', lambda: gptq.Options.from_config(cfg.gptq))
  q = cfg.qat.quant
  for r in cfg.runs:
    where = f'runs[{r["name"]!r}]'
    spec = named(where, lambda: run_spec(cfg, r))
    named(where, lambda: losses.parse_objective(r['objective'], r['lambdas'], r['parent_bits']))
    if r.get('algo', 'qat') == 'qat':
      named(f'qat ({where})', lambda: qat.Options.from_config(cfg.qat, spec, steps=round(cfg.qat.steps * r.get('budget', 1.0))))
    for b in cfg.eval.bits if is_sliced(r) else ():
      named(f'eval.bits ({where})', lambda: run_spec(cfg, r, b))
  for b in cfg.eval.bits:
    named('eval.bits', lambda: quant_spec(b, dict(q, parent_bits=b)))
  mixed = any(r['name'] == 'baseline_int8' or is_sliced(r) for r in cfg.runs)  # study.evaluate's plan rows
  for mix, layer_bits in cfg.eval.mixnmatch.items() if mixed else ():
    named(f'eval.mixnmatch.{mix}', lambda: plans.check(layer_bits, mcfg.num_layers, source=mix))
