"""For tests and checks: tiny-model helpers (`tiny.init_params`) and independent float64 numpy reference forwards
straight from GGUF files (`reference`)."""

from matquant_jax.testing import reference, tiny
from matquant_jax.testing.tiny import init_params
