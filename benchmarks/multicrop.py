"""What multi-crop costs: train.py's views/s and images/s with the 2 global crops alone and with N
local crops more, through both loaders, in one run on one machine (the loop as
benchmarks/throughput.py times it).

    python benchmarks/multicrop.py                              # CPU: synthetic, 16 px
    python benchmarks/multicrop.py --dataset imagefolder --data-dir ../shared/data/cifar10 \
        --image-size 32 --batch-size 64 \
        --local-crops 6 --local-size 16                         # CIFAR-10, the recipe's crops

Extra flags go to train.py (e.g. --method carp). Prints one line per measurement and a final
JSON line.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402


def local_crop_flags(p):
    p.add_argument("--local-crops", type=int, default=6)
    p.add_argument("--local-size", type=int, default=8)


def main():
    opts, flags = throughput.parse_flags(__doc__, local_crop_flags)
    crops = {"2 global": [], f"2 global + {opts.local_crops} local": [
        "--local-crops", str(opts.local_crops), "--local-size", str(opts.local_size)]}
    results = {}
    for name, more in crops.items():
        views = 2 + (opts.local_crops if more else 0)
        for loader in ("device", "workers"):
            rate = throughput.loop_rate([*flags, *more], loader, opts.steps,
                                        opts.batch_size)  # views/s
            results[f"{name}, {loader}"] = rate
            print(f"{name:20s} --loader {loader:7s}: {rate:7.0f} views/s, "
                  f"{rate / views:6.1f} images/s", flush=True)
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    main()
