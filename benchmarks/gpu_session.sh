#!/usr/bin/env bash
# One GPU window of table 5.2 (RESULTS.md, "Table 5.2 on the GPU"): each pair of PAIRS (default
# "carl+simclr") runs side by side on the one GPU, two train.py processes by
# benchmarks/gpu_cifar10.sh (200 epochs, then kNN, linear, linear-aug), under CUDA MPS where
# nvidia-cuda-mps-control exists (a daemon of this user's, quit at the end; the device's settings
# are left alone); a single name ("carp") runs alone. A window lends 15 minutes, a call at most
# 10, and the machine stays warm 30 s between calls: so the session runs detached and the next
# call collects it.
#
#   bash benchmarks/gpu_session.sh start 540 data/cifar10 [train.py flags]   # call 1: 9 min
#   bash benchmarks/gpu_session.sh wait 300                                # call 2 (within 30 s)
#   PAIRS="carl+simclr" MINUTES=3 RUNS=/tmp/g EVAL_FLAGS="--train-subset 500 --test-subset 200 \
#       --linear-epochs 1" bash benchmarks/gpu_session.sh run ../shared/data/cifar10 --epochs 1 \
#       --train-subset 260 --knn-train-subset 500 --knn-test-subset 200     # CPU smoke
#
# The window's 15 minutes (gpu_probe.py, ~8, takes a window of its own): machine start and the
# 20 MB transfer ~0.5; call 1 9 (MINUTES=8.5 of each run's training, the first ~1.1 of them
# reading the JPEGs and compiling, then the evaluation starts); call 2 up to 5: the evaluation,
# ~3.5 min for one run on an H200, ~4.5 guessed for two side by side. 0.5 + 9 + 5 = 14.5. 200
# epochs fit in 7.4 min of training at 90,000 views/s for a pair (40M views), 45,000 for one.
#
# start [SECONDS, default 540] DATA: unpacks DATA.tgz when the folder is missing (60,000 files do
# not travel; one 20 MB archive does), starts `run` under setsid (it outlives the call), then
# waits as `wait SECONDS`; it refuses while a session of $RUNS runs. wait [SECONDS, default 540]:
# prints progress every 20 s until the session ends or SECONDS pass, and copies session.log and
# session.tgz (session.log, nvidia-smi samples, each run's log.jsonl, eval.jsonl and train.out)
# into $OUT (the device tool's folder that comes back) when set. session.log and train.out
# are appended to, each session after a "gpu-session: started" line.
# MINUTES (default 8.5) caps each run's training: what does not fit stops with run.pt written
# (the same command continues it on a machine that still has it) and, as EVAL_STOPPED (default 1
# here) asks, is evaluated as it stands. MPS=0: never start MPS.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
RUNS=${RUNS:-runs/gpu-cifar10}
LOG=$RUNS/session.log
USAGE="usage: $0 start [SECONDS] DATA_DIR [train.py flags] | run DATA_DIR [...] | wait [SECONDS]"
mode=${1:?$USAGE}
shift
mkdir -p "$RUNS"

collect() {  # into $OUT: one archive (the device tool brings back 8 files at most), the log to read
    [ -n "${OUT:-}" ] || return 0
    cp "$LOG" "$OUT"/ 2>/dev/null || true
    local out files=() f
    out=$(cd "$OUT" && pwd)
    for f in "$LOG" "$RUNS"/smi.txt "$RUNS"/*/log.jsonl "$RUNS"/*/eval.jsonl "$RUNS"/*/train.out; do
        [ -f "$f" ] && files+=("${f#"$RUNS"/}")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    # tar's status 1: a file grew while it was read (the archive is whole)
    if tar -C "$RUNS" -czf "$out/session.tgz.part" "${files[@]}" || [ $? -eq 1 ]; then
        mv "$out/session.tgz.part" "$out/session.tgz"
    fi
    return 0
}

latest() {  # each file's lines since its last "gpu-session: started" (this session's)
    local f
    for f in "$@"; do
        [ -f "$f" ] && awk '/^gpu-session: started/ {s = ""} {s = s $0 "\n"}
                            END {printf "%s", s}' "$f"
    done
    return 0
}

if [ "$mode" = start ] || [ "$mode" = run ]; then  # one session at a time on one run.pt
    if [ -f "$RUNS/session.pid" ] && kill -0 "$(cat "$RUNS/session.pid")" 2> /dev/null; then
        echo "error: a session (pid $(cat "$RUNS/session.pid")) still runs on $RUNS; \`$0 wait\`" \
            "for it" >&2
        exit 1
    fi
fi

case $mode in
run)
    DATA=${1:?usage: $0 run DATA_DIR [train.py flags]}
    shift
    MINUTES=${MINUTES:-8.5}
    export EVAL_STOPPED=${EVAL_STOPPED:-1}  # a window's machine does not come back to continue
    echo $$ > "$RUNS/session.pid"
    echo "gpu-session: started $(date -u +%FT%TZ), MINUTES=$MINUTES, PAIRS=${PAIRS:-carl+simclr}"
    mps=0
    if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
        # this user's daemon, its own folders; kept only if a CUDA client then runs under it
        export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        if nvidia-cuda-mps-control -d && timeout 60 \
                python -c "import torch; torch.zeros(1, device='cuda').sum().item()"; then
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
            echo "gpu-session: started $(date -u +%FT%TZ)" >> "$RUNS/$method/train.out"
            METHOD=$method MINUTES=$MINUTES bash benchmarks/gpu_cifar10.sh "$DATA" "$@" \
                >> "$RUNS/$method/train.out" 2>&1 &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || echo "gpu-session: a run of $pair failed"; done
        echo "gpu-session: $pair done"
    done
    [ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control
    echo "gpu-session: all done"
    ;;
start)
    seconds=540
    if [[ ${1:-} =~ ^[0-9]+$ ]]; then seconds=$1 && shift; fi
    DATA=${1:?$USAGE}
    [ -d "$DATA" ] || [ ! -f "$DATA.tgz" ] || tar -C "$(dirname "$DATA")" -xzf "$DATA.tgz"
    rm -f "$RUNS/session.pid"
    setsid nohup bash "$SELF" run "$@" >> "$LOG" 2>&1 < /dev/null &
    exec bash "$SELF" wait "$seconds"
    ;;
wait)
    seconds=${1:-540}
    t0=$(date +%s)
    alive() {  # the session runs (or has not yet written its pid)
        [ ! -f "$RUNS/session.pid" ] && [ $(($(date +%s) - t0)) -lt 10 ] && return 0
        [ -f "$RUNS/session.pid" ] && kill -0 "$(cat "$RUNS/session.pid")" 2> /dev/null
    }
    while alive && [ $(($(date +%s) - t0)) -lt "$seconds" ]; do
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
    latest "$LOG" "$RUNS"/*/train.out \
        | grep "^knn\|^trained\|^done\|^stopped by\|^gpu-cifar10 \|gpu-session" || true
    collect
    ;;
*)
    echo "$USAGE" >&2
    exit 2
    ;;
esac
