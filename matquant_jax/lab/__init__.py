"""Running studies: the main job (`study`), its config schema (`configs`), results files,
tables and plots (`report`), log setup (`logs`) and interleaved timing (`timing`). The only
library code that reads an ml_collections config.
"""

from matquant_jax.lab import configs, logs, report, study, timing
from matquant_jax.lab.configs import base_config
from matquant_jax.lab.report import gap_closure, open_results, write_json
from matquant_jax.lab.study import run_study
