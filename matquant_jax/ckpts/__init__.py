"""Checkpoints: `load(source)` for a stored parent, Gemma orbax, Hugging Face, GGUF or a named
model; writers for the same layouts, and `export_gguf` (a parent's slice as a llama.cpp file).
"""

# pylint: disable=g-importing-member
from matquant_jax.ckpts.loader import (
    load)
from matquant_jax.ckpts.layouts import (
    check_params, checkpoint_tensors, linear_from_params, unpermute_rope, permute_rope, llama_params, HF_LLAMA, GGUF_LLAMA,
    HF_GEMMA_NORMS, HF_GEMMA3_NORMS, GGUF_GEMMA3, GGUF_GEMMA3_NORMS, gemma_params)
from matquant_jax.ckpts.hf import (
    gemma2_from_hf_config, write_safetensors, load_hf, hf_tensors, hf_config, save_hf)
from matquant_jax.ckpts.gguf import (
    load_gguf)
from matquant_jax.ckpts.gguf_export import (
    export_gguf, gguf_source_metadata)
from matquant_jax.ckpts.gemma_orbax import (
    infer_gemma_config, format_gemma_params, load_gemma_orbax, save_gemma_orbax)
from matquant_jax.ckpts.zoo import (
    SMOLLM2_FILE, smollm2_path, GEMMA3_270M_PACKAGES, gemma3_270m_path, MODELS, named_model)
