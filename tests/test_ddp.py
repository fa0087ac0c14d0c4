"""Two-process gloo DDP: every method's loss and gradients equal those of one process on the
whole batch.

Each rank holds half the batch. Per-sample terms are per-rank means and DDP averages the
gradients over ranks; the batch-wide terms are global: the KL's batch mean (all-reduce), SimCLR's
negatives (all-gather) and Sinkhorn's codes (the scores gathered); so the DDP gradient equals the
single-process gradient on the concatenated batch. Teacher outputs and queues are fixed tensors
here (every rank holds the same queue in train.py).
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import losses
from test_losses import carl_loss, carp_loss

WORLD = 2
B = 8  # global batch per view
DIM, K, BLOCK = 16, 12, 4
LAM = 1.7
SEED, STEP = 3, 5


def make_data():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(B, DIM, generator=g), torch.randn(B, DIM, generator=g)
    # the two halves (ranks) see different inputs, so local and global batch means differ
    xa[: B // 2] += 1.5
    xb[: B // 2] += 1.5
    return xa, xb


def make_net():
    torch.manual_seed(0)
    return nn.Linear(DIM, K)


def fixed(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def loss_fn(method, la, lb, rows=slice(None)):
    """The method's loss of the logits / embeddings (this rank's `rows` of the batch) of two views;
    the teacher's outputs, local crops and queues are fixed tensors of the global batch,
    sliced alike."""
    part = losses.random_partition(K, BLOCK, SEED, STEP)
    teacher = [fixed(B, K, seed=11)[rows], fixed(B, K, seed=12)[rows]]
    local = la.flip(1) * 0.5  # a third view from the same net (a "local crop")
    if method == "carl":
        return carl_loss(la, lb, LAM)
    if method == "carp":
        return carp_loss(la, lb, LAM, part)
    if method == "carp-teacher-multicrop-pooled":
        return losses.assignment_loss([la, lb, local], teacher, LAM, part, 2, pooled=True)
    if method == "simclr":
        return losses.nt_xent(la, lb, 0.2)
    if method == "byol":
        return losses.byol_loss(la, lb, *teacher)
    if method == "swav":
        bank = torch.nn.functional.normalize(fixed(16, K, seed=13), dim=1)
        scores = [torch.nn.functional.normalize(x, dim=1) for x in (la, lb, local)]
        return losses.swav_loss(scores, 0.1, 2, bank)
    if method == "mocov2":
        return losses.moco_loss(la, lb, *teacher,
                                torch.nn.functional.normalize(fixed(24, K, seed=14), dim=1), 0.2)
    raise ValueError(method)


METHODS = ["carl", "carp", "carp-teacher-multicrop-pooled", "simclr", "byol", "swav", "mocov2"]


def local_kl(logits):
    """KL to uniform of a plain local batch mean (what one rank would see without all-reduce)."""
    p = logits.float().softmax(-1)
    pbar = p.mean(0)
    return math.log(K) + (pbar * pbar.log()).sum().item()


def local_kl_blocks(logits, partition):
    p = logits.float()[:, partition].softmax(-1)  # (B, N_P, N_B)
    pbar = p.mean(0)
    return (math.log(partition.shape[1]) + (pbar * pbar.log()).sum(-1)).mean().item()


def step_on(net, method, xa, xb, rows=slice(None)):
    logits = net(torch.cat([xa, xb]))
    la, lb = logits.chunk(2)
    loss, stats = loss_fn(method, la, lb, rows)
    loss.backward()
    return loss.detach(), stats, la.detach(), lb.detach()


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        xa, xb = make_data()
        lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD
        results = {}
        for method in METHODS:
            ddp = nn.parallel.DistributedDataParallel(make_net())
            loss, stats, la, lb = step_on(ddp, method, xa[lo:hi], xb[lo:hi], slice(lo, hi))
            part = losses.random_partition(K, BLOCK, SEED, STEP)
            results[method] = {"loss": loss, "stats": stats,
                               "grads": {n: p.grad.clone()
                                         for n, p in ddp.module.named_parameters()}}
            if method in ("carl", "carp"):
                plain = local_kl(la) + local_kl(lb) if method == "carl" else \
                    local_kl_blocks(la, part) + local_kl_blocks(lb, part)
                results[method].update(kl=stats["kl"], consistency=stats["consistency"],
                                       local_kl=plain)
        # the same DDP step with a plain local batch mean in the KL: gradients must then differ
        real_mean = losses.global_batch_mean
        losses.global_batch_mean = lambda p: p.mean(0)
        try:
            ddp = nn.parallel.DistributedDataParallel(make_net())
            loss, stats, _, _ = step_on(ddp, "carl", xa[lo:hi], xb[lo:hi])
            results["carl_local_mean"] = {"kl": stats["kl"],
                                          "grads": {n: p.grad.clone()
                                                    for n, p in ddp.module.named_parameters()}}
        finally:
            losses.global_batch_mean = real_mean
        results["runs"] = {m: two_real_steps(m, rank) for m in ("mocov2", "swav")}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # no rank tears gloo down while the other still talks to it (seen once: SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def two_real_steps(method, rank):
    """Two train.py steps of a teacher-and-queue method under DDP, each rank on its own views: what
    each rank then holds (student, teacher, queue)."""
    import train  # here: the spawned workers import this module before torch.distributed is set up
    flags = ["--method", method, "--queue-size", "32", "--batch-size", "16", "--image-size", "8",
             "--amp", "off", "--no-compile"]
    args = train.parse_args(flags + (["--num-prototypes", "10"] if method == "swav" else []))
    run = train.build_run(args, torch.device("cpu"), WORLD, steps_per_epoch=3)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(2):
        # this rank's 8 of the global 16
        views = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
        train.train_step(run, views, train.schedule_values(run, step), step)
    return {"model": run.model.state_dict(),
            "teacher": run.teacher and run.teacher.net.state_dict(),
            "queue": run.queue.state_dict()}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(method):
    net = make_net()
    xa, xb = make_data()
    loss, stats, _, _ = step_on(net, method, xa, xb)
    return loss, stats, {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_ddp_gradients_match_single_process(ddp_results, method):
    _, _, ref_grads = single_process(method)
    for r in range(WORLD):
        got = ddp_results[r][method]["grads"]
        assert got.keys() == ref_grads.keys()
        for n in ref_grads:
            assert ref_grads[n].abs().max() > 1e-4  # non-trivial gradients
            torch.testing.assert_close(got[n], ref_grads[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_loss_equals_single_process_for_every_method(ddp_results, method):
    """Each rank's loss is the mean over its half of per-sample terms that see the global batch:
    their mean over ranks is the single-process loss."""
    ref_loss, _, _ = single_process(method)
    loss = sum(ddp_results[r][method]["loss"].item() for r in range(WORLD)) / WORLD
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_ddp_loss_matches_single_process(ddp_results, method):
    ref_loss, ref_stats, _ = single_process(method)
    # the KL is global: every rank reports the single-process value
    for r in range(WORLD):
        assert (ddp_results[r][method]["kl"].item()
                == pytest.approx(ref_stats["kl"].item(), rel=1e-5, abs=1e-6))
    # consistency is a per-rank mean over equal halves: the mean over ranks is the global mean
    cons = sum(ddp_results[r][method]["consistency"].item() for r in range(WORLD)) / WORLD
    assert cons == pytest.approx(ref_stats["consistency"].item(), rel=1e-5)
    loss = sum(ddp_results[r][method]["loss"].item() for r in range(WORLD)) / WORLD
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    # the ranks do see different data (otherwise the check above is vacuous)
    assert abs(ddp_results[0][method]["consistency"].item()
               - ddp_results[1][method]["consistency"].item()) > 1e-4


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_ddp_kl_differs_from_local_mean(ddp_results, method):
    _, ref_stats, _ = single_process(method)
    for r in range(WORLD):
        res = ddp_results[r][method]
        assert abs(res["local_kl"] - res["kl"].item()) > 1e-3
        assert abs(res["local_kl"] - ref_stats["kl"].item()) > 1e-3


def test_ddp_with_local_mean_would_give_wrong_gradients(ddp_results):
    _, ref_stats, ref_grads = single_process("carl")
    res = ddp_results[0]["carl_local_mean"]
    assert abs(res["kl"].item() - ref_stats["kl"].item()) > 1e-3
    assert any(not torch.allclose(res["grads"][n], ref_grads[n], rtol=1e-5, atol=1e-5)
               for n in ref_grads)


@pytest.mark.parametrize("method", ["mocov2", "swav"])
def test_ddp_ranks_hold_the_same_teacher_and_queue(ddp_results, method):
    """After real steps on different data, every rank holds the same weights, EMA teacher and queue
    (the queue filled with the global batch's rows, in the same order), so rank 0's run.pt stands
    for all. BatchNorm's running statistics are each rank's own (DDP hands rank 0's to all at every
    forward; the teacher normalises with batch statistics only)."""
    a, b = (ddp_results[r]["runs"][method] for r in range(WORLD))
    # filled: 2 steps x 2 views x 8 x 2 ranks
    assert a["queue"]["ptr"] == b["queue"]["ptr"] == 0 and a["queue"]["filled"] == 32
    assert a["queue"]["rows"].abs().sum() > 0
    torch.testing.assert_close(a["queue"]["rows"], b["queue"]["rows"], rtol=0, atol=0)
    for part in ("model", "teacher") if method == "mocov2" else ("model",):  # SwAV has no teacher
        weights = [k for k in a[part]
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert len(weights) > 60  # every parameter of the ResNet-18, head and last part
        for k in weights:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part} {k}")
