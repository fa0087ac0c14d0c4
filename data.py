"""Datasets: `synthetic` (built in), cifar10, cifar100, stl10, imagefolder; balanced subsets; the
order in which training visits them.

Every dataset yields (image, label) with a PIL image; `split` is "pretrain" (what
self-supervised training sees: STL-10 adds its 100k unlabeled images), "train" (the
labelled train split) or "test" (imagefolder: `val/`, or `test/` when there is no `val/`).
`load_images` decodes a whole split once into a uint8 tensor, for `--loader device` (train.py,
its kNN monitor, evaluate.py). A missing or empty dataset, or an unreadable image, exits with
one line naming the path; for cifar10, cifar100 and stl10 (torchvision's on-disk formats, LAYOUT),
the missing or truncated file and the layout expected.
"""
import concurrent.futures
import functools
import hashlib
import os
import time

import numpy as np
import torch
import torchvision
from PIL import Image

import augment

DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagefolder")
SYNTHETIC_PX = 20  # side of the built-in images: the quickstart's image size (RESULTS.md)
IMAGE_SIZE = {"synthetic": SYNTHETIC_PX, "cifar10": 32, "cifar100": 32, "stl10": 96,
              "imagefolder": 224}
SPLITS = ("pretrain", "train", "test")


class Synthetic(torch.utils.data.Dataset):
    """10 classes of SYNTHETIC_PX-square images, generated deterministically from a seed: a light
    shape (disk, square, triangle, plus, ring, diamond, X, horizontal bar, stripes, checkerboard)
    of random size and position on a dark noisy background, drawn at their own size (downsampling
    32 px drawings gave a random network a 47% kNN head start at 16 px; RESULTS.md). Within a class
    only what the views vary (position, scale, a little colour) varies, so features that learned
    the views' invariances separate the classes, while a random network's features also encode
    position and scale. No random per-image colours: colour survives both views, a shortcut by
    which training matched images while kNN on shape stayed near chance (RESULTS.md)."""

    classes = ["disk", "square", "triangle", "plus", "ring", "diamond", "x", "bar", "stripes",
               "checker"]

    def __init__(self, split, transform=None, size=2000, seed=0, px=SYNTHETIC_PX):
        rng = np.random.default_rng([seed, {"pretrain": 0, "train": 0, "test": 1}[split]])
        if split == "test":
            size = size // 4
        self.targets = [i % 10 for i in range(size)]
        self.images = np.stack([self._draw(c, rng, px)
                                for c in self.targets])  # (N, px, px, 3) uint8
        self.transform = transform

    @staticmethod
    def _draw(label, rng, px):
        yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
        r = rng.uniform(7, 13) * px / 32  # half-size of the shape
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


# What torchvision reads under --data-dir (every split checks every file, against the md5 of the
# published file).
LAYOUT = {
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (the python version)",
    "cifar100": "cifar-100-python/{train,test,meta} (the python version)",
    "stl10": "stl10_binary/{train_X.bin,train_y.bin,test_X.bin,test_y.bin,unlabeled_X.bin} "
             "(the binary version)",
}


def _bad_file(cls, root):
    """(path, what is wrong) for the first file of torchvision's `cls` that is missing, else the
    first whose md5 is not the published one's; None when all are right."""
    files = cls.train_list + cls.test_list + ([[cls.meta["filename"], cls.meta["md5"]]]
                                              if hasattr(cls, "meta") else [])
    paths = [(os.path.join(root, cls.base_folder, name), md5) for name, md5 in files]
    for path, _ in paths:  # every missing file is found before any is hashed (STL-10 holds 3 GB)
        if not os.path.isfile(path):
            return path, "is missing"
    for path, md5 in paths:
        if not torchvision.datasets.utils.check_integrity(path, md5):
            return path, "is truncated or corrupted (its md5 is not the published file's)"
    return None


def _torchvision(cls, name, data_dir, download, **kw):
    root = os.path.abspath(data_dir)
    expected = f"expected {LAYOUT[name]} under {root}"
    try:
        return cls(root=data_dir, download=download, **kw)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted", naming no file
        if not os.path.isdir(os.path.join(root, cls.base_folder)):
            _fail(f"{cls.__name__} not found: {expected}; pass --download to fetch it there, "
                  "or --data-dir where it lies")
        bad = _bad_file(cls, root)
        what = f"{bad[0]} {bad[1]}" if bad else str(e)
        _fail(f"{cls.__name__}: {what}; {expected}; pass --download to fetch it again")
    except OSError as e:  # an unreadable file (the message names it), or a failed download
        _fail(f"{cls.__name__} under {root}: "
              f"{'could not download or read it' if download else 'cannot read it'} "
              f"({type(e).__name__}: {e}); {expected}")


class BadImageError(Exception):
    """An image file that cannot be decoded; the message names the file."""

    def line(self):
        """The message naming the file, also when a DataLoader process raised it (the message then
        holds the process's traceback, ending with ours)."""
        return str(self).strip().splitlines()[-1].split("BadImageError: ")[-1]


def load_rgb(path):
    """ImageFolder's loader, with one line naming the file when it is unreadable or truncated."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # OSError (truncated), PIL.UnidentifiedImageError, ...
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _image_folder(root, transform):
    if not os.path.isdir(root):
        _fail(f"no folder {os.path.abspath(root)}; --data-dir must hold train/<class>/* "
              "and val/ or test/")
    try:
        return torchvision.datasets.ImageFolder(root, transform=transform, loader=load_rgb)
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
        return _torchvision(cls, name, data_dir, download, train=split != "test",
                            transform=transform)
    if name == "stl10":
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
        return _torchvision(torchvision.datasets.STL10, name, data_dir, download, split=stl_split,
                            transform=transform)
    if download:
        _fail("--download does not apply to --dataset imagefolder")
    sub = "train" if split != "test" else ("val" if os.path.isdir(os.path.join(data_dir, "val"))
                                           else "test")
    return _image_folder(os.path.join(data_dir, sub), transform)


def targets(ds):
    """Integer labels of a dataset (or Subset) as a 1-d int64 tensor, without loading images."""
    if isinstance(ds, torch.utils.data.Subset):
        return targets(ds.dataset)[torch.as_tensor(ds.indices)]
    labels = ds.labels if hasattr(ds, "labels") else ds.targets  # STL10 keeps .labels
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def fingerprint(ds):
    """A short hash of what the images at each index of `ds` (a dataset or Subset) are: its kind and
    folder, and an ImageFolder tree's (file, class) list or else its labels. Files saved for one
    split (evaluate.py's label subsets) are not reused for another."""
    if isinstance(ds, torch.utils.data.Subset):
        key = f"{fingerprint(ds.dataset)}{list(ds.indices)}".encode()
    else:
        root = os.path.abspath(ds.root) if hasattr(ds, "root") else ""  # Synthetic: none
        if hasattr(ds, "samples"):  # ImageFolder
            content = "".join(f"{os.path.relpath(p, ds.root)},{c};" for p, c in ds.samples).encode()
        else:
            content = targets(ds).numpy().tobytes()
        key = f"{type(ds).__name__},{root},{len(ds)};".encode() + content
    return hashlib.sha1(key).hexdigest()[:12]


def subset_indices(labels, size, flag):
    """Sorted indices of the fixed class-balanced subset of `size` labelled samples (seed 0) that
    every script draws for `flag` (named in the error when size does not split into the classes)."""
    num_classes = len(labels[labels >= 0].unique())  # -1 marks STL-10's unlabeled images, left out
    if size % num_classes:
        _fail(f"{flag} {size} is not a multiple of the {num_classes} classes")
    return balanced_subset(labels, size // num_classes, seed=0)


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


# ---------------------------------------------------------------- a whole split as one uint8 tensor

def load_images(name, split, data_dir="data", download=False, size=32, max_bytes=None, subset=None,
                flag=None, ds=None):
    """Decode a split once: (images (N, 3, H, W) uint8, labels (N,) int64, -1 for unlabeled).

    Images keep their own size when they all share one; otherwise (an ImageFolder tree of mixed
    sizes) each is held as a square around its eval view (augment.stored_square). An ImageFolder
    tree is decoded once and cached (see `_cache_path`). subset: only the class-balanced subset
    `subset_indices(labels, subset, flag)`, chosen before decoding. max_bytes: refuse, before
    decoding, a split that would not fit. ds: the split as build_dataset built it, or a Subset of
    it (then its images), not built again here."""
    if ds is None:
        ds = build_dataset(name, split, None, data_dir, download)
    keep = None
    if isinstance(ds, torch.utils.data.Subset):
        ds, keep = ds.dataset, torch.as_tensor(ds.indices)  # (n,)
    labels = targets(ds)  # (N,)
    if keep is None:
        keep = subset_indices(labels, subset, flag) if subset else torch.arange(len(labels))  # (n,)
    if isinstance(ds, Synthetic):
        images = torch.from_numpy(ds.images).permute(0, 3, 1, 2)  # (N, 3, px, px)
    elif isinstance(ds, torchvision.datasets.CIFAR10):  # CIFAR-100 too
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, 3, 32, 32)
    elif isinstance(ds, torchvision.datasets.STL10):
        images = torch.from_numpy(ds.data)  # (N, 3, 96, 96)
    else:
        return _decode_folder(ds, keep, size, max_bytes), labels[keep]
    if max_bytes is not None and images[0].numel() * len(keep) > max_bytes:
        _fail(f"{name} {split} needs {images[0].numel() * len(keep) / 2**30:.1f} GiB held whole; "
              "use --loader workers")
    return images[keep].contiguous(), labels[keep]


def default_loader(dataset, image_size):
    """--loader's default: device (the split decoded once into memory, views made in batches),
    except for ImageFolder trees of large images (ImageNet), which do not fit."""
    return "workers" if dataset == "imagefolder" and image_size > 96 else "device"


def memory_budget(device):
    """The most bytes a decoded split may take: half the free memory of `device` (GPU memory, or
    the available RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


@functools.lru_cache(maxsize=None)
def _cache_folder(cache):
    """`cache`, made if need be; None, said once in one line, when it cannot be made (a read-only
    home, XDG_CACHE_HOME naming a file): a cache is a convenience, the run goes on without it."""
    try:
        os.makedirs(cache, exist_ok=True)
        return cache
    except OSError as e:
        print(f"warning: cannot make the cache folder {cache} ({e.strerror or e}); decoding "
              f"without a cache (set XDG_CACHE_HOME to a writable folder to keep one)", flush=True)
        return None


def _cache_path(root, tag):
    """Where a decoded ImageFolder split is cached: $XDG_CACHE_HOME/carl-carp (default
    ~/.cache/carl-carp), named after the split's absolute path (datasets often lie in read-only or
    shared folders) and its hash (two paths may read alike once their slashes are replaced); None
    without a cache folder."""
    home = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    cache = _cache_folder(os.path.join(home, "carl-carp"))
    if cache is None:
        return None
    root = os.path.abspath(root)
    name = root.strip("/").replace("/", "_")[-100:]  # file names are limited to 255 bytes
    digest = hashlib.sha1(root.encode()).hexdigest()[:10]
    return os.path.join(cache, f"{name}.{digest}.{tag}.uint8.pt")


def write_atomic(path, write):
    """write(tmp) into a temporary file beside `path`, then rename it to `path`: a crash or a failed
    write (full disk) never leaves a half-written file there. The temporary file is removed on any
    error, which is raised again."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C too
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _decode_folder(ds, keep, size, max_bytes):
    """Images keep[i] of an ImageFolder dataset as (len(keep), 3, H, W) uint8, from the cache when
    valid."""
    samples = [ds.samples[i][0] for i in keep.tolist()]
    # The cache is valid while every file keeps its path, size and modification time, and the images
    # are held as they were (stored_square's squares depend on `size`).
    try:
        stats = [os.stat(p) for p in samples]
    except OSError as e:  # a file gone since the tree was listed
        _fail(f"cannot read image {e.filename}: {e.strerror}")
    held = f"v3: mixed sizes held as augment.stored_square({size});"
    files = "".join(f"{os.path.abspath(p)},{s.st_size},{s.st_mtime_ns};"
                    for p, s in zip(samples, stats))
    key = hashlib.sha1((held + files).encode()).hexdigest()
    path = _cache_path(ds.root, f"{size}px" + (f"-{len(keep)}of{len(ds)}"
                                               if len(keep) < len(ds) else ""))
    if path is not None and os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
            if cached["fingerprint"] == key:
                return cached["images"]
        except Exception:  # unreadable or stale cache: decode again
            pass

    def header(p):
        try:
            with Image.open(p) as img:  # reads the header only
                return img.size  # (W, H)
        except Exception as e:
            raise BadImageError(f"cannot read image {p}: {type(e).__name__}: {e}") from None

    # PIL decodes outside the GIL
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        def run(fn, items, what):
            t0, shown = time.time(), time.time()
            try:
                for done, result in enumerate(pool.map(fn, items), 1):
                    yield result
                    if time.time() - shown > 10:
                        eta = (time.time() - t0) / done * (len(items) - done)
                        print(f"{what} {ds.root}: {done}/{len(items)} images, eta {eta:.0f} s",
                              flush=True)
                        shown = time.time()
            except BadImageError as e:
                pool.shutdown(cancel_futures=True)  # fail now, not after every queued image
                _fail(str(e))

        sizes = set(run(header, samples, "reading"))
        mixed = len(sizes) > 1  # then each image is held as augment.stored_square makes it
        w, h = (augment.eval_resize(size),) * 2 if mixed else sizes.pop()
        if max_bytes is not None and len(samples) * 3 * h * w > max_bytes:
            _fail(f"{ds.root}: {len(samples)} images of {w}x{h} need "
                  f"{len(samples) * 3 * h * w / 2**30:.1f} GiB held whole; use --loader workers")
        fit = augment.stored_square(size) if mixed else (lambda img: img)
        images = torch.empty(len(samples), 3, h, w, dtype=torch.uint8)  # (n, 3, H, W)

        def decode(i):
            # (3, H, W)
            images[i] = torch.from_numpy(np.array(fit(load_rgb(samples[i])))).permute(2, 0, 1)

        for _ in run(decode, range(len(samples)), "decoding"):
            pass
    if path is None:
        return images
    try:
        write_atomic(path, lambda tmp: torch.save({"fingerprint": key, "images": images}, tmp))
    except Exception as e:  # a cache is a convenience (full disk: RuntimeError): go on without it
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"warning: could not cache the decoded images at {path}: {reason}", flush=True)
    return images


# --------------------------------------------------------------- the order training visits the data

def seed_of(*keys):
    """A 64-bit seed from integers, e.g. (seed, epoch, index): independent streams per key."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


class Batches:
    """This rank's samples for every step from `start` to `stop` (global step numbers), as lists of
    (epoch, index). Each epoch is a permutation drawn from (seed, epoch) cut into steps of the
    global batch, each step's batch split across ranks (drop_last, as DistributedSampler). It
    depends on nothing else, so a run resumed at any step sees the same samples in the same
    order."""

    def __init__(self, num_samples, batch_size, world, rank, seed, start, stop):
        self.n, self.batch = num_samples, batch_size
        self.world, self.rank, self.seed = world, rank, seed
        self.steps_per_epoch = num_samples // batch_size
        self.start, self.stop = start, stop

    def __len__(self):
        return self.stop - self.start

    def epoch_order(self, epoch):
        g = torch.Generator().manual_seed(seed_of(self.seed, epoch))
        # (steps * batch,)
        perm = torch.randperm(self.n, generator=g)[: self.steps_per_epoch * self.batch]
        # (steps, batch / world)
        return perm.view(self.steps_per_epoch, self.world, -1)[:, self.rank]

    def __iter__(self):
        order, order_epoch = None, None
        for step in range(self.start, self.stop):
            epoch, it = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            yield [(epoch, i) for i in order[it].tolist()]


class SeededViews(torch.utils.data.Dataset):
    """dataset[(epoch, index)] -> (views(image `index`), its label) with torch's random draws
    seeded by (seed, epoch, index): the views do not depend on the worker count or on where a run
    resumed."""

    def __init__(self, dataset, views, seed):
        self.dataset, self.views, self.seed = dataset, views, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        img, y = self.dataset[i]
        # torchvision's transforms draw from torch's global RNG
        torch.manual_seed(seed_of(self.seed, epoch, i))
        return self.views(img), y
