#!/usr/bin/env bash
# Regenerates the committed CPU table: bench/results/cpu-<UTC date>.{json,md,png}.
# Extra arguments go to `fastcl bench`, e.g. `bench/run_cpu.sh --sizes 1024`.
set -euo pipefail
cd "$(dirname "$0")/.."
stem="bench/results/cpu-$(date -u +%F)"
python -m fastcl.profiler --device cpu --loss all --impl torch,naive,compile,pml \
    --sizes 1024,4096,8192 --dim 128 --dtype fp32 --repeats 5 \
    --json "$stem.json" --markdown "$stem.md" --plot "$stem.png" "$@"
