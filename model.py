"""Networks: ResNet backbone (torchvision, optional CIFAR stem), projection head, assigners.

    image -> backbone -> (B, F) features -> projection head -> (B, 128) z -> assigner -> (B, K) logits

The backbone is a plain torchvision ResNet with `fc` replaced by Identity, so its state_dict
loads into `torchvision.models.resnet18()` (after the same stem change) with only `fc` missing.
"""
import os
import re

import torch
import torch.nn as nn
import torchvision

ARCHS = ("resnet18", "resnet50")
EMBED_DIM = 128
CIFAR_STEM_MAX_PX = 64  # images up to this size get the CIFAR stem unless told otherwise


def build_backbone(arch, cifar_stem):
    """torchvision ResNet without pretrained weights and without `fc`; returns (net, feature dim).

    The CIFAR stem (3x3 conv, stride 1, no max-pool) keeps the spatial resolution of small
    (<= 64 px) images, which the ImageNet stem (7x7 stride 2 + max-pool) would shrink 4x at once.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features  # 512 for resnet18, 2048 for resnet50
    net.fc = nn.Identity()
    return net, feat_dim


def mlp(in_dim, hidden, out_dim, hidden_layers):
    """`hidden_layers` x (Linear-BN-ReLU), then a plain Linear to out_dim."""
    layers, d = [], in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class AssignmentModel(nn.Module):
    """Backbone + projection head + assigner. CARL: the assigner is one bias-free Linear(128, K) whose
    weight rows are the K prototypes. CARP: a 2-layer MLP with BatchNorm (hidden as wide as
    the projection head) whose last layer holds the prototypes."""

    def __init__(self, method, arch="resnet18", cifar_stem=True, num_prototypes=100, proto_init_gain=1.0):
        super().__init__()
        self.backbone, feat_dim = build_backbone(arch, cifar_stem)
        hidden = feat_dim  # 512 for resnet18, 2048 for resnet50 (thesis 5.8.2 and 6.5.2)
        self.head = mlp(feat_dim, hidden, EMBED_DIM, hidden_layers=2)
        if method == "carl":  # thesis eq. 5.2: q_j = <z, c_j>, no bias (a bias could balance assignments by itself)
            self.assigner = nn.Linear(EMBED_DIM, num_prototypes, bias=False)
        elif method == "carp":
            self.assigner = mlp(EMBED_DIM, hidden, num_prototypes, hidden_layers=1)
        else:
            raise ValueError(f"unknown --method {method!r}; choose carl or carp")
        # Prototypes (the assigner's last layer) start at PyTorch's default init times a gain.
        # With gain 1 the initial logits have a std of ~0.2: assignments start uniform and the
        # loss's gradient reaching the backbone is ~30x weaker than SimCLR's (it grows with the
        # square of the logit scale), which only a long schedule outgrows. Gain 5 (CARL)
        # or 3 (CARP) starts the logits at std ~1 (RESULTS.md, "What was found").
        prototypes = self.assigner if method == "carl" else self.assigner[-1]
        with torch.no_grad():
            prototypes.weight.mul_(proto_init_gain)
            if prototypes.bias is not None:  # CARP's assigner is an MLP: its last layer keeps its bias
                prototypes.bias.mul_(proto_init_gain)

    def forward(self, x):
        z = self.head(self.backbone(x))  # (B, 128)
        return self.assigner(z)  # (B, K) logits


def load_backbone_state(ckpt_state):
    """The backbone weights from a run.pt model state_dict (keys 'backbone.*') or from an
    exported backbone.pt (plain torchvision keys)."""
    if any(k.startswith("backbone.") for k in ckpt_state):
        return {k[len("backbone."):]: v for k, v in ckpt_state.items() if k.startswith("backbone.")}
    return dict(ckpt_state)


def load_checkpoint(path, keys=("model", "args")):
    """torch.load(weights_only=True) of a dict holding `keys`; one clear error for a missing or
    unreadable file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, unsafe pickle...
        first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])[:200]  # drop ANSI colours
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}: {first_line}")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise SystemExit(f"error: {path} is not a run.pt written by train.py (no 'model'/'args' entries)")
    return ckpt


if __name__ == "__main__":  # quick shape check: python model.py
    for arch, px, stem in (("resnet18", 32, True), ("resnet50", 224, False)):
        m = AssignmentModel("carp", arch, stem, 3000).to(memory_format=torch.channels_last)
        out = m(torch.randn(4, 3, px, px).to(memory_format=torch.channels_last))
        print(arch, px, tuple(out.shape))
