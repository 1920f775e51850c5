"""QAT training with the MatQuant objective, and log-perplexity evaluation.

One jitted train step (state donated) computes every slice's loss from the
same parameters; the frozen part of the model is a separate, undonated input.
Train state = {'step', 'params' (trainable subset), 'opt_state'}, saved with
an orbax CheckpointManager so a run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from typing import Any, Callable, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
import tqdm

from matquant_jax import losses, sharding
from matquant_jax.models import gemma
from matquant_jax.qeinsum import QuantSpec

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


def quant_spec(bits: int | None, quant: ml_collections.ConfigDict | None) -> QuantSpec | None:
  """The QuantSpec for `bits` (an int, a per-layer tuple, or None for float) from a config's
  quantizer subtree (parent_bits, extra_precision, group_size, targets, slice_grad)."""
  if bits is None:
    return None
  q = quant or {}
  return QuantSpec(bits=bits, parent_bits=q.get('parent_bits', 8),
                   extra_precision=q.get('extra_precision', False),
                   group_size=q.get('group_size', None), targets=tuple(q.get('targets', ('ffn',))),
                   slice_grad=q.get('slice_grad', 'clamp'))


def width_spec(spec: QuantSpec | None, bits) -> QuantSpec | None:
  """`spec` at `bits` (None: float); no spec means the default QuantSpec."""
  if bits is None:
    return None
  return dataclasses.replace(spec, bits=bits) if spec is not None else QuantSpec(bits)


def init_state(trainable: Params, tx: optax.GradientTransformation) -> dict:
  """A fresh train state; the trainable arrays are copied because the step donates its state."""
  trainable = jax.tree.map(jnp.copy, trainable)
  return {'step': jnp.zeros((), jnp.int32), 'params': trainable, 'opt_state': tx.init(trainable)}


def model_shardings(config: gemma.TransformerConfig, tree: Params, mesh, rules) -> Params:
  """NamedShardings of a params, 'quant' or parent tree of this model under the mesh rules."""
  reduce = {p: i.reduce_axes for p, i in gemma.quantizable_weights(config).items()}
  return sharding.tree_shardings(tree, mesh, rules, gemma.logical_axes(config), reduce)


def init_params(model: gemma.Transformer, seq_len: int, seed: int, mesh, rules) -> Params:
  """Parameters created already sharded: eval_shape of init, then jit with out_shardings."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(seed), tokens)['params']
  out = model_shardings(model.config, abstract, mesh, rules)
  init = lambda key: model.init(key, tokens)['params']
  return jax.jit(init, out_shardings=out)(jax.random.PRNGKey(seed))


def make_train_step(model: gemma.Transformer, objective: losses.Objective, spec: QuantSpec | None,
                    tx: optax.GradientTransformation, shardings: tuple | None = None) -> Callable:
  """jit(train_step)(state, frozen, batch) -> (state, metrics); batch: int [B, T+1].

  frozen: {'params': the untrained parameters, plus fixed collections such as 'quant'}.

  shardings: (state, frozen, batch) NamedSharding trees for explicit in/out shardings.
  """

  def train_step(state, frozen, batch):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    mask = gemma.token_mask(model.config, targets)

    def loss_fn(trainable):
      variables = {**frozen, 'params': merge_params(trainable, frozen['params'])}
      def logits_fn(bits):
        return model.apply(variables, inputs, quant=width_spec(spec, bits))
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


def as_variables(params_or_variables) -> dict:
  """{'params': ...} plus an optional 'quant' collection (OmniQuant transforms)."""
  if 'params' in params_or_variables:
    return params_or_variables
  return {'params': params_or_variables}


LOGITS_BYTES = 2**29  # float32 logits made at once by evaluation (a 262k vocabulary needs bounding)


def token_logprobs(model: gemma.Transformer, variables, inputs: jax.Array, targets: jax.Array,
                   spec: QuantSpec | None) -> jax.Array:
  """log p(target) [B, T] under the model; the [rows, T, vocab] logits are made a few rows at a
  time (at most LOGITS_BYTES), so a large vocabulary does not need B x T x vocab memory."""
  b, t = inputs.shape
  rows = max(1, LOGITS_BYTES // (t * model.config.num_embed * 4))

  def logprobs(x, y):
    logits = model.apply(as_variables(variables), x, quant=spec)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]

  if rows >= b:
    return logprobs(inputs, targets)
  one_row = lambda xy: logprobs(xy[0][None], xy[1][None])[0]
  return jax.lax.map(one_row, (inputs, targets), batch_size=rows)


def make_eval_fn(model: gemma.Transformer) -> Callable:
  """eval_fn(params, batches, spec) -> mean NLL in nats per token (log perplexity).

  params may also be variables {'params', 'quant'}, e.g. an exported OmniQuant parent.
  """

  @functools.partial(jax.jit, static_argnums=2)
  def _sums(params, batch, spec):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    mask = gemma.token_mask(model.config, targets)
    nll = -token_logprobs(model, params, inputs, targets, spec)
    return jnp.sum(nll * mask), jnp.sum(mask)

  def eval_fn(params, batches: Iterable[np.ndarray], spec: QuantSpec | None) -> float:
    total, count = 0.0, 0.0
    for b in batches:
      s, n = _sums(params, jnp.asarray(b), spec)
      total, count = total + float(s), count + float(n)
    return total / count

  return eval_fn


def restore_blockwise(ckpt_dir: str | None, like, desc: str, num_blocks: int):
  """(manager or None, blocks done, tree) for a layer-wise algorithm that saves `like`'s
  structure after every block (step = blocks done): the latest save, restored if present."""
  if not ckpt_dir:
    return None, 0, like
  mngr = checkpoint_manager(ckpt_dir, keep=1)
  done = mngr.latest_step()
  if done is None:
    return mngr, 0, like
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  logging.info('%s: resuming after block %d of %d', desc, done, num_blocks)
  return mngr, done, mngr.restore(done, args=ocp.args.StandardRestore(abstract))


def checkpoint_manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  """An orbax manager keeping the last `keep` steps (saves are atomic)."""
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


@dataclasses.dataclass
class Prepared:
  """A sharded train state and the jitted step that advances it."""
  state: dict
  frozen: Params
  step_fn: Callable
  state_shardings: dict
  batch_sharding: Any


def prepare(model: gemma.Transformer, init_params: Params, objective: losses.Objective,
            opts: Options, mesh=None, rules=sharding.DEFAULT_RULES) -> Prepared:
  """Splits, shards and initialises the train state over `mesh` (default: the first device)
  and jits the step with explicit in/out shardings. init_params: parameters, or variables
  whose collections other than 'params' (an OmniQuant 'quant') stay fixed."""
  if mesh is None:
    mesh = sharding.make_mesh(sharding.mesh_config(), jax.devices()[:1])
  variables = as_variables(init_params)
  trainable, frozen_params = split_params(variables['params'], opts.trainable)
  frozen = {**variables, 'params': frozen_params}
  tx = make_optimizer(opts)
  t_sh = model_shardings(model.config, trainable, mesh, rules)
  f_sh = {c: model_shardings(model.config, tree, mesh, rules) for c, tree in frozen.items()}
  trainable, frozen = jax.device_put(trainable, t_sh), jax.device_put(frozen, f_sh)
  make_state = functools.partial(init_state, tx=tx)
  s_sh = sharding.state_shardings(jax.eval_shape(make_state, trainable), tx, t_sh, mesh)
  state = jax.jit(make_state, out_shardings=s_sh)(trainable)
  b_sh = sharding.batch_sharding(mesh, rules)
  step_fn = make_train_step(model, objective, opts.spec, tx, (s_sh, f_sh, b_sh))
  return Prepared(state, frozen, step_fn, s_sh, b_sh)


def train(model: gemma.Transformer, init_params: Params, objective: losses.Objective,
          batch_fn: Callable[[int], np.ndarray], opts: Options,
          ckpt_dir: str | None = None, writer=None, desc: str = 'train',
          mesh=None, rules=sharding.DEFAULT_RULES) -> tuple[Params, dict]:
  """Trains from init_params for opts.steps steps; resumes from ckpt_dir if it holds a checkpoint.

  objective: `losses.parse_objective(...)`, e.g. '8,4,2' with lambdas. batch_fn(step)
  gives this process's rows of the global batch, int [B, T+1]. The state is sharded over `mesh` (default: the first device)
  by `rules`; a checkpoint saved on another mesh restores onto this one.
  init_params may be variables {'params', 'quant'} (`warm_start.float_variables`): the
  'quant' collection stays fixed and comes back with the parameters.
  Returns the full parameters (variables, when given variables) and the last metrics.
  """
  p = prepare(model, init_params, objective, opts, mesh, rules)
  state, frozen, step_fn, b_sh = p.state, p.frozen, p.step_fn, p.batch_sharding
  mngr = checkpoint_manager(ckpt_dir) if ckpt_dir else None
  if mngr is not None and mngr.latest_step() is not None:
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            state, p.state_shardings)
    state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
    logging.info('%s: resumed at step %d from %s', desc, int(state['step']), ckpt_dir)
  start = int(state['step'])
  metrics = {}
  bar = tqdm.tqdm(range(start, opts.steps), desc=desc, initial=start, total=opts.steps,
                  mininterval=2.0, dynamic_ncols=True, disable=jax.process_index() != 0)
  t0 = time.perf_counter()
  for step in bar:
    state, m = step_fn(state, frozen, sharding.global_batch(batch_fn(step), b_sh))
    done = step + 1
    if done % opts.log_every == 0 or done == opts.steps:
      metrics = {k: float(v) for k, v in m.items()}
      bar.set_postfix(loss=f'{metrics["loss"]:.3f}')
      if writer is not None:
        for k, v in metrics.items():
          writer.add_scalar(f'{desc}/{k}', v, done)
    if mngr is None:
      continue
    preempted = mngr.reached_preemption(done)
    if (opts.checkpoint_every and done % opts.checkpoint_every == 0) or done == opts.steps or preempted:
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
