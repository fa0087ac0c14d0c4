#!/usr/bin/env bash
# One device session of the GPU plan (RESULTS.md, "GPU scenario"): table 5.2's protocol run by
# benchmarks/gpu_cifar10.sh for each method in turn (train 200 epochs, then kNN, linear and
# linear-aug), in order of priority, within this call's MINUTES (default 9: a device call may
# last 10). What does not fit stops with its run.pt written; the same command in the next call
# continues where this one stopped, and a run already evaluated is skipped. Then, if time is
# left, the throughput of each method.
#
#   MINUTES=9 bash benchmarks/gpu_session.sh data/cifar10   # on the device: data/ carried along
#   MINUTES=3 METHODS="carl simclr" RUNS=/tmp/g EVAL_FLAGS="--train-subset 500 --test-subset 200 \
#       --linear-epochs 1" bash benchmarks/gpu_session.sh ../shared/data/cifar10 --epochs 1 \
#       --train-subset 512                                  # the CPU smoke run of the same script
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: $0 DATA_DIR [train.py flags]}
shift
MINUTES=${MINUTES:-9}
METHODS=${METHODS:-"carl carp simclr swav carp-neurips23"}
end=$(python -c "import time; print(time.time() + 60 * $MINUTES)")
left() { python -c "import time; print(round(($end - time.time()) / 60, 2))"; }

for method in $METHODS; do
    minutes=$(left)
    if python -c "import sys; sys.exit(float('$minutes') >= 1)"; then
        echo "gpu-session: $(left) min left; stopping before $method (the same command continues)"
        exit 0
    fi
    # training stops itself at $minutes (run.pt written); the evaluation after it is cut at the
    # same time
    METHOD=$method MINUTES=$minutes \
        timeout --kill-after=20 "$(python -c "print($minutes + 0.5)")m" \
        bash benchmarks/gpu_cifar10.sh "$DATA" "$@" \
        || echo "gpu-session: $method cut at the time limit"
done
for method in "carl --num-prototypes 100" carp simclr byol "swav --num-prototypes 100" mocov2; do
    # views/s of each method's step and of train.py's loop, compiled, and the GPU memory it
    # holds (row 5)
    seconds=$(python -c "print(int(60 * min(1.5, $(left))))")
    [ "$seconds" -ge 30 ] || break
    # shellcheck disable=SC2086
    timeout "$seconds" python benchmarks/throughput.py --dataset imagefolder --data-dir "$DATA" \
        --image-size 32 --batch-size 256 --steps 30 --loaders device --method $method || true
done
