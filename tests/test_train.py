"""train.py end to end on the built-in synthetic dataset (CPU): outputs, loss, resume, bad inputs.

Run size: --train-subset 120 (12 per class), --batch-size 32, 32 px, 2 epochs
(3 steps/epoch), every step logged. The CARL and CARP runs are module fixtures and double as the
uninterrupted references of the resume tests.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import model as models
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--dataset", "synthetic", "--train-subset", "120", "--batch-size", "32", "--workers", "0",
        "--epochs", "2", "--log-every", "1"]
CARP = ["--method", "carp", "--num-prototypes", "100", "--block-size", "25"]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_main(argv):
    for key in DIST_ENV:  # in-process runs are single-process runs
        os.environ.pop(key, None)
    train.main(argv)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def fingerprint(path):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    st = os.stat(path)
    return digest, st.st_size, st.st_mtime_ns


def cifar_resnet18():
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


@pytest.fixture(scope="module")
def carl_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("carl") / "run")
    run_main(["--method", "carl", *BASE, "--out-dir", out])
    return out


@pytest.fixture(scope="module")
def carp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("carp") / "run")
    run_main([*CARP, *BASE, "--out-dir", out])
    return out


# ---------------------------------------------------------------- outputs and loss

@pytest.mark.parametrize("which", ["carl", "carp"])
def test_run_writes_outputs_and_loss_goes_down(which, request):
    out = request.getfixturevalue(f"{which}_run")
    for name in ("run.pt", "backbone.pt", "log.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(6))  # 3 steps/epoch, 2 epochs, every step logged
    assert {r["epoch"] for r in log} == {0, 1}
    for r in log:
        for key in ("loss", "consistency", "kl", "lam", "lr", "in_use", "entropy"):
            assert key in r
        assert r["loss"] == pytest.approx(r["consistency"] + r["lam"] * r["kl"], rel=1e-4)
    ep0 = [r["loss"] for r in log if r["epoch"] == 0]
    ep1 = [r["loss"] for r in log if r["epoch"] == 1]
    assert sum(ep1) / len(ep1) < sum(ep0) / len(ep0) - 1e-3  # epoch means: single steps are noisy
    # the schedules: cosine lr decays, lam decays linearly from its start value
    base_lr = {**train.DEFAULTS[which], **train.DATASET_DEFAULTS.get((which, "synthetic"), {})}["lr"]
    assert log[0]["lr"] == pytest.approx(base_lr * 32 / 256)  # lr scaled by batch / 256
    assert log[-1]["lr"] < log[0]["lr"] and log[-1]["lam"] < log[0]["lam"]


@pytest.mark.parametrize("which", ["carl", "carp"])
def test_run_pt_contents(which, request):
    out = request.getfixturevalue(f"{which}_run")
    ckpt = torch.load(os.path.join(out, "run.pt"), map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scaler", "epoch", "step", "args", "rng"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6
    assert ckpt["args"]["method"] == which and ckpt["args"]["num_prototypes"] == 100
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    prototypes = ckpt["model"]["assigner.weight" if which == "carl" else "assigner.3.weight"]
    assert prototypes.shape == (100, 128 if which == "carl" else 512)
    assert ckpt["optimizer"]["state"]  # momentum buffers were saved
    m = models.AssignmentModel(which, "resnet18", True, 100)
    m.load_state_dict(ckpt["model"])  # strict
    # backbone.pt is the backbone of the same final model
    sd = torch.load(os.path.join(out, "backbone.pt"), map_location="cpu", weights_only=True)
    assert sd.keys() == m.backbone.state_dict().keys()
    assert all(torch.equal(v, ckpt["model"][f"backbone.{k}"]) for k, v in sd.items())


def test_lars_gives_biases_and_bn_a_scaled_lr(carp_run):
    """CARP trains with LARS: the last step's lr of the 1-d group is the weights' lr times
    LARS_EXCLUDED_LR_SCALE, and that group skips weight decay and the trust ratio."""
    ckpt = torch.load(os.path.join(carp_run, "run.pt"), map_location="cpu", weights_only=True)
    weights, excluded = ckpt["optimizer"]["param_groups"]
    assert ckpt["args"]["optimizer"] == "lars"
    assert excluded["lars_exclude"] and excluded["weight_decay"] == 0 and not weights["lars_exclude"]
    assert weights["lr"] > 0
    assert excluded["lr"] == pytest.approx(weights["lr"] * train.LARS_EXCLUDED_LR_SCALE)
    sgd = train.build_optimizer(train.parse_args(["--method", "carl", "--optimizer", "sgd"]),
                                models.AssignmentModel("carl", "resnet18", True, 10), 0.1)
    assert all(g.get("lr_scale", 1.0) == 1.0 for g in sgd.param_groups)  # plain SGD: one lr


@pytest.mark.parametrize("which", ["carl", "carp"])
def test_backbone_pt_loads_into_torchvision(which, request):
    out = request.getfixturevalue(f"{which}_run")
    sd = torch.load(os.path.join(out, "backbone.pt"), map_location="cpu", weights_only=True)
    net = cifar_resnet18()
    res = net.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    # trained: the weights moved away from a fresh initialisation with the same seed
    torch.manual_seed(0)
    fresh = models.AssignmentModel(which, "resnet18", True, 100).backbone.state_dict()
    assert not torch.equal(fresh["conv1.weight"], sd["conv1.weight"])


@pytest.mark.parametrize("argv,views", [(["--method", "carl"], "carl"), (["--method", "carp"], "carp"),
                                        (["--method", "carp", "--views", "carl"], "carl")])
def test_views_default_to_the_method(argv, views):
    assert train.parse_args(argv).views == views


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("which", ["carl", "carp"])
def test_resume_matches_uninterrupted_run(tmp_path, request, which):
    """--until-epoch 1, then --resume: same weights, optimizer state and log as the uninterrupted run."""
    argv = ["--method", "carl", *BASE] if which == "carl" else [*CARP, *BASE]
    full = request.getfixturevalue(f"{which}_run")
    split = str(tmp_path / "split")
    run_main([*argv, "--until-epoch", "1", "--out-dir", split])
    half = torch.load(os.path.join(split, "run.pt"), weights_only=True)
    assert half["epoch"] == 1 and half["step"] == 3
    assert {r["epoch"] for r in read_log(split)} == {0}
    run_main([*argv, "--resume", os.path.join(split, "run.pt"), "--out-dir", split])
    a = torch.load(os.path.join(full, "run.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "run.pt"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-6, msg=k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][pid]["momentum_buffer"], st["momentum_buffer"],
                                   rtol=0, atol=1e-6)
    # the resumed run did continue: the epoch-1 weights differ from the final ones
    assert any(not torch.equal(half["model"][k], b["model"][k]) for k in a["model"] if k.endswith("weight"))
    la, lb = read_log(full), read_log(split)
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(6))
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)



# ---------------------------------------------------------------- bad inputs

def existing_run(tmp_path, src=None):
    """An out-dir that already holds a run.pt (a real one when src is given); returns (dir, fingerprint)."""
    d = tmp_path / "existing"
    d.mkdir()
    path = d / "run.pt"
    if src:
        shutil.copy(src, path)
    else:
        path.write_bytes(b"precious checkpoint bytes")
    return str(d), fingerprint(path)


def assert_untouched(d, fp):
    assert fingerprint(os.path.join(d, "run.pt")) == fp
    assert sorted(os.listdir(d)) == ["run.pt"]


@pytest.mark.parametrize("argv,match", [
    (["--method", "simclr"], r"unknown --method 'simclr'"),
    (["--dataset", "mnist"], r"unknown --dataset 'mnist'"),
    (["--arch", "vgg11"], r"unknown --arch 'vgg11'"),
    (["--method", "carp", "--num-prototypes", "100", "--block-size", "30"],
     r"--num-prototypes 100 is not divisible by --block-size 30"),
    (["--method", "carl", "--block-size", "25"], r"--block-size is for --method carp"),
    (["--epochs", "2", "--until-epoch", "3"], r"--until-epoch 3 must lie in 1\.\.--epochs 2"),
    (["--batch-size", "0"], r"--batch-size must be positive"),
    (["--proto-init-gain", "0"], r"--proto-init-gain must be positive"),
    (["--optimizer", "adam"], r"unknown --optimizer 'adam'"),
])
def test_bad_flags_exit_before_any_work(tmp_path, argv, match):
    d, fp = existing_run(tmp_path)
    with pytest.raises(SystemExit, match=match) as e:
        run_main([*argv, "--workers", "0", "--out-dir", d])
    assert e.value.code not in (0, None)
    assert_untouched(d, fp)
    # also into a fresh out-dir: nothing is created
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit, match=match):
        run_main([*argv, "--workers", "0", "--out-dir", str(fresh)])
    assert not fresh.exists()


def test_fresh_run_into_existing_out_dir_refuses(tmp_path):
    d, fp = existing_run(tmp_path)
    with pytest.raises(SystemExit, match=r"run\.pt exists; continue it with --resume"):
        run_main(["--method", "carl", *BASE, "--out-dir", d])
    assert_untouched(d, fp)


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_imagefolder_missing_data_dir(tmp_path, layout):
    data_dir = tmp_path / "imagenet"
    if layout == "empty":
        (data_dir / "train").mkdir(parents=True)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"(no folder .*imagenet.*--data-dir)|(no images under .*imagenet)"):
        run_main(["--dataset", "imagefolder", "--data-dir", str(data_dir), "--workers", "0", "--out-dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("argv,match", [
    (["--method", "carp", "--num-prototypes", "100", "--block-size", "25"], r"method='carl'.*method='carp'"),
    (["--method", "carl", "--arch", "resnet50"], r"arch='resnet18'.*arch='resnet50'"),
    (["--method", "carl", "--num-prototypes", "200"], r"num_prototypes=100.*num_prototypes=200"),
    (["--method", "carl", "--no-cifar-stem"], r"cifar_stem=True.*cifar_stem=False"),
    (["--method", "carl", "--views", "carp"], r"views='carl'.*views='carp'"),
])
def test_resume_from_incompatible_checkpoint(tmp_path, carl_run, argv, match):
    d, fp = existing_run(tmp_path, src=os.path.join(carl_run, "run.pt"))
    ckpt = os.path.join(d, "run.pt")
    with pytest.raises(SystemExit, match=match):
        run_main([*argv, "--dataset", "synthetic", "--train-subset", "120", "--batch-size", "32",
                  "--workers", "0", "--epochs", "2", "--resume", ckpt, "--out-dir", d])
    assert_untouched(d, fp)


@pytest.mark.parametrize("content,match", [
    (b"this is not a checkpoint", r"cannot read checkpoint"),
    (None, r"cannot read checkpoint"),  # a truncated real torch file
    ("not-run-pt", r"not a run\.pt written by train\.py"),
])
def test_resume_from_corrupt_checkpoint(tmp_path, content, match):
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
        run_main(["--method", "carl", *BASE, "--resume", str(path), "--out-dir", str(d)])
    assert_untouched(str(d), fp)


def test_resume_from_missing_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"checkpoint .*nope\.pt does not exist"):
        run_main(["--method", "carl", *BASE, "--resume", str(tmp_path / "nope.pt"), "--out-dir", str(out)])
    assert not out.exists()


# ---------------------------------------------------------------- torchrun (2 CPU processes, gloo)

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, timeout):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_batch_not_divisible_by_world(tmp_path):
    d, fp = existing_run(tmp_path)
    p = torchrun(["--method", "carl", "--dataset", "synthetic", "--batch-size", "33", "--workers", "0",
                  "--out-dir", d], timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "--batch-size 33 is not divisible by the 2 processes" in out, out
    assert_untouched(d, fp)


def test_torchrun_two_process_smoke(tmp_path):
    out = str(tmp_path / "ddp")
    p = torchrun(["--method", "carp", "--num-prototypes", "40", "--block-size", "10", "--dataset", "synthetic",
                  "--train-subset", "40", "--batch-size", "16", "--image-size", "16", "--workers", "0",
                  "--epochs", "1", "--log-every", "1", "--out-dir", out], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 process(es)" in p.stdout
    ckpt = torch.load(os.path.join(out, "run.pt"), weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2  # 40 images / global batch 16 -> 2 steps
    assert os.path.isfile(os.path.join(out, "backbone.pt"))
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1]  # rank 0 only writes the log
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
