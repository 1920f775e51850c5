"""The model: `TransformerConfig` and its presets, the Flax `Transformer` (Gemma-2, Gemma 3,
Llama/Mistral as switches of one decoder), its KV cache, the one table of quantizable
weights, which precision a tree of variables holds, and sharding rules (`nn.sharding`).
Imports `core` only.
"""

# pylint: disable=g-importing-member
from matquant_jax.nn.config import (
    PAD_ID, EOS_ID, BOS_ID, UNK_ID, AttentionType, TransformerConfig)
from matquant_jax.nn.weights import (
    WeightInfo, quantizable_weights, logical_axes, ffn_reduce_axes, targeted_weights)
from matquant_jax.nn.transformer import (
    K_MASK, fan_in_init, apply_rope, RMSNorm, Embedder, quantized_einsum, Einsum, Attention, Output,
    FeedForward, Block, token_mask, attention_inputs, embed, blocks, param_shapes, Transformer)
from matquant_jax.nn.cache import (
    init_cache, cache_inputs)
from matquant_jax.nn.precision import (
    is_quantized, flat_leaves, weight_info, quantized_targets, stored_bits, as_variables, resolve_spec,
    bits_per_weight)
from matquant_jax.nn.presets import (
    PRESETS, preset)
from matquant_jax.nn import gemma3, llama, presets, sharding
