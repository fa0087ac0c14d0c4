"""Networks: ResNet backbone (torchvision, optional CIFAR stem), projection head, the method's last
part; the EMA teacher and the queue that some methods keep.

    view -> backbone -> (B, F) features -> projection head -> (B, D) embedding z
         -> last part -> (B, K or D)

The last part (`Model.out`) is built by the method's entry in methods.py (CARL's prototypes, CARP's
assigner, BYOL's predictor, ...); this file knows no method. The backbone is a plain torchvision
ResNet with `fc` replaced by Identity, so its state_dict loads into `torchvision.models.resnet18()`
(after the same stem change) with only `fc` missing.
"""
import copy
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCHS = ("resnet18", "resnet50")
HEADS = ("thesis", "neurips23")
EMBED_DIM = 128
CIFAR_STEM_MAX_PX = 64  # images up to this size get the CIFAR stem unless told otherwise


def build_backbone(arch, cifar_stem, zero_init_residual=False):
    """torchvision ResNet without pretrained weights and without `fc`; returns (net, feature dim).

    The CIFAR stem (3x3 conv, stride 1, no max-pool) keeps the spatial resolution of small
    (<= 64 px) images, which the ImageNet stem (7x7 stride 2 + max-pool) would shrink 4x at once.
    zero_init_residual: each block's last BatchNorm starts at 0, so every block starts as identity.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features  # 512 for resnet18, 2048 for resnet50
    net.fc = nn.Identity()
    return net, feat_dim


def mlp(in_dim, hidden, out_dim, hidden_layers, act=nn.ReLU):
    """`hidden_layers` x (Linear-BN-activation), then a plain Linear to out_dim."""
    layers, d = [], in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), act()]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def projection_head(kind, feat_dim):
    """(head, embedding width). thesis (5.8.2, the same for every method): 2 hidden layers as wide
    as the features, BatchNorm, ReLU, 128-d out, PyTorch's init. neurips23 (the published CARP
    head): 3 layers, 2048 hidden, BatchNorm, GELU, to a 256-d bottleneck, weights drawn from a
    normal of std 0.02 truncated at +-2 and biases 0, as its code does."""
    if kind == "thesis":
        return mlp(feat_dim, feat_dim, EMBED_DIM, hidden_layers=2), EMBED_DIM
    if kind == "neurips23":
        head = mlp(feat_dim, 2048, 256, hidden_layers=2, act=nn.GELU)
        for layer in head:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02, a=-2, b=2)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        return head, 256
    raise ValueError(f"unknown --head {kind!r}; choose one of {', '.join(HEADS)}")


class UnitPrototypes(nn.Module):
    """K prototypes used at unit length: logits <z, c_j / ||c_j||>. The published CARP's last
    layer: a weight-normalised linear layer whose norm is fixed at 1, which is this."""

    def __init__(self, dim, num_prototypes):
        super().__init__()
        weight = nn.Linear(dim, num_prototypes, bias=False).weight.detach()  # (K, D)
        self.weight = nn.Parameter(weight)

    def forward(self, z):
        return z @ F.normalize(self.weight, dim=1).T  # (B, K)


class Outputs(NamedTuple):
    """A network's outputs for a list of views: one tensor per view in each."""
    z: list  # (B, D) embeddings: the projection head's
    out: list  # (B, K or D): the last part's
    h: list = None  # (B, F) backbone features (Model.forward's; the online probe's input)


class Model(nn.Module):
    """Backbone + projection head + the method's last part `out`.

    last(dim, feat_dim) -> (the last part, its prototype layer or None) is called after the head is
    built (so a fixed seed gives the same weights whatever the method's entry does); normalize: the
    last part sees L2-normalised embeddings (SwAV), which are also what the loss gets as z.
    forward(views) takes a list of view batches, each (B, 3, S, S) (sizes may differ between views:
    multi-crop), runs each run of equal-sized views as one batch, and returns Outputs."""

    def __init__(self, arch, cifar_stem, head, last, normalize=False, zero_init_residual=False):
        super().__init__()
        self.backbone, feat_dim = build_backbone(arch, cifar_stem, zero_init_residual)
        self.head, dim = projection_head(head, feat_dim)
        self.normalize = normalize
        self.out, protos = last(dim, feat_dim)
        # where the prototypes are inside `out` ("" when `out` is them): a name, not a second
        # reference, which would list them twice in the state_dict
        self.prototypes_at = next((n for n, m in self.out.named_modules() if m is protos), None)

    @property
    def prototypes(self):
        return None if self.prototypes_at is None else self.out.get_submodule(self.prototypes_at)

    def forward(self, views):
        embeddings, outputs, features, i = [], [], [], 0
        while i < len(views):
            j = i + 1
            while j < len(views) and views[j].shape[-1] == views[i].shape[-1]:
                j += 1
            h = self.backbone(torch.cat(views[i:j]))  # ((j - i) B, F)
            z = self.head(h)  # ((j - i) B, D)
            if self.normalize:
                z = F.normalize(z, dim=1)
            embeddings += z.chunk(j - i)
            outputs += self.out(z).chunk(j - i)
            features += h.chunk(j - i)
            i = j
        return Outputs(embeddings, outputs, features)


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) that in training mode, with `groups` > 1, splits the batch into that
    many equal runs of consecutive rows and normalises each with its own statistics: in one forward,
    what `groups` BatchNorm calls one after another do, running statistics included. EMATeacher
    turns its copy's BatchNorm layers into these (same parameters, buffers and state_dict keys)."""
    groups = 1

    def _check_input_dim(self, x):
        pass  # (B, C) or (B, C, H, W), as the BatchNorm1d or 2d it was

    def forward(self, x):
        if not self.training or self.groups == 1:
            return super().forward(x)
        G = self.groups
        xg = x.unflatten(0, (G, -1)).float()  # (G, B / G, C, ...)
        dims = [1, *range(3, xg.dim())]  # all but the group and the channel
        var, mean = torch.var_mean(xg, dims, correction=0, keepdim=True)  # (G, 1, C, 1, ...) each
        y = (xg - mean) * (var + self.eps).rsqrt()  # (G, B / G, C, ...)
        if self.affine:
            shape = (-1,) + (1,) * (x.dim() - 2)  # (C, 1, ...): broadcast over the spatial dims
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            # G updates r <- (1 - m) r + m s_g in turn: r (1 - m)^G + sum_g m (1 - m)^(G-1-g) s_g
            m, n = self.momentum, xg[0, :, 0].numel()  # n: values per group and channel
            w = m * (1 - m) ** torch.arange(G - 1, -1, -1, device=x.device).float()  # (G,)
            self.running_mean.mul_((1 - m) ** G).add_(w @ mean.view(G, -1))
            unbiased = var.view(G, -1) * (n / (n - 1))  # (G, C)
            self.running_var.mul_((1 - m) ** G).add_(w @ unbiased)
            self.num_batches_tracked.add_(G)
        return y.flatten(0, 1).to(x.dtype)


def shuffle_group_size(batch, bn_group):
    """Images per group of MoCo's shuffled BN: the largest divisor of the batch up to
    min(bn_group, batch // 2) (equal groups, at least two; one group of 1 for a batch of 1)."""
    return max((d for d in range(1, min(bn_group, batch // 2) + 1) if batch % d == 0), default=1)


class EMATeacher:
    """A copy of the student whose weights follow an exponential moving average of the student's:
    teacher = m * teacher + (1 - m) * student after every step (BYOL's target network, MoCo's key
    encoder, the published CARP's teacher). No gradient reaches it; its BatchNorm layers normalise
    with the batch's statistics, as the student's do.

    bn_group (MoCo v2's shuffled BN): the batch's images are split at random into equal groups of at
    most bn_group images (both their views), at least two groups, each normalised with its own
    statistics, so a key is never normalised with the batch its query was (the leak MoCo shuffles BN
    against; its authors' one-GPU CIFAR demo splits BN the same way). The group size is the largest
    divisor of the batch up to min(bn_group, batch // 2): 32 for a batch of 256, 1 for a prime one.
    All groups go through in one forward (GroupBatchNorm); under DDP each rank groups its own share,
    without SyncBatchNorm."""

    def __init__(self, student, bn_group=None):
        self.net = copy.deepcopy(student).requires_grad_(False)
        self.run, self.bn_group = self.net, bn_group
        self.group_norms, self.generator = [], None
        if bn_group:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.__class__ = GroupBatchNorm  # the same module, its forward the grouped one
                    self.group_norms.append(m)

    def compile(self):
        self.run = torch.compile(self.net)
        return self

    @torch.no_grad()
    def update(self, student, momentum):
        torch._foreach_lerp_(list(self.net.parameters()),
                             [p.detach() for p in student.parameters()], 1 - momentum)

    @torch.no_grad()
    def __call__(self, views, seed=0):
        """views -> Outputs, as Model.forward's (without h under bn_group); `seed` draws the
        bn_group order."""
        batch, V = views[0].shape[0], len(views)
        if not self.bn_group:
            return self.run(views)
        size = shuffle_group_size(batch, self.bn_group)
        device = views[0].device  # drawn there: a copy from the host would wait for the GPU
        if self.generator is None:  # made once, seeded at every call
            self.generator = torch.Generator(device)
        order = torch.randperm(batch, device=device,  # (B,)
                               generator=self.generator.manual_seed(seed))
        # the rows of torch.cat(views) group by group, a group's images in every view: (G, V, size)
        views_at = batch * torch.arange(V, device=order.device)  # (V,)
        rows = (order.view(-1, 1, size) + views_at[:, None]).flatten()  # (V B,)
        for m in self.group_norms:
            m.groups = batch // size
        (z,), (out,), _ = self.run([torch.cat(views)[rows]])  # (V B, D), (V B, K or D)
        for m in self.group_norms:
            m.groups = 1
        undo = rows.argsort()  # (V B,): back to torch.cat(views)'s order
        # no backbone features h: nothing reads the teacher's
        return Outputs(*(list(t[undo].chunk(V)) for t in (z, out)))


class Queue:
    """The last `size` rows pushed (keys, embeddings), the oldest overwritten first: MoCo's
    negatives (filled with random unit keys at the start, as MoCo does), SwAV's bank (empty at the
    start, used once full). `size` must be a multiple of the rows pushed per step (train.py
    checks)."""

    def __init__(self, size, dim, device, random_fill_seed=None):
        if random_fill_seed is None:
            self.rows, self.filled = torch.zeros(size, dim, device=device), 0
        else:
            g = torch.Generator().manual_seed(random_fill_seed)
            rows = F.normalize(torch.randn(size, dim, generator=g), dim=1)  # (size, dim)
            self.rows, self.filled = rows.to(device), size
        self.ptr = 0
        # a value of its own: a compiled step reads `full`, which changes once (reading `filled`
        # there would make a new graph at every step until the queue is full)
        self.full = self.filled == size

    @torch.no_grad()
    def push(self, rows):
        self.rows[self.ptr:self.ptr + len(rows)] = rows.float()
        self.ptr = (self.ptr + len(rows)) % len(self.rows)
        self.filled = min(self.filled + len(rows), len(self.rows))
        self.full = self.filled == len(self.rows)

    def state_dict(self):
        return {"rows": self.rows, "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state):
        self.rows.copy_(state["rows"])
        self.ptr, self.filled = state["ptr"], state["filled"]
        self.full = self.filled == len(self.rows)
