"""Reading checkpoints: this project's run.pt and backbone.pt, and other libraries' files, into
the state dict of a torchvision ResNet without `fc` (what model.build_backbone makes).

    python evaluate.py --ckpt dino/checkpoint.pth             # the teacher, as CARP's loader does
    python evaluate.py --ckpt dino/checkpoint.pth --weights student
    python evaluate.py --ckpt moco_v3/checkpoint_0099.pth.tar  # the base encoder
    python evaluate.py --ckpt some.pth --checkpoint-key model  # the weights under one entry

The layouts read (LAYOUTS; a file's is found from its entries and the prefix of its conv1):
  run.pt        train.py's: "model" (the student, keys backbone.*), "teacher" (the EMA teacher's
                whole network, or None), "args", "epoch", "provenance", the optimizer, the queue...
  CARP / DINO   checkpoint.pth: "student" and "teacher", each a DistributedDataParallel-wrapped
                MultiCropWrapper (module.backbone.*, module.head.*); "args" (an argparse
                Namespace), "optimizer", "epoch", "fp16_scaler", DINO's "dino_loss"
  MoCo v3       "state_dict": module.base_encoder.* (its fc is the projector),
                module.momentum_encoder.*, module.predictor.*; "arch", "optimizer", "scaler"
  MoCo v1/v2    "state_dict": module.encoder_q.* (fc: the head), module.encoder_k.*, module.queue
  SwAV, DeepCluster-v2  "state_dict" (or the file itself): module.*, with module.projection_head.*
                and module.prototypes.*; "optimizer", "amp"
  VICReg, Barlow Twins  "model": module.backbone.*, module.projector.* (Barlow Twins: module.bn.*);
                "optimizer", "epoch"
  solo-learn    Lightning .ckpt: "state_dict" with backbone.* (before 2022: encoder.*), projector.*,
                classifier.* (momentum methods: momentum_backbone.*), "pytorch-lightning_version",
                "loops", ...; its CIFAR stem pads the 3x3 conv1 by 2 pixels, this project's by 1
  state dict    a torchvision ResNet's own keys, fc or not: backbone.pt, backbone_teacher.pt,
                backbone_ep*.pt, Barlow Twins' and VICReg's resnet50.pth, DINO's released backbones
Only conv1, bn1 and layer1-4 are kept: heads, projectors, prototypes and fc are dropped. Every file
is read with torch.load(weights_only=True), allowing only the few objects those files hold besides
tensors, containers and numbers (SAFE_GLOBALS).
"""
import argparse
import collections
import os
import re
import sys

import torch

import methods

BACKBONE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")  # a ResNet but its fc
# name; the top-level entries that may hold the weights, preferred first (None: the file itself);
# the prefixes of the backbone's keys there; networks: --weights -> entry, where there are two.
Layout = collections.namedtuple("Layout", "name entries prefixes networks")
RUN_PT = Layout("run.pt from train.py", ("teacher", "model"), ("backbone.",),
                {"student": "model", "teacher": "teacher"})
SOLO_LEARN = Layout("solo-learn .ckpt", ("state_dict",), ("backbone.", "encoder."), None)
LAYOUTS = (
    RUN_PT,
    Layout("CARP / DINO checkpoint.pth", ("teacher", "student"), ("module.backbone.", "backbone."),
           {"student": "student", "teacher": "teacher"}),
    Layout("MoCo v3 checkpoint", ("state_dict",), ("module.base_encoder.",), None),
    Layout("MoCo v1/v2 checkpoint", ("state_dict",), ("module.encoder_q.",), None),
    Layout("SwAV / DeepCluster-v2 checkpoint", ("state_dict", None), ("module.",), None),
    Layout("VICReg / Barlow Twins checkpoint", ("model",), ("module.backbone.",), None),
    SOLO_LEARN,
    Layout("torchvision ResNet state dict", (None,), ("",), None),
)
# every layout's prefixes, longest first: "module.backbone." is tried before "module."
PREFIXES = tuple(sorted(dict.fromkeys(p for layout in LAYOUTS for p in layout.prefixes),
                        key=len, reverse=True))


def _inert(*args, **kwargs):
    """Stands in for a function a checkpoint names by reference; reading weights never calls it."""
    return None


# CARP's and DINO's argparse.Namespace of arguments, and VICReg's LARS filter, a function its
# optimizer state keeps in every param group (pickled by name: __main__ when run as a script,
# main_vicreg under submitit), resolved to the inert stand-in.
SAFE_GLOBALS = [argparse.Namespace, (_inert, "__main__.exclude_bias_and_norm"),
                (_inert, "main_vicreg.exclude_bias_and_norm")]

# provenance: train.py's record of what made a run.pt (commit, versions, device), else None
Checkpoint = collections.namedtuple("Checkpoint", "state args epoch weights provenance")


def fail(msg):
    raise SystemExit(f"error: {msg}")


def load_checkpoint(path, keys=("model", "args")):
    """torch.load(weights_only=True) of a dict holding `keys`; one clear error line naming the file
    for anything else: missing, a folder, empty, not a PyTorch file, truncated, other objects."""
    if os.path.isdir(path):
        fail(f"checkpoint {path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        fail(f"cannot read checkpoint {path}: {e.strerror or e}")
    if not head:
        fail(f"cannot read checkpoint {path}: it is empty (0 bytes)")
    # torch.save writes a zip archive (PK..), its legacy format a pickle (protocol 2: \x80\x02)
    if head != b"PK\x03\x04" and not head.startswith(b"\x80\x02"):
        fail(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (torch.save writes a "
             f"zip archive)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, a pickle of objects weights_only refuses...
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split("\n")  # ANSI colours dropped
        if "Weights only load failed" in lines[0]:  # not its advice: weights_only=False runs code
            named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = (f"it holds {named[1] if named else 'objects'} beside tensors and plain values, "
                    f"which is not loaded (unpickling it could run code)")
        else:
            detail = next((line.strip() for line in lines if line.strip()), "")[:200]
            detail = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
            what = f"it is truncated or corrupted ({detail})"
        fail(f"cannot read checkpoint {path}: {what}")
    if keys and (not isinstance(ckpt, dict) or any(k not in ckpt for k in keys)):
        fail(f"{path} is not a run.pt written by train.py (no 'model'/'args' entries)")
    return ckpt


def backbone_prefix(state):
    """The prefix of a ResNet backbone's keys in the dict `state` (PREFIXES in turn), or None."""
    if not isinstance(state, dict):
        return None
    return next((p for p in PREFIXES if torch.is_tensor(state.get(p + "conv1.weight"))), None)


def load_backbone_state(state, prefix=None):
    """The backbone's weights in `state` under `prefix` (default: found), named as torchvision's;
    fc, heads, projectors and any other network in the dict left out."""
    prefix = backbone_prefix(state) if prefix is None else prefix
    if prefix is None:
        return {}
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and k[len(prefix):].split(".")[0] in BACKBONE_MODULES}


def arch_of(state):
    """resnet50 where the blocks are bottlenecks (they have a conv3), else resnet18."""
    return "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"


def find_layout(ckpt):
    """(layout, entry, prefix) of the first of LAYOUTS whose weights `ckpt` holds, or None."""
    for layout in LAYOUTS:
        if layout is RUN_PT and not ("model" in ckpt and "args" in ckpt):
            continue
        for entry in layout.entries:
            prefix = backbone_prefix(ckpt if entry is None else ckpt.get(entry))
            if prefix in layout.prefixes:
                return layout, entry, prefix
    return None


def shown_keys(d, n=8):
    keys = [str(k) for k in d]
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def read_backbone(path, weights=None, key=None):
    """Checkpoint(backbone state dict, the run's train.py args (other files: {"arch": read from
    the weights}), epochs done or None, which weights, provenance or None) from a file in any of
    LAYOUTS.

    weights: "student" or "teacher" out of a run.pt or a CARP / DINO file (default: the teacher
    where there is one, as the published CARP evaluates; of a run.pt, the one its method's paper
    evaluates: the online network of BYOL and MoCo). key: the weights under this top-level entry
    instead. Anything else is one error line."""
    ckpt = load_checkpoint(path, keys=())
    if not isinstance(ckpt, dict):
        fail(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    found = find_layout(ckpt)
    if key is not None:
        if key not in ckpt:
            fail(f"--checkpoint-key {key}: {path} has no such entry; its entries: "
                 f"{shown_keys(ckpt)}")
        entry, prefix, what = key, backbone_prefix(ckpt[key]), f"entry '{key}'"
        if prefix is None:
            fail(f"--checkpoint-key {key}: that entry of {path} holds no ResNet weights (no "
                 f"conv1.weight under any of the prefixes {', '.join(map(repr, PREFIXES))})")
    elif found is None:
        names = "; ".join(layout.name for layout in LAYOUTS)
        fail(f"{path} is in none of the layouts evaluate.py reads ({names}); its top-level keys: "
             f"{shown_keys(ckpt)}")
    else:
        layout, entry, prefix = found
        what = layout.name
        if layout.networks:
            has_teacher = backbone_prefix(ckpt.get(layout.networks["teacher"])) is not None
            default = "teacher" if has_teacher else "student"
            if layout is RUN_PT and has_teacher:  # the network the method's paper evaluates
                method = methods.METHODS.get(dict(ckpt.get("args") or {}).get("method"))
                default = method.evaluated if method else default
            want = weights or default
            entry = layout.networks[want]
            prefix = backbone_prefix(ckpt.get(entry))
            if prefix is None and layout is RUN_PT:  # "teacher": None, a run without an EMA teacher
                fail(f"--weights {want}: {path} holds no EMA teacher (the run had --teacher none); "
                     f"--weights student evaluates its one network")
            if prefix is None:
                fail(f"--weights {want}: the '{entry}' entry of {path} ({layout.name}) holds no "
                     f"ResNet weights")
            what = want if layout is RUN_PT else f"{layout.name}, {want}"
        elif weights:
            fail(f"--weights {weights}: {path} ({layout.name}) holds one network; --weights picks "
                 f"the student or the teacher out of a run.pt or a CARP / DINO checkpoint.pth")
    state = load_backbone_state(ckpt if entry is None else ckpt[entry], prefix)
    if found is not None and found[0] is SOLO_LEARN and state["conv1.weight"].shape[-1] == 3:
        print(f"warning: {path}: solo-learn pads its CIFAR stem's 3x3 conv1 by 2 pixels, this "
              f"project by 1, so the features differ a little from those solo-learn evaluates",
              file=sys.stderr, flush=True)
    own = found is not None and found[0] is RUN_PT
    epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
    made = ckpt.get("provenance") if own else None  # None where a run.pt has no provenance
    return Checkpoint(state, ckpt["args"] if own else {"arch": arch_of(state)}, epoch, what, made)
