"""What clusters do to runs, on CPU: preemption signals, mid-epoch checkpoints, unreadable images,
a data directory that changed, a checkpoint write that fails (a worker killed under torchrun: see
test_torchrun.py). Each interrupted run must end with the same weights as an uninterrupted one,
every step logged once."""
import errno
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import train
from test_evaluate import image_tree
from test_train import CARL, assert_same_weights, fingerprint, load, read_log, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STARTED = []  # subprocesses this module and test_torchrun started


@pytest.fixture(autouse=True)
def kill_leftovers():
    """A failed test must not leave training processes behind (torchrun's workers included)."""
    yield
    for p in STARTED:
        if p.poll() is None:
            for pid in workers_of(p.pid):
                os.kill(pid, signal.SIGKILL)
            p.kill()
            p.wait()
    STARTED.clear()


def stop_at(monkeypatch, step, signum=signal.SIGTERM):
    """Send this process `signum` while train step `step` runs, as a scheduler would."""
    real = train.train_step

    def step_then_signal(*args):
        out = real(*args)
        if args[-1] == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(train, "train_step", step_then_signal)


@pytest.fixture(scope="module")
def workers_run(tmp_path_factory):
    """The uninterrupted reference for the PIL path: --loader workers with 2 DataLoader workers."""
    out = str(tmp_path_factory.mktemp("workers") / "run")
    run_main([*CARL, "--loader", "workers", "--workers", "2", "--out-dir", out])
    return out


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("device") / "run")
    run_main([*CARL, "--out-dir", out])
    return out


# ---------------------------------------------------------------- preemption, mid-epoch checkpoints

@pytest.mark.parametrize("loader,signum", [("device", signal.SIGTERM), ("workers", signal.SIGUSR1),
                                           ("device", signal.SIGINT)])  # SIGINT: Ctrl-C
def test_signal_mid_epoch_then_same_command_matches_uninterrupted(tmp_path, monkeypatch, capsys,
                                                                  request, loader, signum):
    argv = [*CARL, "--loader", loader, "--workers", "2" if loader == "workers" else "0"]
    reference = request.getfixturevalue(f"{loader}_run")
    out = str(tmp_path / "run")
    stop_at(monkeypatch, 3, signum)  # epoch 1, its first of 3 steps
    with pytest.raises(SystemExit) as e:
        run_main([*argv, "--out-dir", out])
    assert e.value.code == 128 + signum
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step 4 of 6 (epoch 1, step 1 of 3)" in capsys.readouterr().out
    assert load(os.path.join(out, "run.pt"))["step"] == 4  # written at the stopping step, mid-epoch
    assert [r["step"] for r in read_log(out) if "loss" in r] == [0, 1, 2, 3]
    monkeypatch.undo()
    # the same command: continues at step 4, nothing repeated or skipped
    run_main([*argv, "--out-dir", out])
    assert "continuing" in capsys.readouterr().out
    assert_same_weights(os.path.join(reference, "run.pt"), os.path.join(out, "run.pt"))
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(6))


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    real = train.train_step

    def step_then_two_ctrl_c(*args):
        out = real(*args)
        if args[-1] == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(train, "train_step", step_then_two_ctrl_c)
    with pytest.raises(SystemExit,
                       match=r"^error: stopped by a second Ctrl-C; .* holds the last run\.pt"):
        run_main([*CARL, "--out-dir", str(tmp_path / "run")])
    assert "Ctrl-C again: now, unsaved" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under-a-file", "read-only"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, where):
    monkeypatch.setattr(train, "load_pretrain_data",
                        lambda *a: pytest.fail("data loaded before the check"))
    (tmp_path / "f").write_text("a file")
    out = {"file": tmp_path / "f", "under-a-file": tmp_path / "f" / "run",
           "read-only": tmp_path / "ro" / "run"}
    if where == "read-only":  # root writes through permission bits, so the refusal is simulated
        def refuse(dir, prefix):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(train.tempfile, "mkdtemp", refuse)
    match = {"file": r"--out-dir .*f is a file, not a folder$",
             "under-a-file": r"cannot be made: .*f is a file$",
             "read-only": r"--out-dir .*run cannot be written \(.*: Permission denied\)$"}[where]
    with pytest.raises(SystemExit, match=match):
        run_main([*CARL, "--out-dir", str(out[where])])
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_knn_skipped_by_a_stop_at_an_epoch_end_runs_on_continuing(tmp_path, monkeypatch, capsys):
    argv = [*CARL, "--knn-every", "1", "--knn-train-subset", "100", "--knn-test-subset", "50",
            "--out-dir", str(tmp_path / "run")]
    stop_at(monkeypatch, 2)  # the last step of epoch 0: run.pt is written, the epoch-1 kNN skipped
    with pytest.raises(SystemExit):
        run_main(argv)
    assert [r["step"] for r in read_log(str(tmp_path / "run")) if "knn_top1" in r] == [0]
    monkeypatch.undo()
    run_main(argv)
    assert "knn ep 1:" in capsys.readouterr().out
    assert [r["step"] for r in read_log(str(tmp_path / "run"))
            if "knn_top1" in r] == [0, 3, 6]  # each once


def test_views_do_not_depend_on_the_worker_count(tmp_path, workers_run):
    out = str(tmp_path / "run")
    run_main([*CARL, "--loader", "workers", "--workers", "0", "--out-dir", out])
    assert_same_weights(os.path.join(workers_run, "run.pt"), os.path.join(out, "run.pt"))


def test_checkpoints_inside_an_epoch(tmp_path, monkeypatch):
    saved = []
    real = train.atomic_save
    monkeypatch.setattr(train, "atomic_save",
                        lambda obj, path: (saved.append(obj.get("step")), real(obj, path)))
    clock = iter(range(0, 10 ** 9, 100))  # every call to time.time() is 100 s later than the last
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    run_main([*CARL, "--ckpt-every-min", "1",  # 60 s: due after every step
              "--out-dir", str(tmp_path / "r")])
    # run.pt after every step, not only 3 and 6
    assert [s for s in saved if s is not None] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_real_sigterm_to_the_process_group(tmp_path):
    """A scheduler's SIGTERM reaches the main process and its DataLoader workers: the run stops at a
    step, writes run.pt there and exits 143; the same command continues to the end."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", *CARL, "--epochs", "8", "--loader", "workers",
           "--workers", "1", "--out-dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    STARTED.append(p)
    wait_for_step(out, 1, p)
    os.killpg(p.pid, signal.SIGTERM)
    text = p.communicate(timeout=600)[0]
    assert p.returncode == 143, text
    stopped = [line for line in text.splitlines()
               if line.startswith("stopped by SIGTERM after step")]
    assert stopped, text
    step = int(stopped[0].split()[5])
    assert 1 < step < 24 and load(os.path.join(out, "run.pt"))["step"] == step
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"continuing {os.path.join(out, 'run.pt')} at step {step} of 24" in done.stdout
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(24))
    assert load(os.path.join(out, "run.pt"))["step"] == 24


def wait_for_step(out, step, proc, timeout=600):
    """Poll log.jsonl until it holds `step` (the process must still be running)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if any(r.get("step", -1) >= step and "loss" in r for r in read_log(out)):
                return
        except (FileNotFoundError, ValueError):  # not written yet, or a line half written
            pass
        time.sleep(0.02)
    raise TimeoutError(f"step {step} never logged")


def test_a_loss_that_is_not_finite_stops_the_run_before_any_save(tmp_path, monkeypatch):
    real = train.losses.assignment_loss

    def nan_at_step_4(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), stats
    calls = []
    monkeypatch.setattr(train.losses, "assignment_loss", nan_at_step_4)
    with pytest.raises(SystemExit, match=r"^error: the loss is not finite at step 4 "
                                         r"\(nan on rank 0\); lower --lr, or raise --lam-start$"):
        run_main([*CARL, "--out-dir", str(tmp_path / "r")])
    assert load(tmp_path / "r" / "run.pt")["step"] == 3  # epoch 0's checkpoint; none after the nan


# ---------------------------------------------------------------- failed writes

def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "r"
    real = torch.save
    calls = []

    def full_disk_on_second_run_pt(obj, path, *a, **kw):
        if re.search(r"run\.pt\.\d+\.tmp$", str(path)):
            calls.append(path)
            if len(calls) == 2:
                real(obj, path, *a, **kw)  # the partial file exists when the disk fills up
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk_on_second_run_pt)
    with pytest.raises(SystemExit, match=r"could not write .*run\.pt \(OSError: \[Errno 28\] "
                                         r"No space left on device\); the previous one is intact"):
        run_main([*CARL, "--out-dir", str(out)])
    assert load(out / "run.pt")["step"] == 3  # epoch 0's checkpoint, untouched
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    run_main([*CARL, "--out-dir", str(out)])  # space freed: the same command finishes the run
    assert load(out / "run.pt")["step"] == 6


# ---------------------------------------------------------------- bad data

TEN_CLASSES = [f"c{c}" for c in range(10)]
FOLDER = ["--dataset", "imagefolder", "--image-size", "16", "--batch-size", "8", "--epochs", "2",
          "--workers", "0", "--knn-every", "0", "--log-every", "1"]


@pytest.mark.parametrize("loader,workers", [("device", "0"), ("workers", "1")])
def test_unreadable_image_names_the_file_and_keeps_the_checkpoint(tmp_path, loader, workers):
    tree = image_tree(tmp_path / "data", 16, per_class=4, classes=TEN_CLASSES)
    argv = [*FOLDER, "--data-dir", str(tree), "--loader", loader, "--workers", workers,
            "--out-dir", str(tmp_path / "out")]
    # a good first epoch (and, for the device loader, a decoded cache)
    run_main([*argv, "--until-epoch", "1"])
    ckpt = tmp_path / "out" / "run.pt"
    fp = fingerprint(ckpt)
    bad = tree / "train" / "c3" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated mid-file
    with pytest.raises(SystemExit, match=rf"^error: cannot read image {bad}: ") as e:
        run_main(argv)
    assert fingerprint(ckpt) == fp
    # the DataLoader workers are gone although the error's traceback is still held (here by
    # pytest): they ignore SIGTERM, so workers left alive would make the process wait for them
    # forever at exit
    assert e.value.__traceback__ is not None and multiprocessing.active_children() == []


def test_changed_data_dir_is_refused(tmp_path):
    tree = image_tree(tmp_path / "data", 16, per_class=4, classes=TEN_CLASSES)
    argv = [*FOLDER, "--data-dir", str(tree), "--out-dir", str(tmp_path / "out")]
    run_main([*argv, "--until-epoch", "1"])
    Image.new("RGB", (16, 16)).save(tree / "train" / "c0" / "extra.png")
    with pytest.raises(SystemExit, match=r"imagefolder under .* now has 41 images in 10 classes, "
                                         r"but .*run\.pt was trained on 40 in 10"):
        run_main(argv)


def workers_of(pid):
    """The pids of the processes `pid` started (torchrun's workers), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:  # the parent pid
                children.append(int(entry))
    return sorted(children)
