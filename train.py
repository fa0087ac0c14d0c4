"""Pretrain CARL or CARP.

    python train.py                                   # CARL on the built-in synthetic dataset, CPU ok
    python train.py --method carp --dataset cifar10 --data-dir data --download
    torchrun --nproc_per_node=4 train.py --method carp --dataset imagefolder --data-dir /imagenet

Writes <out-dir>/log.jsonl (one JSON line per log step and per kNN evaluation), and
<out-dir>/run.pt (everything needed to continue) with <out-dir>/backbone.pt (a plain torchvision
ResNet state_dict without `fc`) every --ckpt-every-epochs epochs, every --ckpt-every-min minutes, at
the end and when stopped by SIGTERM/SIGUSR1. The same command run again continues from
<out-dir>/run.pt at the next step.
Flags left unset take the thesis settings for the method and dataset (DEFAULTS below).
"""
import argparse
import contextlib
import json
import math
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import augment
import data
import evaluate
import lars
import losses
import model as models

# Thesis settings. CARL (5.6-5.8): SGD + LARS (SwAV's LARC) 0.6 -> 0.0006, wd 5e-4, K=100 CIFAR-10,
# 300 CIFAR-100 and STL-10, 3000 ImageNet; lambda 4 -> 1.5 over 100 epochs (5.6.2), 2 -> 1 on
# STL-10 (5.6.1). CARP (6.5.4): LARS 5.4 -> 0.00054, wd 1e-6, K=3000 in blocks of 250, lambda
# 2 -> 0.15 over 30 epochs. Both: 200 epochs, batch 256 (5.8, 6.5.4), no warm-up (6.5.4).
# CARL's optimizer: the thesis names SGD with LARS and SwAV's recipe (LARC, trust coefficient
# 0.001, every parameter trust-scaled); plain SGD at 0.6 with no warm-up collapsed to one
# prototype within 90 steps on CIFAR-10 (RESULTS.md, "CARL a") and LARC did not in 100 steps at
# batch 256, so "larc" is the default.
# `synthetic` is ours: the quickstart, under 3 minutes of training on a slow laptop CPU (RESULTS.md):
# 20 px images, 2 epochs (62 steps of 64), LARS at 9.6 per 256 with wd 1e-6 for CARL too, prototypes
# started larger (gain) so the first steps carry a gradient, lambda starting near 1 (the thesis's 4 / 2
# sent the assignments straight to uniform).
DEFAULTS = {
    "carl": dict(optimizer="larc", lr=0.6, final_lr_ratio=1e-3, weight_decay=5e-4, epochs=200, batch_size=256,
                 num_prototypes=100, block_size=None, lam_start=4.0, lam_end=1.5, lam_epochs=100,
                 proto_init_gain=1.0, views="carl", knn_every=0),
    "carp": dict(optimizer="lars", lr=5.4, final_lr_ratio=1e-4, weight_decay=1e-6, epochs=200, batch_size=256,
                 num_prototypes=3000, block_size=250, lam_start=2.0, lam_end=0.15, lam_epochs=30,
                 proto_init_gain=1.0, views="carp", knn_every=0),
}
DATASET_DEFAULTS = {
    ("carl", "cifar100"): dict(num_prototypes=300),
    ("carl", "stl10"): dict(num_prototypes=300, lam_start=2.0, lam_end=1.0),
    ("carl", "imagefolder"): dict(num_prototypes=3000),
    ("carl", "synthetic"): dict(epochs=2, batch_size=64, optimizer="lars", lr=9.6, weight_decay=1e-6,
                                proto_init_gain=5.0, lam_start=1.5, lam_end=1.0, lam_epochs=2, knn_every=1),
    ("carp", "synthetic"): dict(epochs=5, batch_size=64, num_prototypes=500, block_size=50,
                                proto_init_gain=3.0, lam_start=0.75, lam_end=0.5, lam_epochs=5, knn_every=1),
}
# Under "lars", biases and BatchNorm parameters skip the trust ratio (BYOL, Barlow Twins), so they
# take plain SGD steps. At LARS learning rates (4.8-5.4 per 256) those steps are far too large: on
# CIFAR-10 at batch 64, CARL (prototype gain 5) fell onto 2 of 100 prototypes within 20 steps with
# them, and did not with this scale. Barlow Twins gives them 0.0048 / 0.2 = 0.024 of the weights' lr.
LARS_EXCLUDED_LR_SCALE = 0.024
# A run continues from its run.pt only with these unchanged: each changes what the run computes.
SAME_RUN_KEYS = ("method", "dataset", "train_subset", "arch", "cifar_stem", "image_size", "epochs", "batch_size",
                 "optimizer", "lr", "final_lr_ratio", "weight_decay", "warmup_epochs", "num_prototypes",
                 "proto_init_gain", "block_size", "lam_start", "lam_end", "lam_epochs", "views", "loader",
                 "sync_bn", "seed")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption; SLURM's --signal=USR1@secs before a time limit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="carl", help="carl or carp")
    p.add_argument("--dataset", default="synthetic", help=", ".join(data.DATASETS))
    p.add_argument("--data-dir", default="data", help="where the dataset lies (or is downloaded to)")
    p.add_argument("--download", action="store_true", help="let torchvision download cifar10/cifar100/stl10")
    p.add_argument("--train-subset", type=int, default=None,
                   help="pretrain on a fixed class-balanced subset of this many labelled train images")
    p.add_argument("--arch", default="resnet18", help=", ".join(models.ARCHS))
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem without max-pool (default: on for images <= 64 px)")
    p.add_argument("--image-size", type=int, default=None,
                   help="view size (default: 20 synthetic, 32 CIFAR, 96 STL-10, 224 else)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--until-epoch", type=int, default=None,
                   help="stop after this epoch (schedules still span --epochs); the same command continues")
    p.add_argument("--batch-size", type=int, default=None, help="global batch over all processes")
    p.add_argument("--optimizer", default=None, help="larc (LARS on every parameter), lars (not on biases/BN) or sgd")
    p.add_argument("--lr", type=float, default=None, help="base lr for batch 256; scaled by batch/256")
    p.add_argument("--final-lr-ratio", type=float, default=None, help="the cosine ends at lr times this")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear lr warm-up before the cosine decay")
    p.add_argument("--num-prototypes", type=int, default=None, help="K")
    p.add_argument("--proto-init-gain", type=float, default=None,
                   help="scale of the prototypes' initial weights (thesis: 1, PyTorch's default init)")
    p.add_argument("--block-size", type=int, default=None, help="CARP: prototypes per partition block N_B")
    p.add_argument("--lam-start", type=float, default=None, help="KL weight at epoch 0 (b in thesis eq. 5.8)")
    p.add_argument("--lam-end", type=float, default=None, help="KL weight after --lam-epochs (a)")
    p.add_argument("--lam-epochs", type=float, default=None, help="epochs of linear decay (E)")
    p.add_argument("--views", default=None, choices=["carl", "carp"],
                   help="view pipeline: carl (SimCLR-style) or carp (BYOL-style, asymmetric); default: the method's")
    p.add_argument("--loader", default=None, choices=["device", "workers"],
                   help="device: the dataset decoded once into memory on the training device, views made there in "
                        "batches; workers: PIL views in DataLoader processes (default: workers for ImageFolder trees "
                        "of large images, else device)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"],
                   help="default: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16, AMX), else off")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model, and the device loader's views (default: on GPU only; the first "
                        "step then takes about a minute)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader processes per rank (--loader workers)")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", default=None,
                   help="continue from this run.pt (only needed when it lies outside --out-dir)")
    p.add_argument("--ckpt-every-epochs", type=int, default=1,
                   help="write run.pt at the end of every N-th epoch (more than 1 where epochs take seconds)")
    p.add_argument("--ckpt-every-min", type=float, default=15.0, help="also write run.pt inside an epoch this often")
    p.add_argument("--knn-every", type=int, default=None,
                   help="kNN top-1 (k=200) every N epochs, after the last, and before the first (default: 1 for "
                        "synthetic, else 0 = off)")
    p.add_argument("--knn-train-subset", type=int, default=None, help="kNN bank: a class-balanced subset of this many")
    p.add_argument("--knn-test-subset", type=int, default=None, help="kNN queries: a class-balanced subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    args = p.parse_args(argv)
    return resolve(args)


def fail(msg):
    raise SystemExit(f"error: {msg}")


def resolve(args):
    """Fill unset flags from DEFAULTS and check flag combinations before any work."""
    if args.method not in DEFAULTS:
        fail(f"unknown --method {args.method!r}; choose carl or carp")
    if args.dataset not in data.DATASETS:
        fail(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(data.DATASETS)}")
    if args.arch not in models.ARCHS:
        fail(f"unknown --arch {args.arch!r}; choose one of {', '.join(models.ARCHS)}")
    if args.method == "carl" and args.block_size is not None:
        fail("--block-size is for --method carp (CARL assigns over all K prototypes at once)")
    defaults = {**DEFAULTS[args.method], **DATASET_DEFAULTS.get((args.method, args.dataset), {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.image_size = args.image_size or data.IMAGE_SIZE[args.dataset]
    if args.cifar_stem is None:
        args.cifar_stem = args.image_size <= models.CIFAR_STEM_MAX_PX
    if args.loader is None:
        args.loader = data.default_loader(args.dataset, args.image_size)
    if args.optimizer not in ("larc", "lars", "sgd"):
        fail(f"unknown --optimizer {args.optimizer!r}; choose larc, lars or sgd")
    if args.method == "carp" and args.num_prototypes % args.block_size:
        fail(f"--num-prototypes {args.num_prototypes} is not divisible by --block-size {args.block_size}")
    if args.until_epoch is not None and not 0 < args.until_epoch <= args.epochs:
        fail(f"--until-epoch {args.until_epoch} must lie in 1..--epochs {args.epochs}")
    for key in ("epochs", "batch_size", "num_prototypes", "image_size", "log_every", "proto_init_gain",
                "final_lr_ratio", "ckpt_every_min", "ckpt_every_epochs"):
        if getattr(args, key) <= 0:
            fail(f"--{key.replace('_', '-')} must be positive")
    if args.knn_every < 0:
        fail("--knn-every must be 0 (off) or positive")
    for key in ("train_subset", "knn_train_subset", "knn_test_subset"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            fail(f"--{key.replace('_', '-')} must be positive")
    return args


def check_same_run(saved, args, path):
    """One clear line naming the first flag that differs from the run being continued."""
    for key in SAME_RUN_KEYS:
        if key in saved and saved[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            fail(f"{path} is a run with {flag} {saved[key]}, but this command has {flag} {getattr(args, key)}; "
                 f"use the run's flags to continue it, or another --out-dir")


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash or a failed write (full disk) never leaves
    a half-written file, and the previous one stays as it was."""
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous one is intact" if os.path.exists(path) else "there is no earlier one"
        fail(f"could not write {path} ({type(e).__name__}: {e}); {kept}")


def lr_schedule(base_lr, final_lr, epochs, steps_per_epoch, warmup_epochs):
    """Per-step lr: linear warm-up from 0, then cosine from base_lr to final_lr (DINO's form: the
    last step lands within (base - final) * (1 - cos(pi / n)) / 2 of final_lr)."""
    total, warm = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    warmup = np.linspace(0, base_lr, warm, endpoint=False)
    t = np.arange(total - warm) / max(1, total - warm)
    cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine])  # (total,)


def lam_schedule(start, end, decay_epochs, epochs, steps_per_epoch):
    """Per-step KL weight: linear from start to end over decay_epochs, then end. Thesis eq. 5.8
    steps once per epoch; per step is the same line without the stairs."""
    e = np.arange(epochs * steps_per_epoch) / steps_per_epoch  # (total,) fractional epoch
    if decay_epochs <= 0:
        return np.full_like(e, end)
    return np.where(e < decay_epochs, start - (start - end) * e / decay_epochs, end)


def describe_schedules(args, lr):
    warm = f"{args.warmup_epochs:g}-epoch warm-up" if args.warmup_epochs else "no warm-up"
    return (f"lr {lr:g} -> {lr * args.final_lr_ratio:g} (cosine, {warm}), "
            f"lambda {args.lam_start:g} -> {args.lam_end:g} over {args.lam_epochs:g} epochs")


def setup_distributed():
    """(rank, world size, device, control group). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain
    python is rank 0 of 1. The control group (gloo, CPU) carries the stop/save flags each step
    without a GPU sync."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # torchrun's agent hosts one TCPStore for all its worker restarts (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
    # and the process group's keys (each rank's gloo address, NCCL's id) stay in it: a restarted rank can read its
    # peer's dead address from the last attempt and fail (Connection refused) or hang. Keys under a prefix per
    # attempt are never stale; the world size is in it as a joining node restarts workers without a new count.
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}-world{world}"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(attempt, store),
                            rank=rank, world_size=world)
    control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return dist.get_rank(), dist.get_world_size(), device, control


def build_optimizer(args, model, lr):
    if args.optimizer == "sgd":
        return torch.optim.SGD(lars.param_groups(model, "larc"), lr=lr, weight_decay=args.weight_decay, momentum=0.9)
    groups = lars.param_groups(model, args.optimizer, excluded_lr_scale=LARS_EXCLUDED_LR_SCALE)
    return lars.LARS(groups, lr=lr, weight_decay=args.weight_decay, momentum=0.9)


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: there a bf16-autocast ResNet-18 step is 1.7-1.9x faster than a float32
    one (2-core EPYC, RESULTS.md); without them bf16 is emulated and slower."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # also when capped by ATEN_CPU_CAPABILITY
        return False
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_speed_flags(args, device):
    """--amp and --compile left unset follow the device (benchmarks/throughput.py uses the same)."""
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "off"
    if args.amp == "fp16" and device.type != "cuda":
        fail("--amp fp16 needs a GPU; use --amp bf16 or off on the CPU")
    if args.compile is None:  # 1.6x on an H100 (RESULTS.md); no gain measured on CPUs, where it needs a C++ compiler
        args.compile = device.type == "cuda"


def ignore_stop_signals(_worker_id=None):
    """DataLoader workers leave SIGTERM/SIGUSR1 to the main process, which stops them in order."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def load_pretrain_data(args, device, max_bytes):
    """The pretraining split: (uint8 images (N, 3, H, W) on `device`, or a PIL dataset; labels (N,))."""
    if args.loader == "device":
        images, labels = data.load_images(args.dataset, "pretrain", args.data_dir, args.download, args.image_size,
                                          max_bytes, args.train_subset, "--train-subset")
        return images.to(device), labels
    dataset = data.build_dataset(args.dataset, "pretrain", None, args.data_dir, args.download)
    labels = data.targets(dataset)  # (N,)
    if args.train_subset:
        keep = data.subset_indices(labels, args.train_subset, "--train-subset")  # (train_subset,)
        dataset, labels = torch.utils.data.Subset(dataset, keep.tolist()), labels[keep]
    return dataset, labels


def pretrain_batches(args, source, batches, rank, device):
    """(view_a, view_b) on `device` for each step of `batches` (data.Batches), by either loader."""
    if args.loader == "device":
        views = augment.batch_pretrain_views(args.views, args.image_size, args.dataset)
        if args.compile:  # fuses the views' few hundred small ops: on a GPU their launches cost more than the maths
            views.compile()
        g = torch.Generator(device=device)
        order, order_epoch = None, None
        for step in range(batches.start, batches.stop):
            epoch, it = divmod(step, batches.steps_per_epoch)
            if epoch != order_epoch:  # the epoch's sample order, moved to the device once
                order, order_epoch = batches.epoch_order(epoch).to(device), epoch  # (steps, local batch)
            g.manual_seed(data.seed_of(args.seed, step, rank))  # the views depend on (seed, step, rank) only
            yield views(source[order[it]], g)
        return
    views = augment.pretrain_views(args.views, args.image_size, args.dataset)
    loader = torch.utils.data.DataLoader(data.SeededViews(source, views, args.seed), batch_sampler=batches,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)
    try:
        for view_a, view_b in loader:
            yield view_a.to(device, non_blocking=True), view_b.to(device, non_blocking=True)
    except data.BadImageError as e:  # raised in a worker, its message ends with ours; run.pt stays as it was
        fail(str(e).strip().splitlines()[-1].split("BadImageError: ")[-1])


def train_step(net, optimizer, scaler, autocast, view_a, view_b, args, lam, step):
    """One optimisation step on a batch of view pairs; returns (loss, stats) as device tensors."""
    x = torch.cat([view_a, view_b]).contiguous(memory_format=torch.channels_last)  # (2 * local batch, 3, S, S)
    with autocast:
        logits = net(x)  # (2 * local batch, K)
    logits_a, logits_b = logits.chunk(2)  # (local batch, K) each
    if args.method == "carl":
        loss, stats = losses.carl_loss(logits_a, logits_b, lam)
    else:
        partition = losses.random_partition(args.num_prototypes, args.block_size, args.seed, step)  # (N_P, N_B)
        if logits.is_cuda:  # pinned, so that copying it to the GPU does not wait for the GPU
            partition = partition.pin_memory()
        loss, stats = losses.carp_loss(logits_a, logits_b, lam, partition)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, stats


class KnnMonitor:
    """Weighted kNN top-1 (k=200, T=0.07, cosine: evaluate.py's functions) of the backbone's features
    of eval views, the labelled train split as the bank and the test split as queries."""

    def __init__(self, args, device, max_bytes=None):
        self.args, self.device = args, device
        self.splits = []  # [(images (N, 3, H, W) uint8, labels (N,))] for the bank and the queries
        for split, subset in (("train", args.knn_train_subset), ("test", args.knn_test_subset)):
            images, labels = data.load_images(args.dataset, split, args.data_dir, args.download, args.image_size,
                                              max_bytes, subset, f"--knn-{split}-subset")
            self.splits.append((images.to(device), labels.to(device)))
        self.num_classes = int(self.splits[0][1].max()) + 1

    @torch.no_grad()
    def __call__(self, backbone, batch_size=256):
        feats = []
        eval_batch = lambda x: augment.eval_batch(x, self.args.image_size, self.args.dataset)  # noqa: E731
        for images, labels in self.splits:
            batches = evaluate.DeviceBatches(images, labels, batch_size, eval_batch)
            feats.append(evaluate.extract_features(backbone, batches, self.device))  # ((N, F), (N,))
        backbone.train()
        (bank, bank_labels), (queries, query_labels) = feats
        scores = evaluate.knn_classify(bank, bank_labels, queries, self.num_classes, k=200, T=0.07)  # (N_test, C)
        return evaluate.topk_accuracy(scores, query_labels)  # [top-1, top-5]


def main(argv=None):
    args = parse_args(argv)
    stop_signal = []  # SIGTERM/SIGUSR1 received; looked at after every step
    previous = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum)) for s in STOP_SIGNALS}
    try:
        pretrain(args, stop_signal)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler for inductor's kernels
        if os.environ.get("TORCHDYNAMO_VERBOSE") == "1":
            raise
        fail(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); run with --no-compile, "
             f"or with TORCHDYNAMO_VERBOSE=1 for the traceback")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def pretrain(args, stop_signal):
    rank, world, device, control = setup_distributed()
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    run_path = os.path.join(args.out_dir, "run.pt")
    # The same command continues its own run; --resume only points elsewhere for a first start.
    resume_from = run_path if os.path.exists(run_path) else args.resume
    ckpt = models.load_checkpoint(resume_from) if resume_from else None
    if ckpt is not None:
        check_same_run(ckpt["args"], args, resume_from)
    start_step = ckpt["step"] if ckpt is not None else 0
    if world > 1:  # every rank must continue from the same step (--out-dir on a shared filesystem)
        steps = torch.tensor([start_step, -start_step])  # (2,)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=control)
        if steps[0] != -steps[1]:
            fail(f"the ranks found run.pt at different steps ({-int(steps[1])} to {int(steps[0])}); --out-dir must "
                 f"be one folder every node sees")
    if ckpt is not None and ckpt["epoch"] >= (args.until_epoch or args.epochs):
        if rank == 0:
            print(f"{resume_from} is finished: {ckpt['epoch']} of {args.epochs} epochs done"
                  + (f" (--until-epoch {args.until_epoch})" if args.until_epoch else "") + "; nothing to do", flush=True)
        return
    resolve_speed_flags(args, device)

    # Data: this rank's share of every global batch, in an order fixed by (seed, epoch).
    max_bytes = data.memory_budget(device)
    source, labels = load_pretrain_data(args, device, max_bytes)
    num_images, num_classes = len(labels), len(labels[labels >= 0].unique())
    if num_images < args.batch_size:
        fail(f"{num_images} images are fewer than one batch of --batch-size {args.batch_size}")
    trained_on = ckpt.get("data") if ckpt is not None else None
    if trained_on and trained_on != {"num_images": num_images, "num_classes": num_classes}:
        fail(f"{args.dataset} under {args.data_dir} now has {num_images} images in {num_classes} classes, but "
             f"{resume_from} was trained on {trained_on['num_images']} in {trained_on['num_classes']}")
    steps_per_epoch = num_images // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    end_step = (args.until_epoch or args.epochs) * steps_per_epoch

    # Model, optimizer, schedules.
    torch.manual_seed(args.seed)
    model = models.AssignmentModel(args.method, args.arch, args.cifar_stem, args.num_prototypes,
                                   args.proto_init_gain)
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    lr = args.lr * args.batch_size / 256
    optimizer = build_optimizer(args, model, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    lrs = lr_schedule(lr, lr * args.final_lr_ratio, args.epochs, steps_per_epoch, args.warmup_epochs)  # (total,)
    lams = lam_schedule(args.lam_start, args.lam_end, args.lam_epochs, args.epochs, steps_per_epoch)  # (total,)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the run started without fp16
            scaler.load_state_dict(ckpt["scaler"])
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    if args.compile:
        net = torch.compile(net)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                              enabled=args.amp != "off")

    log_path = os.path.join(args.out_dir, "log.jsonl")
    monitor = KnnMonitor(args, device, max_bytes) if args.knn_every and rank == 0 else None
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        log = trim_log(log_path, start_step)  # drop what an interrupted run logged after its checkpoint
        print(f"{args.method} {args.arch} on {args.dataset}: {num_images} images, {world} process(es) on "
              f"{device.type}, batch {args.batch_size}, {steps_per_epoch} steps/epoch, {args.epochs} epochs, "
              f"K {args.num_prototypes}" + (f" in blocks of {args.block_size}" if args.method == "carp" else "")
              + f", {args.optimizer} wd {args.weight_decay:g}, {args.views} views, {args.loader} loader, amp "
              f"{args.amp}" + (", torch.compile (its first step takes about a minute)" if args.compile else ""),
              flush=True)
        print(describe_schedules(args, lr), flush=True)
        if ckpt is not None:
            print(f"continuing {resume_from} at step {start_step} of {total_steps} "
                  f"(epoch {start_step // steps_per_epoch}, step {start_step % steps_per_epoch} of it)", flush=True)
        knn_records = [r for r in log if "knn_top1" in r]  # the first is the random-init value

    def save(step):
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "step": step, "epoch": step // steps_per_epoch, "args": vars(args),
                     "data": {"num_images": num_images, "num_classes": num_classes}}
            atomic_save(state, run_path)
            atomic_save(model.backbone.state_dict(), os.path.join(args.out_dir, "backbone.pt"))

    def knn_due(step):  # before training, after every --knn-every-th epoch and after the last
        epoch, it = divmod(step, steps_per_epoch)
        return args.knn_every and it == 0 and (epoch % args.knn_every == 0 or step == total_steps)

    def knn(step):
        if rank == 0 and all(r["step"] != step for r in knn_records):  # a continued run may hold it already
            t0 = time.time()
            top1, top5 = monitor(model.backbone)
            rec = {"epoch": step // steps_per_epoch, "step": step, "knn_top1": round(top1, 2),
                   "knn_top5": round(top5, 2), "seconds": round(time.time() - t0, 1)}
            knn_records.append(rec)
            append_log(log_path, rec)
            print(f"knn ep {rec['epoch']}: top-1 {top1:.2f}{knn_gain(knn_records)}, top-5 {top5:.2f}, "
                  f"{rec['seconds']:.0f} s", flush=True)
        if world > 1:
            dist.barrier(group=control)  # the other ranks wait for rank 0's evaluation

    if knn_due(start_step):  # step 0, or an epoch's end whose kNN a stopped run skipped
        knn(start_step)

    batches = data.Batches(num_images, args.batch_size, world, rank, args.seed, start_step, end_step)
    t_start, last_save = time.time(), time.time()
    # closing() shuts DataLoader workers down on every way out: they ignore SIGTERM, so nothing else would
    with contextlib.closing(pretrain_batches(args, source, batches, rank, device)) as stream:
        for step, (view_a, view_b) in zip(range(start_step, end_step), stream):
            epoch, it = divmod(step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step]) * group["lr_scale"]
            loss, stats = train_step(net, optimizer, scaler, autocast, view_a, view_b, args, float(lams[step]), step)
            if step == start_step:  # the speed is timed from here: the first step waits for --compile
                if device.type == "cuda":
                    torch.cuda.synchronize()  # once a session: the first step's GPU work inside, not after
                t_first = time.time()

            # Every rank agrees, each step, whether to stop (a signal reached any rank) or save (rank 0's clock).
            save_due = rank == 0 and time.time() - last_save > 60 * args.ckpt_every_min
            flags = torch.tensor([max(stop_signal, default=0), int(save_due)])  # (2,) int64
            if world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=control)
            epoch_done = it == steps_per_epoch - 1
            if step % args.log_every == 0 or epoch_done or flags.any():  # the only host-device syncs
                if not math.isfinite(loss.item()):  # before anything is saved
                    fail(f"loss is {loss.item()} at step {step}; lower --lr, or raise --lam-start")
            if rank == 0 and (step % args.log_every == 0 or epoch_done):
                now = time.time()
                done, since = (step - start_step, t_first) if step > start_step else (1, t_start)
                rate = args.batch_size * done / (now - since)  # images/s this session, after its first step
                rec = {"epoch": epoch, "step": step, "loss": loss.item(), "consistency": stats["consistency"].item(),
                       "kl": stats["kl"].item(), "entropy": float(stats["entropy"]), "in_use": int(stats["in_use"]),
                       "lam": float(lams[step]), "lr": float(lrs[step]), "img_per_s": round(rate, 1),
                       "eta_min": round((end_step - step - 1) * args.batch_size / rate / 60, 1),
                       "time": round(now - t_start, 3)}
                append_log(log_path, rec)
                print(f"ep {epoch} step {step}/{total_steps} loss {rec['loss']:.4f} cons {rec['consistency']:.4f} "
                      f"kl {rec['kl']:.4f} lam {rec['lam']:.3f} lr {rec['lr']:.4g} in-use {rec['in_use']}/"
                      f"{args.num_prototypes} {rate:.0f} img/s eta {rec['eta_min']}m", flush=True)

            if flags.any() or step + 1 == end_step or (epoch_done and (epoch + 1) % args.ckpt_every_epochs == 0):
                save(step + 1)
                last_save = time.time()
            stopping = flags[0] and step + 1 < end_step
            if epoch_done and knn_due(step + 1) and not stopping:  # a stopping run has seconds: run.pt, no kNN
                knn(step + 1)
            if stopping:
                if world > 1:
                    dist.barrier(group=control)  # run.pt is written before any rank exits
                if rank == 0:
                    print(f"stopped by {signal.Signals(int(flags[0])).name} after step {step + 1} of {total_steps} "
                          f"(epoch {epoch}, step {it + 1} of {steps_per_epoch}); {run_path} holds it: run the same "
                          f"command to continue", flush=True)
                raise SystemExit(128 + int(flags[0]))
    if rank == 0:
        print(f"done: {end_step // steps_per_epoch} of {args.epochs} epochs in {(time.time() - t_start) / 60:.1f} min; "
              f"checkpoint {run_path}", flush=True)
        if len(knn_records) > 1:
            first, last = knn_records[0], knn_records[-1]
            print(f"kNN top-1 (k=200): {first['knn_top1']:.2f} at epoch {first['epoch']}"
                  f"{' (random init)' if first['step'] == 0 else ''} -> {last['knn_top1']:.2f} at epoch "
                  f"{last['epoch']}: {last['knn_top1'] - first['knn_top1']:+.2f} points", flush=True)


def knn_gain(records):
    """' (+12.30 since epoch 0)' for the newest kNN record; ' (random init)' for a fresh run's first."""
    first, last = records[0], records[-1]
    if last is first:
        return " (random init)" if first["step"] == 0 else ""
    return f" ({last['knn_top1'] - first['knn_top1']:+.2f} since epoch {first['epoch']})"


def read_log(path):
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line half written when the machine went down
                pass
    return records


def append_log(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def trim_log(path, step):
    """Keep the log records of steps before `step` (kNN records at `step` too), so a continued run
    logs every step once; returns them."""
    kept = [r for r in read_log(path) if r["step"] < step or "knn_top1" in r and 0 < r["step"] == step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    return kept


if __name__ == "__main__":
    main()
