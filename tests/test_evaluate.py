"""Tests for evaluate.py: the pure pieces on synthetic features, then the CLI end to end on a tiny
checkpoint from a 1-epoch `synthetic` training run. CPU only;
python -m pytest -q tests/test_evaluate.py"""
import argparse
import json
import multiprocessing
import os
import pathlib
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import checkpoints
import data
import evaluate
import model as models
import train

TINY = ["--train-subset", "50", "--test-subset", "50", "--batch-size", "32", "--workers", "0"]


def image_tree(root, px, per_class=3, classes="ab"):
    """An ImageFolder tree of random px x px PNGs: train/ and test/, each with these classes."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


def blobs(num_classes, per_class, dim=32, seed=0, spread=0.3):
    """Well-separated Gaussian clusters: (feats (N, dim), labels (N,)); the same centres for every
    seed."""
    centres = torch.randn(num_classes, dim,
                          generator=torch.Generator().manual_seed(123))  # (C, dim)
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # (N,)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))  # (N, dim)
    return centres[labels] + spread * noise, labels


# ---------------------------------------------------------------- pure functions

def test_knn_separable_and_shuffled_labels():
    train_feats, train_labels = blobs(10, 30, seed=0)
    test_feats, test_labels = blobs(10, 10, seed=1)
    scores = evaluate.knn_classify(train_feats, train_labels, test_feats, 10, k=20, T=0.07, chunk=7)
    assert scores.shape == (100, 10)
    assert evaluate.topk_accuracy(scores, test_labels)[0] == 100.0
    # chunking changes nothing (7 queries at a time vs all at once)
    whole = evaluate.knn_classify(train_feats, train_labels, test_feats, 10, k=20, T=0.07,
                                  chunk=1000)
    torch.testing.assert_close(scores, whole)
    # k larger than the bank is capped, not an error
    assert evaluate.knn_classify(train_feats, train_labels, test_feats, 10,
                                 k=5000).shape == (100, 10)

    shuffled = train_labels[torch.randperm(len(train_labels),
                                           generator=torch.Generator().manual_seed(0))]
    top1, _ = evaluate.topk_accuracy(
        evaluate.knn_classify(train_feats, shuffled, test_feats, 10, k=20), test_labels)
    assert top1 < 30  # chance is 10


def test_knn_votes_are_temperature_weighted():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # one vote for class 0, two for 1
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.2]])  # much closer to the class-0 vector
    scores = evaluate.knn_classify(bank, labels, query, 2, k=3, T=0.07)  # (1, 2)
    cos = (torch.nn.functional.normalize(query, dim=1)
           @ torch.nn.functional.normalize(bank, dim=1).T)  # (1, 3)
    torch.testing.assert_close(scores, torch.stack([(cos[:, 0] / 0.07).exp(),
                                                    2 * (cos[:, 1] / 0.07).exp()], 1))
    assert scores.argmax().item() == 0  # a majority vote would say 1


def test_topk_accuracy_hand_made():
    scores = torch.tensor([
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # label 0: top-1 and top-5 hit
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: 5th highest -> top-5 hit only
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: 6th highest -> miss
        [0.0, 0.0, 0.0, 1.0, 0.0, 0.5],  # label 5: 2nd highest -> top-5 hit only
    ])
    labels = torch.tensor([0, 1, 0, 5])
    assert evaluate.topk_accuracy(scores, labels) == [25.0, 75.0]
    assert evaluate.topk_accuracy(scores, labels, ks=(1, 2, 6)) == [25.0, 50.0, 100.0]


def test_balanced_subsets_counts_and_seeds():
    # unbalanced: 20..47 per class
    labels = torch.cat([torch.full((20 + 3 * c,), c) for c in range(10)])
    a = data.balanced_subset(labels, 7, seed=0)
    assert torch.bincount(labels[a], minlength=10).tolist() == [7] * 10
    assert len(a.unique()) == 70
    assert torch.equal(a, data.balanced_subset(labels, 7, seed=0))
    assert not torch.equal(a, data.balanced_subset(labels, 7, seed=1))


def test_semi_subset_is_saved_and_reused(tmp_path):
    full = data.build_dataset("synthetic", "train")  # 2000 images, 200 per class
    labels = data.targets(full)
    args = argparse.Namespace(ckpt=str(tmp_path / "run.pt"), dataset="synthetic",
                              train_subset=None, subset_seed=0)
    pos, path = evaluate.semi_subset(full, labels, 0.10, args)
    assert path == str(tmp_path / f"subset_synthetic_10pct_seed0_{data.fingerprint(full)}.txt")
    assert torch.bincount(labels[pos]).tolist() == [20] * 10
    saved = [int(line) for line in open(path)]
    assert saved == pos.tolist()  # indices into the full train split
    with open(path, "w") as f:  # a saved file wins over a fresh draw: runs stay comparable
        f.write("".join(f"{i}\n" for i in saved[:30]))
    again, _ = evaluate.semi_subset(full, labels, 0.10, args)
    assert again.tolist() == saved[:30]
    other_seed = argparse.Namespace(**{**vars(args), "subset_seed": 1})
    other, other_path = evaluate.semi_subset(full, labels, 0.10, other_seed)
    assert other_path.endswith(f"_10pct_seed1_{data.fingerprint(full)}.txt")
    assert not torch.equal(other, pos)

    # on a --train-subset the file holds full-split indices and is named after the subset
    keep = data.balanced_subset(labels, 50, seed=0)  # (500,)
    sub = torch.utils.data.Subset(full, keep.tolist())
    args.train_subset = 500
    pos, path = evaluate.semi_subset(sub, labels[keep], 0.01, args)
    name = f"subset_synthetic_train500_1pct_seed0_{data.fingerprint(sub)}.txt"
    assert os.path.basename(path) == name
    assert len(pos) == 10  # max(1, 1% of 50) per class
    assert [int(line) for line in open(path)] == keep[pos].tolist()


def test_linear_probe_separable_features():
    train_feats, train_labels = blobs(10, 40, seed=0, spread=0.5)
    test_feats, test_labels = blobs(10, 20, seed=1, spread=0.5)
    # far from zero mean / unit scale: the probe standardises inputs and folds that into its weights
    train_feats, test_feats = 50 * train_feats + 300, 50 * test_feats + 300
    head = evaluate.train_linear(train_feats, train_labels, 10, epochs=20, lr=0.1, batch_size=64)
    assert isinstance(head, torch.nn.Linear) and head.in_features == 32 and head.out_features == 10
    with torch.no_grad():
        top1, top5 = evaluate.topk_accuracy(head(test_feats), test_labels)
    assert top1 >= 95 and top5 == 100


CPU = torch.device("cpu")


def batch_by_batch(backbone, images, labels, batch_size, seed, size):
    """linear-aug's epochs the plain way: crop a batch, its features, the next batch (CPU)."""
    view = augment.batch_train_view(size, "synthetic")
    g_order, g_views = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)

    def epoch():
        for idx in torch.randperm(len(labels), generator=g_order).split(batch_size):
            crops = view(images[idx], g_views)  # (B, 3, size, size)
            yield evaluate.extract_features(backbone, [(crops, labels[idx])], CPU)
    return epoch


def test_linear_aug_features_in_chunks_match_batch_by_batch(monkeypatch):
    """linear-aug's crops through the frozen backbone 96 images at a time (and --compile's wrapper)
    give, from the same seed, the batches of features that crop-then-forward batch by batch gives,
    float rounding apart; heads trained on either give the same logits (to 1e-4) and accuracy."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (100, 3, 12, 12), dtype=torch.uint8, generator=g)  # (N, 3, H, W)
    labels = torch.arange(100) % 4  # (N,)
    torch.manual_seed(0)
    backbone = models.build_backbone("resnet18", True)[0].eval()
    args = argparse.Namespace(image_size=12, dataset="synthetic", seed=0, compile=True)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    chunked = evaluate.device_aug_epochs(backbone, images, labels, 32, args, CPU, chunk=96)
    assert len(compiled) == 1
    plain = batch_by_batch(backbone, images, labels, 32, 0, 12)
    for _ in range(2):  # two epochs: batches of 32, 32, 32, 4 from chunks of 96 and 4
        got, want = list(chunked()), list(plain())
        assert [len(y) for _, y in got] == [len(y) for _, y in want] == [32, 32, 32, 4]
        for (f, y), (f_want, y_want) in zip(got, want):
            assert torch.equal(y, y_want)
            torch.testing.assert_close(f, f_want, rtol=1e-4, atol=1e-4)
    eval_feats, _ = evaluate.extract_features(  # (N, F)
        backbone, [(augment.eval_batch(images, 12, "synthetic"), labels)], CPU)
    heads = []
    chunked = evaluate.device_aug_epochs(backbone, images, labels, 32, args, CPU, chunk=64)
    for aug_batches in (chunked, batch_by_batch(backbone, images, labels, 32, 0, 12)):
        torch.manual_seed(0)  # the head's init
        heads.append(evaluate.train_linear(eval_feats, labels, 4, epochs=3, batch_size=32,
                                           aug_batches=aug_batches))
    with torch.no_grad():
        logits = [head(eval_feats) for head in heads]  # (N, 4) each
    torch.testing.assert_close(*logits, rtol=1e-4, atol=1e-4)
    assert evaluate.topk_accuracy(logits[0], labels) == evaluate.topk_accuracy(logits[1], labels)


def test_progress_is_throttled_by_time(monkeypatch, capsys):
    ticks = iter([0, 5, 25, 30, 31])  # start, then after each of 4 steps (seconds)
    monkeypatch.setattr(evaluate, "time", types.SimpleNamespace(monotonic=lambda: next(ticks)))
    assert list(evaluate.progress(range(4), "x: epoch")) == [0, 1, 2, 3]
    # step 1 (5 s) is too soon; step 2 (25 s) prints; step 3 (30 s) is too soon;
    # the last always follows
    assert capsys.readouterr().out.splitlines() == ["x: epoch 2/4, 0.4 min, eta 0.4 min",
                                                    "x: epoch 4/4, 0.5 min, eta 0.0 min"]
    ticks = iter([0, 1, 2])
    list(evaluate.progress(range(2), "short"))  # over before the first interval: silent
    assert capsys.readouterr().out == ""


def test_linear_epochs_default_100_or_50_on_transfer():
    def epochs(argv, stored):
        return (evaluate.resolve(evaluate.parse_args(["--ckpt", "x", *argv]), stored, {})
                .linear_epochs)

    assert epochs([], {"dataset": "cifar10"}) == 100
    assert epochs(["--dataset", "cifar100"], {"dataset": "cifar10"}) == 50  # thesis 5.7.2
    assert epochs(["--dataset", "cifar100", "--linear-epochs", "7"], {"dataset": "cifar10"}) == 7
    assert epochs(["--dataset", "cifar100"], {}) == 100  # backbone.pt: pretraining dataset unknown


# ---------------------------------------------------------------- CLI end to end

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # 120, not 128: train.py asks for a multiple of the 10 classes
    train.main(["--epochs", "1", "--train-subset", "120", "--batch-size", "32", "--workers", "0",
                "--knn-every", "0", "--out-dir", str(out)])
    return out


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_all_protocols(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0)  # a progress line after every step
    # a clock 1 s later at every reading: "seconds" is measured, > 0 however fast this machine (a
    # GPU extracts these features in milliseconds, which round to 0.0)
    clock = iter(range(10 ** 9))
    monkeypatch.setattr(evaluate, "time", types.SimpleNamespace(time=lambda: next(clock),
                                                                monotonic=time.monotonic))
    results = evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "knn", "linear",
                             "semi", "finetune", "--linear-epochs", "5", "--finetune-epochs", "1",
                             *TINY])
    out = capsys.readouterr().out
    rows = ["knn k=50", "knn k=20", "linear", "semi 1%", "semi 10%", "finetune 100%"]  # k <= 50
    table = out[out.index("\nprotocol"):]
    assert "trained top-1" in table and "random-init" not in table
    for row in rows:
        assert f"\n{row} " in table
    assert [r[1] for r in results] == rows
    for line in ["trained features, train split: batch 2/2, ", "trained linear: epoch 5/5, ",
                 "trained semi 10%: epoch 1/1, ", "trained finetune 100%, test split: batch 2/2, "]:
        assert f"\n{line}" in out, line

    records = read_records(run_dir / "eval.jsonl")[-6:]
    assert [(r["protocol"], r["setting"]) for r in records] == [
        ("knn", "k=50"), ("knn", "k=20"), ("linear", ""), ("semi", "1%"), ("semi", "10%"),
        ("finetune", "100%")]
    for r in records:
        assert r["ckpt"] == str(run_dir / "run.pt") and r["ckpt_epoch"] == 1
        assert r["pretrain_dataset"] == "synthetic" and r["dataset"] == "synthetic"
        assert r["random_init"] is False and r["seconds"] >= 1
        assert 0 <= r["top1"] <= r["top5"] <= 100
        assert r["settings"]["arch"] == "resnet18" and r["settings"]["cifar_stem"] is True
        assert r["settings"]["train_images"] == 50 and r["settings"]["test_images"] == 50
    assert records[0]["settings"]["k"] == 50  # capped at the bank size
    assert [r["settings"]["labels"] for r in records[3:]] == [10, 10, 50]  # >= 1 per class
    for pct in (1, 10):
        path, = run_dir.glob(f"subset_synthetic_train50_{pct}pct_seed0_*.txt")
        assert records[3 if pct == 1 else 4]["settings"]["subset_file"] == str(path)
        assert len(open(path).read().split()) == 10


def test_backbone_pt_loads_with_stem_detected(run_dir, capsys):
    knn = ["--protocol", "knn", "--knn-k", "20", *TINY]
    from_run = evaluate.main(["--ckpt", str(run_dir / "run.pt"), *knn])
    from_backbone = evaluate.main(["--ckpt", str(run_dir / "backbone.pt"),
                                   "--dataset", "synthetic", *knn])
    assert from_backbone == from_run  # same weights, same numbers
    record = read_records(run_dir / "eval.jsonl")[-1]
    assert record["pretrain_dataset"] is None and record["ckpt_epoch"] is None
    assert (record["settings"]["cifar_stem"] is True
            and record["settings"]["image_size"] == data.SYNTHETIC_PX)
    assert "pretrained on unknown" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not fit --arch resnet18 without the cifar stem"):
        evaluate.main(["--ckpt", str(run_dir / "backbone.pt"), "--no-cifar-stem", *knn])


@pytest.mark.parametrize("loader", ["device", "workers"])
def test_thesis_probe_linear_aug(run_dir, capsys, monkeypatch, loader):
    """linear-aug: crop/flip views (made on the device, or by PIL in the loader's processes)
    through the frozen backbone, which stays in eval mode (its BatchNorm statistics untouched),
    recorded as its own protocol beside the fast probe."""
    built = []
    build = evaluate.build_backbone

    def keep_copy(*a):
        net, feat_dim = build(*a)
        built.append((net, {k: v.clone() for k, v in net.state_dict().items()}))
        return net, feat_dim

    monkeypatch.setattr(evaluate, "build_backbone", keep_copy)
    monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0)
    device_views, train_view = [], augment.batch_train_view
    monkeypatch.setattr(augment, "batch_train_view",
                        lambda *a: device_views.append(a) or train_view(*a))
    results = evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "linear",
                             "linear-aug", "--linear-epochs", "2", "--loader", loader, *TINY])
    assert [r[1] for r in results] == ["linear", "linear-aug"]
    assert len(device_views) == (loader == "device")  # the crops were made where the loader says
    records = read_records(run_dir / "eval.jsonl")[-2:]
    assert [(r["protocol"], r["setting"], r["settings"]["epochs"]) for r in records] == [
        ("linear", "", 2), ("linear-aug", "", 2)]
    assert "\ntrained linear-aug: epoch 2/2, " in capsys.readouterr().out
    (net, before), = built
    for key, value in net.state_dict().items():
        # running_mean, running_var, num_batches_tracked too
        assert torch.equal(value, before[key]), key


def test_device_and_workers_loaders_agree(run_dir, capsys):
    """The same eval views either way (batched on the device, PIL in workers): the same kNN results,
    and linear probes within one test image of each other (2 points of 50)."""
    argv = ["--ckpt", str(run_dir / "run.pt"), "--protocol", "knn", "linear",
            "--linear-epochs", "3", *TINY]
    device, workers = (evaluate.main([*argv, "--loader", "device"]),
                       evaluate.main([*argv, "--loader", "workers"]))
    assert "cpu, device loader" in capsys.readouterr().out
    assert [r[1] for r in device] == [r[1] for r in workers] == ["knn k=50", "knn k=20", "linear"]
    assert [r[2:] for r in device[:2]] == [r[2:] for r in workers[:2]]
    assert device[2][2] == pytest.approx(workers[2][2], abs=2.01)


def test_loaders_agree_on_a_tree_of_mixed_sizes(run_dir, tmp_path, capsys, monkeypatch):
    """At 80 px eval views resize by 8/7 and crop: the device loader's held squares give the same
    kNN numbers as PIL views of the original files."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "mixed" / split / c)
            for i, (h, w) in enumerate([(84, 120), (110, 90), (96, 97)]):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "mixed" / split / c / f"{i}.png")
    argv = ["--ckpt", str(run_dir / "backbone.pt"), "--dataset", "imagefolder",
            "--data-dir", str(tmp_path / "mixed"), "--image-size", "80", "--protocol", "knn",
            "--knn-k", "3", "--workers", "0"]
    device, workers = (evaluate.main([*argv, "--loader", "device"]),
                       evaluate.main([*argv, "--loader", "workers"]))
    assert [r[2:] for r in device] == [r[2:] for r in workers]
    # linear-aug crops whole images, as PIL's train_view does, not the held squares
    monkeypatch.setattr(augment, "batch_train_view",
                        lambda *a: pytest.fail("crops made on the device"))
    evaluate.main([*argv[:8], "--protocol", "linear-aug", "--linear-epochs", "1",
                   "--workers", "0"])  # no knn flags
    assert ("linear-aug: the held images (91x91 px) are not the files' own"
            in capsys.readouterr().out)


def test_linear_aug_on_images_larger_than_the_input_uses_pil(run_dir, capsys, monkeypatch):
    """The batched crop does not antialias when it shrinks: 20 px synthetic images probed at 16 px
    get linear-aug's views from PIL, said in one line."""
    monkeypatch.setattr(augment, "batch_train_view",
                        lambda *a: pytest.fail("crops made on the device"))
    evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "linear-aug",
                   "--linear-epochs", "1", "--image-size", "16", *TINY])
    assert ("linear-aug: the held images (20x20 px) are not the files' own or are larger than "
            "16 px" in capsys.readouterr().out)


def test_device_loader_refuses_a_split_that_does_not_fit(run_dir, monkeypatch):
    monkeypatch.setattr(os, "sysconf", lambda name: 1000)  # ~0.5 MB of "free memory"
    with pytest.raises(SystemExit,
                       match=r"synthetic train needs .* GiB held whole; use --loader workers"):
        evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "knn", "--workers", "0"])


def test_image_size_from_what_it_knows(run_dir, tmp_path, capsys):
    """--image-size, else a run.pt's training size, else the images' own size when they are small
    or the stem is the cifar one, else the dataset's default; warned when images get resized over
    2x."""
    small, large = (image_tree(tmp_path / "small", 32),
                    image_tree(tmp_path / "large", 72, per_class=2))
    knn = ["--dataset", "imagefolder", "--protocol", "knn", "--knn-k", "3", "--workers", "0"]

    def first_line_and_warning(ckpt, data_dir, *argv):
        evaluate.main(["--ckpt", str(ckpt), "--data-dir", str(data_dir), *knn, *argv])
        out, err = capsys.readouterr()
        return out.splitlines()[0], err

    # the user report: a cifar-stem backbone.pt over 32 px images runs at 32 px, not the 224 default
    line, err = first_line_and_warning(run_dir / "backbone.pt", small)
    assert ("cifar stem" in line and "on imagefolder at 32 px (the images' own size)" in line
            and err == "")
    assert read_records(run_dir / "eval.jsonl")[-1]["settings"]["image_size"] == 32
    line, err = first_line_and_warning(run_dir / "backbone.pt", small, "--image-size", "80")
    assert "at 80 px (--image-size)" in line
    assert err.startswith("warning: the images are 32x32 px") and "resized 2.5x to 80 px" in err
    # not small, but the cifar stem
    line, err = first_line_and_warning(run_dir / "backbone.pt", large)
    assert "at 72 px (the images' own size)" in line and err == ""
    # a run.pt: its training size (synthetic's), whatever the images
    line, err = first_line_and_warning(run_dir / "run.pt", large)
    px = data.SYNTHETIC_PX
    assert (f"at {px} px (the checkpoint's training size)" in line
            and f"resized {px / 72:.2g}x to {px} px" in err)
    # an imagenet-stem backbone.pt over large images: the dataset's default
    torch.save(models.build_backbone("resnet18", False)[0].state_dict(),
               tmp_path / "imagenet_stem.pt")
    line, err = first_line_and_warning(tmp_path / "imagenet_stem.pt", large)
    assert "imagenet stem" in line and "at 224 px (the imagefolder default)" in line
    assert err.startswith("warning: the images are 72x72 px") and "resized 3.1x" in err


def test_transfer_probe_trains_50_epochs(run_dir, tmp_path, capsys):
    tree = image_tree(tmp_path / "tree", 32)
    evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--dataset", "imagefolder",
                   "--data-dir", str(tree), "--protocol", "linear", "--workers", "0"])
    assert "linear probes 50 epochs (transfer)" in capsys.readouterr().out.splitlines()[0]
    record = read_records(run_dir / "eval.jsonl")[-1]
    assert (record["pretrain_dataset"], record["dataset"], record["protocol"]) == (
        "synthetic", "imagefolder", "linear")
    assert record["settings"]["epochs"] == 50


def test_random_init_column(run_dir, capsys):
    results = evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "knn",
                             "--knn-k", "20", "--random-init", *TINY])
    header, row = capsys.readouterr().out.split("\nprotocol")[1].splitlines()[:2]
    assert "trained top-1" in header and "random-init top-1" in header
    assert row.split()[:2] == ["knn", "k=20"] and len(row.split()) == 6
    records = read_records(run_dir / "eval.jsonl")[-2:]
    assert [r["random_init"] for r in records] == [False, True]
    assert [r[0] for r in results] == ["trained", "random-init"]
    # seed-0 init is the network train.py started from, so after one epoch the weights differ
    state, *_ = checkpoints.read_backbone(str(run_dir / "run.pt"))
    args = evaluate.resolve(evaluate.parse_args(["--ckpt", "x"]),
                            {"arch": "resnet18", "cifar_stem": True}, state)
    trained, _ = evaluate.build_backbone(args, state, torch.device("cpu"))
    untrained, _ = evaluate.build_backbone(args, None, torch.device("cpu"))
    assert not torch.equal(trained.conv1.weight, untrained.conv1.weight)


# ---------------------------------------------------------------- bad input

def test_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--ckpt", str(tmp_path / "nope.pt")])
    # a str SystemExit code: python prints it as one line on stderr and exits with status 1
    assert exc.value.code == f"error: checkpoint {tmp_path / 'nope.pt'} does not exist"


def test_corrupt_checkpoints(tmp_path, run_dir):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match=r"^error: cannot read checkpoint .*garbage\.pt"):
        evaluate.main(["--ckpt", str(garbage)])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run_dir / "run.pt").read_bytes()[:5000])
    with pytest.raises(SystemExit, match=r"^error: cannot read checkpoint .*truncated\.pt"):
        evaluate.main(["--ckpt", str(truncated)])
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3}, other)
    with pytest.raises(SystemExit, match="is in none of the layouts evaluate.py reads"):
        evaluate.main(["--ckpt", str(other)])


def test_unknown_protocol(run_dir):
    message = (r"^error: --protocol invalid choice: 'kmeans' \(choose from 'knn', 'linear', "
               r"'linear-aug', 'semi', 'finetune'\)$")
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "knn", "kmeans"])


def test_subset_not_a_multiple_of_the_classes(run_dir):
    with pytest.raises(SystemExit,
                       match=r"^error: --test-subset 55 is not a multiple of the 10 classes$"):
        evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--test-subset", "55", "--workers", "0"])


def test_missing_labels(run_dir, monkeypatch):
    build = data.build_dataset

    def unlabelled_train(name, split, *a, **kw):
        ds = build(name, split, *a, **kw)
        if split == "train":
            ds.targets = [-1] * len(ds)
        return ds

    monkeypatch.setattr(data, "build_dataset", unlabelled_train)
    with pytest.raises(SystemExit,
                       match="2000 of the 2000 images of its train split have no label"):
        evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--workers", "0"])


def test_missing_transfer_dataset(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="^error: CIFAR100 not found: expected "
                                         "cifar-100-python/.* pass --download"):
        evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--dataset", "cifar100",
                       "--data-dir", str(tmp_path)])


# ---------------------------------------------------------------- faults a newcomer meets

def semi_args(ckpt, dataset):
    return argparse.Namespace(ckpt=str(ckpt), dataset=dataset, train_subset=None, subset_seed=0)


def test_semi_subset_of_another_tree_is_its_own(tmp_path):
    """Beside the same checkpoint, a second tree draws its own label subset: one image of each of
    its 4 classes, not the first tree's indices (2 images, 2 classes)."""
    args = semi_args(tmp_path / "run.pt", "imagefolder")
    picked = {}
    for name, classes in (("treeA", "ab"), ("treeB", "abcd")):
        tree = image_tree(tmp_path / name, 8, per_class=2, classes=classes)
        ds = data.build_dataset("imagefolder", "train", None, str(tree))
        labels = data.targets(ds)
        pos, path = evaluate.semi_subset(ds, labels, 0.01, args)
        assert torch.bincount(labels[pos]).tolist() == [1] * len(classes)
        picked[name] = path
    assert picked["treeA"] != picked["treeB"]


def test_semi_subset_that_cannot_be_saved_goes_on(tmp_path, capsys):
    full = data.build_dataset("synthetic", "train")
    labels = data.targets(full)
    (tmp_path / "file").write_text("a file where the checkpoint's folder should be")
    args = semi_args(tmp_path / "file" / "run.pt", "synthetic")
    pos, path = evaluate.semi_subset(full, labels, 0.01, args)
    assert path is None and torch.bincount(labels[pos]).tolist() == [2] * 10
    err = capsys.readouterr().err
    assert err.startswith("warning: cannot save the 1% label subset to ") and err.count("\n") == 1


def ckpt_copy(run_dir, folder):
    folder.mkdir()
    (folder / "run.pt").write_bytes((run_dir / "run.pt").read_bytes())
    return folder / "run.pt"


def test_unwritable_results_log_fails_before_any_work(run_dir, tmp_path, capsys):
    ckpt = ckpt_copy(run_dir, tmp_path / "ro")
    (tmp_path / "ro" / "eval.jsonl").mkdir()  # cannot be appended to, even by root
    with pytest.raises(SystemExit, match=r"^error: cannot write the results log .*eval\.jsonl "
                                         r"\(Is a directory\)"):
        evaluate.main(["--ckpt", str(ckpt), "--protocol", "knn", "--knn-k", "20", *TINY])
    assert capsys.readouterr().out == ""  # nothing loaded, nothing computed


def test_results_log_unwritable_later_keeps_the_results(run_dir, tmp_path, capsys, monkeypatch):
    ckpt = ckpt_copy(run_dir, tmp_path / "run")
    log, knn = tmp_path / "run" / "eval.jsonl", evaluate.knn_classify

    def log_gone_then_knn(*a, **kw):  # the log turns unwritable after the start-up check
        if log.is_file():
            log.unlink()
            log.mkdir()
        return knn(*a, **kw)

    monkeypatch.setattr(evaluate, "knn_classify", log_gone_then_knn)
    results = evaluate.main(["--ckpt", str(ckpt), "--protocol", "knn", "--knn-k", "20", "5", *TINY])
    out, err = capsys.readouterr()
    assert [r[1] for r in results] == ["knn k=20", "knn k=5"]
    assert "\ntrained knn k=20: top-1 " in out and "\ntrained knn k=5: top-1 " in out
    assert "appended 0 records to " in out and "2 could not be, printed above" in out
    assert err.count("warning: cannot append to ") == 2


RANDOM_BYTES = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("content,match", [
    (b"", "it is empty"),
    (b"epoch 3\nloss 1.25\n", "it is not a PyTorch checkpoint"),
    (RANDOM_BYTES, "it is not a PyTorch checkpoint"),
    ("path", "it holds pathlib.PosixPath beside tensors and plain values"),
    ("folder", "is a folder, not a checkpoint file"),
], ids=["empty", "text", "random", "path", "folder"])
def test_bad_checkpoint_files_are_one_line(tmp_path, content, match):
    path = tmp_path / "run.pt"
    if content == "path":  # an object no checkpoint layout needs
        torch.save({"model": {}, "args": {"out": pathlib.Path("out")}}, path)
    elif content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(path)])
    line = e.value.code
    assert isinstance(line, str) and "\n" not in line
    assert line.startswith("error: ") and str(path) in line and match in line
    assert "weights_only" not in line  # not torch's advice to load it unsafely


@pytest.mark.parametrize("protocol,corrupt,workers", [
    ("knn", "b", "1"),  # --loader workers: read in a DataLoader process
    ("semi", "b", "0"),
    ("finetune", "b", "1"),
    ("knn", "a/0.png", "0"),  # the first train image, read for its size
])
def test_unreadable_image_is_one_line(run_dir, tmp_path, protocol, corrupt, workers):
    tree = image_tree(tmp_path / "tree", 16)
    bad = tree / "train" / corrupt
    for path in [bad] if bad.is_file() else bad.iterdir():
        path.write_bytes(path.read_bytes()[:60])  # truncated mid-file
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(run_dir / "backbone.pt"), "--dataset", "imagefolder",
                       "--data-dir", str(tree), "--protocol", protocol, "--knn-k", "3",
                       "--finetune-epochs", "1", "--batch-size", "4", "--loader", "workers",
                       "--workers", workers])
    assert e.value.code.startswith(f"error: cannot read image {bad}") and "\n" not in e.value.code
    assert multiprocessing.active_children() == []  # the loader's processes are gone


@pytest.mark.parametrize("flag,value", [
    ("--knn-t", "0"), ("--knn-t", "nan"), ("--workers", "-1"), ("--linear-lr", "-5"),
    ("--image-size", "0"), ("--batch-size", "0"), ("--linear-epochs", "0"),
    ("--finetune-epochs", "-1"), ("--finetune-lr", "0"), ("--weight-decay", "-0.1"),
    ("--knn-k", "0"), ("--train-subset", "-10"), ("--test-subset", "0"), ("--seed", "-1"),
    ("--subset-seed", "-1"),
])
def test_flag_out_of_range_is_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--ckpt", "run.pt", flag, value])
    assert e.value.code.startswith(f"error: {flag} must be ") and value in e.value.code
    assert capsys.readouterr().err == ""  # one line, no usage dump


def test_one_image_batches_refused_for_fine_tuning(run_dir):
    with pytest.raises(SystemExit, match=r"^error: --batch-size 1: semi and finetune train "):
        evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "finetune", *TINY,
                       "--batch-size", "1"])


@pytest.mark.parametrize("flags", [["--protocol", "knn", "linear"],
                                   ["--protocol", "linear-aug", "--loader", "workers"]])
def test_compile_refused_where_it_does_nothing(run_dir, flags):
    with pytest.raises(SystemExit, match=r"^error: --compile applies only to linear-aug with "
                                         r"--loader device$"):
        evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--compile", *flags, *TINY])


def test_device_loader_builds_each_split_once(run_dir, monkeypatch):
    """torchvision's datasets check every file's md5 when built: the device loader's held images
    come from the datasets already built, not from a second build."""
    built, build = [], data.build_dataset
    monkeypatch.setattr(data, "build_dataset", lambda name, split, *a, **kw: (
        built.append(split) or build(name, split, *a, **kw)))
    evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "knn", "--knn-k", "20",
                   "--loader", "device", *TINY])
    assert built == ["train", "test"]


def test_knn_row_says_the_k_used(run_dir, capsys):
    results = evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "knn",
                             "--knn-k", "200", "20", *TINY])
    assert [r[1] for r in results] == ["knn k=50", "knn k=20"]  # 50 train images in the bank
    out, err = capsys.readouterr()
    assert "\ntrained knn k=50: top-1 " in out and "knn k=200" not in out
    assert "warning: --knn-k 200 is more than the 50 train images; k=50 used" in err


def test_ctrl_c_is_one_line_and_keeps_the_results(run_dir, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "train_linear", interrupted)  # Ctrl-C during the linear probe
    log = run_dir / "eval.jsonl"
    before = log.read_text().count("\n") if log.exists() else 0
    with pytest.raises(SystemExit, match=r"^error: stopped by Ctrl-C; the results printed above "
                                         r"without a warning are in eval.jsonl; a rerun evaluates "
                                         r"every protocol again$"):
        evaluate.main(["--ckpt", str(run_dir / "run.pt"), "--protocol", "knn", "linear", *TINY])
    assert "trained knn k=" in capsys.readouterr().out  # kNN came first: printed and logged
    assert log.read_text().count("\n") > before
