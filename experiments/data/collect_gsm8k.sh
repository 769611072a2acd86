#!/usr/bin/env bash
# Collect the GSM8K train trajectories from prompt 1,000 on, in chunks of 500 prompts, one chunk after another.
# Resumable across sessions: a chunk whose archive is committed (experiments/data/gsm8k_train/cNNNNN.tar.xz) is
# unpacked and resumed (finished chunks are skipped by `cllm gen` itself: every prompt is already done).
# Each chunk is archived after it finishes; commit the archives. One process; OMP_NUM_THREADS as the caller sets.
#   OMP_NUM_THREADS=1 bash experiments/data/collect_gsm8k.sh [FIRST_OFFSET] [LAST_OFFSET]
set -euo pipefail
cd "$(dirname "$0")/../.."
first=${1:-1000}; last=${2:-7000}; chunk=500
runs=runs/ablation/data/gsm8k_train; archives=experiments/data/gsm8k_train
mkdir -p "$runs" "$archives"
for ((off = first; off <= last; off += chunk)); do
    name=$(printf 'c%05d' "$off")
    if [[ -f "$archives/$name.tar.xz" && ! -d "$runs/$name" ]]; then
        tar -xJf "$archives/$name.tar.xz" -C "$runs"
    fi
    cllm gen --config experiments/ablation/configs/data_gsm8k_train.yaml --offset "$off" --limit "$chunk" \
        --out "$runs/$name"
    tar -C "$runs" -cJf "$archives/$name.tar.xz.tmp" "$name" && mv "$archives/$name.tar.xz.tmp" "$archives/$name.tar.xz"
    echo "[collect_gsm8k] $name archived $(date -u +%FT%TZ)"
done
