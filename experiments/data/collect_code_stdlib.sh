#!/usr/bin/env bash
# Collect the 1,328 standard-library code prompts' trajectories (issue 30's prompts, for the code draft of issue 45),
# in chunks of 500 prompts (experiments/data/collect.sh); resumable from the committed chunk archives.
#   OMP_NUM_THREADS=1 bash experiments/data/collect_code_stdlib.sh [FIRST_OFFSET] [LAST_OFFSET]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec bash experiments/data/collect.sh experiments/ablation/configs/data_code_stdlib.yaml code_stdlib "${1:-0}" "${2:-1000}"
