#!/usr/bin/env bash
# CPU comparison (RESULTS.md, "CPU comparison"): ResNet-18 (CIFAR stem) pretrained by each method
# on the same fixed class-balanced 5,000-image subset of the CIFAR-10 train split, one after the
# other on one machine, each for the same wall time of training. Three metrics, since one can
# mislead: train.py's kNN monitor (k=200, T=0.07) before training (random init) and at the end,
# those 5,000 images as the bank and a fixed class-balanced 2,000-image subset of the test split
# as queries; the online linear probe trained beside each run (--online-probe), on the same
# queries; and evaluate.py's linear probe (the fast one: 100 epochs on the frozen features of the
# 5,000 images, tested on the 2,000), of the run and of the random init. Prints one table.
#
#   # ImageFolder tree (train/, test/)
#   bash benchmarks/cpu_cifar10.sh ../shared/data/cifar10
#   # torchvision CIFAR-10 (downloads)
#   RUNS="simclr carl" MINUTES=5 bash benchmarks/cpu_cifar10.sh data
#
# Equal wall time: first each run's training speed is measured (20 steps on 1,280 images, the
# first left out) and its epochs set to the whole number nearest what MINUTES (default 6) of
# training hold at that speed, so every cosine schedule ends where its run does; the speeds and
# epochs are kept in $OUT/epochs.tsv, so a stopped benchmark run again continues each training
# from its run.pt with the same epochs.
# Every run: batch 64 (the lr scaled linearly from its per-256 value: at ~50 images/s a batch of 256
# gives ~20 steps an epoch), the method's thesis/paper settings otherwise; RESULTS.md lists every
# setting that differs and why. OUT (default runs/cpu-cifar10), RUNS (default: all, in the order
# below).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: $0 DATA_DIR}
MINUTES=${MINUTES:-6}
OUT=${OUT:-runs/cpu-cifar10}
if [ -d "$DATA/train" ]; then SRC=(--dataset imagefolder --data-dir "$DATA" --image-size 32)
else SRC=(--dataset cifar10 --data-dir "$DATA" --download); fi
COMMON=(--train-subset 5000 --batch-size 64 --log-every 20 --knn-train-subset 5000
        --knn-test-subset 2000 --online-probe)
PROBE=(--protocol linear --train-subset 5000 --test-subset 2000 "${SRC[@]}")

# The CPU recipes of CARL and CARP (RESULTS.md, "Why these hyper-parameters"): LARS, prototypes
# started larger, lambda near 1, CARP with CARL's views and blocks sized to the batch.
# "@F": F times the run's epochs (lambda's decay keeps its share of the run).
CARL_CPU=(--method carl --optimizer lars --lr 4.8 --weight-decay 1e-6 --final-lr-ratio 1e-3
          --num-prototypes 100 --proto-init-gain 5 --lam-start 1.5 --lam-end 1 --lam-epochs @1)
CARP_CPU=(--method carp --views carl --optimizer lars --lr 5.4 --weight-decay 1e-6
          --final-lr-ratio 1e-3 --num-prototypes 500 --block-size 50 --proto-init-gain 3
          --lam-start 0.75 --lam-end 0.5 --lam-epochs @1)
MULTICROP=(--local-crops 6 --local-size 16)
declare -A FLAGS=(
    [simclr]="--method simclr"
    [simclr-lr4x]="--method simclr --lr 0.12"
    [byol]="--method byol --views carl"
    [swav]="--method swav --num-prototypes 100"
    [mocov2]="--method mocov2"
    [carl-thesis]="--method carl --num-prototypes 100 --lam-epochs @0.5"
    [carl]="${CARL_CPU[*]}"
    [carp]="${CARP_CPU[*]}"
    [carl-teacher]="${CARL_CPU[*]} --teacher ema"
    [carp-teacher]="${CARP_CPU[*]} --teacher ema"
    [carl-multicrop]="${CARL_CPU[*]} ${MULTICROP[*]}"
    [carp-multicrop]="${CARP_CPU[*]} ${MULTICROP[*]}"
    [carl-teacher-multicrop]="${CARL_CPU[*]} --teacher ema ${MULTICROP[*]}"
    [carp-teacher-multicrop]="${CARP_CPU[*]} --teacher ema ${MULTICROP[*]}"
    [carp-recipe]="--method carp --recipe neurips23"
)
# carl-thesis (the thesis's settings at batch 64), simclr-lr4x (SimCLR's lr x4) and carp-recipe
# (the published CARP, --recipe neurips23, untouched) run only when named in RUNS
RUNS=${RUNS:-"simclr carl carp byol swav mocov2 carl-teacher carp-teacher carl-multicrop
               carp-multicrop carl-teacher-multicrop carp-teacher-multicrop"}
mkdir -p "$OUT"
touch "$OUT/epochs.tsv"

flags_for() {  # run name, its epochs -> its train.py flags, each "@F" resolved
    local f out=()
    for f in ${FLAGS[$1]}; do
        [[ $f == @* ]] && f=$(python -c "print(round(${f#@} * $2, 3))")
        out+=("$f")
    done
    echo "${out[@]}"
}

# 1. each run's speed, and the epochs MINUTES hold (kept: a rerun continues alike)
for name in $RUNS; do
    [ -n "${FLAGS[$name]:-}" ] || { echo "unknown run $name" >&2; exit 2; }
    grep -q "^$name	" "$OUT/epochs.tsv" && continue
    rm -rf "$OUT/speed-$name"
    # shellcheck disable=SC2046
    python train.py $(flags_for "$name" 1) "${SRC[@]}" --train-subset 1280 --batch-size 64 \
        --epochs 1 --log-every 19 --knn-every 0 --out-dir "$OUT/speed-$name" \
        > "$OUT/speed-$name.out" 2>&1
    python - "$OUT" "$name" "$MINUTES" <<'PY'
import json, sys
out, name, minutes = sys.argv[1], sys.argv[2], float(sys.argv[3])
steps = [json.loads(l) for l in open(f"{out}/speed-{name}/log.jsonl") if '"loss"' in l]
rate = steps[-1]["img_per_s"]  # images/s over steps 1-19 (the first step left out)
# nearest whole epoch: the table prints the minutes it took
epochs = max(1, round(minutes * 60 * rate / 5000))
open(f"{out}/epochs.tsv", "a").write(f"{name}\t{epochs}\t{rate}\n")
print(f"{name}: {rate:.1f} images/s -> {epochs} epochs in {minutes:g} min")
PY
    rm -rf "$OUT/speed-$name"
done

# 2. the trainings, one after the other; the same command continues a stopped one
for name in $RUNS; do
    epochs=$(awk -F'\t' -v n="$name" '$1 == n {print $2}' "$OUT/epochs.tsv")
    mkdir -p "$OUT/$name"
    # shellcheck disable=SC2046
    python train.py $(flags_for "$name" "$epochs") "${SRC[@]}" "${COMMON[@]}" --epochs "$epochs" \
        --knn-every "$epochs" --out-dir "$OUT/$name" >> "$OUT/$name/train.out" 2>&1
done

first=1
# 3. the linear probe of each run (and, once, of the random init); kept in eval.jsonl
for name in $RUNS; do
    random=(); [ "$first" = 1 ] && random=(--random-init)
    # done when its probe is logged (the first run's: with the random init's beside it)
    want='"protocol": "linear"'; [ "$first" = 1 ] && want='"random_init": true'
    grep -qs "$want" "$OUT/$name/eval.jsonl" && { first=0; continue; }
    python evaluate.py --ckpt "$OUT/$name/run.pt" "${PROBE[@]}" "${random[@]}" \
        >> "$OUT/$name/eval.out" 2>&1
    first=0
done

python - "$OUT" $RUNS <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
speed = {l.split("\t")[0]: l.split("\t") for l in open(f"{out}/epochs.tsv")}
rows = {name: [json.loads(l) for l in open(f"{out}/{name}/eval.jsonl")] for name in names}
linear = {name: [r for r in recs if r["protocol"] == "linear"] for name, recs in rows.items()}
init = next(r["top1"] for recs in linear.values() for r in recs if r["random_init"])
print(f"{'run':24s} {'img/s':>6s} {'epochs':>6s} {'train min':>9s} {'kNN init':>8s} "
      f"{'kNN end':>7s} {'gain':>6s} {'online':>6s} {'lin init':>8s} {'lin end':>7s} {'gain':>6s}")
for name in names:
    log = [json.loads(l) for l in open(f"{out}/{name}/log.jsonl")]
    knn, steps = [r for r in log if "knn_top1" in r], [r for r in log if "loss" in r]
    # each continued session's clock starts at 0: add up the last time of every session
    minutes = sum(a["time"] for a, b in zip(steps, steps[1:] + [{"time": 0}])
                  if b["time"] < a["time"]) / 60
    end = [r for r in linear[name] if not r["random_init"]][-1]["top1"]
    online = knn[-1].get("probe_top1", float("nan"))
    print(f"{name:24s} {float(speed[name][2]):6.1f} {steps[-1]['epoch'] + 1:6d} {minutes:9.1f} "
          f"{knn[0]['knn_top1']:8.2f} {knn[-1]['knn_top1']:7.2f} "
          f"{knn[-1]['knn_top1'] - knn[0]['knn_top1']:+6.2f} "
          f"{online:6.2f} {init:8.2f} {end:7.2f} {end - init:+6.2f}")
PY
