"""The stored parent: make one from float weights (`make_parent`), save, load, export packed
slices, and plan a Mix'n'Match width per layer (`parents.planner`).
"""

# pylint: disable=g-importing-member
from matquant_jax.parents.make import (
    by_weight, make_parent, resident)
from matquant_jax.parents.store import (
    FORMAT, VERSION, WEIGHTS, MANIFEST, CONFIG, family, is_parent, pack, unpack, save, export,
    read_manifest, read_config, load, weight_bytes, file_bytes)
from matquant_jax.parents import planner
