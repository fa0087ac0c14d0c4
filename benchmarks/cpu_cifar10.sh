#!/usr/bin/env bash
# CPU sanity scenario (RESULTS.md): ResNet-18 (CIFAR stem) pretrained with CARL and with CARP
# on a fixed class-balanced 5,000-image subset of the CIFAR-10 train split, one after the other,
# each with the whole (2-core) machine for ~25 min (with bf16). train.py's kNN monitor (k=200,
# T=0.07) scores the backbone before training (random init), every 7 epochs and at the end, with
# those 5,000 images as the bank and a fixed class-balanced 2,000-image subset of the test split
# as queries. Prints one result line per method.
#
#   bash benchmarks/cpu_cifar10.sh ../shared/data/cifar10      # ImageFolder tree (train/, test/)
#   bash benchmarks/cpu_cifar10.sh data                        # torchvision CIFAR-10 (downloads)
#
# Resumable: run it again after a stop and each training continues from its run.pt.
# EPOCHS (default 14: ~25 min each with the bf16 autocast train.py uses on CPUs with native
# bf16; without it, about 8 on a fast CPU and 4 on a slow one) and OUT (default
# runs/cpu-cifar10) may be set. Why these hyper-parameters: RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: $0 DATA_DIR}
EPOCHS=${EPOCHS:-14}
OUT=${OUT:-runs/cpu-cifar10}
if [ -d "$DATA/train" ]; then SRC=(--dataset imagefolder --data-dir "$DATA" --image-size 32)
else SRC=(--dataset cifar10 --data-dir "$DATA" --download); fi
COMMON=(--train-subset 5000 --batch-size 64 --epochs "$EPOCHS" --optimizer lars --weight-decay 1e-6
        --final-lr-ratio 1e-3 --log-every 20 --knn-every 7 --knn-train-subset 5000 --knn-test-subset 2000)

pretrain() {  # name, then method flags; the same command continues an interrupted run
    mkdir -p "$OUT/$1"
    python train.py "${@:2}" "${SRC[@]}" "${COMMON[@]}" --out-dir "$OUT/$1" >> "$OUT/$1/train.out" 2>&1
}
pretrain carl --method carl --lr 4.8 --num-prototypes 100 --proto-init-gain 5 \
    --lam-start 1.5 --lam-end 1 --lam-epochs "$EPOCHS"
pretrain carp --method carp --views carl --lr 5.4 --num-prototypes 500 --block-size 50 --proto-init-gain 3 \
    --lam-start 0.75 --lam-end 0.5 --lam-epochs "$EPOCHS"

python - "$OUT" <<'PY'
import json, sys
for m in ("carl", "carp"):
    log = [json.loads(l) for l in open(f"{sys.argv[1]}/{m}/log.jsonl")]
    knn, steps = [r for r in log if "knn_top1" in r], [r for r in log if "loss" in r]
    # each continued session's clock starts at 0: add up the last time of every session
    minutes = sum(a["time"] for a, b in zip(steps, steps[1:] + [{"time": 0}]) if b["time"] < a["time"]) / 60
    curve = ", ".join(f"ep {r['epoch']} {r['knn_top1']:.2f}" for r in knn)
    print(f"cpu-cifar10 {m}: kNN k=200 top-1 {knn[-1]['knn_top1']:.2f}, random-init {knn[0]['knn_top1']:.2f} "
          f"({curve}); {steps[-1]['epoch'] + 1} epochs, {minutes:.1f} min, "
          f"{sum(r['seconds'] for r in knn) / len(knn):.0f} s per kNN evaluation, "
          f"min prototypes in use {min(r['in_use'] for r in steps)}")
PY
