"""The model configuration: `TransformerConfig` (the Gemma-2 presets and test sizes as classmethods;
every released model by name in `nn.presets`), attention types, special token ids."""

from __future__ import annotations

import dataclasses
import numbers
import enum


PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


class AttentionType(enum.Enum):
  GLOBAL = 1
  LOCAL_SLIDING = 2


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Gemma-2 hyperparameters (names follow the official `TransformerConfig`)."""
  num_layers: int
  num_embed: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  head_dim: int
  num_kv_heads: int
  sliding_window_size: int = 4096
  attn_logits_soft_cap: float | None = 50.0
  final_logit_softcap: float | None = 30.0
  query_pre_attn_scalar: float | None = None  # default head_dim**-0.5
  transpose_gating_einsum: bool = False
  rope_base: float = 10_000.0  # global layers (all layers unless rope_local_base is set)
  dtype: str = 'float32'  # activation dtype; parameters stay float32
  # Family switches; the defaults are Gemma-2. models/llama.py sets them for Llama/Mistral,
  # models/gemma3.py for Gemma 3.
  attention_pattern: str = 'alternating'  # 'alternating' (local, global, ...), 'gemma3' (5 local,
                                          # 1 global), 'global', 'sliding'
  rope_local_base: float | None = None  # sliding-window layers' RoPE base (Gemma 3: 10k)
  rope_global_scale: float = 1.0  # linear RoPE scaling (positions / scale) of global layers
  qk_norm: bool = False  # Gemma 3: RMSNorm over head_dim on queries and keys before RoPE
  ffn_activation: str = 'gelu_tanh'  # GeGLU; 'silu' is SwiGLU
  post_norms: bool = True  # Gemma-2's post-attention / post-FFN norms
  norm_eps: float = 1e-6
  norm_plus_one: bool = True  # Gemma scales by (1 + scale), Llama by its weight
  embed_scale: bool = True  # multiply embeddings by sqrt(embed_dim)
  tie_embeddings: bool = True  # else a separate embedder/output_embedding [vocab, embed]
  pad_id: int | None = PAD_ID  # keys and targets with this id are masked (None: no padding id)
  # Trained with BOS opening every sequence (released Gemma checkpoints: without it the NLL is
  # about 1 nat worse): evaluation windows and calibration rows then start with BOS.
  bos_per_sequence: bool = False

  def __post_init__(self):
    for key in ('num_layers', 'num_embed', 'embed_dim', 'hidden_dim', 'num_heads', 'head_dim', 'num_kv_heads'):
      value = getattr(self, key)
      if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f'TransformerConfig.{key} must be a positive integer, got {value!r}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}')
    self.attention_types  # pylint: disable=pointless-statement  (names a bad attention_pattern)

  @property
  def attention_types(self) -> tuple[AttentionType, ...]:
    """Gemma-2: even layers local sliding window, odd layers global; Gemma 3: every sixth global."""
    local, glob = AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL
    pattern = {'alternating': (local, glob), 'gemma3': (local,) * 5 + (glob,),
               'global': (AttentionType.GLOBAL,), 'sliding': (AttentionType.LOCAL_SLIDING,)}
    if self.attention_pattern not in pattern:
      raise ValueError(f'attention_pattern must be one of {sorted(pattern)}, got {self.attention_pattern!r}')
    p = pattern[self.attention_pattern]
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def query_scale(self) -> float:
    return self.query_pre_attn_scalar or self.head_dim**-0.5

  def rope(self, attn_type: AttentionType) -> tuple[float, float]:
    """(base, linear scale) of RoPE in a layer of this type."""
    if attn_type == AttentionType.LOCAL_SLIDING and self.rope_local_base is not None:
      return self.rope_local_base, 1.0
    return self.rope_base, self.rope_global_scale

  @classmethod
  def gemma2_2b(cls, **kw) -> 'TransformerConfig':
    return cls(num_layers=26, num_embed=256128, embed_dim=2304, hidden_dim=9216,
               num_heads=8, head_dim=256, num_kv_heads=4, **{'bos_per_sequence': True, **kw})

  @classmethod
  def gemma2_9b(cls, **kw) -> 'TransformerConfig':
    return cls(num_layers=42, num_embed=256128, embed_dim=3584, hidden_dim=14336,
               num_heads=16, head_dim=256, num_kv_heads=8, transpose_gating_einsum=True,
               **{'bos_per_sequence': True, **kw})

  @classmethod
  def gemma2_27b(cls, **kw) -> 'TransformerConfig':
    return cls(num_layers=46, num_embed=256128, embed_dim=4608, hidden_dim=36864,
               num_heads=32, head_dim=128, num_kv_heads=16, transpose_gating_einsum=True,
               query_pre_attn_scalar=(4608 // 32)**-0.5, **{'bos_per_sequence': True, **kw})

  @classmethod
  def tiny(cls, num_embed: int = 256, **kw) -> 'TransformerConfig':
    """A few-thousand-parameter model for unit tests."""
    base = dict(num_layers=2, num_embed=num_embed, embed_dim=32, hidden_dim=64,
                num_heads=4, head_dim=8, num_kv_heads=2, sliding_window_size=4)
    return cls(**{**base, **kw})

  @classmethod
  def small(cls, num_embed: int = 2048, **kw) -> 'TransformerConfig':
    """The embedded default: a small Gemma-2-architecture model that trains on 2 CPU cores."""
    base = dict(num_layers=4, num_embed=num_embed, embed_dim=128, hidden_dim=512,
                num_heads=4, head_dim=32, num_kv_heads=2, sliding_window_size=64)
    return cls(**{**base, **kw})
