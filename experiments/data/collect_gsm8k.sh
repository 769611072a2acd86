#!/usr/bin/env bash
# Collect the GSM8K train trajectories from prompt 1,000 on, in chunks of 500 prompts (experiments/data/collect.sh).
#   OMP_NUM_THREADS=1 bash experiments/data/collect_gsm8k.sh [FIRST_OFFSET] [LAST_OFFSET]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec bash experiments/data/collect.sh experiments/ablation/configs/data_gsm8k_train.yaml gsm8k_train "${1:-1000}" "${2:-7000}"
