"""torchrun with 2 CPU processes (gloo): the ranks agree on every step, and a worker killed mid-run
is restarted by torchrun and the run ends with the weights of an uninterrupted one, in either
rendezvous form (--standalone, a c10d endpoint) and whether or not the agent shares its store with
the workers (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 turns that off)."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from test_faults import (ROOT, STARTED, kill_leftovers,  # noqa: F401 (autouse fixture)
                         wait_for_step, workers_of)
from test_train import DIST_ENV, assert_same_weights, load, read_log

pytestmark = pytest.mark.slow  # every test here starts torchrun jobs

DDP = ["--method", "carp", "--num-prototypes", "40", "--block-size", "10", "--dataset", "synthetic",
       "--train-subset", "100", "--batch-size", "16", "--image-size", "8", "--workers", "0",
       "--epochs", "3", "--log-every", "1", "--knn-every", "1", "--knn-train-subset", "50",
       "--knn-test-subset", "20"]
EPOCH = 100 // 16  # 6 steps per epoch
STEPS = 3 * EPOCH


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, restarts=0, rdzv="standalone", share_store=True):
    """train.py in 2 workers; rdzv "standalone" (the agent picks a free port) or "c10d" (an endpoint
    on a free port); share_store=False exports TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*DIST_ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
    env["OMP_NUM_THREADS"] = "1"
    if not share_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    form = ["--standalone"] if rdzv == "standalone" else \
        ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--max-restarts={restarts}", "--monitor-interval=0.1", *form, "train.py", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    STARTED.append(p)
    return p


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """The uninterrupted run every restarted one must match."""
    out = str(tmp_path_factory.mktemp("ddp") / "run")
    p = torchrun([*DDP, "--out-dir", out])
    text = p.communicate(timeout=600)[0]
    assert p.returncode == 0, text
    return out, text


def test_torchrun_two_processes(ddp_reference):
    out, text = ddp_reference
    assert "2 process(es)" in text
    assert load(os.path.join(out, "run.pt"))["step"] == STEPS
    log = read_log(out)
    # rank 0 alone writes the log
    assert [r["step"] for r in log if "loss" in r] == list(range(STEPS))
    assert [r["epoch"] for r in log if "knn_top1" in r] == [0, 1, 2, 3]  # rank 1 waited for each


# Without a store prefix per attempt (train.setup_distributed), a restarted worker could read the
# last attempt's gloo addresses from the store torchrun's agent shares by default, and fail or hang.
# The kNN monitor on and off: it adds a barrier. In the first case one worker is SIGTERMed first,
# alone: both ranks must stop after the same step (otherwise DDP would hang or fail), rank 0 writing
# run.pt there, and torchrun restarts them; then the restarted rank 0 is killed and they are
# restarted again.
# Three cases cover each value of each axis (and c10d with the agent's shared store).
@pytest.mark.parametrize("rdzv,share_store,knn,sigterm_first", [
    ("standalone", True, True, True), ("c10d", True, False, False),
    ("c10d", False, True, False)],
    ids=["standalone-knn-sigterm", "c10d-no-knn", "c10d-own-store-knn"])
def test_torchrun_restarts_a_killed_worker(tmp_path, ddp_reference, rdzv, share_store, knn,
                                           sigterm_first):
    out = str(tmp_path / "run")
    p = torchrun([*DDP, *([] if knn else ["--knn-every", "0"]), "--out-dir", out],
                 1 + sigterm_first, rdzv, share_store)
    lines = []
    if sigterm_first:
        wait_for_step(out, 2, p)
        os.kill(workers_of(p.pid)[-1], signal.SIGTERM)  # rank 1 alone
        for line in p.stdout:  # until the restarted workers continue
            lines.append(line)
            if line.startswith("continuing"):
                break
    wait_for_step(out, EPOCH + 1, p)  # epoch 1 under way: epoch 0's run.pt is written
    # the first started: rank 0, the one that writes run.pt
    os.kill(workers_of(p.pid)[0], signal.SIGKILL)
    text = "".join(lines) + p.communicate(timeout=600)[0]
    assert p.returncode == 0, text
    resumed = [line.split(" (")[0] for line in text.splitlines() if line.startswith("continuing")]
    run_pt = os.path.join(out, "run.pt")
    if sigterm_first:
        stopped = [line for line in text.splitlines()
                   if line.startswith("stopped by SIGTERM after step")]
        assert len(stopped) == 1, text
        assert resumed[0] == (f"continuing {run_pt} at step {int(stopped[0].split()[5])} "
                              f"of {STEPS}"), text
    # the kill's restart: from the last run.pt, epoch 0's or a later one if the kill landed late on
    # a loaded machine
    assert len(resumed) == 1 + sigterm_first, text
    assert any(resumed[-1] == f"continuing {run_pt} at step {s} of {STEPS}"
               for s in range(EPOCH, STEPS)), text
    # each step logged once
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(STEPS))
    assert_same_weights(os.path.join(ddp_reference[0], "run.pt"), run_pt)
