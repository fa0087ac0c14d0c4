"""The device loader's views alone: ms per batch (both views) for CARL's and CARP's pipelines,
eager and with --compile's torch.compile, and how many ops of the eager pipeline launch a kernel
(each is a kernel launch on a GPU, where their count, not the maths, sets the speed); the
compiled views' largest difference from the eager ones (float rounding).

    python benchmarks/views.py                         # CPU: batch 256, 32 px
    python benchmarks/views.py --batch-size 256 --image-size 32 --calls 100    # GPU

Random uint8 images; the same calls train.py makes each step (a generator on the device).
"""
import argparse
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402

NO_KERNEL = {"view", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "expand",
             "slice", "select", "alias", "t", "permute", "_unsafe_view", "transpose", "as_strided",
             "detach"}  # views of a tensor


class CountKernelOps(TorchDispatchMode):
    """Counts the aten ops run inside it that make a new tensor (not a view of one)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] not in NO_KERNEL
        return func(*args, **(kwargs or {}))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--calls", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--no-compile", action="store_true",
                   help="eager only (torch.compile takes ~30 s per pipeline)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"{name}; batch {args.batch_size}, {args.image_size} px, {args.calls} timed calls",
          flush=True)
    x = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size),
                      dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)
    for kind in ("carl", "carp"):
        for compiled in [False] + [True] * (not args.no_compile):
            views = augment.batch_pretrain_views(kind, args.image_size, "cifar10")
            g = torch.Generator(device=device).manual_seed(0)
            ops = ""
            if compiled:
                t0 = time.perf_counter()
                views.compile()(x, g)
                sync()
                ops = f", compiled in {time.perf_counter() - t0:.0f} s"
                u = augment.draw_uniforms(len(x), g, views=2)  # (2, B, UNIFORMS)
                diff = max((a - b).abs().max().item()
                           for a, b in zip(views.make_views(x, u), views.make(x, u)))
                ops += f", differs from eager by {diff:.1e} at most"
            else:
                with CountKernelOps() as counter:
                    views(x, g)
                ops = f", {counter.count} ops that launch a kernel"
            for _ in range(3):
                views(x, g)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                views(x, g)
            sync()
            ms = (time.perf_counter() - t0) / args.calls * 1e3
            print(f"{kind} {'compiled' if compiled else 'eager':8s}: {ms:7.2f} ms per batch "
                  f"(both views), {2 * args.batch_size / ms * 1e3:9.0f} views/s{ops}", flush=True)


if __name__ == "__main__":
    main()
