"""Matryoshka Quantization (MatQuant) in JAX/Flax."""
