"""Every method's loss, as pure functions of the views' network outputs.

Notation: B samples per view on this rank (local batch), N in the global batch, K prototypes,
N_P blocks of N_B prototypes, V views (the first G of them global crops), D embedding width.

CARL / CARP (thesis 5.4-5.7, 6.5-6.9), `assignment_loss`:
  consistency  = -mean log <p_student, stopgrad(p_target)> over every (student view, target view)
                 pair but a view with itself; targets: the teacher's global views, or without a
                 teacher the student's own global views (two views: 0.5 each way, thesis eq. 5.4)
  KL           = KL(mean_batch(p) || uniform) of each student view, summed (thesis 5.5: two views,
                 KL(a) + KL(b)), or once over every view pooled (the published CARP code)
  loss         = consistency + lam * KL                     (thesis Listing 2, eq. 5.7)
  CARP takes softmax, consistency and KL inside each block of a random partition of the K
  prototypes and averages over blocks; CARL is one block holding all K.
SimCLR `nt_xent`, BYOL `byol_loss`, SwAV `swav_loss` with `sinkhorn`, MoCo v2 `moco_loss`: one
short function each, the papers' equations.

Everything is computed in float32 whatever autocast is active. Under torch.distributed every
batch-wide quantity is global: the KL's batch mean (a differentiable all-reduce), SimCLR's
negatives (a differentiable all-gather), Sinkhorn's sums (the scores gathered); so one process
holding the whole batch computes the same loss and gradients (tests/test_ddp.py).
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

SINKHORN_EPS = 0.05  # SwAV's epsilon
SINKHORN_ITERS = 3  # SwAV's iterations


# ---------------------------------------------------------------- the global batch under DDP

def _world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


class _AllGather(torch.autograd.Function):
    """Every rank's x stacked along dim 0 in rank order; its backward hands each rank the sum over
    ranks of the gradient of its own rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def global_batch_mean(p):
    """Mean over dim 0 across all ranks (differentiable); plain mean on one process.

    Gradient bookkeeping: the all-reduce's backward sums the gradients of all ranks, and DDP then
    averages the parameter gradients over ranks, so the result equals the gradient of one
    process holding the whole batch."""
    if _world() > 1:
        total = _AllReduceSum.apply(p.sum(0))  # (...) summed over every rank's batch
        return total / (p.shape[0] * _world())
    return p.mean(0)


def gather(x):
    """x (B, ...) of every rank -> (N, ...), differentiable (the same bookkeeping as above); x on
    one process. `own_rows(N)` picks this rank's rows back out."""
    return _AllGather.apply(x) if _world() > 1 else x


def own_rows(n):
    """The slice of this rank's rows in a gathered (n, ...) tensor."""
    b = n // _world()
    rank = dist.get_rank() if _world() > 1 else 0
    return slice(rank * b, (rank + 1) * b)


# ---------------------------------------------------------------- CARL and CARP

_MASK = 2 ** 31 - 1  # hashing keeps to [0, 2**31): every product fits int64, on any device


def _mix(x):
    """A bijection of [0, 2**31) that scatters nearby inputs (xorshift-multiply rounds, odd
    multipliers); the same on a python int and on an int64 tensor of any device, compiled or not."""
    for c in (0x2C1B3C6D, 0x297A2D39, 0x1B873593):
        x = ((x ^ (x >> 16)) * c) & _MASK
    return x ^ (x >> 16)


def random_partition(num_prototypes, block_size, seed, step, device=None):
    """A random partition of range(K) into K // N_B blocks: (N_P, N_B) int64 indices on `device`.

    A function of (seed, step) alone (step: an int, or a 0-d int64 tensor on `device`), made there
    by hashing: every rank gets the same partition without communication, each step a different
    one, a continued run the one an uninterrupted run had, and nothing is copied to the device."""
    if num_prototypes % block_size:
        raise ValueError(f"--num-prototypes {num_prototypes} is not divisible by "
                         f"--block-size {block_size}")
    step_key = _mix((step * 1_000_003 + (seed & _MASK)) & _MASK)  # an int, or a 0-d tensor
    keys = _mix((torch.arange(num_prototypes, device=device) + step_key) & _MASK)  # (K,) distinct
    return keys.argsort().view(-1, block_size)  # (N_P, N_B)


@torch.no_grad()
def prototypes_in_use(scores):
    """How many prototypes are some view's argmax (scores: one (B, K) per view), as a tensor: no
    host-device sync, unlike .unique().numel()."""
    top = torch.cat(scores).argmax(1)  # (V B,)
    used = torch.zeros(scores[0].shape[1], dtype=torch.bool, device=top.device)  # (K,)
    return used.index_fill_(0, top, True).sum()


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


def assignment_loss(student, teacher, lam, partition, num_global=2, pooled=False):
    """CARL / CARP over any number of views. student: V logits (B, K), the first num_global the
    global crops; teacher: the teacher's logits (B, K) of the global crops, or None (targets: the
    student's own global crops); partition (N_P, N_B) on the logits' device. pooled: one KL over
    the student's and teacher's views together (the published code), else one per student view
    (the thesis).
    Returns (loss, stats)."""
    block = lambda logits: logits.float()[:, partition].log_softmax(-1)  # noqa: E731 (B, N_P, N_B)
    logp = [block(x) for x in student]  # V of (B, N_P, N_B)
    targets = [block(x.detach()) for x in teacher] if teacher is not None else logp[:num_global]
    pairs = [(i, j) for i in range(len(logp)) for j in range(len(targets)) if i != j]
    cons = sum(consistency(logp[i], targets[j]) for i, j in pairs) / len(pairs)
    if pooled:
        kl = kl_to_uniform(torch.cat(logp + (targets if teacher is not None else [])).exp())
    else:
        kl = sum(kl_to_uniform(x.exp()) for x in logp)
    loss = cons + lam * kl
    with torch.no_grad():
        in_use = prototypes_in_use(student)  # over the full K
        # the entropy of a batch-mean assignment
        entropy = math.log(partition.shape[1]) - kl / (1 if pooled else len(logp))
    stats = {"consistency": cons.detach(), "kl": kl.detach(), "entropy": entropy, "in_use": in_use}
    return loss, stats


# ---------------------------------------------------------------- SimCLR

def nt_xent(z_a, z_b, temperature):
    """SimCLR's NT-Xent: z (B, D) of two views; each of the 2B anchors here against the 2N - 1 other
    embeddings of the global batch, its other view the positive (2N - 2 negatives)."""
    za, zb = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
    keys = torch.cat([gather(za), gather(zb)])  # (2N, D): every view a, then every view b
    n, rows = keys.shape[0] // 2, own_rows(keys.shape[0] // 2)
    mine = torch.arange(n, device=za.device)[rows]  # (B,) this rank's samples in the global batch
    logits = torch.cat([za, zb]) @ keys.T / temperature  # (2B, 2N)
    self_cols = torch.cat([mine, mine + n])  # (2B,) each anchor's own column
    logits = logits.scatter(1, self_cols[:, None], float("-inf"))  # a scalar: no host-device copy
    positive = torch.cat([mine + n, mine])  # (2B,) the other view of the same image
    loss = F.cross_entropy(logits, positive)
    with torch.no_grad():
        accuracy = (logits.argmax(1) == positive).float().mean()
    return loss, {"pos_top1": accuracy}


# ---------------------------------------------------------------- BYOL

def byol_loss(p_a, p_b, z_a, z_b):
    """BYOL: the online predictions p (B, D) of each view regress the target network's projections
    z (B, D) of the other view, both L2-normalised: 2 - 2 cos, both ways, summed
    (the paper's L + L~)."""
    def regress(p, z):
        return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()
    loss = regress(p_a, z_b) + regress(p_b, z_a)
    return loss, {"cos": (1 - loss.detach() / 4)}


# ---------------------------------------------------------------- SwAV

@torch.no_grad()
def sinkhorn(scores, eps=SINKHORN_EPS, iters=SINKHORN_ITERS):
    """SwAV's Sinkhorn-Knopp: scores (N, K) of N samples -> soft codes q (N, K) whose rows sum to 1
    and whose columns each sum to ~N / K (an equal share of the samples per prototype; exact as
    iters grows)."""
    q = torch.exp((scores.float() - scores.max()) / eps).T  # (K, N); the max cancels in normalising
    q /= q.sum()
    k, n = q.shape
    for _ in range(iters):
        q /= k * q.sum(dim=1, keepdim=True)  # each prototype's total: 1 / K
        q /= n * q.sum(dim=0, keepdim=True)  # each sample's total: 1 / N
    return (q * n).T  # (N, K)


def swav_loss(scores, temperature, num_global=2, bank=None):
    """SwAV's swapped prediction: scores V of (B, K), <normalised z, normalised prototype>, the
    first num_global the global crops. Each global crop's codes (Sinkhorn over the global batch,
    with the queue's scores `bank` (Q, K) in front when given) are predicted by
    softmax(scores / T) of every other view; averaged over those pairs."""
    loss, pairs = 0.0, 0
    for i in range(num_global):
        batch = gather(scores[i].detach().float())  # (N, K)
        rows = torch.cat([bank.float(), batch]) if bank is not None else batch  # (Q + N, K)
        q = sinkhorn(rows)[-len(batch):][own_rows(len(batch))]  # (B, K) this rank's codes
        for v in range(len(scores)):
            if v != i:
                loss = loss - (q * (scores[v].float() / temperature).log_softmax(1)).sum(1).mean()
                pairs += 1
    return loss / pairs, {"in_use": prototypes_in_use(scores)}


# ---------------------------------------------------------------- MoCo v2

def infonce(q, k, queue, temperature):
    """InfoNCE: queries q (B, D) against their keys k (B, D) (the positives) and the queue's keys
    (Q, D) (the negatives), all L2-normalised."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True),
                        q @ queue.float().T], 1) / temperature  # (B, 1 + Q)
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, target), (logits.argmax(1) == 0).float().mean().detach()


def moco_loss(q_a, q_b, k_a, k_b, queue, temperature):
    """MoCo v2, symmetrised (as its authors' CIFAR-10 demo): each view's query against the key
    encoder's key of the other view, 0.5 each way."""
    loss_ab, acc_ab = infonce(q_a, k_b, queue, temperature)
    loss_ba, acc_ba = infonce(q_b, k_a, queue, temperature)
    return 0.5 * (loss_ab + loss_ba), {"pos_top1": 0.5 * (acc_ab + acc_ba)}
