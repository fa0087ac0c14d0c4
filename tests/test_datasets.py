"""cifar10, cifar100 and stl10 from torchvision's on-disk formats, as `--data-dir X` without
`--download` reads them (CPU, no network): tiny format-exact copies written here are read back
pixel for pixel, trained on for an epoch and evaluated through both loaders; a missing or truncated
file ends a run with one line naming it and the layout expected.

torchvision checks every file of a dataset against the md5 of the published file, which no copy
written here can match. The `written` fixture puts the md5s of the files it wrote into torchvision's
tables, as if they were the published ones, so that the path real data takes, md5 check included,
is the one tested; test_published_md5s_refuse_a_copy_written_here shows the check at work.
"""
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torchvision

import data
import evaluate
import train
from test_evaluate import image_tree

CIFAR10, CIFAR100, STL10 = (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100,
                            torchvision.datasets.STL10)
TV = {"cifar10": CIFAR10, "cifar100": CIFAR100, "stl10": STL10}
NAMES = tuple(TV)
# images per class (train, test), unlabeled images (STL-10), px, --batch-size: 3 steps an epoch,
# 2 on STL-10
SIZES = {"cifar10": (10, 2, 0, 32, 32), "cifar100": (1, 1, 0, 32, 32), "stl10": (2, 1, 12, 96, 16)}
RUN = ["--epochs", "1", "--image-size", "16", "--workers", "0", "--log-every", "1",
       "--knn-every", "1", "--no-compile"]  # a GPU, if there is one, would compile for a minute


def images(rng, labels, px, num_classes):
    """(N, 3, px, px) uint8: a colour per class plus noise, so that kNN tells the classes apart."""
    colours = np.random.default_rng(99).integers(40, 216, (num_classes, 3, 1, 1))  # (C, 3, 1, 1)
    noise = rng.integers(-40, 41, (len(labels), 3, px, px))
    return (colours[labels] + noise).clip(0, 255).astype(np.uint8)


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the published files are Python 2 pickles


def write_cifar(root, name):
    """cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or cifar-100-python/ (train,
    test, meta) as the python versions hold them: dicts with a (N, 3072) uint8 "data" array, each
    row the red, green then blue 32 x 32 planes, and a list of labels. Returns {split: (images
    (N, 3, 32, 32), labels (N,))}."""
    cls, (train_per_class, test_per_class, _, px, _) = TV[name], SIZES[name]
    num_classes = 10 if name == "cifar10" else 100
    folder = root / cls.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_labels = np.tile(np.arange(num_classes), train_per_class)
    test_labels = np.tile(np.arange(num_classes), test_per_class)
    train_x, test_x = (images(rng, train_labels, px, num_classes),
                       images(rng, test_labels, px, num_classes))
    if name == "cifar10":
        for i, (x, y) in enumerate(zip(np.array_split(train_x, 5),
                                       np.array_split(train_labels, 5)), 1):
            dump(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5",
                                              "labels": y.tolist(), "data": x.reshape(len(x), -1),
                                              "filenames": [f"{j}.png" for j in y]})
        dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1",
                                     "labels": test_labels.tolist(),
                                     "data": test_x.reshape(len(test_x), -1),
                                     "filenames": ["t.png"] * len(test_x)})
        dump(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)],
                                       "num_cases_per_batch": len(train_x) // 5, "num_vis": 3072})
    else:
        for split, x, y in (("train", train_x, train_labels), ("test", test_x, test_labels)):
            dump(folder / split, {"filenames": [f"{j}.png" for j in y],
                                  "batch_label": f"{split} batch",
                                  "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(),
                                  "data": x.reshape(len(x), -1)})
        dump(folder / "meta", {"fine_label_names": [f"fine{c}" for c in range(100)],
                               "coarse_label_names": [f"coarse{c}" for c in range(20)]})
    train_split = torch.from_numpy(train_x), torch.from_numpy(train_labels)
    return {"pretrain": train_split, "train": train_split,
            "test": (torch.from_numpy(test_x), torch.from_numpy(test_labels))}


def write_stl10(root):
    """stl10_binary/ as the binary version holds it: *_X.bin raw uint8, each image its red, green
    then blue 96 x 96 planes, each plane column by column; *_y.bin one byte per image, labels 1..10;
    class_names.txt one name a line; fold_indices.txt ten lines of train indices (0-based)."""
    train_per_class, test_per_class, unlabeled, px, _ = SIZES["stl10"]
    folder = root / STL10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(1)
    splits = {}
    for split, labels in (("train", np.tile(np.arange(10), train_per_class)),
                          ("test", np.tile(np.arange(10), test_per_class)),
                          # their classes give them colours
                          ("unlabeled", rng.integers(0, 10, unlabeled))):
        x = images(rng, labels, px, 10)
        # column-major planes
        (folder / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        splits[split] = torch.from_numpy(x), torch.from_numpy(labels)
    (folder / "class_names.txt").write_text("".join(f"class{c}\n" for c in range(10)))
    n = len(splits["train"][1])
    (folder / "fold_indices.txt").write_text("".join(" ".join(map(str, range(f, n, 10))) + "\n"
                                                     for f in range(10)))
    (unlabeled_x, _), (train_x, train_y) = splits.pop("unlabeled"), splits["train"]
    splits["pretrain"] = (torch.cat([train_x, unlabeled_x]),
                          torch.cat([train_y, torch.full((unlabeled,), -1)]))
    return splits


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{name: (data dir, {split: (images (N, 3, H, W) uint8, labels (N,))})} for the three formats,
    with torchvision's md5 tables holding these files' md5s while this module runs."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, cls in TV.items():
            root = tmp_path_factory.mktemp(name)
            out[name] = root, write_stl10(root) if name == "stl10" else write_cifar(root, name)
            folder = root / cls.base_folder
            for table in ("train_list", "test_list"):
                mp.setattr(cls, table, [[f, md5(folder / f)] for f, _ in getattr(cls, table)])
            if "meta" in vars(cls):
                mp.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
        yield out


def files_of(name):
    cls = TV[name]
    return [f for f, _ in cls.train_list + cls.test_list] + ([cls.meta["filename"]]
                                                             if hasattr(cls, "meta") else [])


def run_main(argv):
    # in-process: one process
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    train.main(argv)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def runs(written, tmp_path_factory):
    """runs(name, loader) -> the folder of a 1-epoch run on `name`'s written copy, trained once."""
    done = {}

    def run(name, loader):
        if (name, loader) not in done:
            out = tmp_path_factory.mktemp(f"{name}-{loader}")
            run_main(["--dataset", name, "--data-dir", str(written[name][0]),
                      "--batch-size", str(SIZES[name][4]),
                      "--loader", loader, *RUN, "--out-dir", str(out)])
            done[name, loader] = out
        return done[name, loader]
    return run


# ---------------------------------------------------------------- what is read is what was written

@pytest.mark.parametrize("name", NAMES)
def test_every_split_reads_the_written_pixels_and_labels(written, name):
    """Both ways a split is read (load_images for --loader device, the dataset's PIL images for
    --loader workers) give the written pixels and labels; STL-10's pretrain split is its train
    images then its unlabeled ones, labelled -1."""
    root, splits = written[name]
    for split, (x, y) in splits.items():
        images, labels = data.load_images(name, split, str(root))
        assert images.dtype == torch.uint8 and images.shape == x.shape, split
        assert torch.equal(images, x) and torch.equal(labels, y), split
        ds = data.build_dataset(name, split, None, str(root))
        assert torch.equal(data.targets(ds), y), split
        for i in (0, len(ds) - 1):
            img, label = ds[i]
            assert (torch.equal(torch.from_numpy(np.array(img)).permute(2, 0, 1), x[i])
                    and label == y[i]), (split, i)
    if name == "stl10":
        assert (splits["pretrain"][1][20:] == -1).all() and len(splits["pretrain"][1]) == 32
        assert (data.build_dataset(name, "test", None, str(root)).classes
                == [f"class{c}" for c in range(10)])
    else:
        names = data.build_dataset(name, "test", None, str(root)).classes
        assert names == ([f"class{c}" for c in range(10)] if name == "cifar10"
                         else [f"fine{c}" for c in range(100)])


def test_published_md5s_refuse_a_copy_written_here(written, monkeypatch):
    """Without its md5 in torchvision's table a file written here is not the published one, and is
    named as such: the check the `written` fixture satisfies is real."""
    root, _ = written["cifar10"]
    monkeypatch.setattr(CIFAR10, "train_list", [[f, "0" * 32] for f, _ in CIFAR10.train_list])
    with pytest.raises(SystemExit) as e:
        data.build_dataset("cifar10", "train", None, str(root))
    assert str(e.value) == (f"error: CIFAR10: {root}/cifar-10-batches-py/data_batch_1 is truncated "
                            "or corrupted (its md5 is not the published file's); "
                            f"expected {data.LAYOUT['cifar10']} under {root}; "
                            f"pass --download to fetch it again")


# ---------------------------------------------------------------- train an epoch, evaluate

@pytest.mark.parametrize("loader", ["device", "workers"])
@pytest.mark.parametrize("name", NAMES)
def test_one_epoch(runs, written, name, loader):
    """A 1-epoch run on each format by each loader: every pretrain image seen once (drop_last), the
    kNN monitor on the labelled splits before and after."""
    out = runs(name, loader)
    pretrain_images = len(written[name][1]["pretrain"][1])
    steps = pretrain_images // SIZES[name][4]
    ckpt = torch.load(out / "run.pt", map_location="cpu", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"]) == (steps, 1)
    assert ckpt["args"]["dataset"] == name and ckpt["args"]["loader"] == loader
    assert ckpt["data"] == {"num_images": pretrain_images,
                            "num_classes": 100 if name == "cifar100" else 10}
    log = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == list(range(steps))
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    knn = [r for r in log if "knn_top1" in r]
    assert [r["step"] for r in knn] == [0, steps]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in knn)


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_through_both_loaders(runs, written, name):
    """kNN and the linear probe on each format from its run.pt, by the device loader then by PIL
    views (--loader workers): one eval.jsonl record each, the same kNN numbers either way."""
    out, (train_x, _), (test_x, _) = (runs(name, "device"), written[name][1]["train"],
                                      written[name][1]["test"])
    argv = ["--ckpt", str(out / "run.pt"), "--protocol", "knn", "linear", "--linear-epochs", "1",
            "--workers", "0"]
    device = evaluate.main([*argv, "--loader", "device"])
    workers = evaluate.main([*argv, "--loader", "workers"])
    ks = dict.fromkeys([min(200, len(train_x)), 20])  # k capped at the bank
    rows = [f"knn k={k}" for k in ks] + ["linear"]
    assert [r[1] for r in device] == [r[1] for r in workers] == rows
    assert [r[2:] for r in device[:-1]] == [r[2:] for r in workers[:-1]]
    records = read_jsonl(out / "eval.jsonl")
    assert len(records) == 2 * len(rows)
    for r in records:
        assert r["dataset"] == r["pretrain_dataset"] == name and r["ckpt_epoch"] == 1
        assert (r["settings"]["train_images"] == len(train_x)
                and r["settings"]["test_images"] == len(test_x))
        assert r["settings"]["image_size"] == 16
        assert 0 <= r["top1"] <= r["top5"] <= 100
    assert records[0]["settings"]["k"] == len(train_x)
    # chance is 10% (1% on CIFAR-100); each class has its colour, so kNN finds it when the labels
    # read belong to the images read (measured: 95-100%)
    assert all(r["top1"] > 50 for r in records if r["protocol"] == "knn")


# ---------------------------------------------------------------- missing and truncated files

def copy_of(written, name, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(written[name][0], root)
    return root


def expected_error(name, root, path, what):
    return (f"error: {TV[name].__name__}: {path} {what}; expected {data.LAYOUT[name]} "
            f"under {root}; "
            f"pass --download to fetch it again")


MISSING = [(name, f) for name in NAMES for f in files_of(name)]


@pytest.mark.parametrize("name,missing", MISSING, ids=[f"{n}-{f}" for n, f in MISSING])
def test_missing_file_is_named(written, tmp_path, name, missing):
    root = copy_of(written, name, tmp_path)
    path = root / TV[name].base_folder / missing
    assert data.LAYOUT[name].startswith(TV[name].base_folder + "/")
    # written data_batch_1..5
    assert missing in data.LAYOUT[name] or missing.startswith("data_batch_")
    path.unlink()
    with pytest.raises(SystemExit) as e:
        run_main(["--dataset", name, "--data-dir", str(root), *RUN,
                  "--out-dir", str(tmp_path / "out")])
    assert str(e.value) == expected_error(name, root, path, "is missing")


@pytest.mark.parametrize("name", NAMES)
def test_missing_folder_is_named(written, tmp_path, name):
    """An empty --data-dir, or the CIFAR-10 binary version (cifar-10-batches-bin/) there."""
    (tmp_path / "cifar-10-batches-bin").mkdir()
    with pytest.raises(SystemExit) as e:
        run_main(["--dataset", name, "--data-dir", str(tmp_path), *RUN,
                  "--out-dir", str(tmp_path / "out")])
    assert str(e.value) == (f"error: {TV[name].__name__} not found: expected {data.LAYOUT[name]} "
                            f"under {tmp_path}; "
                            f"pass --download to fetch it there, or --data-dir where it lies")


TRUNCATED = [("cifar10", "data_batch_3", "train", "device"),
             ("cifar10", "batches.meta", "evaluate", "workers"),
             ("cifar100", "test", "evaluate", "device"), ("cifar100", "train", "train", "workers"),
             ("stl10", "unlabeled_X.bin", "train", "workers"),
             ("stl10", "test_y.bin", "evaluate", "device")]


@pytest.mark.parametrize("name,truncated,script,loader", TRUNCATED)
def test_truncated_file_is_named(runs, written, tmp_path, name, truncated, script, loader):
    """A file cut short (a copy that stopped, a full disk), met by train.py or evaluate.py, either
    loader."""
    root = copy_of(written, name, tmp_path)
    path = root / TV[name].base_folder / truncated
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if script == "train":
        argv = ["--dataset", name, "--data-dir", str(root), *RUN, "--loader", loader,
                "--out-dir", str(tmp_path)]
    else:
        argv = ["--ckpt", str(runs(name, "device") / "run.pt"), "--data-dir", str(root),
                "--protocol", "knn", "--loader", loader, "--workers", "0"]
    with pytest.raises(SystemExit) as e:
        (run_main if script == "train" else evaluate.main)(argv)
    assert str(e.value) == expected_error(name, root, path,
                                          "is truncated or corrupted "
                                          "(its md5 is not the published file's)")


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    """--download without a network: torchvision's URLError as one line, not a traceback."""
    import urllib.error

    def no_network(*a, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    with pytest.raises(SystemExit) as e:
        data.build_dataset("cifar10", "train", None, str(tmp_path), download=True)
    assert str(e.value) == (f"error: CIFAR10 under {tmp_path}: could not download or read it "
                            "(URLError: <urlopen error [Errno -3] Temporary failure in name "
                            "resolution>); expected "
                            f"{data.LAYOUT['cifar10']} under {tmp_path}")


# ---------------------------------------------------------------- the decoded-image cache

def test_cache_folder_that_cannot_be_made_is_skipped(tmp_path, monkeypatch, capsys):
    """XDG_CACHE_HOME naming a file (or a read-only home): one warning, the images decoded."""
    tree = image_tree(tmp_path / "tree", 8, per_class=2)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    for split in ("train", "test"):
        images, labels = data.load_images("imagefolder", split, str(tree), size=8)
        assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1]
    out = capsys.readouterr().out
    folder = tmp_path / "a-file" / "carl-carp"
    assert out.startswith(f"warning: cannot make the cache folder {folder} (")
    assert out.count("\n") == 1  # said once, not for every split


def test_folders_whose_paths_read_alike_keep_their_own_caches(tmp_path, monkeypatch):
    """.../p_q/train and .../p/q/train: each tree's cache survives the other's (read, not
    decoded again)."""
    trees = [image_tree(tmp_path / "p_q", 8, per_class=2),
             image_tree(tmp_path / "p" / "q", 8, per_class=2, classes="abc")]
    decoded = [data.load_images("imagefolder", "train", str(tree), size=8)[0] for tree in trees]
    monkeypatch.setattr(data, "load_rgb", lambda path: pytest.fail(f"{path} decoded again"))
    for tree, images in zip(trees, decoded):
        assert torch.equal(data.load_images("imagefolder", "train", str(tree), size=8)[0], images)
