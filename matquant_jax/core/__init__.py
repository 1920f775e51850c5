"""The numerics, imported by everything and importing nothing of ours: the quantizer and its
straight-through primitives (`quant`), the call-time `QuantSpec` and the one quantized-einsum
path (`qeinsum`), the MatQuant objective (`losses`), Mix'n'Match plans (`plans`), and small files
written whole and read with errors naming them (`files`).
"""

from matquant_jax.core import losses, plans, qeinsum, quant
from matquant_jax.core.losses import Objective, parse_objective
from matquant_jax.core.plans import pyramid
from matquant_jax.core.qeinsum import QuantSpec
from matquant_jax.core.quant import QuantizedArray, fake_quant, slice_codes
