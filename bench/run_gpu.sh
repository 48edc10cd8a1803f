#!/usr/bin/env bash
# Every check this project owes a GPU, in one place (docs/gpu.md "GPU checks owed" lists them and what
# each proves): first-contact's four steps on a short slot, then tests, losses, augment and epoch.
#
#   bench/run_gpu.sh first-contact   # ≤ 8 min on one H100/H200, no network: doctor, the gpu tests, the
#                                    # headline timing; one folder bench/results/<gpu>-<UTC date>-first-contact/
#   bench/run_gpu.sh tests           # the whole suite on CUDA, gpu-marked tests included
#   bench/run_gpu.sh losses          # every loss x impl x M x dtype x D, with peers: tens of minutes
#   bench/run_gpu.sh augment         # Kornia pipeline vs the fused augmentation kernel
#   bench/run_gpu.sh epoch           # one ResNet-18 epoch, 50 000 32x32 images, batch 512
#   bench/run_gpu.sh all             # tests, losses, augment, epoch: about an hour, far more than a short
#                                    # GPU slot (≤ 10 min a command): use first-contact there
#
# --dry-run (or FASTCL_DRY_RUN=1) prints each step with its time limit and runs nothing (no GPU needed; CI
# runs it). first-contact needs no pip and no network: it uses an installed fastcl, else installs this
# checkout with `pip install --no-deps --no-build-isolation -e .` (FASTCL_BUILD_CUDA=0), else puts a copy of
# the package layout on PYTHONPATH. Steps that need kornia or pytorch-metric-learning skip without them.
# Environment: FASTCL_FIRST_CONTACT_BUDGET (seconds, default 450) bounds the whole first-contact run;
# FASTCL_RESULTS names the results folder; PYTHON the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

section=all
dry_run=${FASTCL_DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        first-contact | tests | losses | augment | epoch | all) section=$arg ;;
        *) echo "usage: bench/run_gpu.sh [first-contact|tests|losses|augment|epoch|all] [--dry-run]" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "$dry_run" = 1 ]; then
    gpu="<gpu>"
else
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/run_gpu.sh: no CUDA device')" || exit 1
    gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
fi
date=$(date -u +%F)
stem="bench/results/${gpu}-${date}"

# run NAME SECONDS COMMAND...: one step under its own time limit (a hang costs that step only), its output
# to the terminal and NAME.log; the status line goes to steps.tsv. In a dry run: print the step.
deadline=0
run() {
    local name=$1 limit=$2
    shift 2
    if [ "$deadline" -gt 0 ]; then
        local left=$((deadline - $(date +%s)))
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    if [ "$dry_run" = 1 ]; then
        printf 'step %-12s timeout %4ss  %s\n' "$name" "$limit" "$*"
        return 0
    fi
    if [ "$limit" -le 5 ]; then
        printf '%s\tskipped\t0\tno time left in the budget\n' "$name" >>"$out/steps.tsv"
        echo "== $name: skipped, no time left" >&2
        return 0
    fi
    echo "== $name (at most ${limit} s): $*" >&2
    local start=$SECONDS status
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    local verdict=ok
    [ "$status" -ne 0 ] && verdict="exit $status"
    [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && verdict="timed out after ${limit} s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$verdict" "$((SECONDS - start))" "$*" >>"$out/steps.tsv"
    return 0
}

# fastcl importable with its kernels (fastcl.kernels lives in kernels/ in the checkout), without a network.
ensure_fastcl() {
    if [ "$dry_run" = 1 ]; then
        echo "step install      python -c 'import fastcl.kernels' || FASTCL_BUILD_CUDA=0 pip install --no-deps" \
            "--no-build-isolation -e . || PYTHONPATH=<copy of fastcl/, kernels/, csrc/ as one package>"
        return 0
    fi
    if "$PYTHON" -c "import fastcl.kernels, fastcl.csrc" 2>/dev/null \
        && [ "$("$PYTHON" -c 'import fastcl, os; print(os.path.dirname(os.path.dirname(fastcl.__file__)))')" = "$repo" ]; then
        return 0
    fi
    if FASTCL_BUILD_CUDA=0 timeout 180 "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
        && "$PYTHON" -c "import fastcl.kernels" 2>/dev/null; then
        return 0
    fi
    echo "bench/run_gpu.sh: pip could not install this checkout; running it from a copied package layout" >&2
    local site
    site=$(mktemp -d)
    cp -r fastcl "$site/fastcl" && cp -r kernels "$site/fastcl/kernels" && cp -r csrc "$site/fastcl/csrc"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONSAFEPATH=1 # `python -m` must not put the checkout's fastcl/ (no kernels/ inside) first
}

# The markdown summary and JSON of a first-contact folder: device, versions, date, command, step table.
summarize() {
    "$PYTHON" - "$out" "$*" <<'EOF'
import json, platform, subprocess, sys, datetime, pathlib
out, command = pathlib.Path(sys.argv[1]), sys.argv[2]
import torch
meta = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
try:
    import triton
    meta["triton"] = triton.__version__
except ImportError:
    meta["triton"] = None
import fastcl
meta["fastcl"] = fastcl.__version__
try:
    meta["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    meta["commit"] = None
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, verdict, seconds, cmd = line.split("\t", 3)
    steps.append({"step": name, "result": verdict, "seconds": int(seconds), "command": cmd})
(out / "summary.json").write_text(json.dumps({"meta": meta, "steps": steps}, indent=1))
lines = [f"# First contact: {meta['device']}, {meta['date']}", ""]
lines += [f"- {k}: `{v}`" for k, v in meta.items() if k not in ("device", "date")]
lines += ["", "| step | result | seconds | command |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['result']} | {s['seconds']} | `{s['command']}` |" for s in steps]
lines += ["", "Logs: `<step>.log`; self-check table: `doctor.json`; timing: `headline.md` / `headline.json`."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

first_contact() {
    out=${FASTCL_RESULTS:-"${stem}-first-contact"}
    deadline=$(($(date +%s) + ${FASTCL_FIRST_CONTACT_BUDGET:-450}))
    echo "first-contact: results in $out; ${FASTCL_FIRST_CONTACT_BUDGET:-450} s in all, each step within its own limit"
    if [ "$dry_run" != 1 ]; then
        mkdir -p "$out" && : >"$out/steps.tsv"
    fi
    ensure_fastcl
    # 1. environment and the self-check of every loss x dtype on the Triton backend (pass/fail table; --warm
    #    times each check again without compilation: the per-process cost `auto` pays, budget 50 ms)
    run doctor 120 "$PYTHON" -m fastcl doctor --backends triton --warm --json "$out/doctor.json"
    # 2. correctness on the GPU: every gpu-marked test but the CUDA extension's (float64 comparisons,
    #    determinism, CUDA-graph capture, large-M addressing, memory); -v logs each result as it ends
    run gpu-tests 200 "$PYTHON" -m pytest -v -m gpu -p no:cacheprovider --junitxml "$out/gpu-tests.xml" tests \
        --ignore tests/test_csrc_cuda.py
    # 3. the headline timing: fused vs naive vs torch.compile, with the cuBLAS rate of the same GEMMs
    run headline 200 "$PYTHON" -m fastcl.profiler --device cuda --loss nt_xent,supcon,info_nce \
        --impl triton,naive,compile --sizes 65536 --dim 128 --dtype bf16 --repeats 10 --no-progress \
        --json "$out/headline.json" --markdown "$out/headline.md" --plot "$out/headline.png"
    # 4. with the time left: the CUDA extension (opt-in backend; compiled just in time on first use)
    run csrc-tests 150 "$PYTHON" -m pytest -v -m gpu -p no:cacheprovider --junitxml "$out/csrc-tests.xml" \
        tests/test_csrc_cuda.py
    if [ "$dry_run" != 1 ]; then
        summarize "bench/run_gpu.sh first-contact"
        echo "results: $out"
    fi
}

# The long modes: each command as it is, its output also in a log beside the results; exit status 1 when
# any failed.
failed=0
plain() {
    if [ "$dry_run" = 1 ]; then
        echo "step $*"
        return 0
    fi
    "$@" || failed=1
}

run_tests() {
    if [ "$dry_run" = 1 ]; then
        echo "step $PYTHON -m pytest -q tests | tee $stem-tests.log"
    else
        "$PYTHON" -m pytest -q tests 2>&1 | tee "$stem-tests.log" || failed=1
    fi
}

run_losses() {
    for dtype in bf16 fp32; do
        for dim in 128 512; do
            plain "$PYTHON" -m fastcl.profiler --device cuda --loss all \
                --impl triton,cuda,torch,naive,compile,pml,infcl --sizes 4096,16384,65536 --dim "$dim" \
                --dtype "$dtype" --repeats 20 --json "$stem-losses-$dtype-d$dim.json" \
                --markdown "$stem-losses-$dtype-d$dim.md" --plot "$stem-losses-$dtype-d$dim.png"
        done
    done
}

run_augment() {
    plain "$PYTHON" bench/bench_augment.py --device cuda --out "$stem-augment"
}

run_epoch() {
    plain "$PYTHON" -m fastcl.train --dataset synthetic --train-size 50000 --test-size 10 --encoder resnet18 \
        --batch-size 512 --epochs 3 --amp --compile --time-epoch --no-progress --out "$stem-epoch" --overwrite
}

case "$section" in
    first-contact) first_contact ;;
    tests) run_tests ;;
    losses) run_losses ;;
    augment) run_augment ;;
    epoch) run_epoch ;;
    all) run_tests; run_losses; run_augment; run_epoch ;;
esac
exit $failed
