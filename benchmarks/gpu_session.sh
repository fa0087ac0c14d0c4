#!/usr/bin/env bash
# One GPU window of table 5.2 (RESULTS.md, "Table 5.2 on the GPU"): each pair of PAIRS (default
# "carl+simclr") runs side by side on the one GPU, two train.py processes by
# benchmarks/gpu_cifar10.sh (200 epochs, then kNN, linear, linear-aug), under CUDA MPS where
# nvidia-cuda-mps-control exists (a daemon of this user's, quit at the end; the device's settings
# are left alone); a single name ("carp") runs alone. A window lends 15 minutes, a call at most
# 10, and the machine stays warm 30 s between calls: so the session runs detached and the next
# call collects it.
#
#   MINUTES=8 bash benchmarks/gpu_session.sh start data/cifar10 [train.py flags]   # a call
#   bash benchmarks/gpu_session.sh wait 300                              # call 2 (within 30 s)
#   PAIRS="carl+simclr" MINUTES=3 RUNS=/tmp/g EVAL_FLAGS="--train-subset 500 --test-subset 200 \
#       --linear-epochs 1" bash benchmarks/gpu_session.sh run ../shared/data/cifar10 --epochs 1 \
#       --train-subset 260 --knn-train-subset 500 --knn-test-subset 200     # CPU smoke
#
# start: unpacks data/cifar10.tgz when the folder is missing (60,000 files do not travel; one
# 20 MB archive does), starts `run` under setsid (it outlives the call), then waits as `wait`.
# wait [SECONDS, default 540]: prints progress every 20 s until the session ends or SECONDS pass,
# and copies the session log, each run's log.jsonl / eval.jsonl and nvidia-smi samples into $OUT
# (the device tool's folder that comes back) when set; it ends early when the session is gone.
# MINUTES (default 8) caps each run's training: what does not fit stops with run.pt written (the
# same command continues it on a machine that still has it). MPS=0: never start MPS.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
RUNS=${RUNS:-runs/gpu-cifar10}
LOG=$RUNS/session.log
mode=${1:?usage: $0 start|run DATA_DIR [train.py flags] | wait [SECONDS]}
shift

collect() {  # the session's results into $OUT, flat (the tool brings back 2 folders down at most)
    [ -n "${OUT:-}" ] || return 0
    cp "$LOG" "$RUNS"/smi.txt "$OUT"/ 2>/dev/null || true
    for run in "$RUNS"/*/; do
        name=$(basename "$run")
        for f in log.jsonl eval.jsonl train.out; do
            [ -f "$run$f" ] && cp "$run$f" "$OUT/$name.$f"
        done
    done
    return 0
}

case $mode in
run)
    DATA=${1:?usage: $0 run DATA_DIR [train.py flags]}
    shift
    MINUTES=${MINUTES:-8}
    echo $$ > "$RUNS/session.pid"
    mps=0
    if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
        # this user's daemon, its own folders; kept only if a CUDA client then runs under it
        export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        if nvidia-cuda-mps-control -d \
                && python -c "import torch; torch.zeros(1, device='cuda').sum().item()"; then
            mps=1 && echo "gpu-session: CUDA MPS on"
        else
            echo quit | nvidia-cuda-mps-control || true
            unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
            echo "gpu-session: CUDA MPS would not serve a client; without it"
        fi
    fi
    for pair in ${PAIRS:-carl+simclr}; do
        pids=()
        for method in ${pair//+/ }; do
            mkdir -p "$RUNS/$method"
            METHOD=$method MINUTES=$MINUTES bash benchmarks/gpu_cifar10.sh "$DATA" "$@" \
                > "$RUNS/$method/train.out" 2>&1 &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || echo "gpu-session: a run of $pair failed"; done
        echo "gpu-session: $pair done"
    done
    [ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control
    echo "gpu-session: all done"
    ;;
start)
    DATA=${1:?usage: $0 start DATA_DIR [train.py flags]}
    [ -d "$DATA" ] || [ ! -f "$DATA.tgz" ] || tar -C "$(dirname "$DATA")" -xzf "$DATA.tgz"
    mkdir -p "$RUNS"
    rm -f "$RUNS/session.pid"
    setsid nohup bash "$SELF" run "$@" > "$LOG" 2>&1 < /dev/null &
    exec bash "$SELF" wait 540
    ;;
wait)
    seconds=${1:-540}
    t0=$(date +%s)
    alive() {  # the session runs (or has not yet written its pid)
        [ ! -f "$RUNS/session.pid" ] && [ $(($(date +%s) - t0)) -lt 10 ] && return 0
        [ -f "$RUNS/session.pid" ] && kill -0 "$(cat "$RUNS/session.pid")" 2> /dev/null
    }
    while alive && ! grep -qs "gpu-session: all done" "$LOG" \
            && [ $(($(date +%s) - t0)) -lt "$seconds" ]; do
        sleep 20
        if command -v nvidia-smi > /dev/null; then
            nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader \
                >> "$RUNS/smi.txt" || true
        fi
        for out in "$RUNS"/*/train.out; do  # each run's latest line
            [ -f "$out" ] && echo "$(basename "$(dirname "$out")"): $(tail -n 1 "$out")"
        done
        collect
    done
    grep -h "^knn\|^trained\|^done\|gpu-session" "$LOG" "$RUNS"/*/train.out 2>/dev/null || true
    collect
    ;;
*)
    echo "usage: $0 start|run DATA_DIR [train.py flags] | wait [SECONDS]" >&2
    exit 2
    ;;
esac
