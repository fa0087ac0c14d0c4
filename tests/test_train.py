"""train.py end to end on the built-in synthetic dataset (CPU): outputs, loss, schedules, thesis
defaults, continuing runs, bad inputs.

Run size: --train-subset 120 (12 per class), --batch-size 32, 8 px, 2 epochs (3 steps/epoch),
every step logged, kNN monitor off unless tested. The CARL and CARP runs are module fixtures and
double as the uninterrupted references of the resume tests. Faults a cluster causes (signals,
killed workers, bad data, failed writes) are in test_faults.py.
"""
import hashlib
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import checkpoints
import data
import evaluate
import model as models
import monitor
import train

BASE = ["--dataset", "synthetic", "--train-subset", "120", "--batch-size", "32",
        "--image-size", "8", "--workers", "0", "--epochs", "2", "--log-every", "1",
        "--knn-every", "0"]
CARL = ["--method", "carl", *BASE]
CARP = ["--method", "carp", "--num-prototypes", "100", "--block-size", "25", *BASE]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def first_batch(argv):
    """A run built in-process from train.py's flags, its first batch of views and step 0's scheduled
    values."""
    args = train.parse_args(argv)
    source, labels = train.load_pretrain_data(args, torch.device("cpu"), None)
    run = train.build_run(args, torch.device("cpu"), 1, steps_per_epoch=3)
    batches = data.Batches(len(labels), args.batch_size, 1, 0, args.seed, 0, 1)
    (views, _), = train.pretrain_batches(args, source, batches, 0, torch.device("cpu"))  # step 0
    return run, views, train.schedule_values(run, 0)


def run_main(argv):
    for key in DIST_ENV:  # in-process runs are single-process runs
        os.environ.pop(key, None)
    train.main(argv)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def fingerprint(path):
    """Content, size, time and inode: a rewrite with the same bytes within one tick of a coarse
    clock still shows (atomic_save's rename makes a new inode)."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    st = os.stat(path)
    return digest, st.st_size, st.st_mtime_ns, st.st_ino


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    """Two run.pt files hold the same model and momentum buffers (to float rounding)."""
    a, b = load(a), load(b)
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-6, msg=k)
    for pid, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][pid]["momentum_buffer"],
                                   st["momentum_buffer"], rtol=0, atol=1e-6)
    for part in ("teacher", "queue"):  # the EMA teacher's weights, the queue's rows and place
        assert (a.get(part) is None) == (b.get(part) is None), part
        for k, v in (a.get(part) or {}).items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6, msg=f"{part} {k}")
            else:
                assert b[part][k] == v, f"{part} {k}"


@pytest.fixture(scope="module")
def carl_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("carl") / "run")
    run_main([*CARL, "--out-dir", out])
    return out


@pytest.fixture(scope="module")
def carp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("carp") / "run")
    run_main([*CARP, "--out-dir", out])
    return out


# ---------------------------------------------------------------- outputs and loss

@pytest.mark.parametrize("which", ["carl", "carp"])
def test_run_writes_outputs_and_logs_every_step(which, request):
    out = request.getfixturevalue(f"{which}_run")
    for name in ("run.pt", "backbone.pt", "log.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    log = [r for r in read_log(out) if "loss" in r]  # the step records
    assert [r["step"] for r in log] == list(range(6))  # 3 steps/epoch, 2 epochs, every step logged
    assert {r["epoch"] for r in log} == {0, 1}
    for r in log:
        for key in ("loss", "consistency", "kl", "lam", "lr", "in_use", "entropy"):
            assert key in r
        assert r["loss"] == pytest.approx(r["consistency"] + r["lam"] * r["kl"], rel=1e-4)
        assert 1 <= r["in_use"] <= 64  # distinct argmax prototypes over the 2 x 32 views
    # CARP's loss over 6 fresh batches is not monotone at this size: the test below covers it
    if which == "carl":
        ep0 = [r["loss"] for r in log if r["epoch"] == 0]
        ep1 = [r["loss"] for r in log if r["epoch"] == 1]
        assert sum(ep1) / len(ep1) < sum(ep0) / len(ep0) - 1e-3  # epoch means: one step is noisy
    base_lr = train.parse_args(["--method", which]).lr  # synthetic's
    assert log[0]["lr"] == pytest.approx(base_lr * 32 / 256)  # lr scaled by batch / 256
    assert log[-1]["lr"] < log[0]["lr"] and log[-1]["lam"] < log[0]["lam"]


@pytest.mark.parametrize("which", ["carl", "carp"])
@pytest.mark.parametrize("seed", [0, 1])
def test_steps_on_one_batch_lower_its_loss(which, seed):
    """The loss, the backward and the optimizer step together descend: 4 steps on one fixed batch
    (same views, same partition, float32 on any CPU) lower that batch's loss at each step."""
    run, views, now = first_batch([*{"carl": CARL, "carp": CARP}[which], "--amp", "off",
                                   "--seed", str(seed)])
    losses = [train.train_step(run, views, now, 0)[0].item()  # now: step 0's lr and lambda
              for _ in range(4)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("which", ["carl", "carp"])
def test_run_pt_contents(which, request):
    out = request.getfixturevalue(f"{which}_run")
    ckpt = load(os.path.join(out, "run.pt"))
    for key in ("model", "optimizer", "scaler", "epoch", "step", "args", "data"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6
    assert ckpt["data"] == {"num_images": 120, "num_classes": 10}
    assert ckpt["args"]["method"] == which and ckpt["args"]["num_prototypes"] == 100
    assert ckpt["args"]["loader"] == "device"  # the default for synthetic: the path GPU runs take
    prototypes = ckpt["model"]["out.weight" if which == "carl" else "out.3.weight"]
    assert prototypes.shape == (100, 128 if which == "carl" else 512)
    assert ckpt["optimizer"]["state"]  # momentum buffers were saved
    assert ckpt["teacher"] is None and ckpt["queue"] is None  # the thesis's CARL, CARP have neither
    m = train.build_model(train.parse_args({"carl": CARL, "carp": CARP}[which]))
    m.load_state_dict(ckpt["model"])  # strict
    sd = load(os.path.join(out, "backbone.pt"))  # the backbone of the same final model
    assert sd.keys() == m.backbone.state_dict().keys()
    assert all(torch.equal(v, ckpt["model"][f"backbone.{k}"]) for k, v in sd.items())


def test_lars_gives_biases_and_bn_a_scaled_lr(carp_run):
    """CARP trains with LARS: the last step's lr of the 1-d group is the weights' lr times
    --bias-lr-scale (Barlow Twins' 0.024), and that group skips weight decay and the trust ratio."""
    ckpt = load(os.path.join(carp_run, "run.pt"))
    weights, excluded = ckpt["optimizer"]["param_groups"]
    assert ckpt["args"]["optimizer"] == "lars"
    assert (excluded["lars_exclude"] and excluded["weight_decay"] == 0
            and not weights["lars_exclude"])
    assert weights["lr"] > 0
    assert (excluded["lr"] == pytest.approx(weights["lr"] * 0.024)
            and ckpt["args"]["bias_lr_scale"] == 0.024)


@pytest.mark.parametrize("optimizer,groups", [("larc", 1), ("lars", 2), ("sgd", 1)])
def test_optimizer_kinds(optimizer, groups):
    args = train.parse_args(["--method", "carl", "--dataset", "cifar10", "--optimizer", optimizer])
    opt = train.build_optimizer(args, train.build_model(args), 0.1)
    assert len(opt.param_groups) == groups
    assert isinstance(opt, torch.optim.SGD if optimizer == "sgd" else train.lars.LARS)
    if optimizer == "larc":  # every parameter, biases and BN included, decayed and trust-scaled
        assert (not opt.param_groups[0]["lars_exclude"]
                and opt.param_groups[0]["weight_decay"] == 5e-4)


def assert_loads_into_torchvision(path):
    """backbone.pt loads into torchvision's resnet18 (with the CIFAR stem) with only `fc` missing;
    returns it."""
    sd = load(path)
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    res = net.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    return sd


@pytest.mark.parametrize("which", ["carl", "carp"])
def test_backbone_pt_loads_into_torchvision(which, request):
    out = request.getfixturevalue(f"{which}_run")
    sd = assert_loads_into_torchvision(os.path.join(out, "backbone.pt"))
    torch.manual_seed(0)  # trained: the weights moved away from the seed-0 initialisation
    fresh = (train.build_model(train.parse_args({"carl": CARL, "carp": CARP}[which]))
             .backbone.state_dict())
    assert not torch.equal(fresh["conv1.weight"], sd["conv1.weight"])


@pytest.mark.parametrize("argv,views,loader", [
    (["--method", "carl"], "carl", "device"), (["--method", "carp"], "carp", "device"),
    (["--method", "carp", "--views", "carl"], "carl", "device"),
    (["--dataset", "cifar10"], "carl", "device"), (["--dataset", "stl10"], "carl", "device"),
    # 224 px trees (ImageNet) do not fit in memory
    (["--dataset", "imagefolder"], "carl", "workers"),
    (["--dataset", "imagefolder", "--image-size", "32"], "carl", "device"),
    (["--dataset", "cifar10", "--loader", "workers"], "carl", "workers")])
def test_views_and_loader_defaults(argv, views, loader):
    args = train.parse_args(argv)
    assert (args.views, args.loader) == (views, loader)


@pytest.mark.parametrize("capability,flag,native",
                         [("AVX512", True, True), ("AVX512", False, False),
                          ("AVX2", True, False), ("DEFAULT", True, False)])
def test_bf16_only_where_native(monkeypatch, capability, flag, native):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU reports the hardware flag but runs AVX2 kernels
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flag)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train.cpu_has_native_bf16() is native


# ---------------------------------------------------------------- thesis defaults and schedules

# (method, dataset, flag, value, thesis section it comes from)
THESIS = [
    ("carl", "cifar10", "lr", 0.6, "5.8.4: cosine starting at 0.6"),
    ("carl", "cifar10", "final_lr_ratio", 1e-3, "5.8.4: decaying to 0.0006"),
    ("carl", "cifar10", "weight_decay", 5e-4, "5.8.4: weight decay 5e-4"),
    ("carl", "cifar10", "optimizer", "larc", "5.8.4: SGD with momentum and LARS (SwAV's LARC)"),
    ("carl", "cifar10", "num_prototypes", 100, "5.8.4: 100 prototypes for CIFAR-10"),
    ("carl", "cifar100", "num_prototypes", 300, "5.8.4: 300 for CIFAR-100"),
    ("carl", "stl10", "num_prototypes", 300, "5.8.4: 300 for STL-10"),
    ("carl", "imagefolder", "num_prototypes", 3000,
     "5.8.4: 3000 for (DS) ImageNet, following SwAV"),
    ("carl", "cifar10", "lam_start", 4.0, "5.6.2: b = 4"),
    ("carl", "cifar10", "lam_end", 1.5, "5.6.2: a = 1.5"),
    ("carl", "cifar10", "lam_epochs", 100, "5.6.2: over the first E = 100 epochs"),
    ("carl", "stl10", "lam_start", 2.0, "5.6.1: from b = 2 on STL-10"),
    ("carl", "stl10", "lam_end", 1.0, "5.6.1: to a = 1"),
    ("carl", "cifar10", "epochs", 200, "5.7.1 / 5.8: 200 epochs"),
    ("carl", "cifar10", "batch_size", 256, "5.8: batch size of 256"),
    ("carl", "cifar10", "views", "carl", "5.8.3: SimCLR's pipeline"),
    ("carl", "cifar10", "proto_init_gain", 1.0,
     "5.5: the prototypes are a linear layer (PyTorch's init)"),
    ("carp", "imagefolder", "optimizer", "lars", "6.5.4: the LARS optimizer"),
    ("carp", "imagefolder", "lr", 5.4, "6.5.4: set to 5.4"),
    ("carp", "imagefolder", "final_lr_ratio", 1e-4, "6.5.4: decays to 0.00054"),
    ("carp", "imagefolder", "weight_decay", 1e-6, "6.5.4: weight decay 1e-6"),
    ("carp", "imagefolder", "num_prototypes", 3000, "6.5.4: N_P = 12 blocks of 250"),
    ("carp", "imagefolder", "block_size", 250, "6.5.4: N_B = 250"),
    ("carp", "imagefolder", "lam_start", 2.0, "6.5.4: b = 2.0"),
    ("carp", "imagefolder", "lam_end", 0.15, "6.5.4: a = 0.15"),
    ("carp", "imagefolder", "lam_epochs", 30, "6.5.4: during the first 30 epochs"),
    ("carp", "imagefolder", "batch_size", 256, "6.5.4: a total batch size of 256"),
    ("carp", "imagefolder", "warmup_epochs", 0, "6.5.4: no warm-ups"),
    ("carl", "cifar10", "warmup_epochs", 0,
     "5.8.4: a cosine decay starting at 0.6 (no warm-up named)"),
    ("carp", "imagefolder", "epochs", 200, "6.5.4 / 5.8: 200 epochs"),
    ("carp", "imagefolder", "views", "carp", "6.5.3, Listing 3: BYOL's asymmetric views"),
    # the baselines of table 5.2
    # (5.8: 200 epochs, batch 256, the same cosine schedule for every method)
    ("simclr", "cifar10", "optimizer", "sgd",
     "5.8.5: removing LARS from SimCLR and BYOL produced better results"),
    ("simclr", "cifar10", "lr", 0.03, "5.8.5: a grid search found a learning rate of 0.03"),
    ("simclr", "cifar10", "temperature", 0.2,
     "5.8.5: a temperature of 0.2 instead of the paper's 0.5"),
    ("simclr", "cifar10", "weight_decay", 5e-4,
     "5.8.4's CIFAR weight decay (the paper's 1e-6 goes with LARS)"),
    ("simclr", "cifar10", "final_lr_ratio", 1e-3,
     "5.8: the same cosine scheduler as CARL's (0.6 -> 0.0006)"),
    ("simclr", "cifar10", "views", "carl", "SimCLR's pipeline, which 5.8.3 gives CARL"),
    ("simclr", "cifar10", "batch_size", 256, "5.8: the same batch size of 256"),
    ("simclr", "cifar10", "epochs", 200, "5.8: all methods trained for 200 epochs"),
    ("byol", "cifar10", "optimizer", "sgd", "5.8.5: removing LARS produced better results"),
    ("byol", "cifar10", "lr", 0.03, "5.8.5: a learning rate of 0.03"),
    ("byol", "cifar10", "teacher", "ema", "BYOL: the target network, an EMA of the online one"),
    ("byol", "cifar10", "teacher_momentum", 0.99,
     "the project's baseline choice: 0.99 -> 1 on CIFAR (the paper's 0.996 is ImageNet's)"),
    ("byol", "cifar10", "teacher_momentum_end", 1.0,
     "BYOL: increased to 1 with a cosine over the steps"),
    ("byol", "cifar10", "views", "carp",
     "BYOL's asymmetric views (thesis Listing 3 is BYOL's pipeline)"),
    ("swav", "cifar10", "num_prototypes", 100,
     "5.8.5: SwAV with CARL's prototypes, 100 for CIFAR-10"),
    ("swav", "cifar100", "num_prototypes", 300, "5.8.5: 300 for CIFAR-100"),
    ("swav", "stl10", "num_prototypes", 300, "5.8.5: 300 for STL-10"),
    ("swav", "cifar10", "optimizer", "larc", "SwAV's repository: LARC (trust 0.001) on SGD"),
    ("swav", "cifar10", "lr", 0.6, "SwAV's batch-256 recipe: base lr 0.6"),
    ("swav", "cifar10", "final_lr_ratio", 1e-3, "SwAV's batch-256 recipe: final lr 0.0006"),
    ("swav", "cifar10", "weight_decay", 1e-6, "SwAV's main_swav.py: wd 1e-6"),
    ("swav", "cifar10", "temperature", 0.1, "SwAV: temperature 0.1"),
    ("swav", "cifar10", "queue_size", 0,
     "SwAV's queue is optional (its batch-256 ImageNet recipe: 3840 from epoch 15)"),
    ("swav", "cifar10", "views", "carl",
     "SimCLR-style colour and crops (SwAV's own adds multi-crop)"),
    ("mocov2", "cifar10", "optimizer", "sgd", "MoCo v2: SGD, momentum 0.9"),
    ("mocov2", "cifar10", "lr", 0.03, "MoCo v2: lr 0.03 for batch 256, cosine"),
    ("mocov2", "cifar10", "weight_decay", 5e-4,
     "MoCo's CIFAR-10 demo: wd 5e-4 (the paper's 1e-4 is ImageNet's)"),
    ("mocov2", "cifar10", "temperature", 0.2,
     "MoCo v2: temperature 0.2 (the project's baseline choice; the CIFAR demo: 0.1)"),
    ("mocov2", "cifar10", "queue_size", 4096, "MoCo's CIFAR-10 demo: a queue of 4096 keys"),
    ("mocov2", "cifar10", "teacher_momentum", 0.99,
     "MoCo's CIFAR-10 demo: key encoder momentum 0.99"),
    ("mocov2", "cifar10", "teacher_momentum_end", 0.99, "MoCo: a constant momentum"),
    ("mocov2", "cifar10", "views", "carl", "MoCo v2: SimCLR's augmentations"),
]


@pytest.mark.parametrize("method,dataset,key,value,section", THESIS,
                         ids=[f"{m}-{d}-{k}" for m, d, k, *_ in THESIS])
def test_thesis_defaults(method, dataset, key, value, section):
    args = train.parse_args(["--method", method, "--dataset", dataset])
    assert getattr(args, key) == pytest.approx(value), section


def test_baseline_constants():
    # SwAV: eps 0.05, 3 iterations
    assert (train.losses.SINKHORN_EPS, train.losses.SINKHORN_ITERS) == (0.05, 3)
    # shuffled BN in groups of 32 (see model.EMATeacher)
    assert train.METHODS["mocov2"].teacher_bn_group == 32
    # 5.8.2: one head for every method
    for method in ("simclr", "byol", "mocov2", "swav", "carl", "carp"):
        assert train.parse_args(["--method", method, "--dataset", "cifar10"]).head == "thesis"


# (flag, value, where the published CARP has it: the paper (NeurIPS 2023) or its code,
# github sthalles/carp)
NEURIPS23 = [
    ("teacher", "ema", "main_carp.py: a teacher updated as an EMA of the student"),
    ("teacher_momentum", 0.99, "main_carp.py: --momentum_teacher 0.99"),
    ("teacher_momentum_end", 1.0, "main_carp.py: increased to 1 with a cosine schedule"),
    ("global_crops", 2, "main_carp.py: only the 2 global views pass through the teacher"),
    ("local_crops", 6, "main_carp.py: --local_crops_number 6"),
    ("local_scale", (0.05, 0.2), "main_carp.py: --local_crops_scale 0.05 0.2"),
    ("views", "neurips23",
     "view_generator.py: global crops 0.2-1, jitter 0.4/0.4/0.2/0.1, blur 1.0/0.1, "
     "solarize 0/0.2"),
    ("kl", "pooled", "carp_loss.py: one KL of the mean of every view's assignments, all-gathered"),
    ("lam_start", 1.0, "main_carp.py: loss = consistency + entropy term, weight 1"),
    ("lam_end", 1.0, "main_carp.py: no schedule on that weight"),
    ("head", "neurips23", "carp_head.py: 3 layers, 2048 hidden, BN, GELU, 256-d bottleneck"),
    ("prototypes", "unit", "carp_head.py: weight-normalised last layer, its norm fixed at 1"),
    ("optimizer", "lars", "main_carp.py: LARS"),
    ("lr", 0.45, "main_carp.py: --lr 0.45, scaled by batch / 256"),
    ("final_lr_ratio", 0.0048 / 0.45,
     "main_carp.py: --min_lr 0.0048 (an absolute lr: the ratio at batch 256)"),
    ("weight_decay", 1e-6, "main_carp.py: --weight_decay 1e-6"),
    ("warmup_epochs", 0, "main_carp.py: --warmup_epochs 0"),
    ("bias_lr_scale", 1.0,
     "utils.py LARS: 1-d parameters skip decay and the trust ratio, at the full lr"),
    ("zero_init_residual", True,
     "main_carp.py: torchvision_models.__dict__[arch](zero_init_residual=True)"),
]


@pytest.mark.parametrize("method", ["carl", "carp"])
@pytest.mark.parametrize("key,value,source", NEURIPS23, ids=[k for k, *_ in NEURIPS23])
def test_recipe_neurips23(method, key, value, source):
    args = train.parse_args(["--method", method, "--recipe", "neurips23", "--dataset", "cifar10"])
    assert getattr(args, key) == pytest.approx(value), source


def test_recipe_sizes_and_precedence():
    """ImageNet: the paper's 224 / 96 px crops and 65,536 prototypes in blocks of 512; CIFAR:
    32 / 16 px and the method's K; a flag given on the command line wins over the recipe."""
    big = train.parse_args(["--method", "carp", "--recipe", "neurips23",
                            "--dataset", "imagefolder"])
    assert ((big.image_size, big.local_size, big.num_prototypes, big.block_size)
            == (224, 96, 65536, 512))
    cifar = train.parse_args(["--method", "carp", "--recipe", "neurips23", "--dataset", "cifar10"])
    assert ((cifar.image_size, cifar.local_size, cifar.num_prototypes, cifar.block_size)
            == (32, 16, 3000, 250))
    own = train.parse_args(["--method", "carl", "--recipe", "neurips23", "--dataset", "cifar10",
                            "--local-crops", "4", "--teacher", "none", "--lr", "0.3"])
    assert ((own.local_crops, own.teacher, own.lr, own.num_prototypes, own.block_size)
            == (4, "none", 0.3, 100, None))
    # the thesis: no teacher
    assert train.parse_args(["--method", "carl", "--dataset", "cifar10"]).teacher == "none"
    # what the code does beyond flags: the teacher takes the student's weights before the optimizer
    # step (main_carp.py updates it before backward), for CARL and CARP only (BYOL, MoCo: after, as
    # their papers)
    assert ([train.METHODS[m].teacher_first for m in ("carl", "carp", "byol", "mocov2")]
            == [True, True, False, False])


def test_defaults_that_a_flag_makes_moot_give_way():
    """synthetic's prototype gain means nothing to unit-norm prototypes, and the recipe's local crop
    shape nothing without local crops: both step aside rather than refuse a flag the user
    never gave."""
    unit = train.parse_args(["--method", "carl", "--prototypes", "unit"])
    assert (unit.dataset, unit.proto_init_gain) == ("synthetic", 1.0)
    no_local = train.parse_args(["--method", "carp", "--recipe", "neurips23",
                                 "--dataset", "cifar10", "--local-crops", "0"])
    assert ((no_local.local_crops, no_local.local_size, no_local.local_scale, no_local.teacher)
            == (0, None, None, "ema"))


def test_momentum_schedule_ends():
    m = train.momentum_schedule(0.99, 1.0, 3, 10)
    assert m.shape == (30,) and m[0] == pytest.approx(0.99) and m[-1] == pytest.approx(1.0)
    assert np.all(np.diff(m) > 0)  # per step, on a cosine
    assert m[15] == pytest.approx(0.99 + 0.01 * (1 - math.cos(math.pi * 15 / 29)) / 2)
    assert np.all(train.momentum_schedule(0.99, 0.99, 3, 10) == 0.99)  # MoCo: constant


def test_lr_schedule_ends():
    base, final, epochs, spe = 5.4, 5.4e-4, 200, 195
    lrs = train.lr_schedule(base, final, epochs, spe, warmup_epochs=0)
    n = epochs * spe
    assert lrs.shape == (n,)
    assert lrs[0] == pytest.approx(base)  # no warm-up: the first step takes the full lr
    last_step_error = (base - final) * (1 - math.cos(math.pi / n)) / 2
    assert abs(lrs[-1] - final) <= last_step_error * 1.0001 and lrs[-1] >= final
    assert np.all(np.diff(lrs) < 0)  # decreasing every step, not once an epoch
    warm = train.lr_schedule(0.6, 6e-4, 10, 100, warmup_epochs=2)
    assert warm[0] == 0 and warm[100] == pytest.approx(0.3) and warm[200] == pytest.approx(0.6)
    assert np.all(np.diff(warm[:200]) > 0)
    assert abs(warm[-1] - 6e-4) <= (0.6 - 6e-4) * (1 - math.cos(math.pi / 800)) / 2 * 1.0001


def test_lam_schedule_ends():
    start, end, E, epochs, spe = 2.0, 0.15, 30, 200, 10
    lams = train.lam_schedule(start, end, E, epochs, spe)
    assert lams.shape == (epochs * spe,)
    assert lams[0] == start
    assert lams[E * spe] == pytest.approx(end)  # reaches a at epoch E
    assert np.all(lams[E * spe:] == end)  # and stays there
    # per step: half-way through epoch 0
    assert lams[5] == pytest.approx(start - (start - end) * 0.5 / E)
    assert np.all(np.diff(lams[: E * spe + 1]) < 0)


def test_startup_line_states_both_schedules(capsys):
    for method, expected in (
            ("carl", "lr 0.6 -> 0.0006 (cosine, no warm-up), lambda 4 -> 1.5 over 100 epochs"),
            ("carp", "lr 5.4 -> 0.00054 (cosine, no warm-up), lambda 2 -> 0.15 over 30 epochs")):
        args = train.parse_args(["--method", method, "--dataset", "cifar10"])
        assert train.describe_schedules(args) == expected
    args = train.parse_args(["--dataset", "cifar10", "--warmup-epochs", "10",
                             "--batch-size", "512"])
    assert train.describe_schedules(args).startswith("lr 1.2 -> 0.0012 (cosine, 10-epoch warm-up)")


def test_run_prints_the_schedules_first(tmp_path, capsys):
    """The schedule's first value is 0 under a warm-up; the line gives the lr it warms up to."""
    out = str(tmp_path / "r")
    run_main([*CARL, "--epochs", "2", "--warmup-epochs", "1", "--until-epoch", "1", "--out-dir",
              out])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("carl resnet18 on synthetic: 120 images")
    peak = 9.6 * 32 / 256  # the quickstart's CARL lr per 256 (methods.py) at --batch-size 32
    assert lines[1] == (f"lr {peak:g} -> {peak * 1e-3:g} (cosine, 1-epoch warm-up), "
                        f"lambda 1.5 -> 1 over 2 epochs")
    assert lines[2].startswith("ep 0 step 0/6 ")
    assert [r["lr"] for r in read_log(out) if "loss" in r][0] == 0  # the warm-up starts at 0


# ---------------------------------------------------------------- kNN monitor

def test_knn_monitor_logs_every_epoch_and_the_gain(tmp_path, capsys):
    out = str(tmp_path / "knn")
    argv = [*CARL, "--epochs", "3", "--knn-every", "1", "--knn-train-subset", "200",
            "--knn-test-subset", "100", "--out-dir", out]
    run_main([*argv, "--until-epoch", "2"])
    run_main(argv)  # continued: the random-init value of the first part stays the reference
    text = capsys.readouterr().out
    knn = [r for r in read_log(out) if "knn_top1" in r]
    assert [(r["epoch"], r["step"]) for r in knn] == [(0, 0), (1, 3), (2, 6), (3, 9)]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in knn)
    assert "knn ep 0: top-1" in text and "(random init)" in text
    gain = knn[-1]["knn_top1"] - knn[0]["knn_top1"]
    assert f"kNN top-1 (k=200): {knn[0]['knn_top1']:.2f} at epoch 0 (random init) -> " \
           f"{knn[-1]['knn_top1']:.2f} at epoch 3: {gain:+.2f} points" in text
    # the monitor scores what evaluate.py would: its kNN on the same subsets of the final backbone
    knn_monitor = monitor.KnnMonitor(train.parse_args(argv), torch.device("cpu"))
    net, _ = models.build_backbone("resnet18", True)
    net.load_state_dict(load(os.path.join(out, "backbone.pt")))
    assert knn_monitor(net)[0] == pytest.approx(knn[-1]["knn_top1"], abs=0.01)


def test_knn_monitor_subset_must_split_into_classes():
    with pytest.raises(SystemExit,
                       match=r"--knn-test-subset 55 is not a multiple of the 10 classes"):
        monitor.KnnMonitor(train.parse_args([*CARL, "--knn-every", "1", "--knn-test-subset", "55"]),
                           torch.device("cpu"))


# ---------------------------------------------------------------- the same command continues

@pytest.mark.parametrize("which", ["carl", "carp"])
def test_same_command_continues_and_matches_uninterrupted_run(tmp_path, request, which, capsys):
    argv = CARL if which == "carl" else CARP
    full = request.getfixturevalue(f"{which}_run")
    split = str(tmp_path / "split")
    run_main([*argv, "--until-epoch", "1", "--out-dir", split])
    half = load(os.path.join(split, "run.pt"))
    assert half["epoch"] == 1 and half["step"] == 3
    run_main([*argv, "--until-epoch", "1", "--out-dir", split])  # that piece is done: nothing runs
    assert ("is finished: 1 of 2 epochs done (--until-epoch 1); nothing to do"
            in capsys.readouterr().out)
    assert load(os.path.join(split, "run.pt"))["step"] == 3
    run_main([*argv, "--out-dir", split])  # no --resume: the out-dir's run.pt is continued
    assert "continuing" in capsys.readouterr().out
    assert_same_weights(os.path.join(full, "run.pt"), os.path.join(split, "run.pt"))
    final = load(os.path.join(split, "run.pt"))
    assert any(not torch.equal(half["model"][k], final["model"][k])
               for k in final["model"] if k.endswith("weight"))
    la, lb = ([r for r in read_log(d) if "loss" in r] for d in (full, split))
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(6))
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
    run_main([*argv, "--out-dir", split])  # a finished run run again exits at once
    assert "is finished: 2 of 2 epochs done; nothing to do" in capsys.readouterr().out


def test_resume_from_elsewhere_then_out_dir_wins(tmp_path, carl_run, capsys):
    """--resume starts a new out-dir from another run.pt; once the out-dir has its own, that one
    wins, so the same command (with --resume still in it) keeps working after a requeue."""
    src = str(tmp_path / "src")
    run_main([*CARL, "--until-epoch", "1", "--out-dir", src])
    dst = str(tmp_path / "dst")
    run_main([*CARL, "--until-epoch", "1", "--resume", os.path.join(src, "run.pt"),
              "--out-dir", dst])
    assert "is finished: 1 of 2 epochs done" in capsys.readouterr().out and not os.path.exists(dst)
    run_main([*CARL, "--resume", os.path.join(src, "run.pt"), "--out-dir", dst])
    assert f"continuing {os.path.join(src, 'run.pt')} at step 3" in capsys.readouterr().out
    run_main([*CARL, "--resume", os.path.join(src, "run.pt"), "--out-dir", dst])
    assert f"{os.path.join(dst, 'run.pt')} is finished" in capsys.readouterr().out
    assert_same_weights(os.path.join(carl_run, "run.pt"), os.path.join(dst, "run.pt"))


# ---------------------------------------------------------------- bad inputs

def existing_run(tmp_path, src=None):
    """An out-dir that already holds a run.pt (a real one when src is given); returns
    (dir, fingerprint)."""
    d = tmp_path / "existing"
    d.mkdir()
    path = d / "run.pt"
    if src:
        path.write_bytes(open(src, "rb").read())
    else:
        path.write_bytes(b"precious checkpoint bytes")
    return str(d), fingerprint(path)


def assert_untouched(d, fp):
    assert fingerprint(os.path.join(d, "run.pt")) == fp
    assert sorted(os.listdir(d)) == ["run.pt"]


@pytest.mark.parametrize("argv,match", [
    (["--method", "dino"], r"unknown --method 'dino'"),
    (["--dataset", "mnist"], r"unknown --dataset 'mnist'"),
    (["--arch", "vgg11"], r"unknown --arch 'vgg11'"),
    (["--method", "carp", "--num-prototypes", "100", "--block-size", "30"],
     r"--num-prototypes 100 is not divisible by --block-size 30"),
    (["--method", "carl", "--block-size", "25"], r"--block-size is not used by --method carl"),
    (["--method", "simclr", "--num-prototypes", "10"],
     r"--num-prototypes is not used by --method simclr"),
    (["--method", "byol", "--temperature", "0.1"], r"--temperature is not used by --method byol"),
    (["--method", "simclr", "--local-crops", "2"], r"--method simclr's loss takes two views"),
    (["--method", "carl", "--global-crops", "1"], r"--global-crops must be 2 or more"),
    (["--method", "carl", "--local-size", "8"],
     r"--local-size and --local-scale shape local crops: give --local-crops"),
    (["--method", "carl", "--local-crops", "2", "--local-scale", "0.5", "0.2"],
     r"--local-scale 0.5 0.2 must satisfy"),
    (["--method", "carl", "--local-crops", "2", "--local-size", "4", "--image-size", "20"],
     r"--local-size 4 is below the network's stride \(8 px with the cifar stem\)"),
    (["--method", "byol", "--teacher", "none"],
     r"--method byol needs its EMA teacher \(--teacher ema\)"),
    (["--method", "carl", "--teacher-momentum", "0.9"],
     r"--teacher-momentum-end are for the EMA teacher"),
    (["--method", "carl", "--teacher", "ema", "--teacher-momentum", "1.5"],
     r"--teacher-momentum must be a number in \[0, 1\]"),
    (["--method", "mocov2", "--batch-size", "64", "--queue-size", "1000"],
     r"--queue-size 1000 is not a multiple of the 128 rows each step adds "
     r"\(2 views x --batch-size 64\)"),
    (["--method", "mocov2", "--queue-size", "0"],
     r"--method mocov2 takes its negatives from a queue"),
    (["--method", "swav", "--recipe", "neurips23"],
     r"--recipe neurips23 is not one of --method swav's"),
    (["--optimizer", "larc", "--bias-lr-scale", "1"], r"--bias-lr-scale is for --optimizer lars"),
    (["--recipe", "dino"], r"unknown --recipe 'dino'"),
    (["--method", "carl", "--prototypes", "unit", "--proto-init-gain", "2"],
     r"--proto-init-gain does not change"),
    (["--online-probe", "--knn-every", "0"], r"--online-probe is scored at the kNN monitor"),
    (["--keep-every", "-1"], r"--keep-every must be an integer >= 0, not -1$"),
    (["--method", "carp", "--block-size", "0"], r"--block-size must be an integer > 0, not 0$"),
    (["--epochs", "2", "--until-epoch", "3"], r"--until-epoch 3 must lie in 1\.\.--epochs 2"),
    (["--batch-size", "0"], r"--batch-size must be an integer > 0, not 0$"),
    (["--proto-init-gain", "0"], r"--proto-init-gain must be a number > 0, not 0$"),
    (["--final-lr-ratio", "0"], r"--final-lr-ratio must be a number > 0"),
    (["--ckpt-every-min", "0"], r"--ckpt-every-min must be a number > 0"),
    (["--ckpt-every-epochs", "0"], r"--ckpt-every-epochs must be an integer > 0"),
    (["--knn-every", "-1"], r"--knn-every must be an integer >= 0, not -1$"),
    (["--train-subset", "-10"], r"--train-subset must be an integer > 0"),
    (["--knn-test-subset", "0"], r"--knn-test-subset must be an integer > 0"),
    # each flag's range at parse time
    (["--image-size", "0"], r"--image-size must be an integer > 0, not 0$"),
    (["--image-size", "4"],
     r"--image-size 4 is below the network's stride \(8 px with the cifar stem\)"),
    (["--lr", "-0.1"], r"--lr must be a number > 0, not -0\.1$"),
    (["--lr", "nan"], r"--lr must be a number > 0, not nan$"),
    (["--weight-decay", "-0.0001"], r"--weight-decay must be a number >= 0, not -0\.0001$"),
    (["--lam-start", "-1"], r"--lam-start must be a number >= 0"),
    (["--workers", "-1"], r"--workers must be an integer >= 0, not -1$"),
    (["--epochs", "two"], r"--epochs must be an integer > 0, not 'two'$"),
    (["--seed", "-1"], r"--seed must be an integer from 0 to 2\*\*63 - 1"),
    (["--method", "carl", "--teacher", "ema", "--teacher-momentum", "-0.5"],
     r"--teacher-momentum must be a number in \[0, 1\]"),
    (["--epochs", "2", "--warmup-epochs", "3"],
     r"--warmup-epochs 3 must be shorter than the run's --epochs 2"),
    (["--views", "dino"], r"--views invalid choice: 'dino'"),
    (["--optimizer", "adam"],
     r"--optimizer invalid choice: 'adam' \(choose from 'larc', 'lars', 'sgd'\)"),
])
def test_bad_flags_exit_before_any_work(tmp_path, argv, match):
    d, fp = existing_run(tmp_path)
    with pytest.raises(SystemExit, match=match) as e:
        run_main([*argv, "--workers", "0", "--out-dir", d])
    assert e.value.code not in (0, None)
    assert_untouched(d, fp)
    fresh = tmp_path / "fresh"  # also into a fresh out-dir: nothing is created
    with pytest.raises(SystemExit, match=match):
        run_main([*argv, "--workers", "0", "--out-dir", str(fresh)])
    assert not fresh.exists()


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_imagefolder_missing_data_dir(tmp_path, layout):
    data_dir = tmp_path / "imagenet"
    if layout == "empty":
        (data_dir / "train").mkdir(parents=True)
    out = tmp_path / "out"
    with pytest.raises(SystemExit,
                       match=r"(no folder .*imagenet.*--data-dir)|(no images under .*imagenet)"):
        run_main(["--dataset", "imagefolder", "--data-dir", str(data_dir), "--workers", "0",
                  "--out-dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("argv,match", [
    (CARP, r"run with --method carl, but this command has --method carp"),
    ([*CARL, "--arch", "resnet50"],
     r"run with --arch resnet18, but this command has --arch resnet50"),
    ([*CARL, "--num-prototypes", "200"],
     r"--num-prototypes 100, but this command has --num-prototypes 200"),
    ([*CARL, "--no-cifar-stem", "--image-size", "32"],
     r"--cifar-stem True, but this command has --cifar-stem False"),
    ([*CARL, "--views", "carp"], r"--views carl, but this command has --views carp"),
    ([*CARL, "--loader", "workers"], r"--loader device, but this command has --loader workers"),
    ([*CARL, "--lr", "1.0"], r"--lr 9.6, but this command has --lr 1;"),
    ([*CARL, "--epochs", "3"], r"--epochs 2, but this command has --epochs 3"),
    ([*CARL, "--seed", "1"], r"--seed 0, but this command has --seed 1"),
    ([*CARL, "--batch-size", "24"], r"--batch-size 32, but this command has --batch-size 24"),
])
def test_continuing_with_other_flags_is_refused(tmp_path, carl_run, argv, match):
    d, fp = existing_run(tmp_path, src=os.path.join(carl_run, "run.pt"))
    with pytest.raises(SystemExit, match=match):
        run_main([*argv, "--out-dir", d])
    assert_untouched(d, fp)


@pytest.mark.parametrize("content,match", [
    (b"this is not a checkpoint", r"cannot read checkpoint .*: it is not a PyTorch checkpoint"),
    (b"", r"cannot read checkpoint .*run\.pt: it is empty \(0 bytes\); move it away to start "
          r"over, or give another --out-dir$"),
    (None, r"cannot read checkpoint .*: it is truncated or corrupted"),  # a truncated torch file
    ("not-run-pt", r"not a run\.pt written by train\.py"),
])
def test_corrupt_checkpoint_in_out_dir(tmp_path, content, match):
    d = tmp_path / "existing"
    d.mkdir()
    path = d / "run.pt"
    if content is None:
        torch.save({"model": {"w": torch.randn(1000)}, "args": {"method": "carl"}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "not-run-pt":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    fp = fingerprint(path)
    with pytest.raises(SystemExit, match=match):
        run_main([*CARL, "--out-dir", str(d)])
    assert_untouched(str(d), fp)


def test_checkpoint_of_an_older_train_py_is_one_line(tmp_path, carl_run):
    """run.pt files from before the baselines (CARL's prototypes under 'assigner.', no teacher or
    queue)."""
    d, _ = existing_run(tmp_path, src=os.path.join(carl_run, "run.pt"))
    old = load(os.path.join(d, "run.pt"))
    old["model"] = {k.replace("out.", "assigner.", 1): v for k, v in old["model"].items()}
    del old["teacher"], old["queue"]
    torch.save(old, os.path.join(d, "run.pt"))
    fp = fingerprint(os.path.join(d, "run.pt"))
    with pytest.raises(SystemExit, match=r"was written by an older train.py .*; continue it with "
                                         r"that version, or start a new --out-dir$"):
        run_main([*CARL, "--out-dir", d])
    assert_untouched(d, fp)


def test_continuing_in_another_number_of_processes_warns(tmp_path, capsys):
    out = str(tmp_path / "r")
    run_main([*CARL, "--until-epoch", "1", "--out-dir", out])
    ckpt = load(os.path.join(out, "run.pt"))
    assert ckpt["world"] == 1
    ckpt["world"] = 2  # as if it had started under torchrun with 2 workers
    torch.save(ckpt, os.path.join(out, "run.pt"))
    run_main([*CARL, "--out-dir", out])
    assert ("warning: " in capsys.readouterr().out
            and load(os.path.join(out, "run.pt"))["step"] == 6)


def test_batch_not_divisible_by_world(tmp_path, monkeypatch):
    """torchrun's WORLD_SIZE is read before any process group is built, so the error comes at once,
    not after a rendezvous with peers."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match="--batch-size 33 is not divisible by the 2 processes"):
        train.main(["--method", "carl", "--batch-size", "33", "--workers", "0",
                    "--out-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_resume_from_missing_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"checkpoint .*nope\.pt does not exist"):
        run_main([*CARL, "--resume", str(tmp_path / "nope.pt"), "--out-dir", str(out)])
    assert not out.exists()


def test_a_bad_resume_file_is_named_without_the_out_dir_advice(tmp_path):
    """Moving the out-dir's run.pt away is the advice for it alone; a --resume file elsewhere
    that is missing or unreadable is named as --resume's."""
    out, empty = tmp_path / "out", tmp_path / "empty.pt"
    missing = r"^error: --resume: checkpoint .*nope\.pt does not exist$"
    with pytest.raises(SystemExit, match=missing):
        run_main([*CARL, "--resume", str(tmp_path / "nope.pt"), "--out-dir", str(out)])
    empty.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"empty\.pt: it is empty \(0 bytes\)$"):
        run_main([*CARL, "--resume", str(empty), "--out-dir", str(out)])
    assert not out.exists()


def test_device_loader_refuses_a_split_that_does_not_fit(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sysconf", lambda name: 1000)  # ~0.5 MB of "free memory"
    with pytest.raises(SystemExit,
                       match=r"synthetic pretrain needs .* GiB held whole; use --loader workers"):
        run_main(["--method", "carl", "--workers", "0", "--out-dir", str(tmp_path / "r")])


def test_compile_flag_compiles_the_step_and_the_device_views(monkeypatch, tmp_path):
    """--compile hands torch.compile the step (student_step: forward, loss, backward, optimizer)
    and the device loader's views (the real compile of the views is tested in test_augment.py, the
    step's in test_compiled_step.py); both are then what runs.
    Without the flag, or with --no-compile, a CPU run compiles nothing."""
    compiled = []

    def fake_compile(fn, **kwargs):
        def run(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        name = getattr(fn, "__name__", type(fn).__name__)
        calls[name] = 0
        compiled.append(name)
        return run
    calls = {}
    monkeypatch.setattr(torch, "compile", fake_compile)
    run_main([*CARL, "--epochs", "1", "--loader", "device", "--compile",
              "--out-dir", str(tmp_path / "r")])
    assert sorted(compiled) == ["make", "student_step"]
    assert calls == {"student_step": 3, "make": 3}  # every one of the 3 steps
    compiled.clear()  # with an EMA teacher its network is compiled too: it runs every step
    run_main([*CARL, "--epochs", "1", "--teacher", "ema", "--compile",
              "--out-dir", str(tmp_path / "t")])
    assert sorted(compiled) == ["Model", "make", "student_step"]
    assert calls == {"Model": 3, "student_step": 3, "make": 3}
    compiled.clear()
    # a CPU run, also on a machine with a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # the default is on for a GPU only: nothing compiled on a CPU
    for flags in ([], ["--no-compile"]):
        run_main([*CARL, "--epochs", "1", "--loader", "device", *flags,
                  "--out-dir", str(tmp_path / f"r{len(flags)}")])
    assert compiled == []


def test_a_failed_compile_is_one_line(monkeypatch, tmp_path):
    """A compiler that cannot run (here faked; a real one: CXX=/nonexistent/g++) ends the run with
    one line that names the cause and the way round it, not a traceback (which
    TORCHDYNAMO_VERBOSE=1 keeps)."""
    class Failed(torch._dynamo.exc.BackendCompilerFailed):
        def __init__(self, msg):  # the parent's signature differs between torch versions
            RuntimeError.__init__(self, msg)

    def fake_compile(fn, **kwargs):
        def run(*args, **kw):
            raise Failed("InvalidCxxCompiler: No working C++ compiler found\n\n"
                         "Set TORCHDYNAMO_VERBOSE=1 ...")
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    with pytest.raises(SystemExit, match=r"^error: torch.compile failed \(Failed: "
                                         r"InvalidCxxCompiler: No working C\+\+ compiler found\); "
                                         r"run with --no-compile, or with TORCHDYNAMO_VERBOSE=1 "
                                         r"for the traceback$"):
        run_main([*CARL, "--epochs", "1", "--compile", "--out-dir", str(tmp_path / "r")])
    monkeypatch.setenv("TORCHDYNAMO_VERBOSE", "1")
    with pytest.raises(Failed):
        run_main([*CARL, "--epochs", "1", "--compile", "--out-dir", str(tmp_path / "r")])


def test_ckpt_every_epochs(monkeypatch, tmp_path):
    """run.pt at the end of every N-th epoch and of the run (3 steps per epoch here)."""
    saved = []
    real = train.atomic_save

    def record(obj, path):
        if path.endswith("run.pt"):
            saved.append(obj["step"])
        real(obj, path)
    monkeypatch.setattr(train, "atomic_save", record)
    run_main([*CARL, "--epochs", "3", "--ckpt-every-epochs", "2", "--out-dir", str(tmp_path / "r")])
    assert saved == [6, 9]
    saved.clear()
    run_main([*CARL, "--epochs", "3", "--out-dir", str(tmp_path / "every")])
    assert saved == [3, 6, 9]
    saved.clear()
    run_main([*CARL, "--epochs", "3", "--until-epoch", "1", "--ckpt-every-epochs", "2",
              "--out-dir", str(tmp_path / "u")])
    assert saved == [3]  # --until-epoch's end is the end of this call's run


def test_images_per_s_is_timed_after_the_first_step(monkeypatch, tmp_path):
    """A slow first step (as --compile's) shows in the first log line only: later rates leave it
    out. On a fake clock that moves 100 s during the first step and 1 s during each later one, so no
    machine's speed enters the test: the first line shows 32 images in 100 s, the others
    32 per second."""
    real, clock = train.train_step, [0.0]

    def timed_step(*args):
        clock[0] += 100.0 if clock[0] == 0 else 1.0
        return real(*args)
    monkeypatch.setattr(train, "train_step", timed_step)
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    run_main([*CARL, "--epochs", "1", "--out-dir", str(tmp_path / "r")])
    # steps 0, 1, 2 of 32 images
    rates = [r["img_per_s"] for r in read_log(tmp_path / "r") if "loss" in r]
    assert rates == [0.3, 32.0, 32.0]  # timed from the start: 32 / 100 s; then from step 0's end


# ---------------------------------------------------------------- teacher, snapshots, provenance

KNN = ["--knn-every", "1", "--knn-train-subset", "100", "--knn-test-subset", "50"]
CPU = torch.device("cpu")


def test_ema_teacher_is_scored_and_saved_beside_the_student(tmp_path, capsys):
    """With an EMA teacher the kNN monitor scores both networks (one line, both in the record) and
    backbone_teacher.pt lies beside backbone.pt; --keep-every N keeps both every N epochs, and a
    continued run may change N."""
    out = tmp_path / "r"
    argv = [*CARL, "--epochs", "3", "--teacher", "ema", *KNN, "--out-dir", str(out)]
    run_main([*argv, "--until-epoch", "2", "--keep-every", "2"])
    assert sorted(f for f in os.listdir(out) if f.startswith("backbone")) == [
        "backbone.pt", "backbone_ep0002.pt", "backbone_teacher.pt", "backbone_teacher_ep0002.pt"]
    for name in ("backbone", "backbone_teacher"):  # epoch 2's snapshots: that session's last
        kept, last = load(out / f"{name}_ep0002.pt"), load(out / f"{name}.pt")
        assert kept.keys() == last.keys() and all(torch.equal(v, last[k]) for k, v in kept.items())
    kept = fingerprint(out / "backbone_teacher_ep0002.pt")
    run_main([*argv, "--keep-every", "1"])  # continued, keeping every epoch from here
    assert fingerprint(out / "backbone_teacher_ep0002.pt") == kept  # a snapshot is never rewritten
    assert {"backbone_ep0003.pt", "backbone_teacher_ep0003.pt"} <= set(os.listdir(out))
    assert "backbone_ep0001.pt" not in os.listdir(out)
    ckpt = load(out / "run.pt")
    for name, network in (("backbone.pt", "model"), ("backbone_teacher.pt", "teacher"),
                          ("backbone_ep0003.pt", "model"),
                          ("backbone_teacher_ep0003.pt", "teacher")):
        sd = assert_loads_into_torchvision(out / name)
        assert all(torch.equal(v, ckpt[network][f"backbone.{k}"]) for k, v in sd.items()), name
    snapshot = checkpoints.read_backbone(str(out / "backbone_teacher_ep0003.pt"))  # evaluate --ckpt
    assert snapshot.weights == "torchvision ResNet state dict"
    assert snapshot.state.keys() == load(out / "backbone_teacher_ep0003.pt").keys()

    text = capsys.readouterr().out
    knn = [r for r in read_log(out) if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [0, 1, 2, 3]
    assert all(0 <= r["knn_top1_teacher"] <= r["knn_top5_teacher"] <= 100 for r in knn)
    assert knn[0]["knn_top1_teacher"] == knn[0]["knn_top1"]  # the teacher starts as the student
    assert "knn ep 0: top-1 {0:.2f} student, {0:.2f} teacher (random init)".format(
        knn[0]["knn_top1"]) in text
    last, gains = knn[-1], [knn[-1][k] - knn[0][k] for k in ("knn_top1", "knn_top1_teacher")]
    assert (f"knn ep 3: top-1 {last['knn_top1']:.2f} student, {last['knn_top1_teacher']:.2f} "
            f"teacher ({gains[0]:+.2f}, {gains[1]:+.2f} since epoch 0), top-5 "
            f"{last['knn_top5']:.2f}, {last['knn_top5_teacher']:.2f}, ") in text
    # the teacher's number is the monitor's kNN of backbone_teacher.pt
    knn_monitor = monitor.KnnMonitor(train.parse_args(argv), CPU)
    net, _ = models.build_backbone("resnet18", True)
    net.load_state_dict(load(out / "backbone_teacher.pt"))
    assert knn_monitor(net)[0] == pytest.approx(last["knn_top1_teacher"], abs=0.01)


def test_provenance_in_args_json_the_log_and_run_pt(tmp_path, capsys):
    """The resolved flags, the commit, the library versions and the device: args.json, run.pt and
    the first record of log.jsonl (no step: step lists skip it), a new record for each session;
    evaluate.py names the commit and the method."""
    out = tmp_path / "r"
    argv = [*CARL, "--out-dir", str(out)]
    run_main([*argv, "--until-epoch", "1"])
    run_main(argv)  # continued: a second session, a second record
    log = read_log(out)
    made = [r for r in log if "provenance" in r]
    assert log[0] is made[0] and log[4] is made[1] and len(made) == 2  # 3 steps in session 1
    assert all("step" not in r for r in made)
    assert [r["step"] for r in log if "loss" in r] == list(range(6))
    with open(out / "args.json") as f:
        saved = json.load(f)
    assert saved == made[1]
    assert saved["args"] == json.loads(json.dumps(vars(train.parse_args(argv))))  # tuples as lists
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(train.__file__),
                         capture_output=True, text=True)
    prov = saved["provenance"]
    assert prov["commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    assert prov["uncommitted_changes"] in ((True, False) if git.returncode == 0 else ("unknown",))
    assert (prov["torch"], prov["torchvision"], prov["device"], prov["processes"]) == (
        torch.__version__, torchvision.__version__, "cpu", 1)
    assert load(out / "run.pt")["provenance"] == prov
    capsys.readouterr()
    evaluate.main(["--ckpt", str(out / "run.pt"), "--protocol", "knn", "--knn-k", "20",
                   "--train-subset", "50", "--test-subset", "50", "--workers", "0"])
    first = capsys.readouterr().out.splitlines()[0]
    assert f"pretrained on synthetic by carl at commit {prov['commit'][:12]}" in first


def test_provenance_without_git_says_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    prov = train.provenance(CPU, 1, code_dir=str(tmp_path))  # not a repository
    assert (prov["commit"], prov["uncommitted_changes"]) == ("unknown", "unknown")
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    prov = train.provenance(CPU, 1)
    assert (prov["commit"], prov["uncommitted_changes"]) == ("unknown", "unknown")
    assert prov["device"] == "cpu"


# ---------------------------------------------------------------- the online linear probe

@pytest.mark.parametrize("loader", ["device", "workers"])
def test_both_loaders_give_each_batch_its_labels(loader):
    args = train.parse_args([*CARL, "--loader", loader])
    source, labels = train.load_pretrain_data(args, CPU, None)
    batches = data.Batches(len(labels), 32, 1, 0, 0, 0, 4)  # steps 0-3: into epoch 1
    got = [y for _, y in train.pretrain_batches(args, source, batches, 0, CPU, labels)]
    order = [batches.epoch_order(step // 3)[step % 3] for step in range(4)]  # (32,) each
    assert all(torch.equal(y, labels[i]) for y, i in zip(got, order))
    if loader == "workers":  # the labels of the very images the views were made from
        assert got[0].tolist() == [source[i][1] for i in order[0].tolist()]
    assert all(y is None for _, y in train.pretrain_batches(args, source, batches, 0, CPU))


def test_online_probe_sends_no_gradient_into_the_backbone():
    """Two steps with the probe's step after each, and without: the backbone's gradients and
    weights are the same to the bit; the probe learns."""
    args = train.parse_args([*CARL, *KNN, "--online-probe", "--amp", "off"])
    source, labels = train.load_pretrain_data(args, CPU, None)
    batches = data.Batches(len(labels), args.batch_size, 1, 0, args.seed, 0, 2)
    steps = list(train.pretrain_batches(args, source, batches, 0, CPU, labels))
    backbones = []
    for with_probe in (False, True):
        run = train.build_run(args, CPU, 1, steps_per_epoch=3)
        probe = monitor.OnlineProbe(512, 10, CPU)
        for step, (views, y) in enumerate(steps):
            now = train.schedule_values(run, step)
            train.train_step(run, views, now, step)
            if with_probe:
                probe.step(run.features, y)
        backbones.append([(p.grad.clone(), p.detach().clone())
                          for p in run.model.backbone.parameters()])
    assert all(torch.equal(g, g2) and torch.equal(w, w2)
               for (g, w), (g2, w2) in zip(*backbones))
    assert probe.weight.abs().sum() > 0 and probe.bias.grad is not None


def test_online_probe_leaves_out_unlabelled_rows():
    """Rows labelled -1 (STL-10's unlabeled images) are not in the loss: its mean is over the
    labelled rows, and a batch without labels changes nothing."""
    probe = monitor.OnlineProbe(4, 3, CPU)
    feats = [torch.randn(6, 4), torch.randn(6, 4)]  # two global crops of 6 images
    loss = probe.step(feats, torch.full((6,), -1))
    assert loss.item() == 0 and probe.weight.abs().sum() == 0 and probe.bias.abs().sum() == 0
    loss = probe.step(feats, torch.tensor([0, 1, -1, 2, -1, 0]))  # zero weights: log 3 a row
    assert loss.item() == pytest.approx(math.log(3))
    assert probe.weight.abs().sum() > 0


def test_online_probe_in_a_run(tmp_path, carl_run, capsys):
    """--online-probe trains beside the method without changing it: a run ends with the weights of
    one without it (carl_run: nor the kNN monitor); its top-1 at every kNN point, its loss at every
    step, its state in run.pt."""
    run_main([*CARL, *KNN, "--online-probe", "--out-dir", str(tmp_path / "with")])
    without = os.path.join(carl_run, "run.pt")
    assert_same_weights(without, tmp_path / "with" / "run.pt")
    ckpt = load(tmp_path / "with" / "run.pt")
    assert ckpt["probe"]["weight"].shape == (10, 512) and load(without)["probe"] is None
    log = read_log(tmp_path / "with")
    knn = [r for r in log if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [0, 1, 2] and all(0 <= r["probe_top1"] <= 100 for r in knn)
    assert knn[0]["probe_top1"] == 10.0  # zero weights: one class, a tenth of the balanced queries
    assert all(math.isfinite(r["probe_loss"]) for r in log if "loss" in r)
    text = capsys.readouterr().out
    assert f"online probe top-1 {knn[-1]['probe_top1']:.2f}, " in text
    assert f"online linear probe top-1 at epoch 2: {knn[-1]['probe_top1']:.2f}" in text
