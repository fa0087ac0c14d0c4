"""The first call of a GPU window (RESULTS.md, "Table 5.2 on the GPU"): one table to choose how
the window's 200-epoch runs go. For one method (CARL by default) at batch 256, 32 px, bf16:

  bare step      forward + backward + optimizer on random views: eager, compiled, and compiled
                 with CUDA graphs (--compile-mode reduce-overhead); views/s, the compile's seconds,
                 peak GPU memory, and the share of the step's wall time the GPU was busy
                 (torch.profiler: its kernels' summed time over a few steps)
  train.py loop  train.main on the built-in synthetic data at 32 px (views made on the device)
                 with the method's CIFAR-10 settings (K, blocks, optimizer), each of the three ways
  two at once    two train.py processes side by side on the one GPU, without and with CUDA MPS
                 (when nvidia-cuda-mps-control exists; a daemon of this user's, quit after), in
                 --compile-mode (the session's): each process's views/s over --two-epochs, their
                 sum, and one process alone in that mode (the train.py loop row) beside them
  syncs          torch.cuda.set_sync_debug_mode("warn") over 3 eager steps of every method: the
                 host-device synchronisations counted (none should be left but .item() on log
                 steps, which the bare step does not make)

    python benchmarks/gpu_probe.py | tee "$OUT/probe.txt"   # on the GPU: ~8 minutes
    python benchmarks/gpu_probe.py --steps 3 --loop-epochs 1 --batch-size 32 --image-size 16 \\
        --parts bare loop                               # CPU smoke (eager only there)

(tee: the device tool returns only the output's last 12,000 characters.) They run in the order
two at once (before this process holds the GPU), loop, bare, syncs, within --minutes: what is
left out, or fails, is named in one line and the rest goes on; Ctrl-C or SIGTERM stops it. Prints
each measurement as it comes, then the table (views/s, the ratio to the eager train.py loop) and
one JSON line.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import methods  # noqa: E402
import train  # noqa: E402
from throughput import bare_setup, log_rate, sync, timed  # noqa: E402

MODES = (("eager", False, "default"), ("compiled", True, "default"),
         ("cuda graphs", True, "reduce-overhead"))


def bare(args, device, steps, profile):
    """(views/s, compile s, peak GiB, GPU busy share or None) of the bare step built from args."""
    torch._dynamo.reset()  # every mode compiles anew: runs in one process share the cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, _ = bare_setup(args, device, args.amp, args.compile)
    t0 = time.perf_counter()
    step()
    sync(device)
    compile_s = time.perf_counter() - t0 if args.compile else 0.0
    views = (args.global_crops + args.local_crops) * args.batch_size  # per step
    rate = views / timed(step, steps, device, warmup=2)
    busy = None
    if profile and device.type == "cuda":
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        try:
            with torch.profiler.profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for _ in range(5):
                    step()
                sync(device)
                wall = time.perf_counter() - t0
            kernels = sum(e.self_device_time_total for e in prof.key_averages()
                          if e.device_type == torch.autograd.DeviceType.CUDA)  # microseconds
            busy = kernels / 1e6 / wall
        except Exception as e:  # the profiler is a nicety: the rates stand without it
            print(f"gpu-probe: no GPU busy share ({type(e).__name__}: {e})", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    return rate, compile_s, peak, busy


def loop_flags(opts, method_flags, epochs, out):
    return [*method_flags, "--dataset", "synthetic", "--image-size", str(opts.image_size),
            "--batch-size", str(opts.batch_size), "--epochs", str(epochs),
            "--knn-every", "0", "--log-every", "7", "--ckpt-every-min", "1e9",
            "--ckpt-every-epochs", str(epochs + 1), "--out-dir", out]


def loop(opts, method_flags, mode_flags, views_per_step):
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train.main([*loop_flags(opts, method_flags, opts.loop_epochs, out), *mode_flags])
        return log_rate(out, views_per_step)[0], time.perf_counter() - t0


def two_at_once(opts, method_flags, mode_flags, views_per_step, mps, end):
    """[(views/s, first, last log time)] of each of two train.py processes started together
    (under MPS if asked); both stopped when one fails or at time.time() `end`."""
    env = dict(os.environ)
    if mps:
        env.update(CUDA_MPS_PIPE_DIRECTORY=tempfile.mkdtemp(),
                   CUDA_MPS_LOG_DIRECTORY=tempfile.mkdtemp())
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True)
    outs = [tempfile.mkdtemp() for _ in range(2)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    try:
        for out in outs:  # their output into files: a full pipe would stall a process
            with open(os.path.join(out, "stderr"), "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(root, "train.py"),
                     *loop_flags(opts, method_flags, opts.two_epochs, out), *mode_flags],
                    env=env, stdout=subprocess.DEVNULL, stderr=err))
        while True:
            codes = [p.poll() for p in procs]  # None while running
            for code, out in zip(codes, outs):
                if code:
                    lines = open(os.path.join(out, "stderr")).read().strip().splitlines()
                    raise RuntimeError(lines[-1] if lines else f"exit status {code}")
            if None not in codes:
                break
            if time.time() > end:
                raise RuntimeError("out of --minutes before both runs ended")
            time.sleep(1)
        return [log_rate(out, views_per_step) for out in outs]
    finally:
        for p in procs:  # one failed, out of time, or Ctrl-C: none left holding the GPU
            if p.poll() is None:
                p.kill()
                p.wait()
        if mps:
            subprocess.run(["nvidia-cuda-mps-control"], input="quit", text=True, env=env)
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)


def syncs(device, opts):
    """{method: host-device synchronisations in 3 eager steps (after one to warm up)}."""
    counts = {}
    for method in train.METHODS:
        args = train.parse_args(["--method", method, "--dataset", "cifar10", "--batch-size",
                                 str(opts.batch_size), "--no-compile"])
        args.epochs = 1  # schedules of a few steps only
        run = train.build_run(args, device, 1, steps_per_epoch=10)
        x = [torch.randn(args.batch_size, 3, 32, 32, device=device) for _ in range(2)]
        now = {name: float(values[0]) for name, values in run.schedules.items()}
        train.train_step(run, x, now, 0)
        sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for step in range(1, 4):
                    train.train_step(run, x, now, step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[method] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="carl",
                   help="train.py's --method; flags not named here go to train.py as they are")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="timed bare steps per mode")
    p.add_argument("--loop-epochs", type=int, default=20, help="of synthetic's 2,000 images")
    p.add_argument("--two-epochs", type=int, default=200,
                   help="each two-at-once run's (7 steps each at batch 256: 1,400 steps, ~30 s "
                        "at the ~24,000 views/s each of two on an H100)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   choices=[mode for _, compile_, mode in MODES if compile_],
                   help="the two-at-once runs' (the session's --compile-mode)")
    p.add_argument("--parts", nargs="+", default=["bare", "loop", "two", "syncs"],
                   choices=["bare", "loop", "two", "syncs"])
    p.add_argument("--minutes", type=float, default=8.5,
                   help="the whole probe's budget (a device call lasts 10 at most)")
    opts, extra = p.parse_known_args()
    end = time.time() + 60 * opts.minutes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    modes = MODES if cuda else MODES[:1]  # compiling on a CPU takes minutes and tells nothing here
    print(f"{name}; PyTorch {torch.__version__}; {opts.method}, batch {opts.batch_size}, "
          f"{opts.image_size} px; modes: {', '.join(m[0] for m in modes)}", flush=True)
    args0 = train.parse_args(["--method", opts.method, *extra, "--dataset", "cifar10",
                              "--batch-size", str(opts.batch_size), "--image-size",
                              str(opts.image_size)])
    # the loops run on synthetic data with the CIFAR-10 settings that synthetic's presets change
    method_flags = ["--method", opts.method, *extra]
    for key in methods.SYNTHETIC.get(opts.method, {}):
        if key != "epochs":
            method_flags += [train.flag(key), str(getattr(args0, key))]
    views = (args0.global_crops + args0.local_crops) * opts.batch_size  # per step
    rows, results = [], {"machine": name, "torch": torch.__version__, "method": opts.method}

    def part(what, fn):
        """fn()'s result, or None when out of time or when it failed (said in one line): a
        failing mode must not cost the window the rest of the table. A stop (Ctrl-C, SIGTERM:
        train.py's SystemExit with the signal's exit status) ends the probe."""
        if time.time() > end:
            print(f"gpu-probe: out of time before {what}", flush=True)
            return None
        try:
            return fn()
        except SystemExit as e:
            if isinstance(e.code, int):
                raise
            print(f"gpu-probe: {what} failed ({e})", flush=True)
        except Exception as e:
            print(f"gpu-probe: {what} failed ({type(e).__name__}: {e})", flush=True)
        return None

    # two at once first, before this process holds the GPU (an MPS daemon then starts clean); then
    # the single run each way, then the bare step
    two_label = next(label for label, _, mode in MODES if mode == opts.compile_mode)
    if "two" in opts.parts and cuda:
        has_mps = shutil.which("nvidia-cuda-mps-control") is not None
        mode_flags = ["--compile", "--compile-mode", opts.compile_mode]
        for mps in ([False, True] if has_mps else [False]):
            label = f"two at once, {two_label}{', MPS' if mps else ''}"
            got = part(label, lambda: two_at_once(opts, method_flags, mode_flags, views, mps,
                                                  end))
            if got is not None:
                rate = sum(r for r, _, _ in got)
                print(f"{label}: {rate:9.0f} views/s together; each " + ", ".join(
                    f"{r:.0f} views/s over {t0:.0f}-{t1:.0f} s" for r, t0, t1 in got), flush=True)
                rows.append((label, rate, None, None, None, None))
                key = f"two_{'mps' if mps else 'plain'}"
                results[key] = rate
                results[f"{key}_each"] = [round(r, 1) for r, _, _ in got]
        if not has_mps:
            print("two at once with MPS: no nvidia-cuda-mps-control on this machine", flush=True)
    for label, compile_, mode in (modes if "loop" in opts.parts else ()):
        mode_flags = ["--compile", "--compile-mode", mode] if compile_ else ["--no-compile"]

        def one_loop():
            torch._dynamo.reset()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            return loop(opts, method_flags, mode_flags, views)

        got = part(f"train.py's loop, {label}", one_loop)
        if got is not None:
            rate, seconds = got
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
            print(f"train.py loop, {label:11s} {rate:9.0f} views/s ({seconds:.0f} s in all)",
                  flush=True)
            rows.append((f"train.py loop, {label}", rate, None, seconds, peak, None))
            results[f"loop_{label}"] = rate
    for label, compile_, mode in (modes if "bare" in opts.parts else ()):
        a = argparse.Namespace(**{**vars(args0), "compile": compile_, "compile_mode": mode})
        got = part(f"the bare step, {label}", lambda: bare(a, device, opts.steps, profile=True))
        if got is not None:
            rate, comp, peak, busy = got
            busy_text = "" if busy is None else f", GPU busy {100 * busy:.0f}%"
            print(f"bare step, {label:11s} {rate:9.0f} views/s, compile {comp:.0f} s, peak "
                  f"{peak:.2f} GiB{busy_text}", flush=True)
            rows.append((f"bare step, {label}", rate, comp, None, peak, busy))
            results[f"bare_{label}"] = rate
    if "syncs" in opts.parts and cuda:
        counts = part("the sync count", lambda: syncs(device, opts))
        if counts is not None:
            results["syncs"] = counts
            print("host-device syncs in 3 eager steps: " + ", ".join(
                f"{m} {n}" for m, n in counts.items()), flush=True)

    base = results.get("loop_eager")  # the ratio column's 1
    print(f"\n{'measurement':34s} {'views/s':>9s} {'ratio':>6s} {'compile s':>9s} {'run s':>6s} "
          f"{'GiB':>6s} {'GPU busy':>8s}   (ratio: to the eager train.py loop; compile s: the "
          "bare step's first; run s: the whole loop's)")
    for label, rate, comp, seconds, peak, busy in rows:
        cells = [f"{rate:9.0f}", "" if base is None else f"{rate / base:6.2f}",
                 "" if comp is None else f"{comp:9.0f}",
                 "" if seconds is None else f"{seconds:6.0f}",
                 "" if peak is None else f"{peak:6.2f}",
                 "" if busy is None else f"{100 * busy:7.0f}%"]
        print(f"{label:34s} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, (9, 6, 9, 6, 6, 8))))
    alone = results.get(f"loop_{two_label}")
    for key in ("two_plain_each", "two_mps_each"):
        if key in results and alone is not None:
            print(f"two at once{', MPS' if 'mps' in key else ''}: each process "
                  + ", ".join(f"{r:.0f}" for r in results[key])
                  + f" views/s; one alone (train.py loop, {two_label}) {alone:.0f} views/s")
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
