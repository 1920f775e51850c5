"""The base algorithms that make a parent: QAT (`qat`), OmniQuant (`omniquant`), GPTQ (`gptq`),
QAT from a stored parent (`warm_start`), and what the block-wise ones share (`blockwise`).
An algorithm imports no other algorithm, only `blockwise`.
"""

from matquant_jax.algos import blockwise, gptq, omniquant, qat, warm_start
