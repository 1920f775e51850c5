#!/usr/bin/env bash
# Runs an experiment config on the GPUs of one host, or of several hosts.
#
#   one host, all its GPUs:   launch/gpu.sh CONFIG WORKDIR [--config.x=y ...]
#   several hosts, on each:   NUM_PROCESSES=2 PROCESS_ID=<0|1> COORDINATOR=host0:1234 \
#                             launch/gpu.sh CONFIG WORKDIR [...]
#   under SLURM (srun, one task per host): launch/gpu.sh CONFIG WORKDIR  (auto-detected)
#
# One process drives all local GPUs; the mesh (--config.mesh.ici.*) spans every
# GPU of every host. WORKDIR must be a path all hosts see (NFS or similar).
# Needs a CUDA build of jax: `.venv/bin/pip install -U "jax[cuda12]"` after `make setup`.
set -euo pipefail
usage="usage: launch/gpu.sh CONFIG WORKDIR [flags...]"
config=${1:?$usage}; workdir=${2:?$usage}
shift 2
args=()
if [[ -n "${COORDINATOR:-}" ]]; then
  args+=(--distributed=on --coordinator_address="$COORDINATOR"
         --num_processes="${NUM_PROCESSES:?set NUM_PROCESSES}" --process_id="${PROCESS_ID:?set PROCESS_ID}")
fi
exec "$(dirname "$0")/local.sh" "$config" "$workdir" "${args[@]}" "$@"
