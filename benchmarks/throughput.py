"""Training throughput in views/s, all measured in one run on one machine:

  (a) bare: forward + backward + optimizer step on random tensors (the ceiling), and the same
      without bf16 (and not compiled, when compiled)
  (b) train.py's loop with --loader workers (PIL views in DataLoader processes)
  (c) train.py's loop with --loader device  (views made on the training device, in batches)

then the ratios (b)/(a) and (c)/(a), and where a step's time goes (data alone for each loader,
forward + backward, optimizer step with the foreach LARS against a per-parameter loop).

Compiled (train.py's default on a GPU, or --compile), (a) and the device views are also timed
eagerly, and (b) and (c) compile as train.py does; --no-compile times everything eagerly.

    python benchmarks/throughput.py                               # CPU: synthetic, 16 px, batch 32
    python benchmarks/throughput.py --dataset imagefolder --data-dir ../shared/data/cifar10 \
        --image-size 32 --batch-size 256 --steps 60 --workers 16  # GPU: CIFAR-10, thesis's batch

Extra flags go to train.py (e.g. --method carp, --compile, --amp off). Prints one line per
measurement and a final JSON line.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps, device, warmup=3):
    """Seconds per call of fn() after `warmup` calls, the device synchronised around the timing."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def log_rate(out, views_per_step):
    """(views/s, first time, last time) between the second loss record of out's log.jsonl and
    the last (start-up, warm-up and compiling left out); the times in s from the run's start."""
    log = [r for r in train.read_log(os.path.join(out, "log.jsonl")) if "loss" in r]
    first, last = log[1], log[-1]
    rate = views_per_step * (last["step"] - first["step"]) / (last["time"] - first["time"])
    return rate, first["time"], last["time"]


def loop_rate(flags, loader, steps, batch):
    """views/s of train.main over `steps` steps, from its log's timestamps (the first log interval,
    with start-up and warm-up, left out)."""
    with tempfile.TemporaryDirectory() as out:
        log_every = max(1, steps // 6)
        subset = -(-steps * batch // 100) * 100  # a multiple of the classes (10 or 100)
        train.main([*flags, "--loader", loader, "--epochs", "1", "--train-subset", str(subset),
                    "--log-every", str(log_every), "--knn-every", "0", "--ckpt-every-min", "1e9",
                    "--out-dir", out])
        args = train.parse_args(flags)
        return log_rate(out, (args.global_crops + args.local_crops) * batch)[0]


def bare_setup(args, device, amp, compile_):
    """(step, optimizer): one call of step() is train.py's whole step (forward, loss, backward,
    optimizer) on fixed random views, global and local crops, channels-last as train.py's."""
    a = argparse.Namespace(**{**vars(args), "amp": amp, "compile": compile_})
    run = train.build_run(a, device, 1, steps_per_epoch=1)
    sizes = [args.image_size] * args.global_crops + [args.local_size] * args.local_crops
    x = [torch.randn(args.batch_size, 3, s, s, device=device)
         .to(memory_format=torch.channels_last) for s in sizes]
    now = {name: float(values[0]) for name, values in run.schedules.items()}
    step = lambda: train.train_step(run, x, now, 0)  # noqa: E731
    return step, run.optimizer


def per_parameter_lars_step(optimizer):
    """The LARS step as one small-kernel sequence per parameter (the per-parameter reference the
    foreach LARS is timed against)."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                u = w.grad
                if not group["lars_exclude"]:
                    u = u.add(w, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.norm(w), torch.norm(u)
                    u = u.mul(torch.where((w_norm > 0) & (u_norm > 0),
                                          group["eta"] * w_norm / u_norm, 1.0))
                v = optimizer.state[w]["momentum_buffer"]
                v.mul_(group["momentum"]).add_(u)
                w.add_(v, alpha=-group["lr"])


def parse_flags(description, add_more):
    """This benchmark's and multicrop.py's command line: (options, the flags for train.py); the
    options not named here (and not added by add_more(parser)) go to train.py as they are."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    add_more(p)
    opts, extra = p.parse_known_args()
    return opts, ["--dataset", opts.dataset, "--data-dir", opts.data_dir,
                  "--image-size", str(opts.image_size), "--batch-size", str(opts.batch_size),
                  "--workers", str(opts.workers), *extra]


def main():
    opts, flags = parse_flags(__doc__, lambda p: p.add_argument(
        "--loaders", nargs="+", default=["workers", "device"], choices=["workers", "device"],
        help="the loaders whose data-alone speed and train.py loop are measured"))
    args = train.parse_args([*flags, "--knn-every", "0"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"{name}; {args.method} {args.arch}, {args.image_size} px, batch {args.batch_size}, "
          f"amp {args.amp}{', compiled' if args.compile else ''}; {opts.steps} timed steps",
          flush=True)
    views = (args.global_crops + args.local_crops) * args.batch_size  # views per step
    results = {"machine": name, "batch": args.batch_size, "image_size": args.image_size,
               "amp": args.amp}

    # (a) the bare step, then what bf16 buys (and --compile, when asked)
    step, optimizer = bare_setup(args, device, args.amp, args.compile)
    results["bare"] = views / timed(step, opts.steps, device)
    print(f"(a) bare step:            {results['bare']:9.0f} views/s", flush=True)
    variants = [("amp off", "off", args.compile)] if args.amp != "off" else []
    if args.compile:
        variants.append(("not compiled", args.amp, False))
    for name, amp, compile_ in variants:
        rate = views / timed(bare_setup(args, device, amp, compile_)[0], opts.steps, device)
        results[f"bare, {name}"] = rate
        print(f"    bare, {name:16s} {rate:9.0f} views/s: the default is "
              f"{results['bare'] / rate:.2f}x this", flush=True)
    saved_step, optimizer.step = optimizer.step, lambda: None  # forward + backward alone
    t_fb = timed(step, opts.steps, device)
    optimizer.step = saved_step
    t_opt = timed(optimizer.step, opts.steps, device)
    if isinstance(optimizer, train.lars.LARS):
        t_loop = timed(lambda: per_parameter_lars_step(optimizer), opts.steps, device)
        print(f"    optimizer step: {1e3 * t_opt:.2f} ms with foreach, {1e3 * t_loop:.2f} ms as a "
              "per-parameter loop", flush=True)
        results["lars_loop_ms"] = 1e3 * t_loop
    del step, optimizer

    # data alone, per loader: the views of `steps` batches
    source, _ = train.load_pretrain_data(train.parse_args([*flags, "--loader", "device"]),
                                         device, None)
    results["dataset_mib"] = source.numel() / 2 ** 20  # uint8: one byte per value
    t_data = {}
    runs = [("workers", "workers", False),
            ("device", "device", args.compile)]  # (loader, name, compile views)
    if args.compile:
        runs.append(("device", "device, not compiled", False))
    runs = [r for r in runs if r[0] in opts.loaders]
    for loader, name, compile_views in runs:
        a = train.parse_args([*flags, "--loader", loader, "--knn-every", "0"])
        a.compile = compile_views
        src = source if loader == "device" else train.load_pretrain_data(a, device, None)[0]
        batches = data.Batches(len(src), a.batch_size, 1, 0, a.seed, 0, opts.steps + 3)
        it = train.pretrain_batches(a, src, batches, 0, device)
        t_data[name] = timed(lambda: next(it), opts.steps, device)
        it.close()  # shuts the DataLoader workers down before (b) and (c)
        print(f"    data alone, {name:20s} {views / t_data[name]:9.0f} views/s", flush=True)
    if args.compile:
        results["data_device_eager_ms"] = 1e3 * t_data["device, not compiled"]
    del source, src
    print(f"    split of the bare step: forward+backward {1e3 * t_fb:.1f} ms, optimizer "
          f"{1e3 * t_opt:.1f} ms; views "
          + " / ".join(f"{1e3 * t_data[name]:.1f} ms ({name})" for name in opts.loaders),
          flush=True)
    results.update(fwd_bwd_ms=1e3 * t_fb, optimizer_ms=1e3 * t_opt,
                   **{f"data_{name}_ms": 1e3 * t_data[name] for name in opts.loaders})

    # (b), (c): train.py's own loop; GPU memory as train.py alone holds it (the benchmark's copies
    # freed)
    for tag, loader in [(t, name) for t, name in (("b", "workers"), ("c", "device"))
                        if name in opts.loaders]:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        results[loader] = loop_rate(flags, loader, max(opts.steps, 12), args.batch_size)
        mem = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"
               if device.type == "cuda" else "")
        print(f"({tag}) train.py --loader {loader:7s}: {results[loader]:9.0f} views/s, "
              f"{results[loader] / results['bare']:.2f} of (a){mem}", flush=True)
    results["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"    host memory: peak resident {results['host_peak_gib']:.2f} GiB (the whole "
          "benchmark's, an upper bound for train.py); the device loader's dataset "
          f"{results['dataset_mib']:.0f} MiB", flush=True)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
