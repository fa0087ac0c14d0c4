"""Every method end to end on the built-in synthetic dataset (CPU): SimCLR, BYOL, SwAV (with its
queue) and MoCo v2 beside CARL and CARP with an EMA teacher and multi-crop (the published recipe's
parts). Each trains 2 epochs without NaN with the kNN monitor on, continues after SIGTERM to the
same final weights (teacher and queue included) as an uninterrupted run, exports a backbone.pt that
loads into torchvision, and evaluate.py reads its run.pt.

Run size: 50 images, batch 16, 8 px, 2 epochs of 3 steps; local crops 8 px too (the network's
stride: train.py refuses smaller ones)."""
import os
import signal

import pytest
import torch

import checkpoints
import evaluate
import model as models
import train
from test_faults import stop_at
from test_train import (BASE, assert_loads_into_torchvision, assert_same_weights, first_batch,
                        load, read_log, run_main)

# test_train's, half the batch: 3 steps/epoch
BASE = [*BASE, "--train-subset", "50", "--batch-size", "16"]
KNN = ["--knn-every", "1", "--knn-train-subset", "50", "--knn-test-subset", "20"]
RUNS = {
    "simclr": ["--method", "simclr"],
    "byol": ["--method", "byol"],
    "swav": ["--method", "swav", "--num-prototypes", "30", "--queue-size", "64",
             "--local-crops", "2", "--local-size", "8"],
    "mocov2": ["--method", "mocov2", "--queue-size", "64"],
    "carl-teacher": ["--method", "carl", "--teacher", "ema",
                     "--local-crops", "2", "--local-size", "8"],
    "carp-neurips23": ["--method", "carp", "--recipe", "neurips23", "--num-prototypes", "100",
                       "--block-size", "25", "--local-crops", "2", "--local-size", "8"],
}
HAS = {"simclr": (), "byol": ("teacher",), "swav": ("queue",), "mocov2": ("teacher", "queue"),
       "carl-teacher": ("teacher",), "carp-neurips23": ("teacher",)}


@pytest.fixture(scope="module", params=list(RUNS))
def method_run(request, tmp_path_factory):
    name = request.param
    out = str(tmp_path_factory.mktemp(name) / "run")
    run_main([*RUNS[name], *BASE, *KNN, "--out-dir", out])
    return name, out


def test_trains_two_epochs_and_exports_a_torchvision_backbone(method_run):
    name, out = method_run
    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(6))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # the monitor before, after each epoch
    assert [r["epoch"] for r in log if "knn_top1" in r] == [0, 1, 2]
    ckpt = load(os.path.join(out, "run.pt"))
    for part in ("teacher", "queue"):
        assert (ckpt[part] is not None) == (part in HAS[name]), part
    if "teacher" in HAS[name]:  # the teacher moved with the student, but is not the student
        w = "backbone.conv1.weight"
        assert not torch.equal(ckpt["teacher"][w], ckpt["model"][w])
        torch.manual_seed(0)
        assert not torch.equal(ckpt["teacher"][w],
                               models.build_backbone("resnet18", True)[0].conv1.weight)
    sd = assert_loads_into_torchvision(os.path.join(out, "backbone.pt"))
    assert all(torch.equal(v, ckpt["model"][f"backbone.{k}"])  # the online network's
               for k, v in sd.items())
    # evaluate.py reads any run.pt alike (its backbone): two are enough
    if name in ("mocov2", "carp-neurips23"):
        (_, row, top1, top5), = evaluate.main(["--ckpt", os.path.join(out, "run.pt"),
                                               "--protocol", "knn", "--knn-k", "20",
                                               "--train-subset", "50", "--test-subset", "20",
                                               "--workers", "0"])
        assert row == "knn k=20" and 0 <= top1 <= top5 <= 100


def test_sigterm_then_the_same_command_matches_an_uninterrupted_run(method_run, tmp_path,
                                                                    monkeypatch, capsys):
    name, reference = method_run
    argv = [*RUNS[name], *BASE, "--out-dir", str(tmp_path / "run")]  # kNN monitor changes no weight
    stop_at(monkeypatch, 3)  # epoch 1, its first step
    with pytest.raises(SystemExit) as e:
        run_main(argv)
    assert e.value.code == 128 + signal.SIGTERM
    assert load(tmp_path / "run" / "run.pt")["step"] == 4
    monkeypatch.undo()
    run_main(argv)
    assert "continuing" in capsys.readouterr().out
    assert_same_weights(os.path.join(reference, "run.pt"), tmp_path / "run" / "run.pt")
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == list(range(6))


@pytest.mark.parametrize("name", list(RUNS))
def test_a_step_on_pil_views(name):
    """Every method takes the PIL loader's views too (the other runs here use the device loader's):
    one step."""
    run, views, now = first_batch([*RUNS[name], *BASE, "--loader", "workers"])
    assert [tuple(v.shape) for v in views] == [(16, 3, 8, 8)] * (2 + run.args.local_crops)
    loss, _ = train.train_step(run, views, now, 0)
    assert torch.isfinite(loss)


def test_workers_loader_makes_the_local_crops_and_continues(tmp_path, monkeypatch):
    """PIL views (the DataLoader's): 2 global + 2 local crops a step, the teacher's state carried
    over a stop."""
    # BASE's --workers 0: PIL views in-process
    argv = [*RUNS["carp-neurips23"], *BASE, "--loader", "workers"]
    run_main([*argv, "--out-dir", str(tmp_path / "full")])
    stop_at(monkeypatch, 2)
    with pytest.raises(SystemExit):
        run_main([*argv, "--out-dir", str(tmp_path / "split")])
    monkeypatch.undo()
    run_main([*argv, "--out-dir", str(tmp_path / "split")])
    assert_same_weights(tmp_path / "full" / "run.pt", tmp_path / "split" / "run.pt")


def test_swav_prototypes_frozen_for_the_first_epoch_and_kept_on_the_sphere(tmp_path):
    argv = [*RUNS["swav"], *BASE, "--out-dir", str(tmp_path / "r")]
    run_main([*argv, "--until-epoch", "1"])
    torch.manual_seed(0)
    init = train.build_model(train.parse_args(argv)).prototypes.weight
    after_one = load(tmp_path / "r" / "run.pt")["model"]["out.weight"]
    # epoch 0: no update (but the normalising's rounding)
    torch.testing.assert_close(after_one, init, rtol=0, atol=1e-6)
    run_main(argv)
    after_two = load(tmp_path / "r" / "run.pt")["model"]["out.weight"]
    # learning from epoch 1 on (LARC's steps are small: lr x 0.001)
    assert (after_two - init).abs().max() > 1e-5
    torch.testing.assert_close(after_two.norm(dim=1), torch.ones(30))


def test_teacher_backbone_and_bf16(tmp_path):
    """Under bf16 autocast a teacher method trains with finite losses; evaluate.py reads BYOL's
    online network, whole."""
    run_main([*RUNS["byol"], *BASE, "--epochs", "1", "--amp", "bf16", "--out-dir", str(tmp_path)])
    ckpt = load(tmp_path / "run.pt")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(tmp_path) if "loss" in r)
    # evaluate.py takes BYOL's online network by default, as its paper evaluates it
    read = checkpoints.read_backbone(str(tmp_path / "run.pt"))
    assert read.weights == "student"
    assert read.state.keys() == {k.removeprefix("backbone.") for k in ckpt["model"]
                                 if k.startswith("backbone.")}
    assert all(torch.equal(v, ckpt["model"][f"backbone.{k}"]) for k, v in read.state.items())


def test_teacher_receives_no_gradient_and_follows_the_schedule(monkeypatch):
    """One real step of BYOL: no teacher weight has a gradient, and the teacher is
    m * teacher + (1 - m) * student with m from the per-step cosine (0.99 at the first step)."""
    args = train.parse_args([*RUNS["byol"], *BASE])
    run = train.build_run(args, torch.device("cpu"), 1, steps_per_epoch=3)
    before = [p.clone() for p in run.teacher.net.parameters()]
    views = [torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)]
    now = train.schedule_values(run, 0)
    assert (now["momentum"] == pytest.approx(0.99)
            and run.schedules["momentum"][-1] == pytest.approx(1.0))
    train.train_step(run, views, now, 0)
    assert all(p.grad is None for p in run.teacher.net.parameters())
    for t, b, s in zip(run.teacher.net.parameters(), before, run.model.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)
