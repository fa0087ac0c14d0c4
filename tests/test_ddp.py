"""Two-process gloo DDP: losses and gradients equal those of one process on the whole batch.

Each rank holds half the batch. The consistency is a per-rank mean and DDP averages the
gradients over ranks; the KL takes the batch mean over the global batch (all-reduce), so the
DDP gradient equals the single-process gradient on the concatenated batch.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import losses

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


def loss_fn(method, la, lb):
    if method == "carl":
        return losses.carl_loss(la, lb, LAM)
    return losses.carp_loss(la, lb, LAM, losses.random_partition(K, BLOCK, SEED, STEP))


def local_kl(logits):
    """KL to uniform of a plain local batch mean (what one rank would see without all-reduce)."""
    p = logits.float().softmax(-1)
    pbar = p.mean(0)
    return math.log(K) + (pbar * pbar.log()).sum().item()


def local_kl_blocks(logits, partition):
    p = logits.float()[:, partition].softmax(-1)  # (B, N_P, N_B)
    pbar = p.mean(0)
    return (math.log(partition.shape[1]) + (pbar * pbar.log()).sum(-1)).mean().item()


def step_on(net, method, xa, xb):
    logits = net(torch.cat([xa, xb]))
    la, lb = logits.chunk(2)
    loss, stats = loss_fn(method, la, lb)
    loss.backward()
    return loss.detach(), stats, la.detach(), lb.detach()


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        xa, xb = make_data()
        lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD
        results = {}
        for method in ("carl", "carp"):
            ddp = nn.parallel.DistributedDataParallel(make_net())
            loss, stats, la, lb = step_on(ddp, method, xa[lo:hi], xb[lo:hi])
            part = losses.random_partition(K, BLOCK, SEED, STEP)
            if method == "carl":
                plain = local_kl(la) + local_kl(lb)
            else:
                plain = local_kl_blocks(la, part) + local_kl_blocks(lb, part)
            results[method] = {
                "loss": loss, "kl": stats["kl"], "consistency": stats["consistency"], "local_kl": plain,
                "grads": {n: p.grad.clone() for n, p in ddp.module.named_parameters()},
            }
        # the same DDP step with a plain local batch mean in the KL: gradients must then differ
        real_mean = losses.global_batch_mean
        losses.global_batch_mean = lambda p: p.mean(0)
        try:
            ddp = nn.parallel.DistributedDataParallel(make_net())
            loss, stats, _, _ = step_on(ddp, "carl", xa[lo:hi], xb[lo:hi])
            results["carl_local_mean"] = {"kl": stats["kl"],
                                          "grads": {n: p.grad.clone() for n, p in ddp.module.named_parameters()}}
        finally:
            losses.global_batch_mean = real_mean
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (seen once: SIGABRT)
    finally:
        dist.destroy_process_group()


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


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_ddp_gradients_match_single_process(ddp_results, method):
    _, _, ref_grads = single_process(method)
    for r in range(WORLD):
        got = ddp_results[r][method]["grads"]
        assert got.keys() == ref_grads.keys()
        for n in ref_grads:
            assert ref_grads[n].abs().max() > 1e-4  # non-trivial gradients
            torch.testing.assert_close(got[n], ref_grads[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_ddp_loss_matches_single_process(ddp_results, method):
    ref_loss, ref_stats, _ = single_process(method)
    # the KL is global: every rank reports the single-process value
    for r in range(WORLD):
        assert ddp_results[r][method]["kl"].item() == pytest.approx(ref_stats["kl"].item(), rel=1e-5, abs=1e-6)
    # consistency is a per-rank mean over equal halves: the mean over ranks is the global mean
    cons = sum(ddp_results[r][method]["consistency"].item() for r in range(WORLD)) / WORLD
    assert cons == pytest.approx(ref_stats["consistency"].item(), rel=1e-5)
    loss = sum(ddp_results[r][method]["loss"].item() for r in range(WORLD)) / WORLD
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    # the ranks do see different data (otherwise the check above is vacuous)
    assert abs(ddp_results[0][method]["consistency"].item() - ddp_results[1][method]["consistency"].item()) > 1e-4


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
    assert any(not torch.allclose(res["grads"][n], ref_grads[n], rtol=1e-5, atol=1e-5) for n in ref_grads)
