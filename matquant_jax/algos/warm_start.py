"""QAT from a stored parent: float weights whose min-max fake quantization gives its codes back.

QAT fake-quantizes float weights on plain min-max grids. A stored parent (OmniQuant's
clipped grids, GPTQ's codes, an E.P. parent) becomes such weights exactly: a group's
dequantized codes span that group's own [min, max] whenever codes 0 and 2^c - 1 both occur
(clipping saturates both ends), so their min-max grid is the parent's grid. OmniQuant's input
scale s is folded where the model has room for it: gating's into the FFN's input norm, linear's
into the up branch's output channels and bias (a per-column factor keeps every code of a grid that groups
along the input axis). Its shift delta and bias delta W stay in the 'quant' collection
(Llama and Gemma FFNs have no biases to hold them), with delta rescaled by 1/s.
"""

from __future__ import annotations

from flax import traverse_util
import numpy as np

from matquant_jax import nn, parents
from matquant_jax.core import quant


def float_variables(config: nn.TransformerConfig, parent: dict) -> dict:
  """{'params', ['quant']} for QAT from a stored parent's variables (`parent.load`).

  Quantized weights become float32 dequantized parents (s folded as above); other
  parameters are kept. Raises for OmniQuant transforms on attention weights (no place
  to fold their scale here).
  """
  params = traverse_util.flatten_dict(parent['params'], sep='/')
  aux = parents.by_weight(parent.get('quant', {}))
  if attn := sorted(w for w in aux if '/attn/' in w):
    raise ValueError(f'warm start folds OmniQuant transforms of FFN weights only; the parent has them on {attn[:2]}')
  for k, v in params.items():
    if isinstance(v, quant.QuantizedArray):
      params[k] = v.dequantize(dtype=np.float32)
  kept = {w: {'shift': a['shift'] / a['smooth'] if 'smooth' in a else a['shift'], 'bias': a['bias']}
          for w, a in aux.items() if 'shift' in a}
  for weight, a in aux.items():
    if 'smooth' not in a:
      continue
    layer, _, name = weight.partition('/mlp/')
    if name == 'gating_einsum':  # the input norm's output / s
      norm = f'{layer}/pre_ffw_norm/scale'
      scale = params[norm]
      params[norm] = (1 + scale) / a['smooth'] - 1 if config.norm_plus_one else scale / a['smooth']
      continue
    # linear: its input is act(gate) * up; the up branch's output channels (and bias) / s
    gating = f'{layer}/mlp/gating_einsum'
    w = params[gating]
    s = a['smooth'][:, None] if config.transpose_gating_einsum else a['smooth'][None, :]
    params[gating] = w.at[1].set(w[1] / s)
    if gating in kept:  # bias [2, 1, 1, hidden]
      kept[gating]['bias'] = kept[gating]['bias'].at[1].divide(a['smooth'])
  out = {'params': traverse_util.unflatten_dict(params, sep='/')}
  if kept:
    out['quant'] = traverse_util.unflatten_dict(
        {f'{w}/{leaf}': v for w, d in kept.items() for leaf, v in d.items()}, sep='/')
  return out


def code_agreement(config: nn.TransformerConfig, parent: dict, variables: dict) -> float:
  """Fraction of the parent's codes that min-max quantization of `variables` reproduces
  (1.0 when every group holds both end codes)."""
  p = traverse_util.flatten_dict(parent['params'], sep='/')
  f = traverse_util.flatten_dict(variables['params'], sep='/')
  infos = nn.quantizable_weights(config)
  same = total = 0
  for k, qa in p.items():
    if not isinstance(qa, quant.QuantizedArray):
      continue
    info = infos[k.partition('/')[2]]
    again = quant.QuantizedArray.from_float(f[k], qa.parent_bits, info.reduce_axes, qa.group_size,
                                             symmetric=qa.symmetric)
    same += int(np.sum(np.asarray(again.codes) == np.asarray(qa.codes)))
    total += qa.codes.size
  return same / total
