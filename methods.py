"""The methods: one entry each in METHODS, holding everything that is the method's own.

A method is a loss (losses.py) and one entry here:

    defaults     every flag the method takes, at its paper's or the thesis's value
    loss         loss(student, teacher, run, now, step) -> (loss, stats, queue rows or None);
                 student and teacher are model.Outputs (z: embeddings, out: last-part outputs, one
                 (B, D) / (B, K or D) tensor per view, global crops first); run: train.build_run's
                 namespace (args, model, queue, ...); now: this step's lr, lam, momentum; now's
                 values and step are floats and an int, or 0-d device tensors in a compiled step
                 (train.student_step): the loss must take either, and read no tensor on the host
    last         last(args, dim, feat_dim) -> (the module after the head, its prototypes or None)
    optional:    per_dataset defaults, recipes it takes, normalize (the last part sees unit z),
                 needs_teacher, multiview (more than two crops), queue (None, "empty": filled as it
                 goes and used once full; "random": starts full of random keys), teacher_bn_group
                 (MoCo's shuffled BN), teacher_first (the EMA teacher takes the student's weights
                 before the optimizer step, not after), evaluated (the network evaluate.py takes
                 by default: "teacher" or "student"), after_backward(model, first_epoch) and
                 after_step(model) hooks

train.py and model.py hold no method names: they run what the entry says. A flag only some
methods take is refused for the others, by the defaults alone.
"""
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
import model as models


@dataclasses.dataclass(frozen=True)
class Method:
    defaults: dict
    loss: Callable
    last: Callable
    per_dataset: dict = dataclasses.field(default_factory=dict)
    recipes: dict = dataclasses.field(default_factory=dict)
    normalize: bool = False
    needs_teacher: bool = False
    multiview: bool = False
    queue: Optional[str] = None
    teacher_bn_group: Optional[int] = None
    teacher_first: bool = False
    evaluated: str = "teacher"  # of a run with an EMA teacher, the network its paper evaluates
    after_backward: Optional[Callable] = None
    after_step: Optional[Callable] = None


# ---------------------------------------------------------------- losses on the networks' outputs

def assignment_loss(student, teacher, run, now, step):
    """CARL (one block of all K) and CARP (a random partition, new every step) on the logits."""
    a, device = run.args, student.out[0].device
    if a.block_size is None:
        partition = torch.arange(a.num_prototypes, device=device).view(1, -1)  # (1, K)
    else:  # made on the device from (seed, step): no copy, the same compiled or not
        partition = losses.random_partition(  # (N_P, N_B)
            a.num_prototypes, a.block_size, a.seed, step, device)
    loss, stats = losses.assignment_loss(student.out, teacher and teacher.out, now["lam"],
                                         partition, a.global_crops, pooled=a.kl == "pooled")
    return loss, stats, None


def simclr_loss(student, teacher, run, now, step):
    return (*losses.nt_xent(*student.out, run.args.temperature), None)


def byol_loss(student, teacher, run, now, step):  # online predictions against the target's z
    return (*losses.byol_loss(*student.out, *teacher.z), None)


def swav_loss(student, teacher, run, now, step):  # the queue holds past global crops' z
    queue, g = run.queue, run.args.global_crops
    bank = None
    if queue and queue.full:
        bank = queue.rows @ run.model.prototypes.weight.detach().T  # (Q, K)
    loss, stats = losses.swav_loss(student.out, run.args.temperature, g, bank)
    return loss, stats, torch.cat(student.z[:g]).detach() if queue else None  # (G B, D)


def mocov2_loss(student, teacher, run, now, step):  # queries against the key encoder's keys, queue
    loss, stats = losses.moco_loss(*student.out, *teacher.z, run.queue.rows, run.args.temperature)
    return loss, stats, F.normalize(torch.cat(teacher.z).float(), dim=1)  # (2B, D): to the queue


def swav_freeze_prototypes(model, first_epoch):  # SwAV: they learn from epoch 1 on
    if first_epoch:
        model.prototypes.weight.grad = None


@torch.no_grad()
def to_unit_rows(layer):  # SwAV's prototypes live on the unit sphere
    layer.weight.copy_(F.normalize(layer.weight, dim=1))


def swav_normalize_prototypes(model):  # after every step
    to_unit_rows(model.prototypes)


# ---------------------------------------------------------------- last parts: what follows the head

def prototypes(args, dim, bias=False):
    """K prototypes scoring a dim-wide input: CARL's linear layer (eq. 5.2: <z, c_j>), or unit-norm
    (the published CARP). PyTorch's init times --proto-init-gain: at gain 1 the first logits have a
    std of ~0.2, assignments start uniform and little gradient reaches the backbone (RESULTS.md)."""
    if args.prototypes == "unit":
        return models.UnitPrototypes(dim, args.num_prototypes)
    layer = nn.Linear(dim, args.num_prototypes, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(args.proto_init_gain)
    return layer


def carl_last(args, dim, feat_dim):
    layer = prototypes(args, dim)
    return layer, layer


def carp_last(args, dim, feat_dim):
    """Thesis 6.5.2: an MLP as wide as the projection head, its last (biased) layer the prototypes;
    under the published head (neurips23) the head itself is that MLP and the prototypes follow."""
    if args.head == "neurips23":
        return carl_last(args, dim, feat_dim)
    mlp = nn.Sequential(nn.Linear(dim, feat_dim, bias=False), nn.BatchNorm1d(feat_dim), nn.ReLU(),
                        prototypes(args, feat_dim, bias=True))
    return mlp, mlp[-1]


def swav_last(args, dim, feat_dim):  # PyTorch's init, put on the unit sphere
    layer = nn.Linear(dim, args.num_prototypes, bias=False)
    to_unit_rows(layer)
    return layer, layer


def byol_last(args, dim, feat_dim):  # thesis 5.8.5: the predictor has the projection head's shape
    return models.mlp(dim, feat_dim, dim, hidden_layers=2), None


def no_last(args, dim, feat_dim):  # the loss takes z itself
    return nn.Identity(), None


# ---------------------------------------------------------------- the thesis's settings

# Sources pinned in tests/test_train.py::THESIS. All: 200 epochs, batch 256, cosine lr without
# warm-up (5.8), ResNet-18 + the same projection head (5.8.2). Weight decay 5e-4 for the SGD
# baselines (the thesis's CIFAR value, 5.8.4; the papers' 1e-6 goes with LARS). Where the thesis is
# silent, this project's choices: BYOL's target momentum 0.99 -> 1 (the paper's 0.996 is its
# ImageNet value) and MoCo v2's temperature 0.2 (its paper's; its CIFAR-10 demo has 0.1).
# Under --optimizer lars, biases and BatchNorm skip the trust ratio (BYOL, Barlow Twins), so they
# take plain SGD steps, far too large at LARS learning rates (CARP at 5.4 collapsed: RESULTS.md,
# "What was found" 2): they get Barlow Twins' 0.0048 / 0.2 = 0.024 of the weights' lr.
BASELINE = dict(epochs=200, batch_size=256, final_lr_ratio=1e-3, global_crops=2, local_crops=0,
                head="thesis", knn_every=0, bias_lr_scale=0.024, zero_init_residual=False)
MULTICROP = dict(BASELINE, local_size=None, local_scale=None)
ASSIGNMENT = dict(MULTICROP, proto_init_gain=1.0, teacher="none", teacher_momentum=0.99,
                  teacher_momentum_end=1.0, kl="per-view", prototypes="linear")


def neurips23(args):
    """--recipe neurips23: the published CARP (Silva & Rivera, NeurIPS 2023; its code, github
    sthalles/carp, main_carp.py), for CARL and CARP: EMA teacher 0.99 -> 1 taking the student's
    weights before each optimizer step, 2 global + 6 local crops, the consistency over every
    (student view, teacher global view) pair, one KL pooled over every view, weight 1 on both
    (lambda 1, no decay), a 3-layer GELU head to 256-d (trunc-normal 0.02 init) and unit-norm
    prototypes, ResNets with zero-init residual branches, LARS 0.45 x batch / 256 cosine to 0.0048
    (the ratio at batch 256) with biases and BatchNorm at the full lr, wd 1e-6, no warm-up. Local
    crops: --local-size's default, 96 px at 224 (the paper's) and on small images half the global
    crop (16 px at 32: the ImageNet ratio 0.43 would give 14; 16 keeps layer4's map at 2x2 with
    the CIFAR stem).
    ImageNet-sized trees take its 65,536 prototypes in blocks of 512; other data keep the
    method's K. Left as this project has it: the head's hidden layers carry no bias (BatchNorm
    follows each), the weight decay is constant (the code schedules it, from 1e-6 to 1e-6)."""
    values = dict(teacher="ema", teacher_momentum=0.99, teacher_momentum_end=1.0, local_crops=6,
                  local_scale=(0.05, 0.2), kl="pooled", lam_start=1.0, lam_end=1.0, lam_epochs=0,
                  head="neurips23", prototypes="unit", views="neurips23", optimizer="lars",
                  lr=0.45, final_lr_ratio=0.0048 / 0.45, weight_decay=1e-6, proto_init_gain=1.0,
                  bias_lr_scale=1.0, zero_init_residual=True)
    if args.dataset == "imagefolder" and args.image_size >= 224:
        values["num_prototypes"] = 65536
        if args.method == "carp":
            values["block_size"] = 512
    return values


# What the start-up line says of each recipe's fidelity to its source
RECIPE_NOTES = {"neurips23": "the official main_carp.py's settings, except its fp16 autocast (here "
                             "--amp), SyncBatchNorm (here --sync-bn) and biases before BatchNorm "
                             "in the head (none here: the same function)"}

METHODS = {
    # Thesis 5.6-5.8: SGD + LARS (SwAV's LARC: plain SGD collapsed, RESULTS.md) 0.6 -> 0.0006,
    # wd 5e-4, K 100 on CIFAR-10, 300 on CIFAR-100 and STL-10; lambda 4 -> 1.5 over 100 epochs.
    "carl": Method(
        dict(ASSIGNMENT, optimizer="larc", lr=0.6, weight_decay=5e-4, num_prototypes=100,
             lam_start=4.0, lam_end=1.5, lam_epochs=100, views="carl"),
        assignment_loss, carl_last, multiview=True, teacher_first=True,
        recipes={"neurips23": neurips23},
        per_dataset={"cifar100": dict(num_prototypes=300), "imagefolder": dict(num_prototypes=3000),
                     "stl10": dict(num_prototypes=300, lam_start=2.0, lam_end=1.0),
                     # the quickstart: LARS at 9.6 per 256 with wd 1e-6, prototypes started larger
                     # (gain) so the first steps carry a gradient, lambda starting near 1 (the
                     # thesis's 4 sent the assignments straight to uniform)
                     "synthetic": dict(optimizer="lars", lr=9.6, weight_decay=1e-6,
                                       proto_init_gain=5.0, lam_start=1.5, lam_end=1.0,
                                       lam_epochs=2)}),
    # Thesis 6.5.4: LARS 5.4 -> 0.00054, wd 1e-6, K 3000 in blocks of 250; lambda 2 -> 0.15 over
    # 30 epochs; BYOL's views.
    "carp": Method(
        dict(ASSIGNMENT, optimizer="lars", lr=5.4, final_lr_ratio=1e-4, weight_decay=1e-6,
             num_prototypes=3000, block_size=250, lam_start=2.0, lam_end=0.15, lam_epochs=30,
             views="carp"),
        assignment_loss, carp_last, multiview=True, teacher_first=True,
        recipes={"neurips23": neurips23},
        # the quickstart: 5 epochs, K 500 in blocks of 50, lambda starting near 1 (the thesis's 2
        # sent the assignments straight to uniform)
        per_dataset={"synthetic": dict(epochs=5, num_prototypes=500, block_size=50,
                                       proto_init_gain=3.0, lam_start=0.75, lam_end=0.5,
                                       lam_epochs=5)}),
    # Thesis 5.8.5: SGD without LARS at 0.03, temperature 0.2.
    "simclr": Method(
        dict(BASELINE, optimizer="sgd", lr=0.03, weight_decay=5e-4, temperature=0.2, views="carl"),
        simclr_loss, no_last),
    # Thesis 5.8.5: SGD at 0.03; EMA target 0.99 -> 1; BYOL's views.
    "byol": Method(
        dict(BASELINE, optimizer="sgd", lr=0.03, weight_decay=5e-4, teacher="ema",
             teacher_momentum=0.99, teacher_momentum_end=1.0, views="carp"),
        byol_loss, byol_last, needs_teacher=True, evaluated="student"),
    # Thesis 5.8.5 (K as CARL's), else its repository's batch-256 recipe: LARC 0.6 -> 0.0006, wd
    # 1e-6, T 0.1, prototypes frozen for the first epoch, no queue.
    "swav": Method(
        dict(MULTICROP, optimizer="larc", lr=0.6, weight_decay=1e-6, num_prototypes=100,
             temperature=0.1, queue_size=0, views="carl"),
        swav_loss, swav_last, normalize=True, multiview=True, queue="empty",
        after_backward=swav_freeze_prototypes, after_step=swav_normalize_prototypes,
        per_dataset={"cifar100": dict(num_prototypes=300), "stl10": dict(num_prototypes=300),
                     "imagefolder": dict(num_prototypes=3000)}),
    # Its paper and its authors' CIFAR-10 demo: SGD 0.03, T 0.2, a queue of 4096 keys, key
    # encoder momentum 0.99, BatchNorm shuffled in groups of 32.
    "mocov2": Method(
        dict(BASELINE, optimizer="sgd", lr=0.03, weight_decay=5e-4, temperature=0.2,
             queue_size=4096, teacher="ema", teacher_momentum=0.99, teacher_momentum_end=0.99,
             views="carl"),
        mocov2_loss, no_last, needs_teacher=True, queue="random", teacher_bn_group=32,
        evaluated="student"),
}

# `synthetic` is ours: the quickstart, under 2 minutes of training on a slow laptop CPU
# (RESULTS.md): 20 px images, 2 epochs of 64 (CARL's and CARP's own settings: their per_dataset).
SYNTHETIC = dict(epochs=2, batch_size=64, knn_every=1)


def defaults(args):
    """Every unset flag's value for this method, dataset and recipe: the method's defaults, the
    synthetic dataset's shared ones, per_dataset, the recipe (later ones win)."""
    method = METHODS[args.method]
    values = {**method.defaults, **(SYNTHETIC if args.dataset == "synthetic" else {}),
              **method.per_dataset.get(args.dataset, {})}
    if args.recipe != "thesis":
        values.update(method.recipes[args.recipe](args))
    return values
