#!/usr/bin/env bash
# GPU scenario (thesis table 5.2 protocol): ResNet-18 (CIFAR stem), full CIFAR-10, batch 256,
# 200 epochs, then the linear probe. Runs in pieces: each call trains PIECE more epochs (resuming
# from run.pt), then records kNN (k=200) on the full train/test splits in eval.jsonl, so the kNN
# curve and images/s (log.jsonl) build up call by call. After epoch 200 it runs the linear probe.
#
#   METHOD=carl bash benchmarks/gpu_cifar10.sh ../shared/data/cifar10    # repeat until it says done
#
# METHOD (carl|carp, default carl), PIECE (epochs per call, default 10), OUT (default runs/gpu-cifar10).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: $0 DATA_DIR}
METHOD=${METHOD:-carl}
PIECE=${PIECE:-10}
OUT=${OUT:-runs/gpu-cifar10}/$METHOD
EPOCHS=200
if [ -d "$DATA/train" ]; then SRC=(--dataset imagefolder --data-dir "$DATA" --image-size 32)
else SRC=(--dataset cifar10 --data-dir "$DATA" --download); fi
# Thesis settings; ImageFolder would otherwise take the ImageNet defaults (K=3000 for CARL).
case $METHOD in
    carl) FLAGS=(--method carl --num-prototypes 100) ;;
    carp) FLAGS=(--method carp) ;;
    *) echo "METHOD must be carl or carp" >&2; exit 2 ;;
esac

done_epochs=0
[ -f "$OUT/run.pt" ] && done_epochs=$(python -c "import torch,sys; print(torch.load(sys.argv[1], weights_only=True)['epoch'])" "$OUT/run.pt")
if [ "$done_epochs" -lt "$EPOCHS" ]; then
    next=$(( done_epochs + PIECE < EPOCHS ? done_epochs + PIECE : EPOCHS ))
    resume=(); [ -f "$OUT/run.pt" ] && resume=(--resume "$OUT/run.pt")
    python train.py "${FLAGS[@]}" "${SRC[@]}" --batch-size 256 --epochs $EPOCHS --until-epoch $next \
        --workers 8 --out-dir "$OUT" "${resume[@]}"
    python evaluate.py --ckpt "$OUT/run.pt" --protocol knn --knn-k 200 "${SRC[@]}"
    echo "gpu-cifar10 $METHOD: epoch $next of $EPOCHS; run again to continue"
else
    python evaluate.py --ckpt "$OUT/run.pt" --protocol knn linear "${SRC[@]}"
    echo "gpu-cifar10 $METHOD: done; results in $OUT/eval.jsonl"
fi
