"""OmniQuant as MatQuant's post-training base algorithm (spec sections 2, 5, 6).

The model's weights stay frozen. Learned, per quantized weight: the clipping
factors gamma, beta = sigmoid(logit) per output channel (LWC), and the input
transform XW -> ((X - delta) / s) Q(W s) + delta W (shift delta, scale s over
the contraction axes). They live in a 'quant' variable collection that mirrors
the params tree, so `model.apply({'params': p, 'quant': t}, ...).logits` runs the
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


def calibrate(config: nn.TransformerConfig, params: Tree, tokens: np.ndarray,
              objective: losses.Objective, spec: QuantSpec, opts: Options = Options(),
              ckpt_dir: str | None = None, writer=None, desc: str = 'omniquant', seed: int = 0) -> Tree:
  """Learns the OmniQuant transforms block by block (`blockwise.calibrate`); returns the
  'quant' tree.

  tokens: int [samples, seq_len] calibration sequences. With `ckpt_dir`, the
  transforms are saved after every block and a rerun resumes after the last
  finished one.
  """
  tokens = blockwise.check_tokens(tokens)
  if opts.batch_size > len(tokens):
    raise ValueError(f'omniquant.batch_size={opts.batch_size} exceeds omniquant.samples={len(tokens)}')
  if None in objective.widths:
    raise ValueError('OmniQuant calibrates quantized slices; the objective may not contain "float"')
  widths = tuple(dict.fromkeys(objective.widths + objective.teachers))
  tx = optimizer(opts)
  fns = {}
  bs, n = opts.batch_size, len(tokens)
  steps_per_epoch = n // bs

  def layer_fns(block):
    kind = (type(block), getattr(block, 'attn_type', None))
    if kind not in fns:
      fns[kind] = _layer_fns(block, objective, spec, tx, opts)
    return fns[kind]

  def forward(i, key, block, qtree, bits):
    fwd = layer_fns(block)[1]
    aux = None if bits is None else qtree[key]
    return lambda x, t: fwd(params[key], aux, x, t, bits)

  def calibrate_block(i, key, block, qtree, streams, target, bar):
    step = layer_fns(block)[0]
    lp, t0 = params[key], time.perf_counter()
    float_block = forward(i, key, block, qtree, None)
    aug = ({r: blockwise.chunked(float_block, streams[r], tokens, bs) for r in objective.data}
           if opts.aug_loss else {})
    scales = None
    if opts.balance:  # each width's block loss at the start, on the whole calibration set
      mask = loss_mask(config, tokens, opts.skip_tokens)
      scales = {r: losses.mse(blockwise.chunked(forward(i, key, block, qtree, r), streams[r], tokens, bs),
                              target, mask) for r in objective.widths}
    aux = jax.tree.map(jnp.copy, qtree[key])  # the step donates it
    opt_state = tx.init(aux)
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
    logging.info('%s: block %d, %.2f s/epoch, last batch %s', desc, i + 1,
                 (time.perf_counter() - t0) / opts.epochs, ', '.join(f'{k} {v:.3e}' for k, v in metrics.items()))
    if writer is not None:
      for k, v in metrics.items():
        writer.add_scalar(f'{desc}/{k}', v, i + 1)
    return {**qtree, key: aux}

  return blockwise.calibrate(
      config, params, tokens, init_transforms(config, params, spec, opts.lwc, opts.let), widths=widths,
      calibrate_block=calibrate_block, forward=forward, batch_size=bs,
      units_per_block=opts.epochs * steps_per_epoch, ckpt_dir=ckpt_dir, desc=desc, float_targets=True,
      settings={'objective': objective, 'spec': spec, 'options': opts, 'seed': seed})
