"""Pretrain a backbone with CARL, CARP, or one of the thesis's baselines (SimCLR, BYOL, SwAV, MoCo v2).

    python train.py                                   # CARL on the built-in synthetic dataset, CPU ok
    python train.py --method carp --dataset cifar10 --data-dir data --download
    python train.py --method carp --recipe neurips23 --dataset cifar10 --data-dir data   # the published CARP
    torchrun --nproc_per_node=4 train.py --method carp --dataset imagefolder --data-dir /imagenet

Writes <out-dir>/log.jsonl (one JSON line per log step and per kNN evaluation), and
<out-dir>/run.pt (everything needed to continue: model, EMA teacher, queue, optimizer) with
<out-dir>/backbone.pt (a plain torchvision ResNet state_dict without `fc`: the online network's, or
the teacher's with --export-teacher) every --ckpt-every-epochs epochs, every --ckpt-every-min
minutes, at the end and when stopped by SIGTERM/SIGUSR1. The same command run again continues from
<out-dir>/run.pt at the next step. Flags left unset take the thesis settings for the method and
dataset (METHODS and DATASET_DEFAULTS below; --recipe on top of them).
"""
import argparse
import collections
import contextlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import augment
import data
import evaluate
import lars
import losses
import model as models


# ---------------------------------------------------------------- the methods

def assignment_loss(student, teacher, run, now, step):
    """CARL (one block of all K) and CARP (a random partition, new every step) on the outputs' logits."""
    a = run.args
    if a.block_size is None:
        partition = torch.arange(a.num_prototypes).view(1, -1)  # (1, K)
    else:
        partition = losses.random_partition(a.num_prototypes, a.block_size, a.seed, step)  # (N_P, N_B)
    if student[1][0].is_cuda:  # pinned, so that copying it to the GPU does not wait for the GPU
        partition = partition.pin_memory()
    partition = partition.to(student[1][0].device, non_blocking=True)
    loss, stats = losses.assignment_loss(student[1], teacher and teacher[1], now["lam"], partition,
                                         a.global_crops, pooled=a.kl == "pooled")
    return loss, stats, None


def simclr_loss(student, teacher, run, now, step):
    return (*losses.nt_xent(*student[1], run.args.temperature), None)


def byol_loss(student, teacher, run, now, step):  # online predictions against the target's projections
    return (*losses.byol_loss(*student[1], *teacher[0]), None)


def swav_loss(student, teacher, run, now, step):  # the queue holds past global crops' embeddings
    bank = run.queue.rows @ run.model.prototypes.weight.detach().T if run.queue and run.queue.full else None
    loss, stats = losses.swav_loss(student[1], run.args.temperature, run.args.global_crops, bank)  # bank (Q, K)
    push = torch.cat(student[0][:run.args.global_crops]).detach() if run.queue else None  # (G B, D)
    return loss, stats, push


def mocov2_loss(student, teacher, run, now, step):  # queries against the key encoder's keys and the queue
    loss, stats = losses.moco_loss(*student[1], *teacher[0], run.queue.rows, run.args.temperature)
    return loss, stats, F.normalize(torch.cat(teacher[0]).float(), dim=1)  # (2B, D) keys for the queue


def swav_freeze_prototypes(model, step, steps_per_epoch):  # SwAV: the prototypes learn from the 2nd epoch on
    if step < steps_per_epoch:
        model.prototypes.weight.grad = None


@torch.no_grad()
def swav_normalize_prototypes(model):  # SwAV: the prototypes back on the unit sphere after every step
    model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))


# One entry per method. loss(student, teacher, run, now, step) -> (loss, stats, rows to push to the queue or
# None), student and teacher being the networks' (embeddings, outputs) per view; needs_teacher: it cannot run
# without its EMA teacher; multiview: it takes more than two crops; queue: None, "empty" (filled as it goes,
# used once full: SwAV) or "random" (starts full of random keys, needed: MoCo); teacher_bn_group: EMATeacher's;
# the hooks run after backward and after the optimizer step. `defaults` lists every flag the method takes.
Method = collections.namedtuple("Method", "defaults loss needs_teacher multiview queue teacher_bn_group after_backward "
                                "after_step", defaults=(False, False, None, None, None, None))
# Thesis settings (sources pinned in tests/test_train.py::THESIS). All: 200 epochs, batch 256, cosine lr
# without warm-up (5.8), ResNet-18 + the same projection head (5.8.2). CARL (5.6-5.8): SGD + LARS (SwAV's
# LARC: plain SGD collapsed, RESULTS.md) 0.6 -> 0.0006, wd 5e-4, K = 100 on CIFAR-10; lambda 4 -> 1.5 over
# 100 epochs. CARP (6.5.4): LARS 5.4 -> 0.00054, wd 1e-6, K = 3000 in blocks of 250, lambda 2 -> 0.15 over 30
# epochs. SimCLR and BYOL (5.8.5): SGD without LARS at 0.03, SimCLR's temperature 0.2. SwAV (5.8.5: K as
# CARL's, else its repository's batch-256 recipe): LARC 0.6 -> 0.0006, wd 1e-6, T 0.1, prototypes frozen for
# the first epoch. MoCo v2 (its paper, and its authors' CIFAR-10 demo): SGD 0.03, T 0.2, a queue of 4096, key
# encoder momentum 0.99. Weight decay 5e-4 for the SGD baselines (the thesis's CIFAR value, 5.8.4; the
# papers' 1e-6 goes with LARS). Where issue 19 (which added the baselines) and the thesis differ, the issue
# is followed: BYOL's target momentum 0.99 -> 1 (the paper's 0.996 is ImageNet's), MoCo's temperature 0.2.
BASELINE = dict(epochs=200, batch_size=256, final_lr_ratio=1e-3, global_crops=2, local_crops=0, head="thesis",
                knn_every=0)
MULTICROP = dict(BASELINE, local_size=None, local_scale=None)
ASSIGNMENT = dict(MULTICROP, proto_init_gain=1.0, teacher="none", teacher_momentum=0.99, teacher_momentum_end=1.0,
                  kl="per-view", prototypes="linear")
METHODS = {
    "carl": Method(dict(ASSIGNMENT, optimizer="larc", lr=0.6, weight_decay=5e-4, num_prototypes=100, lam_start=4.0,
                        lam_end=1.5, lam_epochs=100, views="carl"), assignment_loss, multiview=True),
    "carp": Method(dict(ASSIGNMENT, optimizer="lars", lr=5.4, final_lr_ratio=1e-4, weight_decay=1e-6,
                        num_prototypes=3000, block_size=250, lam_start=2.0, lam_end=0.15, lam_epochs=30,
                        views="carp"), assignment_loss, multiview=True),
    "simclr": Method(dict(BASELINE, optimizer="sgd", lr=0.03, weight_decay=5e-4, temperature=0.2, views="carl"),
                     simclr_loss),
    "byol": Method(dict(BASELINE, optimizer="sgd", lr=0.03, weight_decay=5e-4, teacher="ema", teacher_momentum=0.99,
                        teacher_momentum_end=1.0, views="carp"), byol_loss, needs_teacher=True),
    "swav": Method(dict(MULTICROP, optimizer="larc", lr=0.6, weight_decay=1e-6, num_prototypes=100, temperature=0.1,
                        queue_size=0, views="carl"), swav_loss, multiview=True, queue="empty",
                   after_backward=swav_freeze_prototypes, after_step=swav_normalize_prototypes),
    "mocov2": Method(dict(BASELINE, optimizer="sgd", lr=0.03, weight_decay=5e-4, temperature=0.2, queue_size=4096,
                          teacher="ema", teacher_momentum=0.99, teacher_momentum_end=0.99, views="carl"),
                     mocov2_loss, needs_teacher=True, queue="random", teacher_bn_group=32),
}
# `synthetic` is ours: the quickstart, under 2 minutes of training on a slow laptop CPU (RESULTS.md):
# 20 px images, 2 epochs (62 steps of 64), LARS at 9.6 per 256 with wd 1e-6 for CARL too, prototypes
# started larger (gain) so the first steps carry a gradient, lambda starting near 1 (the thesis's 4 / 2
# sent the assignments straight to uniform). "*": every method.
DATASET_DEFAULTS = {
    ("carl", "cifar100"): dict(num_prototypes=300),
    ("carl", "stl10"): dict(num_prototypes=300, lam_start=2.0, lam_end=1.0),
    ("carl", "imagefolder"): dict(num_prototypes=3000),
    ("swav", "cifar100"): dict(num_prototypes=300),
    ("swav", "stl10"): dict(num_prototypes=300),
    ("swav", "imagefolder"): dict(num_prototypes=3000),
    ("*", "synthetic"): dict(epochs=2, batch_size=64, knn_every=1),
    ("carl", "synthetic"): dict(optimizer="lars", lr=9.6, weight_decay=1e-6, proto_init_gain=5.0, lam_start=1.5,
                                lam_end=1.0, lam_epochs=2),
    ("carp", "synthetic"): dict(epochs=5, num_prototypes=500, block_size=50, proto_init_gain=3.0, lam_start=0.75,
                                lam_end=0.5, lam_epochs=5),
}
# --recipe neurips23: the published CARP (Silva & Rivera, NeurIPS 2023; its code, github sthalles/carp), for
# CARL and CARP: EMA teacher 0.99 -> 1, 2 global + 6 local crops, the consistency over every (student view,
# teacher global view) pair, one KL pooled over every view, weight 1 on both (lambda 1, no decay), a 3-layer
# GELU head to 256-d and unit-norm prototypes, LARS 0.45 x batch / 256 cosine to 0.0048 (the ratio at batch
# 256), wd 1e-6, no warm-up. Local crops: 96 px at 224 (the paper's); on small images half the global crop
# (16 px at 32: ImageNet's ratio 0.43 would give 14 px; 16 keeps layer4's map at 2x2 with the CIFAR stem).
# ImageNet-sized trees take its 65,536 prototypes in blocks of 512; other datasets keep the method's K.
RECIPES = {
    "thesis": {},
    "neurips23": dict(teacher="ema", teacher_momentum=0.99, teacher_momentum_end=1.0, local_crops=6,
                      local_scale=(0.05, 0.2), kl="pooled", lam_start=1.0, lam_end=1.0, lam_epochs=0,
                      head="neurips23", prototypes="unit", views="neurips23", optimizer="lars", lr=0.45,
                      final_lr_ratio=0.0048 / 0.45, weight_decay=1e-6, proto_init_gain=1.0),
}
# Under "lars", biases and BatchNorm parameters skip the trust ratio (BYOL, Barlow Twins), so they take plain
# SGD steps, far too large at LARS learning rates (a collapse: RESULTS.md, "What was found" 2): they get Barlow
# Twins' 0.0048 / 0.2 = 0.024 of the weights' lr.
LARS_EXCLUDED_LR_SCALE = 0.024
COMMON_KEYS = ("epochs", "batch_size", "optimizer", "lr", "final_lr_ratio", "weight_decay", "views", "knn_every",
               "global_crops", "local_crops", "head")
# flags only some methods take: given to another, they are refused
METHOD_KEYS = sorted({k for m in METHODS.values() for k in m.defaults} - set(COMMON_KEYS))
# A run continues from its run.pt only with these unchanged: each changes what the run computes.
SAME_RUN_KEYS = ("method", "recipe", "dataset", "train_subset", "arch", "cifar_stem", "image_size", "epochs",
                 "batch_size", "optimizer", "lr", "final_lr_ratio", "weight_decay", "warmup_epochs", "num_prototypes",
                 "proto_init_gain", "block_size", "lam_start", "lam_end", "lam_epochs", "temperature", "queue_size",
                 "teacher", "teacher_momentum", "teacher_momentum_end", "kl", "prototypes", "head", "views",
                 "global_crops", "local_crops", "local_size", "local_scale", "loader", "sync_bn", "seed")
# preemption (SIGTERM; SLURM's --signal=USR1@secs before a time limit) and Ctrl-C: save, then stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line, like every other refusal here (no usage dump)."""

    def error(self, message):
        fail(re.sub(r"^argument (--[\w-]+)\S*: ", r"\1 ", message))  # "argument --x/--no-x: m" -> "--x m"


def checked(kind, ok, what):
    """An argparse type: kind(text), refused at parse time unless finite and ok(value)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    return parse


POSITIVE_INT = checked(int, lambda v: v > 0, "a positive integer")
COUNT = checked(int, lambda v: v >= 0, "0 or a positive integer")
CROPS = checked(int, lambda v: v >= 2, "2 or more: each global crop is the target of another view")
POSITIVE = checked(float, lambda v: v > 0, "positive")
NONNEGATIVE = checked(float, lambda v: v >= 0, "0 or positive")
UNIT = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="carl", help=", ".join(METHODS))
    p.add_argument("--recipe", default="thesis", help="thesis, or neurips23 (CARL/CARP: the published CARP recipe)")
    p.add_argument("--dataset", default="synthetic", help=", ".join(data.DATASETS))
    p.add_argument("--data-dir", default="data", help="where the dataset lies (or is downloaded to)")
    p.add_argument("--download", action="store_true", help="let torchvision download cifar10/cifar100/stl10")
    p.add_argument("--train-subset", type=POSITIVE_INT, default=None,
                   help="pretrain on a fixed class-balanced subset of this many labelled train images")
    p.add_argument("--arch", default="resnet18", help=", ".join(models.ARCHS))
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem without max-pool (default: on for images <= 64 px)")
    p.add_argument("--image-size", type=POSITIVE_INT, default=None,
                   help="global view size (default: 20 synthetic, 32 CIFAR, 96 STL-10, 224 else)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None)
    p.add_argument("--until-epoch", type=POSITIVE_INT, default=None,
                   help="stop after this epoch (schedules still span --epochs); the same command continues")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="global batch over all processes")
    p.add_argument("--optimizer", default=None, help="larc (LARS on every parameter), lars (not on biases/BN) or sgd")
    p.add_argument("--lr", type=POSITIVE, default=None, help="base lr for batch 256; scaled by batch/256")
    p.add_argument("--final-lr-ratio", type=POSITIVE, default=None, help="the cosine ends at lr times this")
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=None)
    p.add_argument("--warmup-epochs", type=NONNEGATIVE, default=0.0, help="linear lr warm-up before the cosine decay")
    p.add_argument("--num-prototypes", type=POSITIVE_INT, default=None, help="K (CARL, CARP, SwAV)")
    p.add_argument("--proto-init-gain", type=POSITIVE, default=None,
                   help="scale of the prototypes' initial weights (thesis: 1, PyTorch's default init)")
    p.add_argument("--prototypes", default=None, choices=["linear", "unit"],
                   help="CARL/CARP: a linear layer (the thesis) or unit-norm prototypes (the published CARP)")
    p.add_argument("--head", default=None, choices=models.HEADS,
                   help="projection head: thesis (2 x 512, ReLU, 128-d) or neurips23 (3 x 2048, GELU, 256-d)")
    p.add_argument("--block-size", type=POSITIVE_INT, default=None, help="CARP: prototypes per partition block N_B")
    p.add_argument("--lam-start", type=NONNEGATIVE, default=None, help="KL weight at epoch 0 (b in thesis eq. 5.8)")
    p.add_argument("--lam-end", type=NONNEGATIVE, default=None, help="KL weight after --lam-epochs (a)")
    p.add_argument("--lam-epochs", type=NONNEGATIVE, default=None, help="epochs of linear decay (E)")
    p.add_argument("--kl", default=None, choices=["per-view", "pooled"],
                   help="CARL/CARP: the KL of each view's batch-mean assignment (thesis), or of all views pooled")
    p.add_argument("--temperature", type=POSITIVE, default=None, help="SimCLR, SwAV, MoCo v2")
    p.add_argument("--queue-size", type=COUNT, default=None,
                   help="MoCo v2's negatives, SwAV's Sinkhorn bank (0: none): a multiple of the rows a step adds")
    p.add_argument("--teacher", default=None, choices=["none", "ema"],
                   help="CARL/CARP: targets from an EMA teacher of the student (BYOL and MoCo v2 always have one)")
    p.add_argument("--teacher-momentum", type=UNIT, default=None, help="EMA momentum at the first step")
    p.add_argument("--teacher-momentum-end", type=UNIT, default=None,
                   help="... at the last (a per-step cosine between the two; equal: constant)")
    p.add_argument("--export-teacher", action="store_true", help="backbone.pt holds the teacher's backbone")
    p.add_argument("--views", default=None, choices=list(augment.VIEWS),
                   help="view pipeline (augment.py); default: the method's")
    p.add_argument("--global-crops", type=CROPS, default=None, help="global crops per image (CARL, CARP, SwAV: >= 2)")
    p.add_argument("--local-crops", type=COUNT, default=None, help="multi-crop: small crops per image (CARL, CARP, SwAV)")
    p.add_argument("--local-size", type=POSITIVE_INT, default=None, help="local crops' size (default: 96 at 224 px, else half)")
    p.add_argument("--local-scale", type=POSITIVE, nargs=2, default=None, metavar=("A", "B"),
                   help="local crops' area range (default 0.05 0.2)")
    p.add_argument("--loader", default=None, choices=["device", "workers"],
                   help="device: the dataset decoded once into memory on the training device, views made there in "
                        "batches; workers: PIL views in DataLoader processes (default: workers for ImageFolder trees "
                        "of large images, else device)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"],
                   help="default: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16, AMX), else off")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model, the teacher and the device loader's views (default: on GPU only; "
                        "the first step then takes about a minute)")
    p.add_argument("--workers", type=COUNT, default=min(8, os.cpu_count() or 1),
                   help="DataLoader processes per rank (--loader workers)")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", default=None,
                   help="continue from this run.pt (only needed when it lies outside --out-dir)")
    p.add_argument("--ckpt-every-epochs", type=POSITIVE_INT, default=1,
                   help="write run.pt at the end of every N-th epoch (more than 1 where epochs take seconds)")
    p.add_argument("--ckpt-every-min", type=POSITIVE, default=15.0, help="also write run.pt inside an epoch this often")
    p.add_argument("--knn-every", type=COUNT, default=None,
                   help="kNN top-1 (k=200) every N epochs, after the last, and before the first (default: 1 for "
                        "synthetic, else 0 = off)")
    p.add_argument("--knn-train-subset", type=POSITIVE_INT, default=None, help="kNN bank: a class-balanced subset of this many")
    p.add_argument("--knn-test-subset", type=POSITIVE_INT, default=None, help="kNN queries: a class-balanced subset")
    p.add_argument("--seed", type=COUNT, default=0)
    p.add_argument("--log-every", type=POSITIVE_INT, default=10, help="steps between log lines")
    args = p.parse_args(argv)
    return resolve(args)


def fail(msg):
    raise SystemExit(f"error: {msg}")


def flag(key):
    return "--" + key.replace("_", "-")


def shown(value):
    """A flag's value as it is typed: 0.0107, 0.05 0.2."""
    if isinstance(value, (tuple, list)):
        return " ".join(shown(v) for v in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def recipe_values(args):
    """The values --recipe sets for this dataset and image size (RECIPES, plus its sizes)."""
    values = dict(RECIPES[args.recipe])
    if args.recipe == "neurips23":
        values["local_size"] = 96 if args.image_size >= 224 else args.image_size // 2
        if args.dataset == "imagefolder" and args.image_size >= 224:
            values.update(num_prototypes=65536, **({"block_size": 512} if args.method == "carp" else {}))
    return values


def resolve(args):
    """Fill unset flags from the method's, the dataset's and the recipe's settings (in that order of
    precedence, lowest first) and check flag combinations before any work."""
    if args.method not in METHODS:
        fail(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.dataset not in data.DATASETS:
        fail(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(data.DATASETS)}")
    if args.arch not in models.ARCHS:
        fail(f"unknown --arch {args.arch!r}; choose one of {', '.join(models.ARCHS)}")
    if args.recipe not in RECIPES:
        fail(f"unknown --recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    method = METHODS[args.method]
    if args.recipe != "thesis" and method.loss is not assignment_loss:
        fail(f"--recipe {args.recipe} is CARL and CARP's; --method {args.method} follows its own paper")
    for key in METHOD_KEYS:
        if key not in method.defaults and getattr(args, key) is not None:
            fail(f"{flag(key)} is not used by --method {args.method}")
    given = {k for k, v in vars(args).items() if v is not None}  # set on the command line (or not None by default)
    args.image_size = args.image_size or data.IMAGE_SIZE[args.dataset]
    args.recipe_values = recipe_values(args)
    defaults = {**method.defaults, **DATASET_DEFAULTS.get(("*", args.dataset), {}),
                **DATASET_DEFAULTS.get((args.method, args.dataset), {}), **args.recipe_values}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cifar_stem is None:
        args.cifar_stem = args.image_size <= models.CIFAR_STEM_MAX_PX
    if args.loader is None:
        args.loader = data.default_loader(args.dataset, args.image_size)
    if args.optimizer not in ("larc", "lars", "sgd"):
        fail(f"unknown --optimizer {args.optimizer!r}; choose larc, lars or sgd")
    if args.warmup_epochs >= args.epochs:
        fail(f"--warmup-epochs {args.warmup_epochs:g} must be shorter than the run's --epochs {args.epochs}")
    if args.block_size is not None and args.num_prototypes % args.block_size:
        fail(f"--num-prototypes {args.num_prototypes} is not divisible by --block-size {args.block_size}")
    if args.until_epoch is not None and not 0 < args.until_epoch <= args.epochs:
        fail(f"--until-epoch {args.until_epoch} must lie in 1..--epochs {args.epochs}")
    resolve_views_and_teacher(args, method, given)
    return args


def resolve_views_and_teacher(args, method, given):
    """The crops, the teacher and the queue: what each method can take."""
    if not method.multiview and (args.global_crops != 2 or args.local_crops):
        fail(f"--method {args.method}'s loss takes two views: --global-crops 2 and no --local-crops")
    stride = 8 if args.cifar_stem else 32  # smaller crops reach layer4's stride-2 convs as 1x1 maps (and, on
    if args.image_size < stride:  # CPUs, bf16 gave NaN gradients there: RESULTS.md, "What was found")
        fail(f"--image-size {args.image_size} is below the network's stride ({stride} px with the "
             f"{'cifar' if args.cifar_stem else 'imagenet'} stem)")
    if args.local_crops:
        args.local_size = args.local_size or (96 if args.image_size >= 224 else args.image_size // 2)
        args.local_scale = tuple(args.local_scale or (0.05, 0.2))
        if not 0 < args.local_scale[0] < args.local_scale[1] <= 1:
            fail(f"--local-scale {args.local_scale[0]:g} {args.local_scale[1]:g} must satisfy 0 < A < B <= 1")
        if args.local_size < stride:
            fail(f"--local-size {args.local_size} is below the network's stride ({stride} px with the "
                 f"{'cifar' if args.cifar_stem else 'imagenet'} stem)")
    elif given & {"local_size", "local_scale"}:
        fail("--local-size and --local-scale shape local crops: give --local-crops N too")
    else:  # --recipe neurips23 --local-crops 0: the recipe's local crop shape is unused
        args.local_size = args.local_scale = None
    if method.needs_teacher and args.teacher != "ema":
        fail(f"--method {args.method} needs its EMA teacher (--teacher ema)")
    if args.export_teacher and args.teacher != "ema":
        fail("--export-teacher exports the EMA teacher's backbone: the run has none (--teacher ema)")
    if args.teacher == "none" and given & {"teacher_momentum", "teacher_momentum_end"}:
        fail("--teacher-momentum and --teacher-momentum-end are for the EMA teacher: give --teacher ema too")
    if args.prototypes == "unit":  # scaling a unit-norm prototype changes nothing
        if "proto_init_gain" in given and args.proto_init_gain != 1:
            fail("--proto-init-gain does not change unit-norm prototypes (--prototypes unit)")
        args.proto_init_gain = 1.0
    if args.queue_size:
        per_step = args.global_crops * args.batch_size  # rows a step adds: every global crop of the global batch
        if args.queue_size % per_step:
            fail(f"--queue-size {args.queue_size} is not a multiple of the {per_step} rows each step adds "
                 f"({args.global_crops} views x --batch-size {args.batch_size})")
    elif method.queue == "random":
        fail(f"--method {args.method} takes its negatives from a queue: --queue-size must be positive")


def check_same_run(saved, args, path):
    """One clear line naming the first flag that differs from the run being continued."""
    for key in SAME_RUN_KEYS:
        value = getattr(args, key)
        same = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)  # noqa: E731 (a tuple comes back a list)
        if key in saved and same(saved[key]) != same(value):
            fail(f"{path} is a run with {flag(key)} {saved[key]}, but this command has {flag(key)} {value}; "
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


# ---------------------------------------------------------------- schedules: arrays indexed by step

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


def momentum_schedule(start, end, epochs, steps_per_epoch):
    """Per-step EMA momentum: BYOL's cosine from start (step 0) to end (the last step)."""
    total = epochs * steps_per_epoch
    return end - (end - start) * (np.cos(np.pi * np.arange(total) / max(1, total - 1)) + 1) / 2  # (total,)


def schedules(args, steps_per_epoch):
    """The per-step values a run uses: lr always, lambda and the teacher's momentum where the method has them."""
    lr = args.lr * args.batch_size / 256
    out = {"lr": lr_schedule(lr, lr * args.final_lr_ratio, args.epochs, steps_per_epoch, args.warmup_epochs)}
    if args.lam_start is not None:
        out["lam"] = lam_schedule(args.lam_start, args.lam_end, args.lam_epochs, args.epochs, steps_per_epoch)
    if args.teacher == "ema":
        out["momentum"] = momentum_schedule(args.teacher_momentum, args.teacher_momentum_end, args.epochs,
                                            steps_per_epoch)
    return out


def describe_schedules(args):
    lr = args.lr * args.batch_size / 256  # the peak: a warm-up starts at 0
    warm = f"{args.warmup_epochs:g}-epoch warm-up" if args.warmup_epochs else "no warm-up"
    text = f"lr {lr:g} -> {lr * args.final_lr_ratio:g} (cosine, {warm})"
    if args.lam_start is not None and args.lam_start == args.lam_end:
        text += f", lambda {args.lam_start:g} (constant)"
    elif args.lam_start is not None:
        text += f", lambda {args.lam_start:g} -> {args.lam_end:g} over {args.lam_epochs:g} epochs"
    if args.teacher == "ema":
        text += f", EMA teacher momentum {args.teacher_momentum:g} -> {args.teacher_momentum_end:g}"
    return text


def describe_run(args, num_images, world, device, steps_per_epoch):
    """The start-up line: data, batch, the method's own settings, views, speed."""
    shown_elsewhere = ("lam_start", "lam_end", "lam_epochs", "teacher_momentum", "teacher_momentum_end", "local_size",
                       "local_scale")
    own = ", ".join(f"{flag(k)[2:]} {shown(getattr(args, k))}" for k in METHOD_KEYS
                    if k in METHODS[args.method].defaults and getattr(args, k) is not None and k not in shown_elsewhere)
    crops = f"{args.global_crops} x {args.image_size} px" + (
        f" + {args.local_crops} x {args.local_size} px (scale {args.local_scale[0]:g}-{args.local_scale[1]:g})"
        if args.local_crops else "")
    return (f"{args.method} {args.arch} on {args.dataset}: {num_images} images, {world} process(es) on {device.type}, "
            f"batch {args.batch_size}, {steps_per_epoch} steps/epoch, {args.epochs} epochs, {own}, {args.optimizer} wd "
            f"{args.weight_decay:g}, {args.views} views ({crops}), {args.loader} loader, amp {args.amp}"
            + (", torch.compile (its first step takes about a minute)" if args.compile else ""))


# ---------------------------------------------------------------- processes, devices, optimizer

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


def build_run(args, device, world, steps_per_epoch, ckpt=None):
    """Everything a step needs, as one namespace: the model (and `net`, what runs it: DDP, compiled), the
    EMA teacher, the queue, optimizer, grad scaler, autocast and the per-step schedules; from ckpt if given."""
    torch.manual_seed(args.seed)
    method = METHODS[args.method]
    model = models.Model(args.method, args.arch, args.cifar_stem, args.num_prototypes, args.proto_init_gain,
                         args.head, args.prototypes or "linear")
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    teacher = models.EMATeacher(model, method.teacher_bn_group) if args.teacher == "ema" else None
    queue = None
    if args.queue_size:
        dim = model.head[-1].out_features
        queue = models.Queue(args.queue_size, dim, device, args.seed if method.queue == "random" else None)
    sched = schedules(args, steps_per_epoch)
    optimizer = build_optimizer(args, model, float(sched["lr"][0]))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the run started without fp16
            scaler.load_state_dict(ckpt["scaler"])
        if teacher is not None:
            teacher.net.load_state_dict(ckpt["teacher"])
        if queue is not None:
            queue.load_state_dict(ckpt["queue"])
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    if args.compile:
        net = torch.compile(net)
        if teacher is not None:
            teacher.compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                              enabled=args.amp != "off")
    return argparse.Namespace(args=args, method=method, model=model, net=net, teacher=teacher, queue=queue,
                              optimizer=optimizer, scaler=scaler, autocast=autocast, schedules=sched,
                              steps_per_epoch=steps_per_epoch, rank=dist.get_rank() if world > 1 else 0)


# ---------------------------------------------------------------- data

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


def view_pipeline(args, batched):
    """The run's views (global crops, then local ones): batched on the device, or PIL."""
    make = augment.batch_pretrain_views if batched else augment.pretrain_views
    return make(args.views, args.image_size, args.dataset, args.global_crops, args.local_crops, args.local_size,
                args.local_scale)


def pretrain_batches(args, source, batches, rank, device):
    """The views (a list of (local batch, 3, S, S) on `device`) of each step of `batches` (data.Batches),
    by either loader."""
    if args.loader == "device":
        views = view_pipeline(args, batched=True)
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
    loader = torch.utils.data.DataLoader(data.SeededViews(source, view_pipeline(args, batched=False), args.seed),
                                         batch_sampler=batches, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    stream = iter(loader)
    try:
        for views in stream:
            yield [v.to(device, non_blocking=True) for v in views]
        return
    except data.BadImageError as e:  # raised in a worker, its message ends with ours; run.pt stays as it was
        message = str(e).strip().splitlines()[-1].split("BadImageError: ")[-1]
        e.__traceback__ = None  # its frames hold the loader (in a reference cycle only the garbage collector frees)
    # The workers shut down now: they ignore SIGTERM, so a process exiting with them alive waits for them forever.
    del stream
    fail(message)


# ---------------------------------------------------------------- one step

def train_step(run, views, now, step):
    """One optimisation step on a batch of views (global crops first); `now` holds this step's scheduled
    values. Returns (loss, stats) as device tensors."""
    for group in run.optimizer.param_groups:
        group["lr"] = now["lr"] * group["lr_scale"]
    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    with run.autocast:
        student = run.net(views)  # (embeddings, outputs): one (B, D) and one (B, K or D) per view
        teacher = run.teacher(views[:run.args.global_crops], data.seed_of(run.args.seed, step, run.rank, 1)) \
            if run.teacher else None  # the global crops only
    loss, stats, push = run.method.loss(student, teacher, run, now, step)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.method.after_backward:
        run.method.after_backward(run.model, step, run.steps_per_epoch)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.method.after_step:
        run.method.after_step(run.model)
    if run.teacher:
        run.teacher.update(run.model, now["momentum"])
    if push is not None:  # every rank keeps the same queue: the rows of the global batch
        run.queue.push(losses.gather(push))
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


# ---------------------------------------------------------------- around the steps: logs, checkpoints, kNN, stops

class Bookkeeping:
    """What happens between steps, the same for every method: each step the ranks agree whether to stop (a
    signal reached any rank) or save (rank 0's clock); log lines, run.pt, the kNN monitor, the NaN check."""

    def __init__(self, args, run, world, control, start_step, end_step, stop_signal, resumed_from, data_info, device,
                 max_bytes):
        self.args, self.run, self.world, self.control = args, run, world, control
        self.rank, self.spe = run.rank, run.steps_per_epoch
        self.start, self.end, self.total = start_step, end_step, args.epochs * run.steps_per_epoch
        self.stop_signal, self.data_info = stop_signal, data_info
        self.run_path, self.log_path = os.path.join(args.out_dir, "run.pt"), os.path.join(args.out_dir, "log.jsonl")
        self.monitor = KnnMonitor(args, device, max_bytes) if args.knn_every and self.rank == 0 else None
        self.cuda = device.type == "cuda"
        if self.rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            log = trim_log(self.log_path, start_step)  # drop what an interrupted run logged after its checkpoint
            print(describe_run(args, data_info["num_images"], world, device, self.spe), flush=True)
            print(describe_schedules(args), flush=True)
            if args.recipe_values:  # the recipe's values, and where the command line overrides one
                print(f"recipe {args.recipe}: " + " ".join(
                    f"{flag(k)} {shown(v)}" + ("" if getattr(args, k) == v else f" (here {shown(getattr(args, k))})")
                    for k, v in args.recipe_values.items()), flush=True)
            if resumed_from:
                print(f"continuing {resumed_from} at step {start_step} of {self.total} (epoch {start_step // self.spe}, "
                      f"step {start_step % self.spe} of it)", flush=True)
            self.knn_records = [r for r in log if "knn_top1" in r]  # the first is the random-init value
        self.t_start = self.last_save = time.time()
        if self.knn_due(start_step):  # step 0, or an epoch's end whose kNN a stopped run skipped
            self.knn(start_step)

    def save(self, step):
        if self.rank == 0:
            run = self.run
            state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "scaler": run.scaler.state_dict(), "teacher": run.teacher and run.teacher.net.state_dict(),
                     "queue": run.queue and run.queue.state_dict(), "step": step, "epoch": step // self.spe,
                     "args": {k: v for k, v in vars(self.args).items() if k != "recipe_values"}, "data": self.data_info,
                     "world": self.world}
            atomic_save(state, self.run_path)
            exported = run.teacher.net if self.args.export_teacher else run.model
            atomic_save(exported.backbone.state_dict(), os.path.join(self.args.out_dir, "backbone.pt"))
        self.last_save = time.time()

    def knn_due(self, step):  # before training, after every --knn-every-th epoch and after the last
        epoch, it = divmod(step, self.spe)
        return self.args.knn_every and it == 0 and (epoch % self.args.knn_every == 0 or step == self.total)

    def knn(self, step):
        if self.rank == 0 and all(r["step"] != step for r in self.knn_records):  # a continued run may hold it already
            t0 = time.time()
            top1, top5 = self.monitor(self.run.model.backbone)
            rec = {"epoch": step // self.spe, "step": step, "knn_top1": round(top1, 2), "knn_top5": round(top5, 2),
                   "seconds": round(time.time() - t0, 1)}
            self.knn_records.append(rec)
            print(f"knn ep {rec['epoch']}: top-1 {top1:.2f}{knn_gain(self.knn_records)}, top-5 {top5:.2f}, "
                  f"{rec['seconds']:.0f} s", flush=True)
            append_log(self.log_path, rec)
        if self.world > 1:
            dist.barrier(group=self.control)  # the other ranks wait for rank 0's evaluation

    def after_step(self, step, loss, stats, now):
        """Log, save, evaluate, stop, as due after `step`."""
        epoch, it = divmod(step, self.spe)
        if step == self.start:  # the speed is timed from here: the first step waits for --compile
            if self.cuda:
                torch.cuda.synchronize()  # once a session: the first step's GPU work inside, not after
            self.t_first = time.time()
        save_due = self.rank == 0 and time.time() - self.last_save > 60 * self.args.ckpt_every_min
        epoch_done = it == self.spe - 1
        log_due = step % self.args.log_every == 0 or epoch_done  # every save but a signal's or the clock's is one
        # (stop signal, save due, loss not finite): (3,) int64; loss.item() is the only host-device sync
        flags = torch.tensor([max(self.stop_signal, default=0), int(save_due), log_due and not math.isfinite(loss.item())])
        self.agree(flags)
        if (flags[0] or flags[1]) and not log_due:  # a save off the log steps: its loss checked first, on every rank
            flags[2] = not math.isfinite(loss.item())
            self.agree(flags)
        if flags[2]:  # on every rank at once (one alone would leave the others waiting in DDP)
            fail(f"the loss is not finite at step {step} ({loss.item()} on rank {self.rank}); lower --lr"
                 + (", or raise --lam-start" if "lam" in now else ""))
        if self.rank == 0 and log_due:
            self.log(step, epoch, loss, stats, now)
        if flags.any() or step + 1 == self.end or (epoch_done and (epoch + 1) % self.args.ckpt_every_epochs == 0):
            self.save(step + 1)
        stopping = flags[0] and step + 1 < self.end
        if epoch_done and self.knn_due(step + 1) and not stopping:  # a stopping run has seconds: run.pt, no kNN
            self.knn(step + 1)
        if stopping:
            if self.world > 1:
                dist.barrier(group=self.control)  # run.pt is written before any rank exits
            if self.rank == 0:
                print(f"stopped by {signal.Signals(int(flags[0])).name} after step {step + 1} of {self.total} (epoch "
                      f"{epoch}, step {it + 1} of {self.spe}); {self.run_path} holds it: run the same command to "
                      f"continue", flush=True)
            raise SystemExit(128 + int(flags[0]))

    def agree(self, flags):
        """Every rank's flags become their maximum over ranks (in place)."""
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)

    def log(self, step, epoch, loss, stats, now):
        t = time.time()
        done, since = (step - self.start, self.t_first) if step > self.start else (1, self.t_start)
        rate = self.args.batch_size * done / (t - since)  # images/s this session, after its first step
        rec = {"epoch": epoch, "step": step, "loss": loss.item(), **{k: float(v) for k, v in stats.items()}, **now,
               "img_per_s": round(rate, 1), "eta_min": round((self.end - step - 1) * self.args.batch_size / rate / 60, 1),
               "time": round(t - self.t_start, 3)}
        shown = " ".join(f"{k.replace('_', '-')} {rec[k]:.4g}" for k in [*stats, *now])
        print(f"ep {epoch} step {step}/{self.total} loss {rec['loss']:.4f} {shown} {rate:.0f} img/s eta "
              f"{rec['eta_min']}m", flush=True)
        append_log(self.log_path, rec)

    def finish(self):
        if self.rank == 0:
            print(f"done: {self.end // self.spe} of {self.args.epochs} epochs in {(time.time() - self.t_start) / 60:.1f} "
                  f"min; checkpoint {self.run_path}", flush=True)
            if len(self.knn_records) > 1:
                first, last = self.knn_records[0], self.knn_records[-1]
                print(f"kNN top-1 (k=200): {first['knn_top1']:.2f} at epoch {first['epoch']}"
                      f"{' (random init)' if first['step'] == 0 else ''} -> {last['knn_top1']:.2f} at epoch "
                      f"{last['epoch']}: {last['knn_top1'] - first['knn_top1']:+.2f} points", flush=True)


# ---------------------------------------------------------------- the run

def main(argv=None):
    args = parse_args(argv)
    stop_signal = []  # the STOP_SIGNALS received; looked at after every step

    def on_signal(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in stop_signal:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without saving
        stop_signal.append(signum)
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            print("Ctrl-C: stopping after this step with run.pt saved (Ctrl-C again: now, unsaved)",
                  file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        pretrain(args, stop_signal)
    except KeyboardInterrupt:
        fail(f"stopped by a second Ctrl-C; {args.out_dir} holds the last run.pt saved, if any")
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


def check_out_dir(path):
    """One line now, before any long work, if --out-dir is a file or cannot be written; creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--out-dir {path} is a file, not a folder")
    parent = path
    while not os.path.exists(parent):  # the nearest existing folder: os.makedirs will write there
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent):
        fail(f"--out-dir {path} cannot be made: {parent} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".write-test-"))
    except OSError as e:
        fail(f"--out-dir {path} cannot be written ({parent}: {e.strerror or e})")


def find_checkpoint(args, rank, world, control):
    """(checkpoint or None, where it came from): the out-dir's run.pt, else --resume; every rank the same."""
    run_path = os.path.join(args.out_dir, "run.pt")
    # The same command continues its own run; --resume only points elsewhere for a first start.
    resume_from = run_path if os.path.exists(run_path) else args.resume
    ckpt = models.load_checkpoint(resume_from) if resume_from else None
    if ckpt is not None and ("teacher" not in ckpt or any(k.startswith("assigner.") for k in ckpt["model"])):
        fail(f"{resume_from} was written by an older train.py (before the baselines: no teacher or queue entries); "
             f"continue it with that version, or start a new --out-dir")
    if ckpt is not None:
        check_same_run(ckpt["args"], args, resume_from)
        if ckpt.get("world", world) != world and rank == 0:  # speed flags may differ; this one changes the run
            print(f"warning: {resume_from} ran in {ckpt['world']} process(es), this run has {world}: the views and "
                  f"BatchNorm statistics differ from an uninterrupted run's from here on", flush=True)
    if world > 1:  # every rank must continue from the same step (--out-dir on a shared filesystem)
        start = ckpt["step"] if ckpt is not None else 0
        steps = torch.tensor([start, -start])  # (2,)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=control)
        if steps[0] != -steps[1]:
            fail(f"the ranks found run.pt at different steps ({-int(steps[1])} to {int(steps[0])}); --out-dir must "
                 f"be one folder every node sees")
    return ckpt, resume_from


def pretrain(args, stop_signal):
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; checked before any process group waits for peers
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    rank, world, device, control = setup_distributed()
    if rank == 0:
        check_out_dir(args.out_dir)
    ckpt, resume_from = find_checkpoint(args, rank, world, control)
    if ckpt is not None and ckpt["epoch"] >= (args.until_epoch or args.epochs):
        if rank == 0:
            print(f"{resume_from} is finished: {ckpt['epoch']} of {args.epochs} epochs done"
                  + (f" (--until-epoch {args.until_epoch})" if args.until_epoch else "") + "; nothing to do", flush=True)
        return
    resolve_speed_flags(args, device)

    # Data: this rank's share of every global batch, in an order fixed by (seed, epoch).
    max_bytes = data.memory_budget(device)
    source, labels = load_pretrain_data(args, device, max_bytes)
    info = {"num_images": len(labels), "num_classes": len(labels[labels >= 0].unique())}
    if info["num_images"] < args.batch_size:
        fail(f"{info['num_images']} images are fewer than one batch of --batch-size {args.batch_size}")
    if ckpt is not None and ckpt.get("data") and ckpt["data"] != info:
        fail(f"{args.dataset} under {args.data_dir} now has {info['num_images']} images in {info['num_classes']} "
             f"classes, but {resume_from} was trained on {ckpt['data']['num_images']} in {ckpt['data']['num_classes']}")
    steps_per_epoch = info["num_images"] // args.batch_size
    start_step = ckpt["step"] if ckpt is not None else 0
    end_step = (args.until_epoch or args.epochs) * steps_per_epoch

    run = build_run(args, device, world, steps_per_epoch, ckpt)
    book = Bookkeeping(args, run, world, control, start_step, end_step, stop_signal, ckpt and resume_from, info, device,
                       max_bytes)
    batches = data.Batches(info["num_images"], args.batch_size, world, rank, args.seed, start_step, end_step)
    # closing() shuts DataLoader workers down on every way out: they ignore SIGTERM, so nothing else would
    with contextlib.closing(pretrain_batches(args, source, batches, rank, device)) as stream:
        for step, views in zip(range(start_step, end_step), stream):
            now = {name: float(values[step]) for name, values in run.schedules.items()}  # lr, lam, momentum
            loss, stats = train_step(run, views, now, step)
            book.after_step(step, loss, stats, now)
    book.finish()


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
