#!/usr/bin/env bash
# GPU scenario (thesis table 5.2 protocol): ResNet-18 (CIFAR stem), the full CIFAR-10 train split,
# batch 256, 200 epochs, the thesis defaults for METHOD, train.py's kNN monitor every 50 epochs
# (train split as the bank, test split as queries); then kNN, the fast linear probe and the
# thesis's linear protocol (linear-aug) with evaluate.py.
#
#   bash benchmarks/gpu_cifar10.sh ../shared/data/cifar10                    # CARL
#   METHOD=carp MINUTES=8 bash benchmarks/gpu_cifar10.sh ../shared/data/cifar10
#
# METHOD: carl, carp, simclr, byol, swav, mocov2, or carp-neurips23 / carl-neurips23
# (the published recipe).
# EVAL_FLAGS go to evaluate.py (a CPU smoke run: EVAL_FLAGS="--train-subset 500 --test-subset 200
# --linear-epochs 1" with train.py flags "--epochs 1 --train-subset 512").
#
# Flags after the data folder go to train.py (speed flags such as --no-compile, which may differ
# between the calls of one run). run.pt is written every 10 epochs (an epoch takes seconds) or
# 3 minutes, at the end, and when stopped.
# MINUTES (default 0: no limit) caps this call's training (reading the data and compiling, ~1.1
# min on an H200, included): train.py then gets SIGTERM, writes run.pt at the step it reached, and
# the same command continues from there; with EVAL_STOPPED=1 the run as it stands is then
# evaluated too (where it cannot continue: a device window's end). The evaluation (~3.5 min on an
# H200: decoding and kNN 52 s, linear-aug 149 s) is not in MINUTES. A rerun evaluates only the
# protocols eval.jsonl lacks for run.pt as it is (an evaluation cut short goes on). RUNS (default
# runs/gpu-cifar10). The views are made on the GPU (--loader device, the default for CIFAR).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: $0 DATA_DIR [train.py flags]}
shift
METHOD=${METHOD:-carl}
MINUTES=${MINUTES:-0}
RUN=${RUNS:-runs/gpu-cifar10}/$METHOD
if [ -d "$DATA/train" ]; then SRC=(--dataset imagefolder --data-dir "$DATA" --image-size 32)
else SRC=(--dataset cifar10 --data-dir "$DATA" --download); fi
case $METHOD in  # an ImageFolder tree would otherwise take the ImageNet K (3000) for CARL and SwAV
    carl|swav) FLAGS=(--method "$METHOD" --num-prototypes 100) ;;
    carp|simclr|byol|mocov2) FLAGS=(--method "$METHOD") ;;
    carl-neurips23) FLAGS=(--method carl --num-prototypes 100 --recipe neurips23) ;;
    carp-neurips23) FLAGS=(--method carp --recipe neurips23) ;;
    *) echo "METHOD must be carl, carp, simclr, byol, swav, mocov2, carl-neurips23 or" \
            "carp-neurips23" >&2; exit 2 ;;
esac

status=0
timeout --preserve-status --signal=TERM --kill-after=120 "${MINUTES}m" \
    python train.py "${FLAGS[@]}" "${SRC[@]}" --batch-size 256 --epochs 200 --knn-every 50 \
    --ckpt-every-epochs 10 --ckpt-every-min 3 \
    --out-dir "$RUN" "$@" \
    || status=$?
if [ "$status" -eq 143 ]; then
    if [ "${EVAL_STOPPED:-0}" != 1 ] || [ ! -f "$RUN/run.pt" ]; then
        echo "gpu-cifar10 $METHOD: stopped after $MINUTES min; run the same command to continue"
        exit 0
    fi
    echo "gpu-cifar10 $METHOD: stopped after $MINUTES min; evaluating run.pt as it stands"
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
# the protocols with no record in eval.jsonl at run.pt's epoch
missing=$(python -c '
import os, sys
import evaluate, train
epoch = evaluate.load_weights(os.path.join(sys.argv[1], "run.pt"))[2]
done = {r["protocol"] for r in train.read_log(os.path.join(sys.argv[1], "eval.jsonl"))
        if r.get("ckpt_epoch") == epoch and not r.get("random_init")}
print(" ".join(p for p in ("knn", "linear", "linear-aug") if p not in done))' "$RUN")
if [ -z "$missing" ]; then
    echo "gpu-cifar10 $METHOD: done and evaluated; results in $RUN/eval.jsonl"
    exit 0
fi
# shellcheck disable=SC2086
python evaluate.py --ckpt "$RUN/run.pt" --protocol $missing "${SRC[@]}" ${EVAL_FLAGS:-}
echo "gpu-cifar10 $METHOD: evaluated ($missing); kNN curve in $RUN/log.jsonl, probes in" \
    "$RUN/eval.jsonl"
