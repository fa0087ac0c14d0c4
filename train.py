"""Pretrain a backbone with CARL, CARP, or a baseline of the thesis (SimCLR, BYOL, SwAV, MoCo v2).

    python train.py                         # CARL on the built-in synthetic dataset, CPU ok
    python train.py --method carp --dataset cifar10 --data-dir data --download
    python train.py --method carp --recipe neurips23 --dataset cifar10   # the published CARP
    torchrun --nproc_per_node=4 train.py --method carp --dataset imagefolder --data-dir /imagenet

Writes <out-dir>/args.json (the resolved flags and the provenance: git commit, library versions,
device) at the start, <out-dir>/log.jsonl (that record first, then one JSON line per log step and
per kNN evaluation), and <out-dir>/run.pt (everything needed to continue: model, EMA teacher,
queue, optimizer) with <out-dir>/backbone.pt (a plain torchvision ResNet state_dict without `fc`:
the online network's; backbone_teacher.pt: the EMA teacher's) every --ckpt-every-epochs epochs,
every --ckpt-every-min minutes, at the end and when stopped by SIGTERM, SIGUSR1 or Ctrl-C;
--keep-every N keeps backbone_ep0010.pt (and backbone_teacher_ep0010.pt) every N epochs. The same
command run again continues from <out-dir>/run.pt at the next step. Flags left unset take the
method's entry in methods.py (its thesis settings, per dataset, and --recipe on top).
"""
import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

import augment
import checkpoints
import data
import evaluate
import lars
import losses
import model as models
import monitor
from methods import METHODS, RECIPE_NOTES, defaults as method_defaults

# flags only some methods take: given to another, they are refused
_KEYS = [set(m.defaults) for m in METHODS.values()]
METHOD_KEYS = sorted(set.union(*_KEYS) - set.intersection(*_KEYS))
# A continued run must keep every flag but these (speed, cadence, where things are): a new flag is
# checked by default.
MAY_CHANGE = ("data_dir", "download", "until_epoch", "amp", "compile", "compile_mode", "workers",
              "out_dir", "resume", "ckpt_every_epochs", "ckpt_every_min", "keep_every",
              "knn_every", "knn_train_subset", "knn_test_subset", "online_probe", "log_every")
# preemption (SIGTERM; SLURM's --signal=USR1@secs before a time limit) and Ctrl-C: save, then stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# ---------------------------------------------------------------- the command line

# argparse types: each flag's range is checked at parse time, in one line
POSITIVE_INT, COUNT, SEED = evaluate.positive_int, evaluate.nonnegative_int, evaluate.seed_int
POSITIVE, NONNEGATIVE = evaluate.positive_float, evaluate.nonnegative_float
UNIT = evaluate.unit_float
CROPS = evaluate.ranged(int, "2 or more: each global crop is the target of another view",
                        lambda v: v >= 2)


def parse_args(argv=None):
    """The run's settings, final: every flag resolved (resolve) and checked before any work."""
    p = evaluate.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--method", default="carl", help=", ".join(METHODS))
    add("--recipe", default="thesis", help="thesis, or neurips23 (CARL, CARP: the published CARP)")
    add("--dataset", default="synthetic", help=", ".join(data.DATASETS))
    add("--data-dir", default="data", help="where the dataset lies (or is downloaded to)")
    add("--download", action="store_true", help="let torchvision download cifar10/cifar100/stl10")
    add("--train-subset", type=POSITIVE_INT,
        help="pretrain on a fixed class-balanced subset of this many labelled train images")
    add("--arch", default="resnet18", help=", ".join(models.ARCHS))
    add("--cifar-stem", action=argparse.BooleanOptionalAction,
        help="3x3 stride-1 stem without max-pool (default: on for images <= 64 px)")
    add("--zero-init-residual", action=argparse.BooleanOptionalAction,
        help="each residual block starts as identity (its last BatchNorm at 0)")
    add("--image-size", type=POSITIVE_INT,
        help="global view size (default: 20 synthetic, 32 CIFAR, 96 STL-10, 224 else)")
    add("--epochs", type=POSITIVE_INT)
    add("--until-epoch", type=POSITIVE_INT,
        help="stop after this epoch (schedules still span --epochs); the same command continues")
    add("--batch-size", type=POSITIVE_INT, help="global batch over all processes")
    add("--optimizer", choices=["larc", "lars", "sgd"],
        help="larc (LARS on every parameter), lars (not on biases and BatchNorm) or sgd")
    add("--lr", type=POSITIVE, help="base lr for batch 256; scaled by batch / 256")
    add("--final-lr-ratio", type=POSITIVE, help="the cosine ends at lr times this")
    add("--bias-lr-scale", type=POSITIVE,
        help="--optimizer lars: the lr factor of biases and BatchNorm, which skip the trust ratio")
    add("--weight-decay", type=NONNEGATIVE)
    add("--warmup-epochs", type=NONNEGATIVE, default=0.0,
        help="linear lr warm-up before the cosine decay")
    add("--num-prototypes", type=POSITIVE_INT, help="K (CARL, CARP, SwAV)")
    add("--proto-init-gain", type=POSITIVE,
        help="scale of the prototypes' initial weights (thesis: 1, PyTorch's default init)")
    add("--prototypes", choices=["linear", "unit"],
        help="CARL/CARP: a linear layer (the thesis) or unit-norm prototypes (the published CARP)")
    add("--head", choices=models.HEADS,
        help="projection head: thesis (2 x 512, ReLU, 128-d) or neurips23 (3 x 2048, GELU, 256-d)")
    add("--block-size", type=POSITIVE_INT, help="CARP: prototypes per partition block N_B")
    add("--lam-start", type=NONNEGATIVE, help="KL weight at epoch 0 (b in thesis eq. 5.8)")
    add("--lam-end", type=NONNEGATIVE, help="KL weight after --lam-epochs (a)")
    add("--lam-epochs", type=NONNEGATIVE, help="epochs of linear decay (E)")
    add("--kl", choices=["per-view", "pooled"],
        help="CARL/CARP: the KL of each view's batch-mean assignment (thesis), or of all pooled")
    add("--temperature", type=POSITIVE, help="SimCLR, SwAV, MoCo v2")
    add("--queue-size", type=COUNT,
        help="MoCo v2's negatives, SwAV's Sinkhorn bank (0: none): a multiple of a step's rows")
    add("--teacher", choices=["none", "ema"],
        help="CARL/CARP: targets from an EMA teacher of the student (BYOL and MoCo v2 have one)")
    add("--teacher-momentum", type=UNIT, help="EMA momentum at the first step")
    add("--teacher-momentum-end", type=UNIT,
        help="... at the last (a per-step cosine between the two; equal: constant)")
    add("--views", choices=list(augment.VIEWS), help="view pipeline (augment.py)")
    add("--global-crops", type=CROPS, help="global crops per image (CARL, CARP, SwAV: >= 2)")
    add("--local-crops", type=COUNT, help="multi-crop: small crops per image (CARL, CARP, SwAV)")
    add("--local-size", type=POSITIVE_INT, help="local crops' size (default: 96 at 224, else half)")
    add("--local-scale", type=POSITIVE, nargs=2, metavar=("A", "B"),
        help="local crops' area range (default 0.05 0.2)")
    add("--loader", choices=["device", "workers"],
        help="device: the dataset decoded once into memory on the training device, views made "
             "there in batches; workers: PIL views in DataLoader processes (default: workers for "
             "ImageFolder trees of large images, else device)")
    add("--amp", choices=["bf16", "fp16", "off"],
        help="default: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16, AMX), else off")
    add("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    add("--compile", action=argparse.BooleanOptionalAction,
        help="torch.compile the step (forward, loss, backward, optimizer), the teacher and the "
             "device loader's views (default: on GPU only; the first step then takes about a "
             "minute)")
    add("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
        help="--compile's mode (default: default); reduce-overhead and max-autotune replay the "
             "step as CUDA graphs (one process only)")
    add("--workers", type=COUNT, default=min(8, os.cpu_count() or 1),
        help="DataLoader processes per rank (--loader workers)")
    add("--out-dir", default="out")
    add("--resume", help="continue from this run.pt (only needed when it lies outside --out-dir)")
    add("--ckpt-every-epochs", type=POSITIVE_INT, default=1,
        help="write run.pt at the end of every N-th epoch (more than 1 where epochs take seconds)")
    add("--ckpt-every-min", type=POSITIVE, default=15.0,
        help="also write run.pt inside an epoch this often")
    add("--keep-every", type=COUNT, default=0,
        help="keep the backbones of every N-th epoch's end: backbone_ep0010.pt (and "
             "backbone_teacher_ep0010.pt) for epoch 10... (0: off)")
    add("--knn-every", type=COUNT,
        help="kNN top-1 (k=200) every N epochs, after the last, and before the first (default: 1 "
             "for synthetic, else 0 = off)")
    add("--knn-train-subset", type=POSITIVE_INT, help="kNN bank: a class-balanced subset")
    add("--knn-test-subset", type=POSITIVE_INT, help="kNN queries: a class-balanced subset")
    add("--online-probe", action="store_true",
        help="train a linear classifier on the detached, standardised backbone features of the "
             f"global crops beside the method (its own SGD, lr {monitor.PROBE_LR:g}, momentum "
             "0.9); its top-1 on the kNN test split at every kNN point")
    add("--seed", type=SEED, default=0)
    add("--log-every", type=POSITIVE_INT, default=10, help="steps between log lines")
    return resolve(p.parse_args(argv))


def fail(msg):
    raise SystemExit(f"error: {msg}")


def flag(key):
    return "--" + key.replace("_", "-")


def shown(value):
    """A flag's value as it is typed: 0.0107, 0.05 0.2."""
    if isinstance(value, (tuple, list)):
        return " ".join(shown(v) for v in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def resolve(args):
    """Fill unset flags from the method's entry (its defaults, per dataset, its recipe: later ones
    win) and the device, and check every combination, before any work. The one place a flag gets
    its final value."""
    for name, known in (("method", METHODS), ("dataset", data.DATASETS), ("arch", models.ARCHS)):
        if getattr(args, name) not in known:
            fail(f"unknown {flag(name)} {getattr(args, name)!r}; choose one of {', '.join(known)}")
    method = METHODS[args.method]
    recipes = {r for m in METHODS.values() for r in m.recipes}
    if args.recipe != "thesis" and args.recipe not in recipes:
        fail(f"unknown --recipe {args.recipe!r}; choose thesis or {', '.join(sorted(recipes))}")
    if args.recipe != "thesis" and args.recipe not in method.recipes:
        fail(f"--recipe {args.recipe} is not one of --method {args.method}'s (its paper's own)")
    for key in METHOD_KEYS:
        if key not in method.defaults and getattr(args, key) is not None:
            fail(f"{flag(key)} is not used by --method {args.method}")
    given = {k for k, v in vars(args).items() if v is not None}  # set on the command line
    if args.image_size is None:
        args.image_size = data.IMAGE_SIZE[args.dataset]
    for key, value in method_defaults(args).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cifar_stem is None:
        args.cifar_stem = args.image_size <= models.CIFAR_STEM_MAX_PX
    if args.loader is None:
        args.loader = data.default_loader(args.dataset, args.image_size)
    if "bias_lr_scale" in given and args.optimizer != "lars":
        fail(f"--bias-lr-scale is for --optimizer lars (biases and BatchNorm skip its trust "
             f"ratio); this run has --optimizer {args.optimizer}")
    if args.warmup_epochs >= args.epochs:
        fail(f"--warmup-epochs {args.warmup_epochs:g} must be shorter than the run's "
             f"--epochs {args.epochs}")
    if args.block_size is not None and args.num_prototypes % args.block_size:
        fail(f"--num-prototypes {args.num_prototypes} is not divisible by --block-size "
             f"{args.block_size}")
    if args.until_epoch is not None and not args.until_epoch <= args.epochs:
        fail(f"--until-epoch {args.until_epoch} must lie in 1..--epochs {args.epochs}")
    if args.online_probe and not args.knn_every:
        fail("--online-probe is scored at the kNN monitor's points: give --knn-every N too")
    resolve_views(args, method, given)
    resolve_teacher(args, method, given)
    resolve_speed(args, "cuda" if torch.cuda.is_available() else "cpu", given)
    return args


def resolve_views(args, method, given):
    """The crops each method can take; none below the network's stride."""
    if not method.multiview and (args.global_crops != 2 or args.local_crops):
        fail(f"--method {args.method}'s loss takes two views: --global-crops 2, no --local-crops")
    if args.local_crops:
        args.local_size = args.local_size or (96 if args.image_size >= 224
                                              else args.image_size // 2)
        args.local_scale = tuple(args.local_scale or (0.05, 0.2))
        a, b = args.local_scale
        if not 0 < a < b <= 1:
            fail(f"--local-scale {a:g} {b:g} must satisfy 0 < A < B <= 1")
    elif given & {"local_size", "local_scale"}:
        fail("--local-size and --local-scale shape local crops: give --local-crops N too")
    else:  # --recipe neurips23 --local-crops 0: the recipe's local crop shape is unused
        args.local_size = args.local_scale = None
    stride = 8 if args.cifar_stem else 32  # smaller crops reach layer4's stride-2 convs as 1x1 maps
    for key in ("image_size", "local_size"):  # (and on CPUs bf16 gave NaN gradients there)
        if getattr(args, key) is not None and getattr(args, key) < stride:
            stem = "cifar" if args.cifar_stem else "imagenet"
            fail(f"{flag(key)} {getattr(args, key)} is below the network's stride ({stride} px "
                 f"with the {stem} stem)")


def resolve_teacher(args, method, given):
    """The EMA teacher, the prototypes' form and the queue: what each method can take."""
    if method.needs_teacher and args.teacher != "ema":
        fail(f"--method {args.method} needs its EMA teacher (--teacher ema)")
    if args.teacher == "none" and given & {"teacher_momentum", "teacher_momentum_end"}:
        fail("--teacher-momentum and --teacher-momentum-end are for the EMA teacher: give "
             "--teacher ema too")
    if args.prototypes == "unit":  # scaling a unit-norm prototype changes nothing
        if "proto_init_gain" in given and args.proto_init_gain != 1:
            fail("--proto-init-gain does not change unit-norm prototypes (--prototypes unit)")
        args.proto_init_gain = 1.0
    if args.queue_size:
        per_step = args.global_crops * args.batch_size  # rows a step adds: the global batch's crops
        if args.queue_size % per_step:
            fail(f"--queue-size {args.queue_size} is not a multiple of the {per_step} rows each "
                 f"step adds ({args.global_crops} views x --batch-size {args.batch_size})")
    elif method.queue == "random":
        fail(f"--method {args.method} takes its negatives from a queue: --queue-size must be "
             f"positive")
    if method.teacher_bn_group:  # groups far below the paper's size normalise with poor statistics
        batch = args.batch_size // int(os.environ.get("WORLD_SIZE", 1))
        size = models.shuffle_group_size(batch, method.teacher_bn_group)
        small = batch >= 2 * method.teacher_bn_group and size < method.teacher_bn_group // 2
        if small and os.environ.get("RANK", "0") == "0":  # once, not once per torchrun process
            print(f"warning: the shuffled BatchNorm of --method {args.method} splits each "
                  f"process's batch of {batch} into groups of {size} images (the largest divisor "
                  f"up to {method.teacher_bn_group}); a batch with a divisor near it normalises as "
                  f"the paper does", file=sys.stderr, flush=True)


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: there a bf16-autocast ResNet-18 step is 1.7-1.9x faster than a float32
    one (2-core EPYC, RESULTS.md); without them bf16 is emulated and slower."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # also if ATEN_CPU_CAPABILITY caps it
        return False
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_speed(args, device_type, given):
    """--amp and --compile left unset follow the device (benchmarks/throughput.py uses the same)."""
    if args.amp is None:
        args.amp = "bf16" if device_type == "cuda" or cpu_has_native_bf16() else "off"
    if args.amp == "fp16" and device_type != "cuda":
        fail("--amp fp16 needs a GPU; use --amp bf16 or off on the CPU")
    if args.compile is None:  # 1.6x on an H100 (RESULTS.md); no gain on CPUs, needs a compiler
        args.compile = device_type == "cuda"
    if "compile_mode" in given and not args.compile:
        fail(f"--compile-mode {args.compile_mode} is a mode of --compile, which this run has not")
    args.compile_mode = args.compile_mode or "default"
    # CUDA graphs of a step with DDP's collectives inside have not run here: one process only
    if args.compile_mode != "default" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail(f"--compile-mode {args.compile_mode} (CUDA graphs) runs in one process; use "
             f"--compile-mode default under torchrun")


# values for flags a run.pt may lack
IMPLIED = {"bias_lr_scale": 0.024, "zero_init_residual": False}


def check_same_run(saved, args, path):
    """One clear line naming the first flag that differs from the run being continued."""
    as_saved = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)  # noqa: E731
    saved = {**IMPLIED, **saved}
    for key, value in vars(args).items():
        if key not in MAY_CHANGE and key in saved and as_saved(saved[key]) != as_saved(value):
            fail(f"{path} is a run with {flag(key)} {shown(saved[key])}, but this command has "
                 f"{flag(key)} {shown(value)}; use the run's flags to continue it, or another "
                 f"--out-dir")


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
    shown_elsewhere = ("lam_start", "lam_end", "lam_epochs", "teacher_momentum",
                       "teacher_momentum_end", "local_size", "local_scale")
    own = ", ".join(f"{flag(k)[2:]} {shown(getattr(args, k))}" for k in METHOD_KEYS
                    if k in METHODS[args.method].defaults and getattr(args, k) is not None
                    and k not in shown_elsewhere)
    crops = f"{args.global_crops} x {args.image_size} px"
    if args.local_crops:
        a, b = args.local_scale
        crops += f" + {args.local_crops} x {args.local_size} px (scale {a:g}-{b:g})"
    return (f"{args.method} {args.arch} on {args.dataset}: {num_images} images, {world} "
            f"process(es) on {device.type}, batch {args.batch_size}, {steps_per_epoch} "
            f"steps/epoch, {args.epochs} epochs, {own}, {args.optimizer} wd "
            f"{args.weight_decay:g}, {args.views} views ({crops}), {args.loader} loader, amp "
            f"{args.amp}"
            + (", torch.compile (its first step takes about a minute)" if args.compile else ""))


def describe_recipe(args):
    """The recipe's values, marking where the command line overrides one; None for the thesis."""
    if args.recipe == "thesis":
        return None
    values = METHODS[args.method].recipes[args.recipe](args)
    note = RECIPE_NOTES.get(args.recipe)  # a recipe may have none
    return f"recipe {args.recipe}" + (f" ({note})" if note else "") + ": " + " ".join(
        f"{flag(k)} {shown(v)}"
        + ("" if getattr(args, k) == v else f" (here {shown(getattr(args, k))})")
        for k, v in values.items())


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
    return end - (end - start) * (np.cos(np.pi * np.arange(total) / max(1, total - 1)) + 1) / 2


def schedule_values(run, step):
    """`now`: each schedule's value at `step`, as floats."""
    return {name: float(values[step]) for name, values in run.schedules.items()}


def schedules(args, steps_per_epoch):
    """The per-step values a run uses: lr always, lambda and the teacher's momentum where the
    method has them; each (epochs * steps_per_epoch,)."""
    lr = args.lr * args.batch_size / 256
    out = {"lr": lr_schedule(lr, lr * args.final_lr_ratio, args.epochs, steps_per_epoch,
                             args.warmup_epochs)}
    if args.lam_start is not None:
        out["lam"] = lam_schedule(args.lam_start, args.lam_end, args.lam_epochs, args.epochs,
                                  steps_per_epoch)
    if args.teacher == "ema":
        out["momentum"] = momentum_schedule(args.teacher_momentum, args.teacher_momentum_end,
                                            args.epochs, steps_per_epoch)
    return out


# ---------------------------------------------------------------- processes, model, optimizer

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
    # torchrun's agent hosts one TCPStore for all its worker restarts (unless
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and the process group's keys (each rank's gloo address,
    # NCCL's id) stay in it: a restarted rank can read its peer's dead address from the last attempt
    # and fail (Connection refused) or hang. Keys under a prefix per attempt are never stale; the
    # world size is in it as a joining node restarts workers without a new count.
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}-world{world}"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            store=dist.PrefixStore(attempt, store), rank=rank, world_size=world)
    control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return dist.get_rank(), dist.get_world_size(), device, control


def build_model(args):
    """The student network the method's entry describes (model.Model: backbone, head, last part)."""
    method = METHODS[args.method]
    return models.Model(args.arch, args.cifar_stem, args.head,
                        lambda dim, feat_dim: method.last(args, dim, feat_dim), method.normalize,
                        args.zero_init_residual)


def build_optimizer(args, model, lr):
    if args.optimizer == "sgd":
        return torch.optim.SGD(lars.param_groups(model, "larc"), lr=lr, momentum=0.9,
                               weight_decay=args.weight_decay)
    groups = lars.param_groups(model, args.optimizer, excluded_lr_scale=args.bias_lr_scale)
    return lars.LARS(groups, lr=lr, weight_decay=args.weight_decay, momentum=0.9)


def build_run(args, device, world, steps_per_epoch, ckpt=None):
    """Everything a step needs, as one namespace: the model (and `net`, what runs it: DDP), the EMA
    teacher, the queue, optimizer, grad scaler, autocast, the per-step schedules and `step`
    (student_step, compiled under --compile); from ckpt if given."""
    torch.manual_seed(args.seed)
    method = METHODS[args.method]
    model = build_model(args)
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    teacher = models.EMATeacher(model, method.teacher_bn_group) if args.teacher == "ema" else None
    queue = None
    if args.queue_size:
        queue = models.Queue(args.queue_size, model.head[-1].out_features, device,
                             args.seed if method.queue == "random" else None)
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
    for group in optimizer.param_groups:  # so that a compiled step is one graph for every step:
        for p in group["params"]:  # momentum buffers from the start (zeros, as lazily made ones)
            buffer = optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            if args.compile:  # updated in place: CUDA graphs use it where it is, uncopied
                torch._dynamo.mark_static_address(buffer)
        lr = float(group["lr"])  # set every step; under --compile a device tensor, filled in place
        group["lr"] = torch.full((), lr, device=device) if args.compile else lr
    # --compile: what changes every step goes in as device tensors, filled in place each step: new
    # values, not new graphs; no copy from the host, no sync
    now_in = step_in = None
    if args.compile:
        now_in = {name: torch.zeros((), device=device) for name in sched}  # 0-d each
        step_in = torch.zeros((), dtype=torch.long, device=device)
        for t in (*now_in.values(), step_in):  # CUDA graphs read them where they are, uncopied
            torch._dynamo.mark_static_address(t)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    step = student_step
    if args.compile:
        step = torch.compile(student_step, mode=args.compile_mode)
        if teacher is not None:
            teacher.compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(device.type, enabled=args.amp != "off",
                              dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
    return argparse.Namespace(args=args, method=method, model=model, net=net, teacher=teacher,
                              queue=queue, optimizer=optimizer, scaler=scaler, autocast=autocast,
                              schedules=sched, steps_per_epoch=steps_per_epoch, step=step,
                              now_in=now_in, step_in=step_in,
                              device=device, rank=dist.get_rank() if world > 1 else 0)


# ---------------------------------------------------------------- data

def ignore_stop_signals(_worker_id=None):
    """DataLoader workers leave the stop signals to the main process, which stops them in order."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def load_pretrain_data(args, device, max_bytes):
    """The pretraining split: (uint8 images (N, 3, H, W) on `device`, or a PIL dataset; labels
    (N,))."""
    if args.loader == "device":
        images, labels = data.load_images(args.dataset, "pretrain", args.data_dir, args.download,
                                          args.image_size, max_bytes, args.train_subset,
                                          "--train-subset")
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
    return make(args.views, args.image_size, args.dataset, args.global_crops, args.local_crops,
                args.local_size, args.local_scale)


def pretrain_batches(args, source, batches, rank, device, labels=None):
    """(views, labels) of each step of `batches` (data.Batches), by either loader: the views a list
    of (local batch, 3, S, S) on `device`; the batch's labels (local batch,) there (those of
    `labels` (N,): the device loader indexes it, the workers' dataset gives the same), or None
    when `labels` is None."""
    if args.loader == "device":
        labels = labels if labels is None else labels.to(device)
        views = view_pipeline(args, batched=True)
        if args.compile:  # fuses the views' few hundred small ops: on a GPU launches cost the most
            views.compile()
        g = torch.Generator(device=device)
        order, order_epoch = None, None
        for step in range(batches.start, batches.stop):
            epoch, it = divmod(step, batches.steps_per_epoch)
            if epoch != order_epoch:  # the epoch's sample order, moved to the device once
                order, order_epoch = batches.epoch_order(epoch).to(device), epoch  # (steps, batch)
            g.manual_seed(data.seed_of(args.seed, step, rank))  # views depend on (seed, step, rank)
            yield views(source[order[it]], g), labels if labels is None else labels[order[it]]
        return
    seeded = data.SeededViews(source, view_pipeline(args, batched=False), args.seed)
    loader = torch.utils.data.DataLoader(seeded, batch_sampler=batches, num_workers=args.workers,
                                         pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)
    stream = iter(loader)
    try:
        for views, y in stream:  # y: the batch's labels (B,), pinned with the views
            views = [v.to(device, non_blocking=True) for v in views]
            yield views, labels if labels is None else y.to(device, non_blocking=True)
        return
    except data.BadImageError as e:  # raised in a worker, its message ends with ours; run.pt intact
        message = e.line()
        e.__traceback__ = None  # its frames hold the loader (in a cycle: only gc would free it)
    # The workers shut down now: they ignore SIGTERM, so a process exiting with them alive waits
    # for them forever.
    del stream
    fail(message)


# ---------------------------------------------------------------- one step

def train_step(run, views, now, step):
    """One optimisation step on a batch of views (global crops first); `now` holds this step's
    scheduled values. Returns (loss, stats) as device tensors, none read on the host. The EMA
    teacher (forward and update) and the queue are kept here, around run.step (student_step)."""
    a, teacher, teacher_first = run.args, run.teacher, run.method.teacher_first
    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    targets = None
    if teacher is not None:
        with run.autocast:  # Outputs of the global crops
            targets = teacher(views[:a.global_crops], data.seed_of(a.seed, step, run.rank, 1))
        if teacher_first:  # the weights this step starts from
            teacher.update(run.model, now["momentum"])
    for group in run.optimizer.param_groups:  # under --compile a device tensor, filled in place
        lr = now["lr"] * group["lr_scale"]
        group["lr"] = group["lr"].fill_(lr) if a.compile else lr
    now_in, step_in = now, step
    if a.compile:  # build_run's device tensors, filled in place: new inputs, not new graphs
        now_in, step_in = run.now_in, run.step_in.fill_(step)
        for k, v in now.items():
            now_in[k].fill_(v)
        torch.compiler.cudagraph_mark_step_begin()  # --compile-mode reduce-overhead: a new step
    run.optimizer.zero_grad(set_to_none=True)  # here: torch.compile does not trace it
    loss, stats, push, run.features = run.step(run, views, targets, now_in, step_in,
                                               step < run.steps_per_epoch)
    if teacher is not None and not teacher_first:
        teacher.update(run.model, now["momentum"])
    if push is not None:  # every rank keeps the same queue: the rows of the global batch
        run.queue.push(losses.gather(push))
    return loss, stats


def student_step(run, views, targets, now, step, first_epoch):
    """The student's forward, loss, backward and optimizer step: what --compile compiles, whole
    (its graphs break at backward, and around torch.optim's own steps); also the online probe's
    features under --online-probe. now and step: floats and an int, or 0-d device tensors (so
    that one set of graphs serves every step); first_epoch, a bool, changes once (SwAV's
    prototypes learn from epoch 1)."""
    with run.autocast:
        student = run.net(views)  # Outputs: z (B, D), out (B, K or D), h (B, F) per view
    loss, stats, push = run.method.loss(student, targets, run, now, step)
    probe_in = None  # the online probe's (B, F) features of the global crops
    if run.args.online_probe:
        probe_in = [h.detach() for h in student.h[:run.args.global_crops]]
    fp16 = run.args.amp == "fp16"  # the grad scaler's calls break the graph: only where needed
    (run.scaler.scale(loss) if fp16 else loss).backward()
    if run.method.after_backward:
        run.method.after_backward(run.model, first_epoch)
    if fp16:  # skips a step whose gradients overflowed (reading them on the host: a sync)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    if run.method.after_step:
        run.method.after_step(run.model)
    return loss, stats, push, probe_in


# ---------------------------------------------------------------- between steps: logs, saves, kNN

class Bookkeeping:
    """What happens between steps, the same for every method: each step the ranks agree whether to
    stop (a signal reached any rank) or save (rank 0's clock); log lines, run.pt, the kNN monitor,
    the NaN check."""

    def __init__(self, args, run, dist_info, steps, stop_signal, resumed_from, data_info, device,
                 max_bytes):
        self.args, self.run = args, run
        self.world, self.control = dist_info
        self.rank, self.spe = run.rank, run.steps_per_epoch
        self.start, self.end = steps
        self.total = args.epochs * run.steps_per_epoch
        self.stop_signal, self.data_info = stop_signal, data_info
        self.run_path = os.path.join(args.out_dir, "run.pt")
        self.log_path = os.path.join(args.out_dir, "log.jsonl")
        self.monitor = None
        if args.knn_every and self.rank == 0:
            self.monitor = monitor.KnnMonitor(args, device, max_bytes)
        self.cuda = device.type == "cuda"
        self.provenance = None
        if self.rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            log = trim_log(self.log_path, self.start)  # drop what a stopped run logged after saving
            self.provenance = provenance(device, self.world)
            made = {"provenance": self.provenance, "args": vars(args)}  # this session's
            append_log(self.log_path, made)
            atomic_save(made, os.path.join(args.out_dir, "args.json"))
            print(describe_run(args, data_info["num_images"], self.world, device, self.spe),
                  flush=True)
            print(describe_schedules(args), flush=True)
            recipe = describe_recipe(args)
            if recipe:
                print(recipe, flush=True)
            if resumed_from:
                print(f"continuing {resumed_from} at step {self.start} of {self.total} (epoch "
                      f"{self.start // self.spe}, step {self.start % self.spe} of it)", flush=True)
            self.knn_records = [r for r in log if "knn_top1" in r]  # the first: the random init's
        self.t_start = self.last_save = time.time()
        if self.knn_due(self.start):  # step 0, or an epoch's end whose kNN a stopped run skipped
            self.knn(self.start)

    def save(self, step):
        if self.rank == 0:
            run = self.run
            state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "scaler": run.scaler.state_dict(),
                     "teacher": run.teacher and run.teacher.net.state_dict(),
                     "queue": run.queue and run.queue.state_dict(), "step": step,
                     "epoch": step // self.spe, "args": vars(self.args), "data": self.data_info,
                     "world": self.world, "probe": run.probe and run.probe.state_dict(),
                     "provenance": self.provenance}
            atomic_save(state, self.run_path)
            self.save_backbones("")
        self.last_save = time.time()

    def save_backbones(self, suffix):
        """backbone{suffix}.pt, and backbone_teacher{suffix}.pt where there is an EMA teacher."""
        nets = [("backbone", self.run.model)]
        if self.run.teacher is not None:
            nets.append(("backbone_teacher", self.run.teacher.net))
        for name, net in nets:
            atomic_save(net.backbone.state_dict(),
                        os.path.join(self.args.out_dir, f"{name}{suffix}.pt"))

    def knn_due(self, step):  # before training, after every --knn-every-th epoch and after the last
        epoch, it = divmod(step, self.spe)
        return self.args.knn_every and it == 0 and (epoch % self.args.knn_every == 0
                                                    or step == self.total)

    def knn(self, step):
        """kNN top-1/5 of the student's backbone and the EMA teacher's (where there is one), the
        online probe's top-1: a log record and one line."""
        if self.rank == 0 and all(r["step"] != step for r in self.knn_records):  # not held yet
            t0, run = time.time(), self.run
            feats = self.monitor.features(run.model.backbone)
            top1, top5 = self.monitor.score(feats)
            rec = {"epoch": step // self.spe, "step": step, "knn_top1": round(top1, 2),
                   "knn_top5": round(top5, 2)}
            keys, top5s = ["knn_top1"], f"{top5:.2f}"
            if run.teacher is not None:
                t_top1, t_top5 = self.monitor(run.teacher.net.backbone)
                rec.update(knn_top1_teacher=round(t_top1, 2), knn_top5_teacher=round(t_top5, 2))
                keys.append("knn_top1_teacher")
                top5s += f", {t_top5:.2f}"
            if run.probe is not None:  # on the student's features of the kNN queries
                rec["probe_top1"] = round(run.probe.accuracy(*feats[1]), 2)
            rec["seconds"] = round(time.time() - t0, 1)
            self.knn_records.append(rec)
            top1s = (f"{top1:.2f} student, {rec['knn_top1_teacher']:.2f} teacher"
                     if run.teacher is not None else f"{top1:.2f}")
            probe = f", online probe top-1 {rec['probe_top1']:.2f}" if "probe_top1" in rec else ""
            print(f"knn ep {rec['epoch']}: top-1 {top1s}{knn_gain(self.knn_records, keys)}, top-5 "
                  f"{top5s}{probe}, {rec['seconds']:.0f} s", flush=True)
            append_log(self.log_path, rec)
        if self.world > 1:
            dist.barrier(group=self.control)  # the other ranks wait for rank 0's evaluation

    def after_step(self, step, loss, stats, now):
        """Log, save, evaluate, stop, as due after `step`."""
        epoch, it = divmod(step, self.spe)
        if step == self.start:  # the speed is timed from here: the first step waits for --compile
            if self.cuda:
                torch.cuda.synchronize()  # once a session: the first step's GPU work before t0
            self.t_first = time.time()
        save_due = self.rank == 0 and time.time() - self.last_save > 60 * self.args.ckpt_every_min
        epoch_done = it == self.spe - 1
        log_due = step % self.args.log_every == 0 or epoch_done  # so every save but a signal's or
        # the clock's is on a log step. (stop signal, save due, loss not finite): (3,) int64;
        # loss.item() is the only host-device sync
        flags = torch.tensor([max(self.stop_signal, default=0), int(save_due),
                              log_due and not math.isfinite(loss.item())])
        self.agree(flags)
        if (flags[0] or flags[1]) and not log_due:  # a save off the log steps: loss checked first
            flags[2] = not math.isfinite(loss.item())
            self.agree(flags)
        if flags[2]:  # on every rank at once (one alone would leave the others waiting in DDP)
            fail(f"the loss is not finite at step {step} ({loss.item()} on rank {self.rank}); "
                 f"lower --lr" + (", or raise --lam-start" if "lam" in now else ""))
        if self.rank == 0 and log_due:
            self.log(step, epoch, loss, stats, now)
        every = self.args.ckpt_every_epochs
        if flags.any() or step + 1 == self.end or (epoch_done and (epoch + 1) % every == 0):
            self.save(step + 1)
        keep = self.args.keep_every
        if self.rank == 0 and epoch_done and keep and (epoch + 1) % keep == 0:
            self.save_backbones(f"_ep{epoch + 1:04d}")  # snapshots kept, never overwritten
        stopping = flags[0] and step + 1 < self.end
        if epoch_done and self.knn_due(step + 1) and not stopping:  # a stop has seconds: no kNN
            self.knn(step + 1)
        if stopping:
            if self.world > 1:
                dist.barrier(group=self.control)  # run.pt is written before any rank exits
            if self.rank == 0:
                print(f"stopped by {signal.Signals(int(flags[0])).name} after step {step + 1} of "
                      f"{self.total} (epoch {epoch}, step {it + 1} of {self.spe}); {self.run_path} "
                      f"holds it: run the same command to continue", flush=True)
            raise SystemExit(128 + int(flags[0]))

    def agree(self, flags):
        """Every rank's flags become their maximum over ranks (in place)."""
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)

    def log(self, step, epoch, loss, stats, now):
        t = time.time()
        done, since = (step - self.start, self.t_first) if step > self.start else (1, self.t_start)
        rate = self.args.batch_size * done / (t - since)  # images/s this session, after step 1
        eta = (self.end - step - 1) * self.args.batch_size / rate / 60
        rec = {"epoch": epoch, "step": step, "loss": loss.item(),
               **{k: float(v) for k, v in stats.items()}, **now, "img_per_s": round(rate, 1),
               "eta_min": round(eta, 1), "time": round(t - self.t_start, 3)}
        shown = " ".join(f"{k.replace('_', '-')} {rec[k]:.4g}" for k in [*stats, *now])
        print(f"ep {epoch} step {step}/{self.total} loss {rec['loss']:.4f} {shown} {rate:.0f} "
              f"img/s eta {rec['eta_min']}m", flush=True)
        append_log(self.log_path, rec)

    def finish(self):
        if self.rank == 0:
            minutes = (time.time() - self.t_start) / 60
            print(f"done: {self.end // self.spe} of {self.args.epochs} epochs in {minutes:.1f} "
                  f"min; checkpoint {self.run_path}", flush=True)
            if len(self.knn_records) > 1:
                first, last = self.knn_records[0], self.knn_records[-1]
                init = " (random init)" if first["step"] == 0 else ""
                print(f"kNN top-1 (k=200): {first['knn_top1']:.2f} at epoch {first['epoch']}{init} "
                      f"-> {last['knn_top1']:.2f} at epoch {last['epoch']}: "
                      f"{last['knn_top1'] - first['knn_top1']:+.2f} points", flush=True)
                key = "knn_top1_teacher"
                teacher = [r for r in self.knn_records if key in r]
                if teacher:
                    a, b = teacher[0][key], teacher[-1][key]
                    print(f"the EMA teacher's: {a:.2f} -> {b:.2f}: {b - a:+.2f} points", flush=True)
                if "probe_top1" in last:
                    print(f"online linear probe top-1 at epoch {last['epoch']}: "
                          f"{last['probe_top1']:.2f}", flush=True)


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
    except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler for inductor
        if os.environ.get("TORCHDYNAMO_VERBOSE") == "1":
            raise
        fail(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); run "
             f"with --no-compile, or with TORCHDYNAMO_VERBOSE=1 for the traceback")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def check_out_dir(path):
    """One line now, before any long work, if --out-dir is a file or cannot be written; creates
    nothing."""
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
    """(checkpoint or None, where it came from): the out-dir's run.pt, else --resume; every rank
    the same."""
    run_path = os.path.join(args.out_dir, "run.pt")
    # The same command continues its own run; --resume only points elsewhere for a first start.
    resume_from = run_path if os.path.exists(run_path) else args.resume
    if resume_from and not os.path.exists(resume_from):
        fail(f"--resume: checkpoint {resume_from} does not exist")
    try:
        ckpt = checkpoints.load_checkpoint(resume_from) if resume_from else None
    except SystemExit as e:  # one line, and for the out-dir's own run.pt what to do about it
        if resume_from != run_path:
            raise
        fail(f"{str(e.code).removeprefix('error: ')}; move it away to start over, or give another "
             f"--out-dir")
    older = ckpt is not None and ("teacher" not in ckpt
                                  or any(k.startswith("assigner.") for k in ckpt["model"]))
    if older:
        fail(f"{resume_from} was written by an older train.py (before the baselines: no teacher or "
             f"queue entries); continue it with that version, or start a new --out-dir")
    if ckpt is not None:
        check_same_run(ckpt["args"], args, resume_from)
        if ckpt.get("world", world) != world and rank == 0:  # this one changes the run
            print(f"warning: {resume_from} ran in {ckpt['world']} process(es), this run has "
                  f"{world}: the views and BatchNorm statistics differ from an uninterrupted run's "
                  f"from here on", flush=True)
    if world > 1:  # every rank must continue from the same step (--out-dir on a shared filesystem)
        start = ckpt["step"] if ckpt is not None else 0
        steps = torch.tensor([start, -start])  # (2,)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=control)
        if steps[0] != -steps[1]:
            fail(f"the ranks found run.pt at different steps ({-int(steps[1])} to "
                 f"{int(steps[0])}); --out-dir must be one folder every node sees")
    return ckpt, resume_from


def pretrain(args, stop_signal):
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; checked before any group waits
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    rank, world, device, control = setup_distributed()
    if rank == 0:
        check_out_dir(args.out_dir)
    ckpt, resume_from = find_checkpoint(args, rank, world, control)
    if ckpt is not None and ckpt["epoch"] >= (args.until_epoch or args.epochs):
        if rank == 0:
            until = f" (--until-epoch {args.until_epoch})" if args.until_epoch else ""
            print(f"{resume_from} is finished: {ckpt['epoch']} of {args.epochs} epochs "
                  f"done{until}; nothing to do", flush=True)
        return

    # Data: this rank's share of every global batch, in an order fixed by (seed, epoch).
    max_bytes = data.memory_budget(device)
    source, labels = load_pretrain_data(args, device, max_bytes)
    info = {"num_images": len(labels), "num_classes": len(labels[labels >= 0].unique())}
    if info["num_images"] < args.batch_size:
        fail(f"{info['num_images']} images are fewer than one batch of --batch-size "
             f"{args.batch_size}")
    if ckpt is not None and ckpt.get("data") and ckpt["data"] != info:
        fail(f"{args.dataset} under {args.data_dir} now has {info['num_images']} images in "
             f"{info['num_classes']} classes, but {resume_from} was trained on "
             f"{ckpt['data']['num_images']} in {ckpt['data']['num_classes']}")
    steps_per_epoch = info["num_images"] // args.batch_size
    start_step = ckpt["step"] if ckpt is not None else 0
    end_step = (args.until_epoch or args.epochs) * steps_per_epoch

    run = build_run(args, device, world, steps_per_epoch, ckpt)
    run.probe = None
    if args.online_probe:
        if not (labels >= 0).any():
            fail(f"--online-probe needs labels: {args.dataset}'s pretraining images have none")
        run.probe = monitor.OnlineProbe(run.model.head[0].in_features, int(labels.max()) + 1,
                                        device, ckpt and ckpt.get("probe"))
    book = Bookkeeping(args, run, (world, control), (start_step, end_step), stop_signal,
                       ckpt and resume_from, info, device, max_bytes)
    batches = data.Batches(info["num_images"], args.batch_size, world, rank, args.seed, start_step,
                           end_step)
    # closing() shuts DataLoader workers down on every way out: they ignore SIGTERM, so nothing else
    with contextlib.closing(pretrain_batches(args, source, batches, rank, device,
                                             None if run.probe is None else labels)) as stream:
        for step, (views, batch_labels) in zip(range(start_step, end_step), stream):
            now = schedule_values(run, step)
            loss, stats = train_step(run, views, now, step)
            if run.probe is not None:  # beside the method's step, on its features, own optimizer
                stats["probe_loss"] = run.probe.step(run.features, batch_labels)
            book.after_step(step, loss, stats, now)
    book.finish()


def atomic_save(obj, path):
    """Write to a temporary file (torch.save, or JSON for a .json path), then rename: a crash or a
    failed write (full disk) never leaves a half-written file, and the previous one stays as it
    was."""
    write = write_json if path.endswith(".json") else torch.save
    try:
        data.write_atomic(path, lambda tmp: write(obj, tmp))
    except Exception as e:
        kept = "the previous one is intact" if os.path.exists(path) else "there is no earlier one"
        fail(f"could not write {path} ({type(e).__name__}: {e}); {kept}")


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def provenance(device, world, code_dir=os.path.dirname(os.path.abspath(__file__))):
    """What made the run: the git commit of the code in code_dir and whether its tracked files had
    uncommitted changes ("unknown" without git or outside a repository), library versions,
    device."""
    def git(*argv):
        try:
            done = subprocess.run(["git", *argv], cwd=code_dir, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):  # no git, a hung filesystem...
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = (git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
               if commit else None)
    name = f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
    return {"commit": commit or "unknown",
            "uncommitted_changes": "unknown" if changes is None else bool(changes),
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "device": name, "processes": world,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def knn_gain(records, keys):
    """' (+12.30 since epoch 0)' for the newest kNN record (with two keys ' (+12.30, +14.00 ...)',
    each since the first record holding it); ' (random init)' for a fresh run's first."""
    last = records[-1]
    firsts = [next(r for r in records if k in r) for k in keys]
    if firsts[0] is last:
        return " (random init)" if last["step"] == 0 else ""
    gains = ", ".join(f"{last[k] - first[k]:+.2f}" for k, first in zip(keys, firsts))
    return f" ({gains} since epoch {firsts[0]['epoch']})"


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
    """Keep the log records of steps before `step` (kNN records at `step` too) and the provenance
    records (no step), so a continued run logs every step once; returns them."""
    kept = [r for r in read_log(path) if "step" not in r
            or r["step"] < step or "knn_top1" in r and 0 < r["step"] == step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    return kept


if __name__ == "__main__":
    main()
