"""Datasets: `synthetic` (built in), cifar10, cifar100, stl10, imagefolder; balanced subsets.

Every dataset yields (image, label) with a PIL image; `split` is "pretrain" (what
self-supervised training sees: STL-10 adds its 100k unlabeled images), "train" (the
labelled train split) or "test" (imagefolder: `val/`, or `test/` when there is no `val/`).
A missing or empty dataset exits with one line naming the path and the flag that fixes it.
"""
import os

import numpy as np
import torch
import torchvision
from PIL import Image

DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagefolder")
IMAGE_SIZE = {"synthetic": 32, "cifar10": 32, "cifar100": 32, "stl10": 96, "imagefolder": 224}
SPLITS = ("pretrain", "train", "test")


class Synthetic(torch.utils.data.Dataset):
    """10 classes of 32x32 images, generated deterministically from a seed: a light shape (disk,
    square, triangle, plus, ring, diamond, X, horizontal bar, stripes, checkerboard) of random
    size and position on a dark noisy background. Within a class only what the views vary
    (position, scale, a little colour) varies, so features that learned the views' invariances
    separate the classes (kNN k=200: 85% after the 155-step quickstart), while a random
    network's features also encode position and scale (37%). Random per-image colours, an
    earlier design, gave the views a shortcut: colour survives both views, so training matched
    images by colour and kNN on shape stayed near chance (RESULTS.md)."""

    classes = ["disk", "square", "triangle", "plus", "ring", "diamond", "x", "bar", "stripes", "checker"]

    def __init__(self, split, transform=None, size=2000, seed=0):
        rng = np.random.default_rng([seed, {"pretrain": 0, "train": 0, "test": 1}[split]])
        if split == "test":
            size = size // 4
        self.targets = [i % 10 for i in range(size)]
        self.images = np.stack([self._draw(c, rng) for c in self.targets])  # (N, 32, 32, 3) uint8
        self.transform = transform

    @staticmethod
    def _draw(label, rng, px=32):
        yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
        r = rng.uniform(7, 13)  # half-size of the shape
        cy, cx = rng.uniform(r, px - r, size=2)
        dy, dx = (yy - cy) / r, (xx - cx) / r  # in [-1, 1] inside the shape's box
        box = (abs(dy) <= 1) & (abs(dx) <= 1)
        mask = [
            dy ** 2 + dx ** 2 <= 1,
            box,
            box & (dy >= 2 * abs(dx) - 1),
            box & ((abs(dy) < 0.3) | (abs(dx) < 0.3)),
            (dy ** 2 + dx ** 2 <= 1) & (dy ** 2 + dx ** 2 >= 0.45),
            abs(dy) + abs(dx) <= 1,
            box & ((abs(dy - dx) < 0.35) | (abs(dy + dx) < 0.35)),
            box & (abs(dy) < 0.3),
            box & (np.floor((dy + 1) * 2.5) % 2 == 0),
            box & ((np.floor((dy + 1) * 2) + np.floor((dx + 1) * 2)) % 2 == 0),
        ][label]
        bg = 60 + rng.normal(0, 10, size=3)  # (3,) RGB, dark grey with a slight tint
        fg = 190 + rng.normal(0, 10, size=3)
        img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, size=(px, px, 3))
        return img.clip(0, 255).astype(np.uint8)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def _fail(msg):
    raise SystemExit(f"error: {msg}")


def _torchvision(cls, data_dir, download, **kw):
    try:
        return cls(root=data_dir, download=download, **kw)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        _fail(f"{cls.__name__} not found under {os.path.abspath(data_dir)} ({e}); "
              f"pass --download to fetch it there, or --data-dir where it lies")


def _image_folder(root, transform):
    if not os.path.isdir(root):
        _fail(f"no folder {os.path.abspath(root)}; --data-dir must hold train/<class>/* and val/ or test/")
    try:
        return torchvision.datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        _fail(f"no images under {os.path.abspath(root)} ({e}); check --data-dir")


def build_dataset(name, split, transform=None, data_dir="data", download=False):
    if name not in DATASETS:
        _fail(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if name == "synthetic":
        return Synthetic(split, transform)
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return _torchvision(cls, data_dir, download, train=split != "test", transform=transform)
    if name == "stl10":
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
        return _torchvision(torchvision.datasets.STL10, data_dir, download, split=stl_split, transform=transform)
    if download:
        _fail("--download does not apply to --dataset imagefolder")
    sub = "train" if split != "test" else ("val" if os.path.isdir(os.path.join(data_dir, "val")) else "test")
    return _image_folder(os.path.join(data_dir, sub), transform)


def targets(ds):
    """Integer labels of a dataset (or Subset) as a 1-d int64 tensor, without loading images."""
    if isinstance(ds, torch.utils.data.Subset):
        return targets(ds.dataset)[torch.as_tensor(ds.indices)]
    labels = ds.labels if hasattr(ds, "labels") else ds.targets  # STL10 keeps .labels
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def balanced_subset(labels, per_class, seed=0):
    """Sorted indices of `per_class` samples of every class, chosen with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels[labels >= 0].unique().tolist():  # -1: unlabeled (STL-10)
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            _fail(f"class {c} has {len(idx)} samples, fewer than the {per_class} asked for")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picked).sort().values
