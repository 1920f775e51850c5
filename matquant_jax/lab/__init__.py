"""Running studies: the main job (`study`), its config schema (`configs`), results files,
tables and plots (`report`), log setup (`logs`) and interleaved timing (`timing`). The only
library code that reads an ml_collections config.
"""

from matquant_jax.lab import configs, logs, report, study, timing
