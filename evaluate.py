"""Evaluate a pretrained backbone: kNN, linear probe, semi-supervised (1% / 10%) and full
fine-tuning.

    python evaluate.py --ckpt out/run.pt                              # kNN + linear probe
    python evaluate.py --ckpt out/run.pt --protocol knn semi finetune --random-init
    python evaluate.py --ckpt out/run.pt --protocol linear-aug        # the thesis's linear protocol
    python evaluate.py --ckpt out/run.pt --dataset cifar100           # transfer (probes: 50 epochs)
    python evaluate.py --ckpt out/backbone.pt --arch resnet18 --dataset cifar10
    python evaluate.py --ckpt out/run.pt --weights student     # the online network, not the teacher
    python evaluate.py --ckpt dino/checkpoint.pth              # other libraries: see checkpoints.py
    # CPU
    python evaluate.py --ckpt out/run.pt --dataset cifar10 --train-subset 5000 --test-subset 2000

Protocols (thesis / InstDisc / DINO eval_knn conventions):
  knn         frozen L2-normalised features, cosine similarity, votes weighted exp(sim / T),
              k = 200 and 20
  linear      frozen backbone, nn.Linear on standardised precomputed features of the unaugmented
              images, SGD + cosine: fast, for comparing runs
  linear-aug  the thesis's probe (4.2.1, 5.6: He et al.'s MoCo protocol): the same head trained on
              features of fresh random-resized-crop + flip views every epoch, backbone frozen in
              eval mode (BatchNorm statistics untouched); quote this one beside the thesis's numbers
  semi        backbone + linear layer fine-tuned on class-balanced 1% and 10% label subsets,
              saved as <ckpt dir>/subset_<dataset>_<pct>pct_seed<seed>_<hash of the train split's
              files>.txt and reused
  finetune    the same on 100% of the labels
Linear probes train 100 epochs, or 50 when evaluating on another dataset than the pretraining one
(thesis 5.7.2). Architecture, stem, image size and dataset come from the checkpoint's stored args
unless a flag overrides them; a backbone.pt (plain torchvision state_dict) has none, so they come
from the flags, the weights (arch, stem) and the images (size).
--loader device (the default, as train.py's: not for ImageFolder trees at more than 96 px) decodes
each split once into memory on the device and makes the views of knn, linear and linear-aug there
in batches (linear-aug's on PIL workers when the images are larger than the input size); semi and
finetune use PIL views in DataLoader processes.
Prints each result, then appends it as one JSON line to <ckpt dir>/eval.jsonl (checked writable
before any work), and a table at the end.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import checkpoints
import data
import model as models

PROTOCOLS = ("knn", "linear", "linear-aug", "semi", "finetune")
SEMI_FRACTIONS = (0.01, 0.10)
PROGRESS_SECONDS = 20  # at most one progress line this often
# linear-aug's crops per forward of the frozen backbone, in pixels: 4096 (GPU) or 512 (CPU) at 32 px
FEATURE_PIXELS = {"cuda": 2 ** 22, "cpu": 2 ** 19}


fail = checkpoints.fail


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line, like every other refusal here (no usage dump)."""

    def error(self, message):
        fail(re.sub(r"^argument (--[\w-]+)\S*: ", r"\1 ", message))  # "argument --x/--y: m"


def ranged(kind, what, ok):
    """An argparse type: text -> kind(text), refused at parse time unless ok(value): "--knn-t
    must be a number > 0, not 0". train.py's flags use these too."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    return parse


positive_int = ranged(int, "an integer > 0", lambda v: v > 0)
nonnegative_int = ranged(int, "an integer >= 0", lambda v: v >= 0)
positive_float = ranged(float, "a number > 0", lambda v: 0 < v < math.inf)  # nan and inf refused
nonnegative_float = ranged(float, "a number >= 0", lambda v: 0 <= v < math.inf)
seed_int = ranged(int, "an integer from 0 to 2**63 - 1", lambda v: 0 <= v < 2 ** 63)  # torch's
unit_float = ranged(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="run.pt written by train.py, an exported backbone.pt, or another library's "
                        "checkpoint (CARP / DINO, MoCo v3, MoCo v1/v2, SwAV, VICReg, Barlow Twins, "
                        "solo-learn, a torchvision ResNet state dict; see checkpoints.py)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--weights", choices=["student", "teacher"], default=None,
                       help="which network of a run.pt or a CARP / DINO checkpoint (default: "
                            "the EMA teacher where there is one, as the published CARP evaluates)")
    which.add_argument("--checkpoint-key", default=None,
                       help="read the weights under this top-level entry of the file (e.g. model)")
    p.add_argument("--protocol", nargs="+", default=["knn", "linear"], choices=PROTOCOLS)
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="evaluate on this dataset (default: the pretraining one)")
    p.add_argument("--data-dir", default=None,
                   help="where the dataset lies (default: the checkpoint's, else data)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download cifar10/cifar100/stl10")
    p.add_argument("--arch", default=None, choices=models.ARCHS,
                   help="default: the checkpoint's, else resnet18")
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem (default: the checkpoint's, else read from conv1's "
                        "kernel size)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="default: the checkpoint's; for a backbone.pt the images' own size when "
                        "they are small (<= 64 px) or the stem is the cifar one, else the "
                        "dataset's")
    p.add_argument("--train-subset", type=positive_int, default=None,
                   help="a fixed class-balanced subset of this many labelled train images (kNN "
                        "bank, probe and fine-tuning pool)")
    p.add_argument("--test-subset", type=positive_int, default=None,
                   help="a fixed class-balanced subset of this many test images (queries)")
    p.add_argument("--random-init", action="store_true",
                   help="also evaluate an untrained backbone, for comparison")
    p.add_argument("--knn-k", type=positive_int, nargs="+", default=[200, 20],
                   help="neighbours (at most the train images)")
    p.add_argument("--knn-t", type=positive_float, default=0.07, help="kNN vote temperature")
    p.add_argument("--linear-epochs", type=positive_int, default=None,
                   help="linear and linear-aug (default: 100, or 50 on another dataset than the "
                        "pretraining one)")
    p.add_argument("--linear-lr", type=positive_float, default=0.1, help="linear and linear-aug")
    p.add_argument("--finetune-epochs", type=positive_int, default=50, help="semi and finetune")
    p.add_argument("--finetune-lr", type=positive_float, default=0.05, help="semi and finetune")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0,
                   help="linear, linear-aug, semi and finetune")
    p.add_argument("--subset-seed", type=seed_int, default=0,
                   help="seed of the semi-supervised label subsets")
    p.add_argument("--batch-size", type=positive_int, default=256, help="semi and finetune: >= 2")
    p.add_argument("--loader", default=None, choices=["device", "workers"],
                   help="for knn, linear and linear-aug: device (each split decoded once into "
                        "memory on the device, views made there in batches) or workers (PIL views "
                        "in DataLoader processes; semi and finetune always use these); default as "
                        "train.py's: workers for ImageFolder trees of large images, else device")
    p.add_argument("--workers", type=nonnegative_int, default=min(8, os.cpu_count() or 1),
                   help="data loader processes (0: in this one)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile linear-aug's crops and frozen backbone (--loader device; "
                        "for GPUs: it costs a compile of each of two shapes)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="random-init weights, training order and linear-aug's views")
    return p.parse_args(argv)


def resolve(args, stored, state):
    """Unset flags from the checkpoint's args, else defaults; check them before any work. The image
    size, when neither --image-size nor the checkpoint gives it, waits for the images
    (choose_image_size)."""
    if args.batch_size < 2 and {"semi", "finetune"} & set(args.protocol):
        fail(f"--batch-size {args.batch_size}: semi and finetune train BatchNorm, which needs at "
             f"least 2 images a batch")
    if args.compile and ("linear-aug" not in args.protocol or args.loader == "workers"):
        fail("--compile applies only to linear-aug with --loader device")
    args.pretrain_dataset = stored.get("dataset")  # None for a backbone.pt
    args.dataset = args.dataset or stored.get("dataset", "synthetic")
    args.data_dir = args.data_dir or stored.get("data_dir", "data")
    args.arch = args.arch or stored.get("arch", "resnet18")
    if args.cifar_stem is None:
        args.cifar_stem = stored.get("cifar_stem")
    if args.cifar_stem is None and "conv1.weight" in state:
        args.cifar_stem = (
            state["conv1.weight"].shape[-1] == 3)  # (64, 3, 3, 3) cifar, (64, 3, 7, 7) imagenet
    args.transfer = args.pretrain_dataset is not None and args.dataset != args.pretrain_dataset
    # thesis 5.7.2: 50 epochs for the cross-domain probes; 4.2.1 / 6.4.1: 100
    if args.linear_epochs is None:
        args.linear_epochs = 50 if args.transfer else 100
    return args


def choose_image_size(args, stored, first_image):
    """(input size, where it came from): --image-size, else the run's training size, else the
    images' own size (short side of the first train image) when they are small or the stem is the
    cifar one (at the 224 px ImageFolder default a cifar-stem net would see 32 px images upsampled
    7x: ~50x the compute, and another input distribution than it learned on), else the dataset's
    default."""
    own = min(first_image.size)  # PIL size is (width, height)
    if args.image_size:
        return args.image_size, "--image-size"
    if stored.get("image_size"):
        return stored["image_size"], "the checkpoint's training size"
    if own <= models.CIFAR_STEM_MAX_PX or args.cifar_stem and own <= 96:
        return own, "the images' own size"
    if args.cifar_stem:  # large images through a stride-1 stem cost (own / 32)^2 times a CIFAR one
        return models.CIFAR_STEM_MAX_PX, "the largest size the cifar stem gets by default"
    return data.IMAGE_SIZE[args.dataset], f"the {args.dataset} default"


class Transformed(torch.utils.data.Dataset):
    """(PIL image, label) dataset -> (transform(image), label): one loaded dataset, several
    views."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return self.transform(img), label


def labelled_split(args, split, subset_size):
    """The labelled `split` as (dataset of PIL images, labels (N,)), optionally a fixed balanced
    subset."""
    ds = data.build_dataset(args.dataset, split, None, args.data_dir, args.download)
    labels = data.targets(ds)  # (N,)
    if len(labels) == 0 or (labels < 0).any():
        fail(f"--dataset {args.dataset}: {(labels < 0).sum().item()} of the {len(labels)} images "
             f"of its {split} split have no label (-1); evaluation needs labelled train and "
             "test splits")
    if subset_size:
        keep = data.subset_indices(labels, subset_size,
                                   f"--{split}-subset")  # (subset_size,) sorted
        ds, labels = torch.utils.data.Subset(ds, keep.tolist()), labels[keep]
    return ds, labels


def semi_subset(ds, labels, fraction, args):
    """(indices into `ds` of a class-balanced `fraction` of it, the index file or None): from the
    saved index file if present, else drawn and saved there. The file is named after what its
    indices refer to (data.fingerprint: the folder and its files, or the labels; --train-subset),
    so another tree or subset draws its own. Saving is a convenience: where the file cannot be
    written the draw, the same for the same seed, goes on unsaved."""
    num_classes = len(labels.unique())
    per_class = max(1, round(fraction * len(labels) / num_classes))
    tag = f"_train{args.train_subset}" if args.train_subset else ""
    name = f"subset_{args.dataset}{tag}_{round(100 * fraction)}pct_seed{args.subset_seed}"
    folder = os.path.dirname(os.path.abspath(args.ckpt))
    path = os.path.join(folder, f"{name}_{data.fingerprint(ds)}.txt")
    # Indices are saved into the full train split, so the file stays meaningful outside this run.
    full_index = (torch.as_tensor(ds.indices) if isinstance(ds, torch.utils.data.Subset)
                  else torch.arange(len(ds)))
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = torch.tensor([int(line) for line in f if line.strip()])  # (n,) full-split
        except (OSError, ValueError) as e:
            fail(f"cannot read the label subset {path} ({getattr(e, 'strerror', None) or e}); "
                 f"delete it to draw the subset again")
        pos = torch.searchsorted(full_index, saved)  # full_index is sorted
        if len(saved) == 0 or pos.max() >= len(full_index) or not (full_index[pos] == saved).all():
            fail(f"{path} does not fit this train split; delete it to draw the subset again")
        return pos, path
    pos = data.balanced_subset(labels, per_class, seed=args.subset_seed)  # (C * per_class,)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("".join(f"{i}\n" for i in full_index[pos].tolist()))

    try:  # whole or not at all: a cut-short file would be reused as a smaller subset
        data.write_atomic(path, write)
    except OSError as e:
        print(f"warning: cannot save the {100 * fraction:g}% label subset to {path} "
              f"({e.strerror or e}); going on with it unsaved", file=sys.stderr, flush=True)
        return pos, None
    return pos, path


class DeviceBatches:
    """(view(images[idx]), labels[idx]) for each batch, in the stored order, of images
    (N, 3, H, W) uint8 and labels (N,) on one device; has a len, for progress()."""

    def __init__(self, images, labels, batch_size, view):
        self.images, self.labels, self.view = images, labels, view
        self.batch_size = batch_size

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch_size):
            idx = slice(i, i + self.batch_size)
            yield self.view(self.images[idx]), self.labels[idx]


def make_loader(ds, batch_size, workers, device, shuffle=False, seed=0, drop_last=False):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       drop_last=drop_last,
                                       generator=torch.Generator().manual_seed(seed))


def progress(steps, label):
    """Yield from `steps` (epochs, batches: anything with a len), printing "<label> i/n, 4.1 min,
    eta 30.2 min" at most every PROGRESS_SECONDS and after the last step once a line was printed:
    long steps show they are alive, short ones print nothing."""
    n = len(steps)
    start = last = time.monotonic()
    for i, step in enumerate(steps, 1):
        yield step
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS or (i == n and last > start):
            eta = (now - start) / i * (n - i)
            print(f"{label} {i}/{n}, {(now - start) / 60:.1f} min, eta {eta / 60:.1f} min",
                  flush=True)
            last = now


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def extract_features(net, batches, device):
    """net's outputs for every (x, y) of batches, in eval mode: (outputs (N, F) float32,
    labels (N,)) on device."""
    net.eval()
    outs, labels = [], []
    for x, y in batches:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        with autocast(device):
            outs.append(net(x).float())  # (B, F)
        labels.append(y.to(device))
    return torch.cat(outs), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, num_classes, k=200, T=0.07, chunk=256):
    """Weighted kNN (InstDisc / DINO eval_knn): class scores (N_test, C), each the sum of
    exp(cos / T) over the k most similar train features of that class. Queries go `chunk` at a
    time, so no (N_test, N_train) similarity matrix is ever held whole."""
    bank = F.normalize(train_feats, dim=1)  # (N_train, F)
    k = min(k, len(bank))
    scores = []
    for q in F.normalize(test_feats, dim=1).split(chunk):  # (b, F)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (b, k) each
        votes = torch.zeros(len(q), num_classes, device=q.device)  # (b, C)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sim / T).exp()))
    return torch.cat(scores)  # (N_test, C)


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percent of rows whose label is among the k highest scores, for each k (k capped at C)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, max k)
    hit = top == labels[:, None]  # (N, max k)
    return [100.0 * hit[:, :k].any(1).float().mean().item() for k in ks]


def sgd_cosine(params, lr, weight_decay, total_steps):
    """SGD with momentum 0.9 and a per-step cosine decay of lr to 0."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total_steps))


def train_linear(train_feats, train_labels, num_classes, epochs=100, lr=0.1, batch_size=256,
                 weight_decay=0.0, seed=0, aug_batches=None, label="linear"):
    """Linear probe: nn.Linear(F, C) trained with cross-entropy on standardised features, returned
    with the standardisation folded into its weights, so it takes raw features (N, F).

    aug_batches (linear-aug): a function returning one epoch of (feats (B, F), labels (B,)) of
    freshly augmented images; train_feats (of unaugmented images) then only give the
    standardisation statistics. SGD + cosine for both: the thesis names He et al.'s protocol but
    not its optimiser, and MoCo's lr 30 (x0.1 at epochs 60 and 80) suits the scale of its raw
    features, which the standardisation removes."""
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)  # (F,) each
    head = nn.Linear(train_feats.shape[1], num_classes).to(train_feats.device)
    steps_per_epoch = math.ceil(len(train_feats) / batch_size)
    opt, sched = sgd_cosine(head.parameters(), lr, weight_decay, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)

    def shuffled_batches():
        for idx in torch.randperm(len(train_feats), generator=g).split(batch_size):
            idx = idx.to(train_feats.device)
            yield train_feats[idx], train_labels[idx]

    for _ in progress(range(epochs), f"{label}: epoch"):
        for feats, labels in (aug_batches or shuffled_batches)():
            loss = F.cross_entropy(head((feats - mean) / std), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():  # W (x - m) / s + b  =  (W / s) x + (b - W m / s)
        head.bias -= head.weight @ (mean / std)
        head.weight /= std
    return head


def device_aug_epochs(backbone, images, labels, batch_size, args, device, chunk=None):
    """linear-aug's epochs with --loader device: a function returning one epoch of (features (B, F),
    labels (B,)) of the frozen backbone on train_view crops (augment.batch_train_view, made on the
    device) in a fresh shuffled order. The crops go through the backbone `chunk` images at a time
    (a multiple of batch_size; default FEATURE_PIXELS' worth), bf16 on a GPU, compiled with
    --compile: in eval mode each image is normalised on its own, so the chunk changes only float
    rounding. Order and crop parameters are drawn on the device for a whole epoch at once, from
    --seed alone."""
    view = augment.batch_train_view(args.image_size, args.dataset)
    g_order, g_views = (torch.Generator(device=device).manual_seed(args.seed) for _ in range(2))
    if chunk is None:
        chunk = FEATURE_PIXELS[device.type] // args.image_size ** 2 // batch_size * batch_size
        chunk = max(chunk, batch_size)
    backbone.eval()

    @torch.no_grad()
    def features(x, u):  # (n, 3, H, W) uint8, (n, UNIFORMS) -> (n, F) float32
        crops = view.apply(x, view.parameters(u, *x.shape[-2:]))  # (n, 3, S, S)
        with autocast(device):
            return backbone(crops.contiguous(memory_format=torch.channels_last)).float()
    if args.compile:
        features = torch.compile(features, dynamic=False)  # two graphs: chunk, and an epoch's last

    def epoch():  # no host-device sync: the head's steps queue behind the chunk's forward
        order = torch.randperm(len(labels), generator=g_order, device=device)  # (N,)
        u = augment.draw_uniforms(len(labels), g_views)  # (N, UNIFORMS): order[i]'s crop, row i
        for i in range(0, len(order), chunk):
            idx = order[i:i + chunk]  # (n,)
            feats = features(images[idx], u[i:i + chunk])  # (n, F)
            yield from zip(feats.split(batch_size), labels[idx].split(batch_size))
    return epoch


def finetune(backbone, head, loader, epochs, lr, weight_decay, device, label="finetune"):
    """Train backbone (BatchNorm in train mode) and head together with cross-entropy, in place."""
    net = nn.Sequential(backbone, head).to(device, memory_format=torch.channels_last).train()
    opt, sched = sgd_cosine(net.parameters(), lr, weight_decay, epochs * len(loader))
    for _ in progress(range(epochs), f"{label}: epoch"):
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            with autocast(device):
                logits = net(x)  # (B, C)
            loss = F.cross_entropy(logits.float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net


def build_backbone(args, weights, device):
    """The backbone to evaluate: the checkpoint's weights, or (weights None) a
    torch.manual_seed(seed) init, which for seed 0 is the very network train.py started from."""
    torch.manual_seed(args.seed)
    net, feat_dim = models.build_backbone(args.arch, args.cifar_stem)
    if weights is not None:
        try:
            net.load_state_dict(weights)
        except RuntimeError as e:  # wrong --arch or stem: missing / unexpected keys, size mismatch
            # past "Error(s) in loading ..."
            detail = " ".join(" ".join(str(e).splitlines()[1:]).split())
            fail(f"{args.ckpt} does not fit --arch {args.arch} "
                 f"{'with' if args.cifar_stem else 'without'} the cifar stem: {detail[:300]}")
    return net.to(device, memory_format=torch.channels_last), feat_dim


def check_writable(log_path):
    """Fail in one line, before any work, when the results log cannot be appended to (it is created
    empty if missing): results that cannot be logged are half lost."""
    try:
        with open(log_path, "a"):
            pass
    except OSError as e:
        fail(f"cannot write the results log {log_path} ({e.strerror or e}); evaluate a copy of the "
             f"checkpoint in a folder you can write to")


def main(argv=None):
    """run(argv), with an unreadable image, wherever PIL reads one (here or in a DataLoader
    process), ending the run in one line naming the file; Ctrl-C too."""
    try:
        return run(argv)
    except data.BadImageError as e:
        message = e.line()
        e.__traceback__ = None  # its frames hold the DataLoader iterator: freed, its processes stop
    except KeyboardInterrupt:
        message = ("stopped by Ctrl-C; the results printed above without a warning are in "
                   "eval.jsonl; a rerun evaluates every protocol again")
    fail(message)


def run(argv=None):
    args = parse_args(argv)
    state, stored, ckpt_epoch, which, made = checkpoints.read_backbone(args.ckpt, args.weights,
                                                                       args.checkpoint_key)
    args = resolve(args, stored, state)
    log_path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval.jsonl")
    check_writable(log_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Data: PIL datasets loaded once, seen through the eval (resize, centre crop) or train
    # (crop, flip) view.
    train_set, train_labels = labelled_split(args, "train", args.train_subset)
    test_set, test_labels = labelled_split(args, "test", args.test_subset)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    first_image = train_set[0][0]  # PIL
    args.image_size, size_from = choose_image_size(args, stored, first_image)
    if args.cifar_stem is None:  # no checkpoint args and no conv1 to read it from
        args.cifar_stem = args.image_size <= models.CIFAR_STEM_MAX_PX
    eval_tf = augment.eval_view(args.image_size, args.dataset)
    train_tf = augment.train_view(args.image_size, args.dataset)
    bs, nw = args.batch_size, args.workers
    test_loader = make_loader(Transformed(test_set, eval_tf), bs, nw, device)
    args.loader = args.loader or data.default_loader(args.dataset, args.image_size)
    if args.loader == "device" and {"knn", "linear", "linear-aug"} & set(args.protocol):
        held = {}  # split -> (images (N, 3, H, W) uint8, labels (N,)) on the device
        for split, ds in (("train", train_set), ("test", test_set)):  # not built again
            images, labels = data.load_images(args.dataset, split, size=args.image_size,
                                              max_bytes=data.memory_budget(device), ds=ds)
            held[split] = images.to(device), labels.to(device)
        eval_batch = lambda x: augment.eval_batch(x, args.image_size, args.dataset)  # noqa: E731
        feature_batches = {split: DeviceBatches(*held[split], bs, eval_batch) for split in held}
        # linear-aug's crops on the device only from images held as they are (a tree of mixed sizes
        # is held as squares; one image's own size stands for that) and no larger than the input
        # (no shrinking crops)
        held_hw = tuple(held["train"][0].shape[-2:])
        aug_on_device = (held_hw == (first_image.height, first_image.width)
                         and max(held_hw) <= args.image_size)
        if "linear-aug" in args.protocol and not aug_on_device:
            print(f"linear-aug: the held images ({held_hw[1]}x{held_hw[0]} px) are not the files' "
                  f"own or are larger than {args.image_size} px, so its views are made by PIL in "
                  "--workers processes", flush=True)
    else:
        feature_batches = {"train": make_loader(Transformed(train_set, eval_tf), bs, nw, device),
                           "test": test_loader}
        aug_on_device = False
    if args.compile and not aug_on_device:
        print("warning: --compile is not used: linear-aug's views are made by PIL in --workers "
              "processes", file=sys.stderr, flush=True)
    linear_probes = [p for p in ("linear", "linear-aug") if p in args.protocol]
    probe_epochs = (f"linear probes {args.linear_epochs} epochs"
                    f"{' (transfer)' if args.transfer else ''}, "
                    if linear_probes else "")
    stem = "cifar" if args.cifar_stem else "imagenet"
    made_by = ""
    if made:  # a run.pt that says what made it
        changes = {True: " with uncommitted changes", "unknown": " (changes unknown)"}
        made_by = (f" by {stored.get('method')} at commit {made['commit'][:12]}"
                   f"{changes.get(made['uncommitted_changes'], '')}")
    print(f"evaluating {args.ckpt} ({which}; {args.arch}, {stem} stem, "
          f"pretrained on {args.pretrain_dataset or 'unknown'}{made_by}) on {args.dataset} at "
          f"{args.image_size} px ({size_from}): {len(train_set)} train / {len(test_set)} test "
          f"images, {num_classes} classes, {probe_epochs}{device.type}, {args.loader} loader",
          flush=True)
    scale = args.image_size / min(first_image.size)
    if not 0.5 <= scale <= 2:  # far from the images' own size: costly upsampling or lost detail
        w, h = first_image.size
        print(f"warning: the images are {w}x{h} px (the first train image) and get resized "
              f"{scale:.2g}x to {args.image_size} px; --image-size sets the input size",
              file=sys.stderr, flush=True)

    knn_ks = list(dict.fromkeys(min(k, len(train_set)) for k in args.knn_k))  # capped at the bank
    if "knn" in args.protocol and max(args.knn_k) > len(train_set):
        print(f"warning: --knn-k {max(args.knn_k)} is more than the {len(train_set)} train images; "
              f"k={len(train_set)} used", file=sys.stderr, flush=True)
    results = []  # (backbone name, row, top1, top5)
    logged = 0  # records appended to log_path

    def report(name, protocol, setting, top1, top5, seconds, **settings):
        nonlocal logged
        row = f"{protocol} {setting}".strip()
        results.append((name, row, top1, top5))
        rec = {"ckpt": os.path.abspath(args.ckpt), "ckpt_epoch": ckpt_epoch, "weights": which,
               "pretrain_dataset": args.pretrain_dataset, "dataset": args.dataset,
               "protocol": protocol, "setting": setting,
               "settings": {"arch": args.arch, "cifar_stem": args.cifar_stem,
                            "image_size": args.image_size, "image_size_from": size_from,
                            "train_images": len(train_set), "test_images": len(test_set),
                            **settings},
               "top1": round(top1, 2), "top5": round(top5, 2), "random_init": name == "random-init",
               "seconds": round(seconds, 1)}
        print(f"{name} {row}: top-1 {top1:.2f} top-5 {top5:.2f} ({seconds:.0f} s)", flush=True)
        try:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            logged += 1
        except OSError as e:  # writable at the start (check_writable), no longer: printed above
            print(f"warning: cannot append to {log_path} ({e.strerror or e}): {name} {row} is not "
                  f"logged", file=sys.stderr, flush=True)

    # (protocol, fraction of the train labels, its images, the subset's index file or None) to
    # fine-tune on: the same for every backbone
    label_sets = []
    if "semi" in args.protocol:
        for fraction in SEMI_FRACTIONS:
            keep, subset_file = semi_subset(train_set, train_labels, fraction, args)  # (n,)
            ft_set = torch.utils.data.Subset(train_set, keep.tolist())
            label_sets.append(("semi", fraction, ft_set, subset_file))
    if "finetune" in args.protocol:
        label_sets.append(("finetune", 1.0, train_set, None))
    backbones = [("trained", state)] + ([("random-init", None)] if args.random_init else [])
    for name, weights in backbones:
        backbone, feat_dim = build_backbone(args, weights, device)
        if "knn" in args.protocol or linear_probes:  # frozen features of unaugmented images
            t0 = time.time()
            train_feats, train_y = extract_features(  # (N_train, F), (N_train,)
                backbone, progress(feature_batches["train"],
                                   f"{name} features, train split: batch"), device)
            test_feats, test_y = extract_features(  # (N_test, F), (N_test,)
                backbone, progress(feature_batches["test"],
                                   f"{name} features, test split: batch"), device)
            t_feats = time.time() - t0

        if "knn" in args.protocol:
            for k in knn_ks:
                t0 = time.time()
                scores = knn_classify(train_feats, train_y, test_feats, num_classes, k,
                                      args.knn_t)  # (N_test, C)
                top1, top5 = topk_accuracy(scores, test_y)
                report(name, "knn", f"k={k}", top1, top5, t_feats + time.time() - t0, k=k,
                       T=args.knn_t)

        for protocol in linear_probes:
            t0 = time.time()
            aug_batches = None
            # backbone frozen in eval mode, features of fresh crop/flip views per batch
            if protocol == "linear-aug":
                if aug_on_device:
                    aug_batches = device_aug_epochs(backbone, *held["train"], bs, args, device)
                else:
                    aug_loader = make_loader(Transformed(train_set, train_tf), bs, nw, device,
                                             shuffle=True, seed=args.seed)
                    aug_batches = lambda: (  # noqa: E731
                        extract_features(backbone, [b], device) for b in aug_loader)  # (B, F), (B,)

            torch.manual_seed(args.seed)
            head = train_linear(train_feats, train_y, num_classes, args.linear_epochs,
                                args.linear_lr, bs, args.weight_decay, args.seed, aug_batches,
                                label=f"{name} {protocol}")
            with torch.no_grad():
                top1, top5 = topk_accuracy(head(test_feats), test_y)
            report(name, protocol, "", top1, top5, t_feats + time.time() - t0,
                   epochs=args.linear_epochs, lr=args.linear_lr, weight_decay=args.weight_decay,
                   batch_size=bs)

        for protocol, fraction, ft_set, subset_file in label_sets:
            t0 = time.time()
            backbone, feat_dim = build_backbone(args, weights, device)
            torch.manual_seed(args.seed)
            head = nn.Linear(feat_dim, num_classes)
            # no 1-image BatchNorm batch at an epoch's end
            ft_loader = make_loader(Transformed(ft_set, train_tf), bs, nw, device, shuffle=True,
                                    seed=args.seed, drop_last=len(ft_set) > bs)
            what = f"{name} {protocol} {100 * fraction:g}%"
            net = finetune(backbone, head, ft_loader, args.finetune_epochs, args.finetune_lr,
                           args.weight_decay, device, label=what)
            scores, labels = extract_features(  # (N_test, C), (N_test,)
                net, progress(test_loader, f"{what}, test split: batch"), device)
            top1, top5 = topk_accuracy(scores, labels)
            report(name, protocol, f"{100 * fraction:g}%", top1, top5, time.time() - t0,
                   labels=len(ft_set), subset_file=subset_file,
                   subset_seed=args.subset_seed if subset_file else None,
                   epochs=args.finetune_epochs, lr=args.finetune_lr,
                   weight_decay=args.weight_decay, batch_size=bs)

    # Table: one row per protocol setting, trained and random-init side by side.
    names = [name for name, _ in backbones]
    top = {(name, row): (top1, top5) for name, row, top1, top5 in results}
    print(f"\n{'protocol':14s}" + "".join(f"{name + ' top-1':>20s}{'top-5':>8s}" for name in names))
    for row in dict.fromkeys(row for _, row, _, _ in results):
        print(f"{row:14s}" + "".join(f"{top[name, row][0]:20.2f}{top[name, row][1]:8.2f}"
                                     for name in names))
    lost = f"; {len(results) - logged} could not be, printed above" if logged < len(results) else ""
    print(f"appended {logged} records to {log_path}{lost}")
    return results


if __name__ == "__main__":
    main()
