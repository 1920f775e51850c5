"""For tests and checks: independent float64 numpy reference forwards (`reference`).
"""

from matquant_jax.testing import reference
