#!/usr/bin/env bash
# Collect a prompt set's trajectories in chunks of 500 prompts, one chunk after another, from a `cllm gen` config.
# Resumable across sessions: a chunk whose archive is committed (ARCHIVES/cNNNNN.tar.xz) is unpacked and resumed
# (finished chunks are skipped by `cllm gen` itself: every prompt is already done). Each chunk is archived after it
# finishes; commit the archives. One process; OMP_NUM_THREADS as the caller sets.
#   OMP_NUM_THREADS=1 bash experiments/data/collect.sh CONFIG NAME FIRST_OFFSET LAST_OFFSET
# NAME: the folder under runs/ablation/data and experiments/data that holds the chunks (e.g. gsm8k_train).
set -euo pipefail
cd "$(dirname "$0")/../.."
config=$1; name=$2; first=$3; last=$4; chunk=500
runs=runs/ablation/data/$name; archives=experiments/data/$name
[[ -f "$config" ]] || { echo "collect.sh: config not found: $config" >&2; exit 2; }
mkdir -p "$runs" "$archives"
for ((off = first; off <= last; off += chunk)); do
    part=$(printf 'c%05d' "$off")
    if [[ -f "$archives/$part.tar.xz" && ! -d "$runs/$part" ]]; then
        tar -xJf "$archives/$part.tar.xz" -C "$runs"
    fi
    cllm gen --config "$config" --offset "$off" --limit "$chunk" --out "$runs/$part"
    tar -C "$runs" -cJf "$archives/$part.tar.xz.tmp" "$part" && mv "$archives/$part.tar.xz.tmp" "$archives/$part.tar.xz"
    echo "[collect] $name/$part archived $(date -u +%FT%TZ)"
done
