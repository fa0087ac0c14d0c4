"""CARL / CARP losses (losses.py) against hand-computed cases and a naive reference."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def onehot_logits(idx, k, scale=50.0):
    return scale * F.one_hot(torch.as_tensor(idx), k).float()


# ---------------------------------------------------------------- naive references

def naive_consistency_value(la, lb):
    """-mean_i log <softmax(la_i), softmax(lb_i)> (no stop-gradient semantics needed for values)."""
    pa, pb = la.softmax(-1), lb.softmax(-1)
    return -(pa * pb).sum(-1).log().mean()


def naive_one_way(la, lb):
    """-mean_i log <p_a[i], stopgrad(p_b[i])>: the gradient flows into la only."""
    pa, pb = la.softmax(-1), lb.detach().softmax(-1)
    return -(pa * pb).sum(-1).log().mean()


def naive_kl(p):
    pbar = p.mean(0)
    k = p.shape[-1]
    return sum(float(pc) * math.log(float(pc) * k) for pc in pbar if float(pc) > 0)


def naive_carl(la, lb, lam):
    cons = 0.5 * naive_one_way(la, lb) + 0.5 * naive_one_way(lb, la)
    k = la.shape[1]
    kl = 0.0
    for logits in (la, lb):
        pbar = logits.softmax(-1).mean(0)
        kl = kl + (pbar * (pbar * k).log()).sum()
    return cons + lam * kl


def naive_carp(la, lb, lam, partition):
    """Loop over blocks: softmax inside each block, average consistency and KL over blocks."""
    cons, kl = 0.0, 0.0
    n_blocks, n_b = partition.shape
    for block in partition:
        a, b = la[:, block], lb[:, block]
        cons = cons + 0.5 * naive_one_way(a, b) + 0.5 * naive_one_way(b, a)
        for x in (a, b):
            pbar = x.softmax(-1).mean(0)
            kl = kl + (pbar * (pbar * n_b).log()).sum()
    return cons / n_blocks + lam * kl / n_blocks


def carl_loss(logits_a, logits_b, lam):
    """CARL as train.py calls it: two views (B, K), one block holding all K prototypes, no
    teacher."""
    whole = torch.arange(logits_a.shape[1]).view(1, -1)  # (1, K)
    return losses.assignment_loss([logits_a, logits_b], None, lam, whole)


def carp_loss(logits_a, logits_b, lam, partition):
    """CARP as train.py calls it: two views (B, K), a partition (N_P, N_B) from random_partition,
    no teacher."""
    return losses.assignment_loss([logits_a, logits_b], None, lam, partition)


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    gs = torch.autograd.grad(out, xs, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


# ---------------------------------------------------------------- hand-computed cases

def test_identical_onehot_views_have_zero_consistency():
    k = 10
    logits = onehot_logits([0, 3, 7, 3], k)
    logp = logits.log_softmax(-1)
    assert losses.consistency(logp, logp).abs().item() < 1e-6
    _, stats = carl_loss(logits, logits.clone(), lam=1.0)
    assert abs(stats["consistency"].item()) < 1e-6


def test_disagreeing_onehot_views_have_large_consistency():
    # sanity: the zero above is not a constant; different prototypes -> log <p_a, p_b> ~ -50
    k = 10
    a, b = onehot_logits([0, 1], k), onehot_logits([1, 2], k)
    _, stats = carl_loss(a, b, lam=1.0)
    assert stats["consistency"].item() > 40


@pytest.mark.parametrize("k", [2, 10, 100])
def test_all_samples_on_one_prototype_gives_log_k(k):
    p = F.one_hot(torch.full((8,), 1), k).float()
    assert losses.kl_to_uniform(p).item() == pytest.approx(math.log(k), abs=1e-5)
    logits = onehot_logits([1] * 8, k)
    loss, stats = carl_loss(logits, logits.clone(), lam=1.0)
    assert stats["kl"].item() == pytest.approx(2 * math.log(k), abs=1e-4)  # log K per view
    assert loss.item() == pytest.approx(2 * math.log(k), abs=1e-4)  # consistency ~0
    assert float(stats["entropy"]) == pytest.approx(0.0, abs=1e-4)
    assert int(stats["in_use"]) == 1


@pytest.mark.parametrize("k", [4, 10])
def test_uniform_batch_mean_gives_zero_kl(k):
    p = torch.eye(k)[torch.randperm(k)]  # each sample one-hot on a different prototype
    assert losses.kl_to_uniform(p).item() == pytest.approx(0.0, abs=1e-6)
    logits = onehot_logits(torch.randperm(k), k)
    _, stats = carl_loss(logits, logits.clone(), lam=1.0)
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-5)
    assert float(stats["entropy"]) == pytest.approx(math.log(k), abs=1e-5)
    assert int(stats["in_use"]) == k


def test_kl_hand_computed_partial_case():
    # 4 samples, K = 4: two on prototype 0, two on prototype 1 -> pbar = (.5, .5, 0, 0):
    # KL = log 4 + 2 * .5 log .5 = log 2
    p = torch.eye(4)[[0, 0, 1, 1]]
    assert losses.kl_to_uniform(p).item() == pytest.approx(math.log(2), abs=1e-6)


def test_kl_averaged_over_blocks():
    # (B, N_P, N_B): block 0 collapsed (log N_B), block 1 uniform (0) -> mean log(N_B) / 2
    n_b = 5
    p = torch.zeros(n_b, 2, n_b)
    p[:, 0, 0] = 1
    p[torch.arange(n_b), 1, torch.arange(n_b)] = 1
    assert losses.kl_to_uniform(p).item() == pytest.approx(math.log(n_b) / 2, abs=1e-6)


# ---------------------------------------------------------------- against naive formulas

@pytest.mark.parametrize("seed", [0, 1])
def test_consistency_matches_naive_formula(seed):
    g = torch.Generator().manual_seed(seed)
    la, lb = torch.randn(16, 12, generator=g) * 3, torch.randn(16, 12, generator=g) * 3
    value = losses.consistency(la.log_softmax(-1), lb.log_softmax(-1))
    assert value.item() == pytest.approx(naive_consistency_value(la, lb).item(), rel=1e-5)


@pytest.mark.parametrize("lam", [0.0, 0.7, 4.0])
def test_carl_loss_and_grads_match_naive(lam):
    g = torch.Generator().manual_seed(3)
    la, lb = torch.randn(32, 20, generator=g) * 2, torch.randn(32, 20, generator=g) * 2
    loss, (ga, gb) = grads(lambda a, b: carl_loss(a, b, lam)[0], la, lb)
    ref, (ra, rb) = grads(lambda a, b: naive_carl(a, b, lam), la, lb)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-6)
    _, stats = carl_loss(la, lb, lam)
    cons_ref = naive_consistency_value(la, lb).item()
    kl_ref = naive_kl(la.softmax(-1)) + naive_kl(lb.softmax(-1))
    assert stats["consistency"].item() == pytest.approx(cons_ref, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(kl_ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("k,n_b", [(12, 4), (20, 5), (30, 10)])
def test_carp_loss_and_grads_match_naive_blockwise(k, n_b):
    g = torch.Generator().manual_seed(k)
    la, lb = torch.randn(16, k, generator=g) * 2, torch.randn(16, k, generator=g) * 2
    part = losses.random_partition(k, n_b, seed=5, step=7)
    lam = 1.3
    loss, (ga, gb) = grads(lambda a, b: carp_loss(a, b, lam, part)[0], la, lb)
    ref, (ra, rb) = grads(lambda a, b: naive_carp(a, b, lam, part), la, lb)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-6)
    # and the blockwise loss is not the same as CARL over all K (the partition matters)
    carl = carl_loss(la, lb, lam)[0]
    assert abs(carl.item() - loss.item()) > 1e-3


@pytest.mark.parametrize("step", [0, 1, 2])
def test_carp_with_one_block_equals_carl(step):
    k = 24
    g = torch.Generator().manual_seed(step)
    la, lb = torch.randn(10, k, generator=g) * 2, torch.randn(10, k, generator=g) * 2
    part = losses.random_partition(k, k, seed=1, step=step)
    assert part.shape == (1, k)
    lam = 2.5
    carl, (ca, cb) = grads(lambda a, b: carl_loss(a, b, lam)[0], la, lb)
    carp, (pa, pb) = grads(lambda a, b: carp_loss(a, b, lam, part)[0], la, lb)
    assert carp.item() == pytest.approx(carl.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(pa, ca, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pb, cb, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- stop-gradient, symmetry, lambda

def test_consistency_has_no_gradient_through_stopgrad_branch():
    g = torch.Generator().manual_seed(0)
    la = torch.randn(8, 6, generator=g).requires_grad_(True)
    lb = torch.randn(8, 6, generator=g).requires_grad_(True)
    out = losses.consistency(la.log_softmax(-1), lb.log_softmax(-1))
    ga, gb = torch.autograd.grad(out, [la, lb], allow_unused=True)
    assert gb is None or torch.count_nonzero(gb) == 0
    assert ga is not None and ga.abs().sum() > 0
    # analytic: d/dz_a -mean log <p_a, q> = -(r - p_a) / B with r = p_a * q / <p_a, q>
    pa, q = la.softmax(-1).detach(), lb.softmax(-1).detach()
    r = pa * q / (pa * q).sum(-1, keepdim=True)
    torch.testing.assert_close(ga, -(r - pa) / la.shape[0], rtol=1e-4, atol=1e-7)


def test_carl_consistency_is_symmetrised_half_each_way_with_stopgrad():
    """With lam = 0 the grad of each view comes only from its own log term, with weight 0.5."""
    g = torch.Generator().manual_seed(1)
    la, lb = torch.randn(12, 9, generator=g) * 2, torch.randn(12, 9, generator=g) * 2
    _, (ga, gb) = grads(lambda a, b: carl_loss(a, b, 0.0)[0], la, lb)
    _, (oa, _) = grads(naive_one_way, la, lb)  # -mean log <p_a, sg(p_b)>
    _, (ob, _) = grads(naive_one_way, lb, la)
    torch.testing.assert_close(ga, 0.5 * oa, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gb, 0.5 * ob, rtol=1e-4, atol=1e-7)
    # without the stop-gradient the gradient would differ (so the check above can fail)
    _, (fa, _) = grads(lambda a, b: -(a.softmax(-1) * b.softmax(-1)).sum(-1).log().mean(), la, lb)
    assert not torch.allclose(ga, fa, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(ga, oa, rtol=1e-3, atol=1e-6)  # 0.5, not 1.0


def test_consistency_value_is_symmetric_average():
    g = torch.Generator().manual_seed(2)
    la, lb = torch.randn(12, 9, generator=g), torch.randn(12, 9, generator=g)
    _, stats = carl_loss(la, lb, 1.0)
    expected = 0.5 * naive_one_way(la, lb).item() + 0.5 * naive_one_way(lb, la).item()
    assert stats["consistency"].item() == pytest.approx(expected, rel=1e-5)


def test_lambda_weighting():
    g = torch.Generator().manual_seed(4)
    la, lb = torch.randn(16, 10, generator=g) * 2, torch.randn(16, 10, generator=g) * 2
    part = losses.random_partition(10, 5, 0, 0)
    for fn in (lambda lam: carl_loss(la, lb, lam), lambda lam: carp_loss(la, lb, lam, part)):
        l0, s0 = fn(0.0)
        l3, s3 = fn(3.0)
        assert s0["kl"].item() > 1e-3  # non-trivial KL so that lam matters
        assert l0.item() == pytest.approx(s0["consistency"].item(), rel=1e-6)
        assert l3.item() == pytest.approx(s3["consistency"].item() + 3.0 * s3["kl"].item(),
                                          rel=1e-6)
        assert (l3 - l0).item() == pytest.approx(3.0 * s0["kl"].item(), rel=1e-5)


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_stable_for_very_confident_logits(scale):
    g = torch.Generator().manual_seed(0)
    la = (torch.randn(16, 20, generator=g) * scale).requires_grad_(True)
    lb = (torch.randn(16, 20, generator=g) * scale).requires_grad_(True)  # views mostly disagree
    for loss_fn in (lambda: carl_loss(la, lb, 1.0),
                    lambda: carp_loss(la, lb, 1.0, losses.random_partition(20, 5, 0, 0))):
        loss, stats = loss_fn()
        assert torch.isfinite(loss)
        assert loss.item() > 100  # disagreeing confident views cost ~scale, not inf or nan
        ga, gb = torch.autograd.grad(loss, [la, lb])
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
        assert torch.isfinite(stats["kl"]) and torch.isfinite(stats["consistency"])
    # the naive formula underflows here; the implementation must not
    assert not torch.isfinite(naive_consistency_value(la.detach(), lb.detach()))


def test_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    la = (torch.randn(16, 20, generator=g) * 3).bfloat16().requires_grad_(True)
    lb = (torch.randn(16, 20, generator=g) * 3).bfloat16().requires_grad_(True)
    part = losses.random_partition(20, 5, 0, 0)
    ref_carl = carl_loss(la.detach().float(), lb.detach().float(), 1.5)[0]
    ref_carp = carp_loss(la.detach().float(), lb.detach().float(), 1.5, part)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        carl, stats = carl_loss(la, lb, 1.5)
        carp, _ = carp_loss(la, lb, 1.5, part)
    for loss, ref in ((carl, ref_carl), (carp, ref_carp)):
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
        # computed in float32 on the bf16 values: same as the float32 loss up to float32 rounding
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert stats["kl"].dtype == torch.float32 and stats["consistency"].dtype == torch.float32
    ga, = torch.autograd.grad(carl, [la])
    assert ga.dtype == torch.bfloat16 and torch.isfinite(ga.float()).all()


# ---------------------------------------------------------------- partitions

@pytest.mark.parametrize("k,n_b", [(12, 4), (100, 25), (3000, 250), (7, 7), (8, 1)])
def test_partition_is_a_partition(k, n_b):
    part = losses.random_partition(k, n_b, seed=0, step=3)
    assert part.shape == (k // n_b, n_b)
    assert part.dtype == torch.int64
    assert torch.equal(part.flatten().sort().values, torch.arange(k))  # disjoint and covering


def test_partition_deterministic_in_seed_and_step():
    a = losses.random_partition(100, 25, seed=3, step=11)
    b = losses.random_partition(100, 25, seed=3, step=11)
    assert torch.equal(a, b)
    torch.manual_seed(123)  # the global RNG state must not matter
    c = losses.random_partition(100, 25, seed=3, step=11)
    assert torch.equal(a, c)
    steps = [losses.random_partition(100, 25, seed=3, step=s) for s in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not torch.equal(steps[i], steps[j])
    assert not torch.equal(a, losses.random_partition(100, 25, seed=4, step=11))


def test_partition_identical_in_a_separate_process():
    code = ("import sys, losses; "
            "print([losses.random_partition(60, 15, seed=2, step=s).tolist() for s in (0, 9)])")
    # timeout=600: a hang guard (torch's import on a loaded machine)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=600).stdout.strip()
    here = [losses.random_partition(60, 15, seed=2, step=s).tolist() for s in (0, 9)]
    assert out == str(here)


@pytest.mark.parametrize("k,n_b", [(10, 3), (100, 30), (5, 10)])
def test_partition_rejects_non_divisible(k, n_b):
    with pytest.raises(ValueError, match="not divisible"):
        losses.random_partition(k, n_b, seed=0, step=0)


# ---------------------------------------------------------------- CARL / CARP, any number of views

def two_view_carp_loss(logits_a, logits_b, lam, partition):
    """The thesis's two-view CARP loss (no teacher) written out: the multi-view function must give
    exactly this."""
    logits_a, logits_b = logits_a.float(), logits_b.float()
    logp_a, logp_b = logits_a[:, partition].log_softmax(-1), logits_b[:, partition].log_softmax(-1)
    cons = 0.5 * losses.consistency(logp_a, logp_b) + 0.5 * losses.consistency(logp_b, logp_a)
    kl = losses.kl_to_uniform(logp_a.exp()) + losses.kl_to_uniform(logp_b.exp())
    return cons + lam * kl


@pytest.mark.parametrize("k,n_b", [(12, 4), (30, 30)])
def test_two_views_without_teacher_equal_two_view_carp_loss(k, n_b):
    g = torch.Generator().manual_seed(11)
    la, lb = torch.randn(9, k, generator=g) * 2, torch.randn(9, k, generator=g) * 2
    part = losses.random_partition(k, n_b, seed=2, step=3)
    multi, (ma, mb) = grads(lambda a, b: losses.assignment_loss([a, b], None, 0.9, part)[0],
                            la, lb)
    two, (ta, tb) = grads(lambda a, b: two_view_carp_loss(a, b, 0.9, part), la, lb)
    assert multi.item() == two.item()  # exactly: the same operations in the same order
    assert torch.equal(ma, ta) and torch.equal(mb, tb)


def naive_multiview(student, teacher, lam, partition, pooled):
    """From the equations: the mean over (student view i, target view j != i) of the block-averaged
    -log <p_i, q_j>; KL of each student view (or of all views pooled) averaged over blocks."""
    targets = teacher if teacher is not None else [s.detach() for s in student[:2]]
    cons, pairs = 0.0, 0
    for i, s in enumerate(student):
        for j, t in enumerate(targets):
            if i == j:
                continue
            cons = cons + sum(naive_one_way(s[:, blk], t[:, blk].detach())
                              for blk in partition) / len(partition)
            pairs += 1
    def kl(x):
        return sum(naive_kl_blocks(x[:, blk]) for blk in partition) / len(partition)
    if pooled:
        klv = kl(torch.cat(student + (list(teacher) if teacher is not None else [])))
    else:
        klv = sum(kl(s) for s in student)
    return cons / pairs + lam * klv, pairs


def naive_kl_blocks(logits):
    pbar = logits.softmax(-1).mean(0)
    return (pbar * (pbar * logits.shape[1]).log()).sum()


@pytest.mark.parametrize("teacher,pooled",
                         [(False, False), (True, False), (True, True), (False, True)])
def test_multiview_loss_matches_the_equations(teacher, pooled):
    g = torch.Generator().manual_seed(5)
    student = [torch.randn(6, 12, generator=g) * 2 for _ in range(5)]  # 2 global + 3 local crops
    teach = [torch.randn(6, 12, generator=g) * 2 for _ in range(2)] if teacher else None
    part = losses.random_partition(12, 4, seed=0, step=1)
    ours, ours_g = grads(lambda *s: losses.assignment_loss(list(s), teach, 1.3, part, 2, pooled)[0],
                         *student)
    ref, ref_g = grads(lambda *s: naive_multiview(list(s), teach, 1.3, part, pooled)[0], *student)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_published_recipe_pairs_and_pooled_kl():
    """2 global + 6 local crops against the teacher's 2 global ones: 14 pairs of equal weight; the
    teacher gets no gradient, and the pooled KL of 8 identical uniform-mean views is 0."""
    g = torch.Generator().manual_seed(6)
    student = [torch.randn(4, 8, generator=g).requires_grad_(True) for _ in range(8)]
    teach = [torch.randn(4, 8, generator=g).requires_grad_(True) for _ in range(2)]
    whole = torch.arange(8).view(1, -1)
    loss, stats = losses.assignment_loss(student, teach, 1.0, whole, 2, pooled=True)
    loss.backward()
    assert all(t.grad is None for t in teach) and all(s.grad is not None for s in student)
    expected = sum(naive_one_way(s, teach[j])
                   for i, s in enumerate(student) for j in range(2) if i != j) / 14
    assert stats["consistency"].item() == pytest.approx(expected.item(), rel=1e-5)
    eye = [torch.eye(8) * 40 for _ in range(8)]  # each view spreads the batch over all 8 prototypes
    assert (losses.assignment_loss(eye, eye[:2], 1.0, whole, 2, pooled=True)[1]["kl"].item()
            == pytest.approx(0, abs=1e-6))


# ---------------------------------------------------------------- SimCLR

def naive_nt_xent(za, zb, t):
    """SimCLR's eq. 1, anchor by anchor: l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t),
    over all 2N."""
    z = F.normalize(torch.cat([za, zb]), dim=1)
    n = len(za)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [torch.dot(z[i], z[k]) / t for k in range(2 * n) if k != i]
        total = total - (torch.dot(z[i], z[j]) / t - torch.logsumexp(torch.stack(sims), 0))
    return total / (2 * n)


@pytest.mark.parametrize("b,d,t", [(4, 8, 0.2), (7, 3, 0.5)])
def test_nt_xent_matches_the_paper(b, d, t):
    g = torch.Generator().manual_seed(b)
    za, zb = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    ours, (ga, gb) = grads(lambda x, y: losses.nt_xent(x, y, t)[0], za, zb)
    ref, (ra, rb) = grads(lambda x, y: naive_nt_xent(x, y, t), za, zb)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-6)


def test_nt_xent_identical_views_beat_shuffled_ones():
    z = torch.eye(6)  # orthonormal: an anchor's only similar embedding is its own other view
    same, stats = losses.nt_xent(z, z.clone(), 0.2)
    shuffled, _ = losses.nt_xent(z, z[torch.tensor([1, 2, 3, 4, 5, 0])], 0.2)
    # identical: -log e^(1/t) / (e^(1/t) + 2N - 2), exactly
    assert same.item() == pytest.approx(-math.log(math.exp(5) / (math.exp(5) + 10)), rel=1e-5)
    assert stats["pos_top1"].item() == 1.0
    assert shuffled.item() > same.item() + 4


# ---------------------------------------------------------------- BYOL

def test_byol_loss_matches_the_paper_and_stops_the_target_gradient():
    g = torch.Generator().manual_seed(7)
    pa, pb, za, zb = (torch.randn(5, 6, generator=g) for _ in range(4))
    ours, (gpa, gpb, gza, gzb) = grads(lambda *x: losses.byol_loss(*x)[0], pa, pb, za, zb)
    def nmse(p, z):  # ||p / |p| - z / |z| ||^2, the paper's eq. 2
        return ((p / p.norm(dim=1, keepdim=True)
                 - z.detach() / z.detach().norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    ref, (rpa, rpb, _, _) = grads(lambda a, b, c, d: nmse(a, d) + nmse(b, c), pa, pb, za, zb)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gpa, rpa, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gpb, rpb, rtol=1e-4, atol=1e-6)
    assert not gza.any() and not gzb.any()  # the targets receive no gradient
    # aligned: 0
    assert losses.byol_loss(za, zb, zb * 3, za * 2)[0].item() == pytest.approx(0, abs=1e-6)


# ---------------------------------------------------------------- SwAV

def naive_sinkhorn(scores, eps, iters):
    q = (scores.double() / eps).exp().T  # (K, N)
    q = q / q.sum()
    k, n = q.shape
    for _ in range(iters):
        for r in range(k):
            q[r] = q[r] / q[r].sum() / k
        for c in range(n):
            q[:, c] = q[:, c] / q[:, c].sum() / n
    return (q * n).T.float()


def test_sinkhorn_matches_the_algorithm_and_balances_the_prototypes():
    g = torch.Generator().manual_seed(8)
    scores = F.normalize(torch.randn(40, 5, generator=g), dim=1)  # cosines, as SwAV's
    q = losses.sinkhorn(scores)
    torch.testing.assert_close(q, naive_sinkhorn(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(40))  # each sample's code is a distribution
    # each prototype's share approaches N / K as the iterations go on, and is exact in the limit
    spread = [(losses.sinkhorn(scores, iters=n).sum(0) - 40 / 5).abs().sum().item()
              for n in (0, 1, 3, 10, 30)]
    assert all(a > b for a, b in zip(spread, spread[1:])), spread
    exact = losses.sinkhorn(scores, iters=300)
    torch.testing.assert_close(exact.sum(0), torch.full((5,), 8.0), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(losses.sinkhorn(torch.zeros(6, 3)), torch.full((6, 3), 1 / 3))


def test_swav_loss_matches_the_paper():
    g = torch.Generator().manual_seed(9)
    scores = [F.normalize(torch.randn(8, 4, generator=g), dim=1)
              for _ in range(3)]  # 2 global + 1 local crop
    bank = F.normalize(torch.randn(16, 4, generator=g), dim=1)

    def ref(*s, bank=None):
        total = 0.0
        for i in range(2):
            rows = torch.cat([bank, s[i].detach()]) if bank is not None else s[i].detach()
            q = naive_sinkhorn(rows, 0.05, 3)[-8:]
            total = total + sum(-(q * (s[v] / 0.1).log_softmax(1)).sum(1).mean()
                                for v in range(3) if v != i)
        return total / 4
    for b in (None, bank):
        ours, ours_g = grads(lambda *s: losses.swav_loss(list(s), 0.1, 2, b)[0], *scores)
        theirs, theirs_g = grads(lambda *s: ref(*s, bank=b), *scores)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)
        for a, c in zip(ours_g, theirs_g):
            torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-6)
    assert (losses.swav_loss(scores, 0.1, 2, bank)[0].item()
            != pytest.approx(losses.swav_loss(scores, 0.1)[0].item()))


# ---------------------------------------------------------------- MoCo v2

def test_moco_loss_matches_the_paper_and_stops_the_key_gradient():
    g = torch.Generator().manual_seed(10)
    qa, qb, ka, kb = (torch.randn(4, 6, generator=g) for _ in range(4))
    queue = F.normalize(torch.randn(10, 6, generator=g), dim=1)

    def info_nce(q, k):  # eq. 1 of MoCo: -log exp(q.k+ / t) / (exp(q.k+ / t) + sum exp(q.k- / t))
        q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
        return sum(-((q[i] @ k[i]) / 0.2
                     - torch.logsumexp(torch.cat([(q[i] @ k[i]).view(1), queue @ q[i]]) / 0.2, 0))
                   for i in range(len(q))) / len(q)
    ours, (gqa, gqb, gka, gkb) = grads(lambda *x: losses.moco_loss(*x, queue, 0.2)[0],
                                       qa, qb, ka, kb)
    ref, (rqa, rqb, _, _) = grads(lambda a, b, c, d: 0.5 * (info_nce(a, d) + info_nce(b, c)),
                                  qa, qb, ka, kb)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gqa, rqa, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gqb, rqb, rtol=1e-4, atol=1e-6)
    assert not gka.any() and not gkb.any()  # the key encoder's output takes no gradient
