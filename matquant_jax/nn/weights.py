"""The one table of quantizable weights (einsum, contraction axes, target, logical axis names)."""

from __future__ import annotations

import dataclasses

from matquant_jax.nn.config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class WeightInfo:
  """How a quantizable weight is applied: its einsum and contraction (per-channel reduce) axes."""
  eqn: str
  reduce_axes: tuple[int, ...]
  target: str  # 'ffn' or 'attn', as in QuantSpec.targets
  logical_axes: tuple[str | None, ...]  # names for sharding.py's logical-to-mesh rules


def quantizable_weights(config: TransformerConfig) -> dict[str, WeightInfo]:
  """Every weight of a block that goes through the quantized-einsum path, by its params path."""
  w = {}
  if config.num_heads == config.num_kv_heads:
    w['attn/qkv_einsum/w'] = WeightInfo('BTD,SNDH->SBTNH', (2,), 'attn',
                                        ('stack', 'heads', 'embed', 'head_dim'))
  else:
    w['attn/q_einsum/w'] = WeightInfo('BTD,NDH->BTNH', (1,), 'attn', ('heads', 'embed', 'head_dim'))
    w['attn/kv_einsum/w'] = WeightInfo('BSD,CKDH->CBSKH', (2,), 'attn',
                                       ('stack', 'kv_heads', 'embed', 'head_dim'))
  w['attn/attn_vec_einsum/w'] = WeightInfo('BTNH,NHD->BTD', (0, 1), 'attn', ('heads', 'head_dim', 'embed'))
  if config.transpose_gating_einsum:
    w['mlp/gating_einsum'] = WeightInfo('BTD,FHD->FBTH', (2,), 'ffn', ('stack', 'mlp', 'embed'))
  else:
    w['mlp/gating_einsum'] = WeightInfo('BTD,FDH->FBTH', (1,), 'ffn', ('stack', 'embed', 'mlp'))
  w['mlp/linear'] = WeightInfo('BTH,HD->BTD', (0,), 'ffn', ('mlp', 'embed'))
  return w


def logical_axes(config: TransformerConfig) -> dict[str, tuple[str | None, ...]]:
  """Logical axis names of every parameter, by path suffix (block paths without 'layer_i/')."""
  names = {p: i.logical_axes for p, i in quantizable_weights(config).items()}
  names['embedder/input_embedding'] = names['embedder/output_embedding'] = ('vocab', 'embed')
  for norm in ('pre_attention_norm', 'post_attention_norm', 'pre_ffw_norm', 'post_ffw_norm',
               'final_norm', 'attn/_query_norm', 'attn/_key_norm'):
    names[f'{norm}/scale'] = ('norm',)
  return names


def ffn_reduce_axes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """Contraction axes of each FFN weight (per-output-channel statistics reduce over them)."""
  return {p.split('/')[1]: i.reduce_axes for p, i in quantizable_weights(config).items()
          if i.target == 'ffn'}


def targeted_weights(config: TransformerConfig, targets) -> dict[str, WeightInfo]:
  """The table's entries whose target ('ffn', 'attn') is among `targets`."""
  return {p: i for p, i in quantizable_weights(config).items() if i.target in targets}
