#!/usr/bin/env bash
# Runs any experiment config on this machine:  launch/local.sh CONFIG WORKDIR [--config.x=y ...]
# TPU pod slices: launch/tpu_pod.sh; several GPUs: launch/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
make setup
exec .venv/bin/python experiments/main.py --config="$config" --workdir="$workdir" "$@"
