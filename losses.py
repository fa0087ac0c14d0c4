"""CARL and CARP losses as pure functions of the two views' logits.

Notation: B samples per view (local batch), K prototypes, N_P blocks of N_B prototypes.
  consistency  = -mean_i log <p_a[i], stopgrad(p_b[i])>, symmetrised (0.5 each way)   (thesis 5.4)
  KL(view)     = KL(mean_i p[i] || uniform) = log K + sum_c pbar_c log pbar_c           (thesis 5.5)
  loss         = consistency + lam * (KL(view a) + KL(view b))          (thesis Listing 2, eq. 5.7)
CARP takes softmax, consistency and KL inside each block of a random partition of the K
prototypes and averages over blocks (thesis 6.5-6.9). Everything is computed in float32
whatever autocast is active. Under torch.distributed the batch mean in the KL term is the
mean over the *global* batch (a differentiable all-reduce): splitting a batch over GPUs
then does not weaken the regulariser, the weakness thesis 6.1 names for CARL under DDP.
"""
import math

import torch
import torch.distributed as dist


def random_partition(num_prototypes, block_size, seed, step):
    """A random partition of range(K) into K // N_B blocks: (N_P, N_B) int64 indices.

    Drawn from a generator seeded by (seed, step) on the CPU, so every rank gets the same
    partition without communication, and each step a different one."""
    if num_prototypes % block_size:
        raise ValueError(f"--num-prototypes {num_prototypes} is not divisible by --block-size {block_size}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(num_prototypes, generator=g).view(-1, block_size)  # (N_P, N_B)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def global_batch_mean(p):
    """Mean over dim 0 across all ranks (differentiable); plain mean on one process.

    Gradient bookkeeping: the all-reduce's backward sums the gradients of all ranks, and DDP then
    averages the parameter gradients over ranks, so the result equals the gradient of one
    process holding the whole batch."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = _AllReduceSum.apply(p.sum(0))  # (...) summed over every rank's batch
        return total / (p.shape[0] * dist.get_world_size())
    return p.mean(0)


def consistency(logp_a, logp_b):
    """-mean log <p_a, stopgrad(p_b)> over every leading dim; log-probs (..., C) in.

    log <p_a, p_b> = logsumexp(log p_a + log p_b): no log(0) when assignments are confident."""
    return -torch.logsumexp(logp_a + logp_b.detach(), dim=-1).mean()


def kl_to_uniform(p):
    """KL(mean_batch(p) || uniform) for probabilities p (B, ..., C); averaged over the middle
    dims (blocks) if any. All B samples on one prototype gives log C; a uniform mean gives 0."""
    pbar = global_batch_mean(p)  # (..., C)
    neg_entropy = (pbar * pbar.clamp_min(1e-30).log()).sum(-1)  # (...)
    return (math.log(p.shape[-1]) + neg_entropy).mean()


def _blockwise_loss(logits_a, logits_b, lam, partition):
    """Shared body of CARL (one block holding all K) and CARP. Returns (loss, stats)."""
    logits_a, logits_b = logits_a.float(), logits_b.float()
    blocks_a = logits_a[:, partition]  # (B, N_P, N_B)
    blocks_b = logits_b[:, partition]  # (B, N_P, N_B)
    logp_a, logp_b = blocks_a.log_softmax(-1), blocks_b.log_softmax(-1)  # (B, N_P, N_B)
    cons = 0.5 * consistency(logp_a, logp_b) + 0.5 * consistency(logp_b, logp_a)
    kl = kl_to_uniform(logp_a.exp()) + kl_to_uniform(logp_b.exp())
    loss = cons + lam * kl
    with torch.no_grad():
        top = torch.cat([logits_a, logits_b]).argmax(1)  # (2B,) each view's prototype over the full K
        # distinct prototypes in use, as a tensor: no host-device sync (unlike .unique().numel())
        in_use = torch.zeros(logits_a.shape[1], dtype=torch.bool, device=top.device).index_fill_(0, top, True).sum()
        entropy = math.log(partition.shape[1]) - kl / 2  # of the batch-mean assignment, per block
    stats = {"consistency": cons.detach(), "kl": kl.detach(), "entropy": entropy, "in_use": in_use}
    return loss, stats


def carl_loss(logits_a, logits_b, lam):
    """CARL: logits (B, K) of two views -> (loss, stats)."""
    whole = torch.arange(logits_a.shape[1], device=logits_a.device).view(1, -1)  # (1, K): one block
    return _blockwise_loss(logits_a, logits_b, lam, whole)


def carp_loss(logits_a, logits_b, lam, partition):
    """CARP: logits (B, K) of two views, partition (N_P, N_B) from random_partition -> (loss, stats)."""
    return _blockwise_loss(logits_a, logits_b, lam, partition.to(logits_a.device, non_blocking=True))
