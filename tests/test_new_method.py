"""The README's promise: a new method is a loss and one entry. A toy method is added here exactly as
the README's "Adding a method" shows (its loss and its methods.METHODS entry, in this file), then
trained by train.py's command line and evaluated by evaluate.py's."""
import os

import pytest
import torch
import torch.nn.functional as F

import evaluate
import methods
from test_train import BASE, read_log, run_main


def align_loss(z_a, z_b):
    """The toy loss: pull the two views' unit embeddings together, and keep each embedding
    dimension's batch variance from vanishing (the collapse a bare alignment loss finds)."""
    z_a, z_b = z_a.float(), z_b.float()
    align = (F.normalize(z_a, dim=1) - F.normalize(z_b, dim=1)).pow(2).sum(1).mean()  # scalar
    spread = sum(F.relu(1 - z.std(0)).mean() for z in (z_a, z_b))  # per-dimension std below 1
    return align + spread, {"align": align.detach()}


def toy_loss(student, teacher, run, now, step):  # (loss, stats, rows for a queue or None)
    return (*align_loss(*student.z), None)


TOY = methods.Method(dict(methods.BASELINE, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                          views="carl"), toy_loss, methods.no_last)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "toy", TOY)  # the entry: train.py reads this one dict


def test_a_new_method_is_a_loss_and_one_entry(tmp_path, toy, capsys):
    out = str(tmp_path / "toy")
    run_main(["--method", "toy", *BASE, "--epochs", "1", "--out-dir", out])  # 3 steps of 32
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("toy resnet18 on synthetic: 120 images") and "sgd wd 0.0005" in first
    log = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["align"]])).all() for r in log)
    assert log[0]["lr"] == pytest.approx(0.05 * 32 / 256)  # the entry's defaults took effect
    for name in ("run.pt", "backbone.pt"):
        assert os.path.isfile(os.path.join(out, name))
    results = evaluate.main(["--ckpt", os.path.join(out, "run.pt"), "--protocol", "knn",
                             "--knn-k", "20", "--workers", "0", "--train-subset", "50",
                             "--test-subset", "50"])
    (name, row, top1, top5), = results
    assert (name, row) == ("trained", "knn k=20") and 0 <= top1 <= 100 and top5 >= top1
    for flag in ("--num-prototypes", "--temperature"):  # not in its defaults: refused for it
        with pytest.raises(SystemExit, match=rf"{flag} is not used by --method toy"):
            run_main(["--method", "toy", *BASE, flag, "10", "--out-dir", out])
