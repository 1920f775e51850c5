"""OmniQuant as MatQuant's post-training base algorithm (spec sections 2, 5, 6).

The model's weights stay frozen. Learned, per quantized weight: the clipping
factors gamma, beta = sigmoid(logit) per output channel (LWC), and the input
transform XW -> ((X - delta) / s) Q(W s) + delta W (shift delta, scale s over
the contraction axes). They live in a 'quant' variable collection that mirrors
the params tree, so `model.apply({'params': p, 'quant': t}, ...)` runs the
transformed model through the ordinary quantized-einsum path.

Calibration goes one block at a time: the target is the float block's output
on the float model's activations; the input is the output of the already
calibrated (quantized) previous blocks, one stream per bit-width; the loss is
the MatQuant sum over r of lambda_r * MSE_r (plus L2 co-distillation terms).
`make_parent` folds the result into a stored uint8 parent.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

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
from matquant_jax.core import losses, quant
from matquant_jax.core.qeinsum import QuantSpec


LOGIT_INIT = 4.0  # sigmoid(4) = 0.982, as in OmniQuant's code


Tree = Any


@dataclasses.dataclass(frozen=True)
class Options:
  """OmniQuant calibration settings.

  Defaults follow OmniQuant's code (AdamW, weight decay 0, one learning rate
  per parameter group: clipping logits `lwc_lr`, shift/scale `let_lr`); the
  paper states one lr of 1e-3 (experiments/configs/omniquant_paper_lr.py).
  aug_loss: OmniQuant's auxiliary term, the float block applied to the
    quantized input as a second target (its `--aug_loss`).
  balance: divide each width's block loss by its value at the start of the
    block, so lambda weighs relative errors (raw int2 MSE is ~300x int8's).
  skip_tokens: leading positions left out of the block loss (position 0 of a
    real model can carry a massive activation that dominates every MSE).
  """
  epochs: int = 40
  batch_size: int = 4
  lwc_lr: float = 1e-2
  let_lr: float = 5e-3
  weight_decay: float = 0.0
  lwc: bool = True
  let: bool = True
  aug_loss: bool = False
  balance: bool = False
  skip_tokens: int = 0

  def __post_init__(self):
    for key in ('epochs', 'batch_size'):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'omniquant.{key} must be a positive integer, got {value!r}')
    for key in ('lwc_lr', 'let_lr'):
      if not getattr(self, key) > 0:
        raise ValueError(f'omniquant.{key} must be positive, got {getattr(self, key)!r}')
    if not self.weight_decay >= 0:
      raise ValueError(f'omniquant.weight_decay must be >= 0, got {self.weight_decay!r}')
    if not isinstance(self.skip_tokens, int) or self.skip_tokens < 0:
      raise ValueError(f'omniquant.skip_tokens must be a non-negative integer, got {self.skip_tokens!r}')
    if not (self.lwc or self.let):
      raise ValueError('omniquant needs something to learn: set lwc and/or let')

  @classmethod
  def from_config(cls, cfg, **overrides) -> 'Options':
    """The fields of an `omniquant` config section (other keys, e.g. samples, are the caller's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in dict(cfg).items() if k in names}, **overrides})


def optimizer(opts: Options) -> optax.GradientTransformation:
  """AdamW with OmniQuant's parameter groups: clipping logits at lwc_lr, shift/scale at let_lr."""
  def labels(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'lwc' if str(path[-1].key).endswith('_logit') else 'let', tree)
  group = lambda lr: optax.adamw(lr, weight_decay=opts.weight_decay)
  return optax.multi_transform({'lwc': group(opts.lwc_lr), 'let': group(opts.let_lr)}, labels)


def init_transforms(config: nn.TransformerConfig, params: Tree, spec: QuantSpec,
                    lwc: bool = True, let: bool = True) -> Tree:
  """The identity transform (delta 0, s 1) and clipping logits 4.0 for every quantized weight."""
  flat = {}
  for key, _ in nn.blocks(config):
    for path, info in nn.targeted_weights(config, spec.targets).items():
      w = traverse_util.flatten_dict(params[key], sep='/')[path]
      aux = {}
      if lwc:
        shape = quant.stats_shape(w.shape, info.reduce_axes, spec.group_size)
        aux['gamma_logit'] = jnp.full(shape, LOGIT_INIT, jnp.float32)
        aux['beta_logit'] = jnp.full(shape, LOGIT_INIT, jnp.float32)
      if let:
        shape = tuple(w.shape[a] for a in sorted(info.reduce_axes))
        aux['shift'] = jnp.zeros(shape, jnp.float32)
        aux['smooth'] = jnp.ones(shape, jnp.float32)
      flat[f'{key}/{path}'] = aux
  return traverse_util.unflatten_dict(flat, sep='/')


def _layer_fns(block, objective: losses.Objective, spec: QuantSpec, tx: optax.GradientTransformation,
               opts: Options):
  """(jitted train step, jitted forward) for one block module; reused by every block of its kind."""

  def forward(layer_params, aux, x, tokens, bits):
    positions, mask = nn.attention_inputs(block.config, tokens)
    variables = {'params': layer_params} if aux is None else {'params': layer_params, 'quant': aux}
    return block.apply(variables, x, positions, mask, bits, None if bits is None else spec)[0]

  def step(aux, opt_state, layer_params, xs, target, tokens, aug, scales):
    """aug: {r: float block on stream r} (aug_loss) or {}; scales: {r: initial loss} or None."""
    tmask = loss_mask(block.config, tokens, opts.skip_tokens)
    def loss_fn(aux):
      outs = {}
      def out(bits):
        if bits not in outs:
          outs[bits] = forward(layer_params, aux, xs[bits], tokens, bits)
        return outs[bits]
      loss, metrics = losses.matquant_loss(out, target, tmask, objective, losses.mse,
                                           losses.mse_distillation, ('mse', 'l2'), scales)
      for r, lam in zip(objective.widths, objective.lambdas):
        if r in aug:
          metrics[f'aug_int{r}'] = losses.mse(out(r), aug[r], tmask)
          loss += lam * metrics[f'aug_int{r}'] / (1.0 if scales is None else scales[r])
      metrics['loss'] = loss
      return loss, metrics
    grads, metrics = jax.grad(loss_fn, has_aux=True)(aux)
    updates, opt_state = tx.update(grads, opt_state, aux)
    return optax.apply_updates(aux, updates), opt_state, metrics

  return (jax.jit(step, donate_argnums=(0, 1)),
          jax.jit(forward, static_argnums=4))


def loss_mask(config: nn.TransformerConfig, tokens, skip_tokens: int = 0) -> jax.Array:
  """Token weights of the block loss: padding and the first `skip_tokens` positions get 0."""
  keep = (jnp.arange(tokens.shape[-1]) >= skip_tokens).astype(jnp.float32)
  return nn.token_mask(config, tokens) * keep


def _chunked(fn, x: jax.Array, tokens: np.ndarray, size: int) -> jax.Array:
  return jnp.concatenate([fn(x[i:i + size], tokens[i:i + size]) for i in range(0, len(x), size)])


def calibrate(config: nn.TransformerConfig, params: Tree, tokens: np.ndarray,
              objective: losses.Objective, spec: QuantSpec, opts: Options = Options(),
              ckpt_dir: str | None = None, writer=None, desc: str = 'omniquant', seed: int = 0) -> Tree:
  """Learns the OmniQuant transforms block by block; returns the 'quant' tree.

  tokens: int [samples, seq_len] calibration sequences. With `ckpt_dir`, the
  transforms are saved after every block and a rerun resumes after the last
  finished one.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f'calibration tokens must be [samples, seq_len], got shape {tokens.shape}')
  if opts.batch_size > len(tokens):
    raise ValueError(f'omniquant.batch_size={opts.batch_size} exceeds omniquant.samples={len(tokens)}')
  if None in objective.widths:
    raise ValueError('OmniQuant calibrates quantized slices; the objective may not contain "float"')
  qtree = init_transforms(config, params, spec, opts.lwc, opts.let)
  mngr, done, qtree = blockwise.restore_blockwise(ckpt_dir, qtree, desc, config.num_layers)
  if done >= config.num_layers:  # finished: no activation streams to rebuild
    mngr.close()
    return qtree

  widths = tuple(dict.fromkeys(objective.widths + objective.teachers))
  tx = optimizer(opts)
  fns = {}
  bs, n = opts.batch_size, len(tokens)
  steps_per_epoch = n // bs
  x0 = _chunked(lambda t, _: nn.embed(config, params, t), tokens, tokens, bs)
  fp, streams = x0, {r: x0 for r in widths}
  layers = nn.blocks(config)
  bar = tqdm.tqdm(total=(len(layers) - done) * opts.epochs * steps_per_epoch, desc=desc,
                  mininterval=2.0, dynamic_ncols=True)
  t_start = time.perf_counter()
  for i, (key, block) in enumerate(layers):
    kind = (type(block), getattr(block, 'attn_type', None))
    if kind not in fns:
      fns[kind] = _layer_fns(block, objective, spec, tx, opts)
    step, forward = fns[kind]
    lp, aux = params[key], qtree[key]
    float_block = lambda x, t: forward(lp, None, x, t, None)
    target = _chunked(float_block, fp, tokens, bs)
    if i >= done:
      t0 = time.perf_counter()
      aug = {r: _chunked(float_block, streams[r], tokens, bs) for r in objective.data} if opts.aug_loss else {}
      scales = None
      if opts.balance:  # each width's block loss at the start, on the whole calibration set
        mask = loss_mask(config, tokens, opts.skip_tokens)
        scales = {r: losses.mse(_chunked(lambda x, t: forward(lp, aux, x, t, r), streams[r], tokens, bs),
                                target, mask) for r in objective.widths}
      aux = jax.tree.map(jnp.copy, aux)  # the step donates it
      opt_state = tx.init(aux)
      bar.set_description(f'{desc} block {i + 1}/{len(layers)}')
      for epoch in range(opts.epochs):
        order = np.random.default_rng([seed, i, epoch]).permutation(n)
        for b in range(steps_per_epoch):
          idx = order[b * bs:(b + 1) * bs]
          xs = {r: streams[r][idx] for r in widths}
          aug_b = {r: a[idx] for r, a in aug.items()}
          aux, opt_state, metrics = step(aux, opt_state, lp, xs, target[idx], tokens[idx], aug_b, scales)
          bar.update()
        bar.set_postfix({k: f'{float(v):.2e}' for k, v in metrics.items() if k != 'loss'})
      metrics = {k: float(v) for k, v in metrics.items()}
      logging.info('%s: block %d/%d, %.2f s/epoch, last batch %s', desc, i + 1, len(layers),
                   (time.perf_counter() - t0) / opts.epochs,
                   ', '.join(f'{k} {v:.3e}' for k, v in metrics.items()))
      if writer is not None:
        for k, v in metrics.items():
          writer.add_scalar(f'{desc}/{k}', v, i + 1)
      qtree = {**qtree, key: aux}
    streams = {r: _chunked(lambda x, t: forward(lp, aux, x, t, r), streams[r], tokens, bs)
               for r in widths}
    fp = target
    if mngr is not None and i >= done:
      mngr.save(i + 1, args=ocp.args.StandardSave(qtree))
      mngr.wait_until_finished()  # a run stopped in the next block finds this one complete
  bar.close()
  if mngr is not None:
    mngr.wait_until_finished()
    mngr.close()
  logging.info('%s: %d blocks in %.1fs', desc, len(layers) - done, time.perf_counter() - t_start)
  return qtree
