"""Llama and Mistral as configurations of the shared decoder in gemma.py.

The family differs from Gemma-2 only in switches the decoder already has:
RMSNorm scaled by its weight (eps 1e-5), SwiGLU, no post norms, no soft caps,
unscaled embeddings, an optional untied output head, all-global attention
(Llama) or a sliding window on every layer (Mistral). Parameters use the same
tree (q/kv/attn_vec einsums, gating_einsum, linear), so QAT, OmniQuant,
slicing, Mix'n'Match, sharding and evaluation work on these models unchanged.
Half-split RoPE, as in Hugging Face checkpoints; GGUF files store Q and K for
interleaved RoPE and are un-permuted on load (checkpoints.py).
"""

from __future__ import annotations

from matquant_jax.nn.config import TransformerConfig


def llama_config(*, num_layers: int, num_embed: int, embed_dim: int, hidden_dim: int,
                 num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 rope_base: float = 10_000.0, norm_eps: float = 1e-5, tie_embeddings: bool = False,
                 sliding_window: int | None = None, dtype: str = 'float32') -> TransformerConfig:
  """A Llama (sliding_window None) or Mistral (sliding_window set) decoder config."""
  if embed_dim % num_heads and head_dim is None:
    raise ValueError(f'embed_dim={embed_dim} is not divisible by num_heads={num_heads}; give head_dim')
  return TransformerConfig(
      num_layers=num_layers, num_embed=num_embed, embed_dim=embed_dim, hidden_dim=hidden_dim,
      num_heads=num_heads, head_dim=head_dim or embed_dim // num_heads, num_kv_heads=num_kv_heads,
      sliding_window_size=sliding_window or 0, attn_logits_soft_cap=None, final_logit_softcap=None,
      rope_base=rope_base, dtype=dtype, attention_pattern='sliding' if sliding_window else 'global',
      ffn_activation='silu', post_norms=False, norm_eps=norm_eps, norm_plus_one=False,
      embed_scale=False, tie_embeddings=tie_embeddings, pad_id=None)


def smollm2_135m(**kw) -> TransformerConfig:
  """SmolLM2-135M(-Instruct): 30 layers, D 576, 9 heads / 3 KV heads of 64, tied embeddings."""
  return llama_config(num_layers=30, num_embed=49152, embed_dim=576, hidden_dim=1536, num_heads=9,
                      num_kv_heads=3, rope_base=100_000.0, tie_embeddings=True, **kw)


def mistral_7b(**kw) -> TransformerConfig:
  """Mistral-7B-v0.1 (the paper's third model): sliding window 4096, untied head."""
  return llama_config(num_layers=32, num_embed=32000, embed_dim=4096, hidden_dim=14336,
                      num_heads=32, num_kv_heads=8, sliding_window=4096, **kw)


def from_hf_config(hf: dict, dtype: str = 'float32') -> TransformerConfig:
  """The decoder config of a Hugging Face LlamaForCausalLM / MistralForCausalLM config.json."""
  return llama_config(
      num_layers=hf['num_hidden_layers'], num_embed=hf['vocab_size'], embed_dim=hf['hidden_size'],
      hidden_dim=hf['intermediate_size'], num_heads=hf['num_attention_heads'],
      num_kv_heads=hf.get('num_key_value_heads', hf['num_attention_heads']),
      head_dim=hf.get('head_dim'), rope_base=hf.get('rope_theta', 10_000.0),
      norm_eps=hf.get('rms_norm_eps', 1e-5), tie_embeddings=hf.get('tie_word_embeddings', False),
      sliding_window=hf.get('sliding_window'), dtype=dtype)
