#!/usr/bin/env bash
# Every check this project owes a GPU, in one place (none was lent to the sessions that built 0.1.0).
# Writes bench/results/<gpu>-<UTC date>-*.{json,md,png,log}; commit them and update the README tables.
#
#   bench/run_gpu.sh all        # tests, then losses, augment, epoch (each also runs on its own)
#   bench/run_gpu.sh tests      # the whole suite on CUDA, gpu-marked tests included (M = 65 536, 64 MB check)
#   bench/run_gpu.sh losses     # fused vs naive vs torch.compile vs pml vs inf-cl vs the cuBLAS rate
#   bench/run_gpu.sh augment    # Kornia pipeline vs the fused augmentation kernel
#   bench/run_gpu.sh epoch      # one ResNet-18 epoch, 50 000 32×32 images, batch 512
#
# Needs fastcl installed with its dev extra (kornia, pytorch-metric-learning; inf-cl optional).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/run_gpu.sh: no CUDA device')"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
stem="bench/results/${gpu}-$(date -u +%F)"
section=${1:-all}

run_tests() {
    python -m pytest -q tests 2>&1 | tee "$stem-tests.log"
}

run_losses() {
    for dtype in bf16 fp32; do
        for dim in 128 512; do
            python -m fastcl.profiler --device cuda --loss all \
                --impl triton,cuda,torch,naive,compile,pml,infcl --sizes 4096,16384,65536 --dim "$dim" \
                --dtype "$dtype" --repeats 20 --json "$stem-losses-$dtype-d$dim.json" \
                --markdown "$stem-losses-$dtype-d$dim.md" --plot "$stem-losses-$dtype-d$dim.png"
        done
    done
}

run_augment() {
    python bench/bench_augment.py --device cuda --out "$stem-augment"
}

run_epoch() {
    python -m fastcl.train --dataset synthetic --train-size 50000 --test-size 10 --encoder resnet18 \
        --batch-size 512 --epochs 3 --amp --compile --time-epoch --no-progress --out "$stem-epoch" --overwrite
}

case "$section" in
    tests) run_tests ;;
    losses) run_losses ;;
    augment) run_augment ;;
    epoch) run_epoch ;;
    all) run_tests; run_losses; run_augment; run_epoch ;;
    *) echo "usage: bench/run_gpu.sh [all|tests|losses|augment|epoch]" >&2; exit 2 ;;
esac
