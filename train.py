"""Pretrain CARL or CARP.

    python train.py                                   # CARL on the built-in synthetic dataset, CPU ok
    python train.py --method carp --dataset cifar10 --data-dir data --download
    torchrun --nproc_per_node=4 train.py --method carp --dataset imagefolder --data-dir /imagenet

Writes <out-dir>/log.jsonl (one JSON line per log step), and every epoch <out-dir>/run.pt
(everything needed to resume, --resume <out-dir>/run.pt) and <out-dir>/backbone.pt (a plain
torchvision ResNet state_dict without `fc`). Flags left unset take the thesis settings for
the method and dataset (DEFAULTS below).
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import augment
import data
import lars
import losses
import model as models

# Thesis settings. CARL: 5.6-5.8 (SGD 0.6 -> 0.0006, wd 5e-4, K=100 CIFAR-10, 300 CIFAR-100 and
# STL-10, 3000 ImageNet; lambda 4 -> 1.5 over 100 epochs, 2 -> 1 on STL-10).
# CARP: 6.5.4 (LARS 5.4 -> 0.00054, wd 1e-6, K=3000 in blocks of 250, lambda 2 -> 0.15 over 30 epochs).
# `synthetic` is ours: minutes on a laptop CPU, with the CPU benchmark's settings (RESULTS.md):
# LARS with wd 1e-6 for CARL too (at batch 64, SGD at 0.15 collapsed to one prototype within 90
# steps on CIFAR-10), prototypes started larger (gain) so the first steps carry a gradient, and
# lambda starting near 1, since the thesis's 4 / 2 sent the assignments straight to uniform.
# CARP keeps its BYOL views here (kNN 74.6 against 37.4 at random-init); the CIFAR-10 benchmark
# gives it CARL's views (--views carl), with which it learned far faster at 32 px.
DEFAULTS = {
    "carl": dict(optimizer="sgd", lr=0.6, weight_decay=5e-4, epochs=200, batch_size=256,
                 num_prototypes=100, block_size=None, lam_start=4.0, lam_end=1.5, lam_epochs=100,
                 proto_init_gain=1.0, views="carl"),
    "carp": dict(optimizer="lars", lr=5.4, weight_decay=1e-6, epochs=200, batch_size=256,
                 num_prototypes=3000, block_size=250, lam_start=2.0, lam_end=0.15, lam_epochs=30,
                 proto_init_gain=1.0, views="carp"),
}
DATASET_DEFAULTS = {
    ("carl", "cifar100"): dict(num_prototypes=300),
    ("carl", "stl10"): dict(num_prototypes=300, lam_start=2.0, lam_end=1.0),
    ("carl", "imagefolder"): dict(num_prototypes=3000),
    ("carl", "synthetic"): dict(epochs=5, batch_size=64, optimizer="lars", lr=4.8, weight_decay=1e-6,
                                proto_init_gain=5.0, lam_start=1.5, lam_end=1.0, lam_epochs=5),
    ("carp", "synthetic"): dict(epochs=5, batch_size=64, num_prototypes=500, block_size=50,
                                proto_init_gain=3.0, lam_start=0.75, lam_end=0.5, lam_epochs=5),
}
# Under LARS, biases and BatchNorm parameters skip the trust ratio (as the issue asks, like
# BYOL and Barlow Twins), so they take plain SGD steps. At LARS learning rates (4.8-5.4 per
# 256) those steps are far too large: on CIFAR-10 at batch 64, CARL (prototype gain 5) fell onto
# 2 of 100 prototypes within 20 steps with them, and did not with this scale. Barlow Twins gives
# them 0.0048 / 0.2 = 0.024 of the weights' lr; so do we. (SwAV's LARC, whose 0.6 -> 0.0006
# recipe the thesis's CARL matches, trust-scales every parameter instead.) SGD: one lr for all.
LARS_EXCLUDED_LR_SCALE = 0.024
FINAL_LR_RATIO = 0.001  # cosine decay ends at lr / 1000 (0.6 -> 0.0006, 5.4 -> 0.00054)
RESUME_KEYS = ("method", "arch", "cifar_stem", "num_prototypes", "views")  # must match to resume


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
    p.add_argument("--image-size", type=int, default=None, help="view size (default: 32 CIFAR, 96 STL-10, 224 else)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--until-epoch", type=int, default=None,
                   help="stop after this epoch (schedules still span --epochs); continue with --resume")
    p.add_argument("--batch-size", type=int, default=None, help="global batch over all processes")
    p.add_argument("--optimizer", default=None, help="lars or sgd")
    p.add_argument("--lr", type=float, default=None, help="base lr for batch 256; scaled by batch/256")
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
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"],
                   help="default: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16, AMX), else off")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes per rank")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", default=None, help="path to a run.pt to continue from")
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
        args.cifar_stem = args.image_size <= 64
    if args.optimizer not in ("lars", "sgd"):
        fail(f"unknown --optimizer {args.optimizer!r}; choose lars or sgd")
    if args.method == "carp" and args.num_prototypes % args.block_size:
        fail(f"--num-prototypes {args.num_prototypes} is not divisible by --block-size {args.block_size}")
    if args.until_epoch is not None and not 0 < args.until_epoch <= args.epochs:
        fail(f"--until-epoch {args.until_epoch} must lie in 1..--epochs {args.epochs}")
    for key in ("epochs", "batch_size", "num_prototypes", "image_size", "log_every", "proto_init_gain"):
        if getattr(args, key) <= 0:
            fail(f"--{key.replace('_', '-')} must be positive")
    return args


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_schedule(base_lr, epochs, steps_per_epoch, warmup_epochs):
    """Per-step lr: linear warm-up from 0, then cosine from base_lr to base_lr * FINAL_LR_RATIO."""
    total, warm = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    warmup = np.linspace(0, base_lr, warm, endpoint=False)
    t = np.arange(total - warm) / max(1, total - warm)
    final = base_lr * FINAL_LR_RATIO
    cosine = final + 0.5 * (base_lr - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine])  # (total,)


def lam_schedule(start, end, decay_epochs, epochs, steps_per_epoch):
    """Per-step KL weight, thesis eq. 5.8: linear from start to end over decay_epochs, then end."""
    e = np.arange(epochs * steps_per_epoch) / steps_per_epoch  # (total,) fractional epoch
    if decay_epochs <= 0:
        return np.full_like(e, end)
    return np.where(e < decay_epochs, start - (start - end) * e / decay_epochs, end)


def setup_distributed():
    """(rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def build_optimizer(args, model, lr):
    if args.optimizer == "lars":
        groups = lars.param_groups(model, excluded_lr_scale=LARS_EXCLUDED_LR_SCALE)
        return lars.LARS(groups, lr=lr, weight_decay=args.weight_decay, momentum=0.9)
    return torch.optim.SGD(lars.param_groups(model), lr=lr, weight_decay=args.weight_decay, momentum=0.9)


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: there bf16 autocast trains ResNet-18 about 1.8x faster than float32
    (57 -> 108 views/s on a 2-core EPYC, RESULTS.md); without them bf16 is emulated and slower."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    run_path = os.path.join(args.out_dir, "run.pt")
    ckpt = models.load_checkpoint(args.resume) if args.resume else None
    resuming_here = ckpt is not None and os.path.realpath(args.resume) == os.path.realpath(run_path)
    if os.path.exists(run_path) and not resuming_here:
        fail(f"{run_path} exists; continue it with --resume {run_path}, or pick another --out-dir")
    if ckpt is not None:
        saved = {"views": ckpt["args"].get("method"), **ckpt["args"]}  # before --views: the method's
        for key in RESUME_KEYS:
            if saved.get(key) != getattr(args, key):
                fail(f"{args.resume} was trained with {key}={saved.get(key)!r}, "
                     f"but this run has {key}={getattr(args, key)!r}")
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "off"
    if args.amp == "fp16" and device.type != "cuda":
        fail("--amp fp16 needs a GPU; use --amp bf16 or off on the CPU")

    # Data: each rank loads batch_size / world samples per step; the sampler shuffles per epoch.
    views = augment.pretrain_views(args.views, args.image_size, args.dataset)
    dataset = data.build_dataset(args.dataset, "pretrain", views, args.data_dir, args.download)
    if args.train_subset:
        labels = data.targets(dataset)  # (N,); -1 marks STL-10's unlabeled images, left out here
        n_classes = len(labels[labels >= 0].unique())
        if args.train_subset % n_classes:
            fail(f"--train-subset {args.train_subset} is not a multiple of the {n_classes} classes")
        keep = data.balanced_subset(labels, args.train_subset // n_classes, seed=0)
        dataset = torch.utils.data.Subset(dataset, keep.tolist())
    local_batch = args.batch_size // world
    if len(dataset) < args.batch_size:
        fail(f"{len(dataset)} images are fewer than one batch of --batch-size {args.batch_size}")
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", generator=torch.Generator())
    steps_per_epoch = len(loader)

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
    lrs = lr_schedule(lr, args.epochs, steps_per_epoch, args.warmup_epochs)  # (total steps,)
    lams = lam_schedule(args.lam_start, args.lam_end, args.lam_epochs, args.epochs, steps_per_epoch)
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    if args.compile:
        net = torch.compile(net)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                              enabled=args.amp != "off")

    os.makedirs(args.out_dir, exist_ok=True)
    if rank == 0:
        print(f"{args.method} {args.arch} on {args.dataset}: {len(dataset)} images, {world} process(es) on "
              f"{device.type}, batch {args.batch_size}, {steps_per_epoch} steps/epoch, lr {lr:g}, K {args.num_prototypes}"
              + (f" in blocks of {args.block_size}" if args.method == "carp" else ""), flush=True)
    end_epoch = args.until_epoch or args.epochs
    t_start, steps_done = time.time(), 0
    for epoch in range(start_epoch, end_epoch):
        # Re-seed every epoch from (seed, epoch, rank): augmentations and shuffling depend only
        # on those, so a resumed run sees exactly the views an uninterrupted one would.
        epoch_seed = int(np.random.SeedSequence([args.seed, epoch, rank]).generate_state(1)[0])
        torch.manual_seed(epoch_seed)
        loader.generator.manual_seed(epoch_seed)
        sampler.set_epoch(epoch)
        net.train()
        for it, ((view_a, view_b), _) in enumerate(loader):
            step = epoch * steps_per_epoch + it
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step]) * group.get("lr_scale", 1.0)  # absent in older run.pt
            x = torch.cat([view_a, view_b]).to(device, non_blocking=True, memory_format=torch.channels_last)
            with autocast:
                logits = net(x)  # (2 * local batch, K)
            logits_a, logits_b = logits.chunk(2)  # (local batch, K) each
            if args.method == "carl":
                loss, stats = losses.carl_loss(logits_a, logits_b, lams[step])
            else:
                partition = losses.random_partition(args.num_prototypes, args.block_size, args.seed, step)
                loss, stats = losses.carp_loss(logits_a, logits_b, lams[step], partition)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps_done += 1

            if step % args.log_every == 0 or it == steps_per_epoch - 1:
                if not math.isfinite(loss.item()):
                    fail(f"loss is {loss.item()} at step {step}; lower --lr, or raise --lam-start")
                if rank == 0:
                    now = time.time()
                    rate = args.batch_size * steps_done / (now - t_start)  # images/s this session
                    eta = (end_epoch * steps_per_epoch - step - 1) * args.batch_size / rate
                    rec = {"epoch": epoch, "step": step, "loss": loss.item(),
                           "consistency": stats["consistency"].item(), "kl": stats["kl"].item(),
                           "entropy": float(stats["entropy"]), "in_use": stats["in_use"],
                           "lam": float(lams[step]), "lr": float(lrs[step]), "img_per_s": round(rate, 1),
                           "eta_min": round(eta / 60, 1), "time": round(now - t_start, 1)}
                    print(f"ep {epoch} step {step}/{args.epochs * steps_per_epoch} loss {rec['loss']:.4f} "
                          f"cons {rec['consistency']:.4f} kl {rec['kl']:.4f} lam {rec['lam']:.3f} lr {rec['lr']:.4g} "
                          f"in-use {rec['in_use']}/{args.num_prototypes} {rate:.0f} img/s eta {rec['eta_min']}m",
                          flush=True)
                    with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")

        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "args": vars(args),
                     "rng": {"torch": torch.get_rng_state()}}
            atomic_save(state, run_path)
            atomic_save(model.backbone.state_dict(), os.path.join(args.out_dir, "backbone.pt"))
    if rank == 0:
        print(f"done: {end_epoch} of {args.epochs} epochs in {(time.time() - t_start) / 60:.1f} min; "
              f"checkpoint {run_path}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
