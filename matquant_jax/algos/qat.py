"""QAT with the MatQuant objective (and float pretraining, objective 'float').

One jitted train step (state donated) computes every slice's loss from the
same parameters; the frozen part of the model is a separate, undonated input.
Train state = {'step', 'params' (trainable subset), 'opt_state'}, saved with
an orbax CheckpointManager so a run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Callable

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from matquant_jax import nn
from matquant_jax.algos import blockwise
from matquant_jax.core import losses
from matquant_jax.core.qeinsum import QuantSpec, width_spec
from matquant_jax.nn import sharding


Params = Any
TRAINABLE = {'ffn': r'(^|/)mlp/', 'ffn+attn': r'(^|/)(mlp|attn)/', 'all': r'.*'}


def split_params(params: Params, trainable: str) -> tuple[Params, Params]:
  """(trainable, frozen) nested dicts; `trainable` is a TRAINABLE key or a path regex."""
  pattern = re.compile(TRAINABLE.get(trainable, trainable))
  flat = traverse_util.flatten_dict(params, sep='/')
  train = {k: v for k, v in flat.items() if pattern.search(k)}
  if not train:
    raise ValueError(f'trainable={trainable!r} selects no parameter')
  frozen = {k: v for k, v in flat.items() if k not in train}
  return traverse_util.unflatten_dict(train, sep='/'), traverse_util.unflatten_dict(frozen, sep='/')


def merge_params(a: Params, b: Params) -> Params:
  """Union of two disjoint nested parameter dicts."""
  flat = {**traverse_util.flatten_dict(a, sep='/'), **traverse_util.flatten_dict(b, sep='/')}
  return traverse_util.unflatten_dict(flat, sep='/')


@dataclasses.dataclass(frozen=True)
class Options:
  """QAT (and float pretraining) settings; `Options.from_config` reads a config subtree.

  AdamW (b1 0.9, b2 0.95) with linear warm-up, cosine decay to
  `end_lr_fraction` of the peak, and global-norm clipping.
  trainable: 'ffn', 'ffn+attn', 'all' or a parameter-path regex.
  spec: the parent's QuantSpec (group size, targets, slice gradient); each
    width of the objective uses it with `bits` replaced. None: QuantSpec(8).
  checkpoint_every: steps between saves (0: only at the end) when a
    checkpoint directory is given.
  """
  steps: int
  learning_rate: float
  warmup_steps: int = 0
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  trainable: str = 'ffn'
  spec: QuantSpec | None = None
  checkpoint_every: int = 0
  log_every: int = 10

  def __post_init__(self):
    for key, low in (('steps', 1), ('warmup_steps', 0), ('checkpoint_every', 0), ('log_every', 1)):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f'train.{key} must be an integer >= {low}, got {value!r}')
    if not self.learning_rate > 0:
      raise ValueError(f'train.learning_rate must be positive, got {self.learning_rate!r}')

  @classmethod
  def from_config(cls, cfg, spec: QuantSpec | None = None, **overrides) -> 'Options':
    """From a config subtree (steps, trainable, checkpoint_every, log_every, optimizer)."""
    o = cfg.optimizer
    fields = dict(steps=cfg.steps, trainable=cfg.trainable, learning_rate=o.learning_rate,
                  warmup_steps=o.warmup_steps, end_lr_fraction=o.end_lr_fraction,
                  weight_decay=o.weight_decay, grad_clip=o.grad_clip, spec=spec,
                  checkpoint_every=cfg.get('checkpoint_every', 0), log_every=cfg.get('log_every', 10))
    return cls(**{**fields, **overrides})


def make_optimizer(opts: Options) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay and global-norm clipping."""
  warmup = min(opts.warmup_steps, opts.steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opts.learning_rate, warmup_steps=warmup,
      decay_steps=max(opts.steps, warmup + 1), end_value=opts.learning_rate * opts.end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(opts.grad_clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=opts.weight_decay))


def init_state(trainable: Params, tx: optax.GradientTransformation) -> dict:
  """A fresh train state; the trainable arrays are copied because the step donates its state."""
  trainable = jax.tree.map(jnp.copy, trainable)
  return {'step': jnp.zeros((), jnp.int32), 'params': trainable, 'opt_state': tx.init(trainable)}


def init_params(model: nn.Transformer, seq_len: int, seed: int, mesh, rules) -> Params:
  """Parameters created already sharded: eval_shape of init, then jit with out_shardings."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(seed), tokens)['params']
  out = sharding.model_shardings(model.config, abstract, mesh, rules)
  init = lambda key: model.init(key, tokens)['params']
  return jax.jit(init, out_shardings=out)(jax.random.PRNGKey(seed))


def make_train_step(model: nn.Transformer, objective: losses.Objective, spec: QuantSpec | None,
                    tx: optax.GradientTransformation, shardings: tuple | None = None) -> Callable:
  """jit(train_step)(state, frozen, batch) -> (state, metrics); batch: int [B, T+1].

  frozen: {'params': the untrained parameters, plus fixed collections such as 'quant'}.

  shardings: (state, frozen, batch) NamedSharding trees for explicit in/out shardings.
  """

  def train_step(state, frozen, batch):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    mask = nn.token_mask(model.config, targets)

    def loss_fn(trainable):
      variables = {**frozen, 'params': merge_params(trainable, frozen['params'])}
      def logits_fn(bits):
        return model.apply(variables, inputs, spec=width_spec(spec, bits)).logits
      return losses.matquant_loss(logits_fn, targets, mask, objective)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    metrics['grad_norm'] = optax.tree.norm(grads)
    new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state}
    return new_state, metrics

  if shardings is None:
    return jax.jit(train_step, donate_argnums=(0,))
  metrics_sharding = sharding.replicated(shardings[2].mesh)
  return jax.jit(train_step, in_shardings=shardings, out_shardings=(shardings[0], metrics_sharding),
                 donate_argnums=(0,))


@dataclasses.dataclass
class Prepared:
  """A sharded train state and the jitted step that advances it."""
  state: dict
  frozen: Params
  step_fn: Callable
  state_shardings: dict
  batch_sharding: Any


def prepare(model: nn.Transformer, init_params: Params, objective: losses.Objective,
            opts: Options, mesh=None, rules=sharding.DEFAULT_RULES) -> Prepared:
  """Splits, shards and initialises the train state over `mesh` (default: the first device)
  and jits the step with explicit in/out shardings. init_params: parameters, or variables
  whose collections other than 'params' (an OmniQuant 'quant') stay fixed."""
  if mesh is None:
    mesh = sharding.make_mesh(sharding.mesh_config(), jax.devices()[:1])
  variables = nn.as_variables(init_params)
  trainable, frozen_params = split_params(variables['params'], opts.trainable)
  frozen = {**variables, 'params': frozen_params}
  tx = make_optimizer(opts)
  t_sh = sharding.model_shardings(model.config, trainable, mesh, rules)
  f_sh = {c: sharding.model_shardings(model.config, tree, mesh, rules) for c, tree in frozen.items()}
  trainable, frozen = jax.device_put(trainable, t_sh), jax.device_put(frozen, f_sh)
  make_state = functools.partial(init_state, tx=tx)
  s_sh = sharding.state_shardings(jax.eval_shape(make_state, trainable), tx, t_sh, mesh)
  state = jax.jit(make_state, out_shardings=s_sh)(trainable)
  b_sh = sharding.batch_sharding(mesh, rules)
  step_fn = make_train_step(model, objective, opts.spec, tx, (s_sh, f_sh, b_sh))
  return Prepared(state, frozen, step_fn, s_sh, b_sh)


EXPLODED = 10.0  # a loss this many times the first step's (and above 1) is a blow-up


def check_loss(loss: float, first: float, step: int, desc: str) -> None:
  """FloatingPointError naming the step when the loss is not finite or has exploded."""
  if not np.isfinite(loss) or loss > EXPLODED * max(first, 1.0):
    raise FloatingPointError(f'{desc}: loss {loss} at step {step} (first step: {first}); the run '
                             'diverged: lower the learning rate (nothing past the last good save was kept)')


def run_settings(objective: losses.Objective, opts: Options, settings: dict | None) -> dict:
  """What decides a run's checkpoints: the objective, the optimizer and spec, and `settings`.
  Not the step count (a run may be extended), nor how often it logs or saves."""
  o = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ('steps', 'checkpoint_every', 'log_every')}
  return {'objective': dataclasses.asdict(objective), 'options': o, **(settings or {})}


def train(model: nn.Transformer, init_params: Params, objective: losses.Objective,
          batch_fn: Callable[[int], np.ndarray], opts: Options,
          ckpt_dir: str | None = None, writer=None, desc: str = 'train',
          mesh=None, rules=sharding.DEFAULT_RULES, settings: dict | None = None) -> tuple[Params, dict]:
  """Trains from init_params for opts.steps steps; resumes from ckpt_dir if it holds a checkpoint.

  objective: `losses.parse_objective(...)`, e.g. '8,4,2' with lambdas. batch_fn(step)
  gives this process's rows of the global batch, int [B, T+1]. The state is sharded over `mesh` (default: the first device)
  by `rules`; a checkpoint saved on another mesh restores onto this one.
  init_params may be variables {'params', 'quant'} (`warm_start.float_variables`): the
  'quant' collection stays fixed and comes back with the parameters.
  settings: what else decides the run (data, seed, the initial model); with the objective and
  opts they are recorded in ckpt_dir, and a checkpoint made with other settings is refused, as
  is one past opts.steps. A loss that is not finite or explodes stops the run (FloatingPointError).
  Returns the full parameters (variables, when given variables) and the last metrics.
  """
  p = prepare(model, init_params, objective, opts, mesh, rules)
  state, frozen, step_fn, b_sh = p.state, p.frozen, p.step_fn, p.batch_sharding
  mngr = blockwise.checkpoint_manager(ckpt_dir) if ckpt_dir else None
  if mngr is not None:
    blockwise.check_settings(ckpt_dir, run_settings(objective, opts, settings),
                             has_checkpoint=mngr.latest_step() is not None)
  if mngr is not None and mngr.latest_step() is not None:
    if mngr.latest_step() > opts.steps:
      raise ValueError(f'{desc}: {ckpt_dir} holds step {mngr.latest_step()}, past this run\'s '
                       f'{opts.steps} steps; use another checkpoint directory')
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            state, p.state_shardings)
    state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
    logging.info('%s: resumed at step %d from %s', desc, int(state['step']), ckpt_dir)
  start = int(state['step'])
  metrics, first_loss = {}, None
  bar = tqdm.tqdm(range(start, opts.steps), desc=desc, initial=start, total=opts.steps,
                  mininterval=2.0, dynamic_ncols=True, disable=jax.process_index() != 0)
  t0 = time.perf_counter()
  for step in bar:
    state, m = step_fn(state, frozen, sharding.global_batch(batch_fn(step), b_sh))
    done = step + 1
    preempted = mngr is not None and mngr.reached_preemption(done)
    save = mngr is not None and (
        (opts.checkpoint_every and done % opts.checkpoint_every == 0) or done == opts.steps or preempted)
    if done % opts.log_every == 0 or done == opts.steps or save or step == start:
      metrics = {k: float(v) for k, v in m.items()}
      first_loss = metrics['loss'] if step == start else first_loss
      try:
        check_loss(metrics['loss'], first_loss, done, desc)  # before a save: never checkpoint a blow-up
      except FloatingPointError:
        if mngr is not None:
          mngr.wait_until_finished()
        raise
      bar.set_postfix(loss=f'{metrics["loss"]:.3f}')
      if writer is not None:
        for k, v in metrics.items():
          writer.add_scalar(f'{desc}/{k}', v, done)
    if save:
      mngr.save(done, args=ocp.args.StandardSave(state))  # asynchronous; atomic on disk
    if preempted:
      mngr.wait_until_finished()
      raise SystemExit(f'{desc}: preempted; saved step {done}, rerun the same command to resume')
  if mngr is not None:
    mngr.wait_until_finished()
    mngr.close()
  if opts.steps > start:
    logging.info('%s: %d steps in %.1fs', desc, opts.steps - start, time.perf_counter() - t0)
  params = merge_params(state['params'], frozen['params'])
  return ({**frozen, 'params': params} if 'params' in init_params else params), metrics
