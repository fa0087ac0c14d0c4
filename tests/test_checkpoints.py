"""checkpoints.py and evaluate.py's --ckpt / --weights / --checkpoint-key: a tiny file in each
layout other libraries write (their key names and nesting, around a torchvision resnet18 with
weights=None wrapped as they wrap it), read into the backbone; a run.pt's student and teacher."""
import argparse
import copy
import json
import pathlib
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import checkpoints
import evaluate
import model as models
from test_evaluate import TINY
from test_train import CARL, run_main


class DDP(nn.Module):
    """What DistributedDataParallel adds to a state dict: the `module.` prefix."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def mlp(in_dim, hidden, out):  # Linear-BN-ReLU-Linear: SwAV's, solo-learn's and VICReg's heads
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


def moco_v3_mlp(in_dim, hidden, out):  # its _build_mlp(2, ...): the last BatchNorm has no affine
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False))


def resnet18(seed, cifar_padding=None, **kwargs):
    """torchvision resnet18, BatchNorm affine parameters and running statistics drawn at random as
    after training (at init BN is the identity in eval mode, which would hide a statistics mix-up);
    cifar_padding: a 3x3 stride-1 conv1 with that padding and no max-pool."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None, **kwargs)
    if cifar_padding is not None:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=cifar_padding, bias=False)
        net.maxpool = nn.Identity()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return net


def features(resnet, x):
    """The source network's backbone features: everything up to the pooled (B, 512)."""
    net = copy.deepcopy(resnet).eval()
    net.fc = nn.Identity()
    with torch.no_grad():
        return net(x)  # (B, 512)


def optimizer_state(net, **group_extras):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt.param_groups[0].update(group_extras)
    return opt.state_dict()


def exclude_bias_and_norm(p):  # VICReg's LARS filter, kept by its optimizer in every param group
    return p.ndim == 1


# ---------------------------------------------------------------- writers: one per layout
# Each writes the file as its library does and returns (path, {network name: source ResNet}).

def dino_head():
    head = nn.Module()  # DINOHead / CARPHead: an MLP, then a weight-normalised last layer
    head.mlp = nn.Sequential(nn.Linear(512, 32), nn.GELU(), nn.Linear(32, 16))
    head.last_layer = nn.Module()
    head.last_layer.weight_g = nn.Parameter(torch.ones(20, 1))
    head.last_layer.weight_v = nn.Parameter(torch.randn(20, 16))
    return head


def multi_crop_wrapper(resnet):  # backbone.fc = Identity, then backbone + head
    wrapper = nn.Module()
    wrapper.backbone, wrapper.head = copy.deepcopy(resnet), dino_head()
    wrapper.backbone.fc = nn.Identity()
    return wrapper


def write_dino(tmp_path, monkeypatch, carp=False):
    nets = {"student": resnet18(1, zero_init_residual=carp),
            "teacher": resnet18(2, zero_init_residual=carp)}
    student, teacher = (DDP(multi_crop_wrapper(nets[k])) for k in ("student", "teacher"))
    save = {"student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer_state(student, weight_decay_filter=None,
                                         lars_adaptation_filter=None),
            "epoch": 100, "args": argparse.Namespace(arch="resnet18", out_dim=20, output_dir=".",
                                                     global_crops_scale=(0.4, 1.0)),
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 0}}
    if not carp:
        save["dino_loss"] = {"center": torch.zeros(1, 20)}
    torch.save(save, tmp_path / "checkpoint.pth")
    return tmp_path / "checkpoint.pth", nets


def write_carp(tmp_path, monkeypatch):
    return write_dino(tmp_path, monkeypatch, carp=True)


def write_mocov3(tmp_path, monkeypatch):
    moco = nn.Module()  # MoCo_ResNet: each encoder's fc replaced by the projector MLP
    moco.base_encoder = resnet18(3, num_classes=64, zero_init_residual=True)
    moco.momentum_encoder = resnet18(4, num_classes=64, zero_init_residual=True)
    for enc in (moco.base_encoder, moco.momentum_encoder):
        enc.fc = moco_v3_mlp(512, 64, 32)
    moco.predictor = moco_v3_mlp(32, 64, 32)
    model = DDP(moco)
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": model.state_dict(),
                "optimizer": optimizer_state(model), "scaler": {"scale": 1024.0}},
               tmp_path / "checkpoint_0099.pth.tar")
    return tmp_path / "checkpoint_0099.pth.tar", {"": moco.base_encoder}


def write_mocov2(tmp_path, monkeypatch):
    moco = nn.Module()  # MoCo: encoder_q and encoder_k, fc an MLP head (--mlp), the queue buffers
    moco.encoder_q, moco.encoder_k = resnet18(5, num_classes=16), resnet18(6, num_classes=16)
    for enc in (moco.encoder_q, moco.encoder_k):
        enc.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), enc.fc)
    moco.register_buffer("queue", torch.randn(16, 64))
    moco.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    model = DDP(moco)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": model.state_dict(),
                "optimizer": optimizer_state(model)}, tmp_path / "checkpoint_0199.pth.tar")
    return tmp_path / "checkpoint_0199.pth.tar", {"": moco.encoder_q}


def swav_resnet(seed):  # src/resnet50.py: torchvision's names, no fc, projection_head, prototypes
    net = resnet18(seed)
    net.fc = nn.Identity()
    net.projection_head = mlp(512, 64, 16)
    net.prototypes = nn.Linear(16, 30, bias=False)
    return net


def write_swav(tmp_path, monkeypatch):
    net = swav_resnet(7)
    model = DDP(net)
    torch.save({"epoch": 400, "state_dict": model.state_dict(), "optimizer": optimizer_state(model),
                "amp": {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 0}}},
               tmp_path / "checkpoint.pth.tar")
    return tmp_path / "checkpoint.pth.tar", {"": net}


def write_swav_released(tmp_path, monkeypatch):  # the released weights: the DDP state dict itself
    net = swav_resnet(8)
    torch.save(DDP(net).state_dict(), tmp_path / "swav_800ep_pretrain.pth.tar")
    return tmp_path / "swav_800ep_pretrain.pth.tar", {"": net}


def write_vicreg(tmp_path, monkeypatch):
    vicreg = nn.Module()  # VICReg: backbone (no fc) and the expander
    vicreg.backbone = resnet18(9, zero_init_residual=True)
    vicreg.backbone.fc = nn.Identity()
    vicreg.projector = mlp(512, 64, 64)
    model = DDP(vicreg)
    # main_vicreg.py runs as a script: its LARS filter pickles as __main__.exclude_bias_and_norm
    monkeypatch.setattr(exclude_bias_and_norm, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "exclude_bias_and_norm", exclude_bias_and_norm,
                        raising=False)
    opt = optimizer_state(model, weight_decay_filter=exclude_bias_and_norm,
                          lars_adaptation_filter=exclude_bias_and_norm)
    torch.save(dict(epoch=100, model=model.state_dict(), optimizer=opt), tmp_path / "model.pth")
    return tmp_path / "model.pth", {"": vicreg.backbone}


def write_barlowtwins(tmp_path, monkeypatch):
    bt = nn.Module()  # BarlowTwins: torchvision backbone (fc = Identity), projector, affine-free bn
    bt.backbone = resnet18(10, zero_init_residual=True)
    bt.backbone.fc = nn.Identity()
    bt.projector = nn.Sequential(nn.Linear(512, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(True),
                                 nn.Linear(64, 64, bias=False))
    bt.bn = nn.BatchNorm1d(64, affine=False)
    model = DDP(bt)
    opt = optimizer_state(model, weight_decay_filter=True, lars_adaptation_filter=True)
    torch.save(dict(epoch=1000, model=model.state_dict(), optimizer=opt),
               tmp_path / "checkpoint.pth")
    return tmp_path / "checkpoint.pth", {"": bt.backbone}


def solo_learn(tmp_path, cifar):
    method = nn.Module()  # BYOL as solo-learn builds it (BaseMomentumMethod), fc = Identity
    method.backbone = resnet18(11, cifar_padding=2 if cifar else None)
    method.momentum_backbone = resnet18(12, cifar_padding=2 if cifar else None)
    for net in (method.backbone, method.momentum_backbone):
        net.fc = nn.Identity()
    method.classifier = nn.Linear(512, 10)
    method.projector, method.momentum_projector = mlp(512, 64, 32), mlp(512, 64, 32)
    method.predictor = mlp(32, 64, 32)
    sched = {"warmup_epochs": 10, "max_epochs": 400, "warmup_start_lr": 3e-5, "eta_min": 0.0,
             "base_lrs": [1.0, 0.1], "last_epoch": 3, "_step_count": 4, "_last_lr": [0.3, 0.1]}
    path = tmp_path / "byol-cifar10-epoch=399.ckpt"
    loops = {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 400}}}}
    torch.save({"epoch": 399, "global_step": 3, "pytorch-lightning_version": "2.0.2",
                "state_dict": method.state_dict(), "loops": loops, "callbacks": {},
                "optimizer_states": [optimizer_state(method)], "lr_schedulers": [sched]}, path)
    return path, {"": method.backbone}


def write_solo_learn(tmp_path, monkeypatch):  # an ImageNet-100 run: the torchvision stem
    return solo_learn(tmp_path, cifar=False)


def write_torchvision(tmp_path, monkeypatch):  # a plain state dict, fc included
    net = resnet18(13)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    return tmp_path / "resnet18.pth", {"": net}


WRITERS = {"DINO": write_dino, "CARP": write_carp, "MoCo v3": write_mocov3, "MoCo v2": write_mocov2,
           "SwAV": write_swav, "SwAV released": write_swav_released, "VICReg": write_vicreg,
           "Barlow Twins": write_barlowtwins, "solo-learn": write_solo_learn,
           "torchvision": write_torchvision}


def read_into_backbone(path, x, **kw):
    """Read `path` as evaluate.py does, load the state strictly into the backbone evaluate.py builds
    (arch and stem as evaluate.resolve finds them) and return (features of x, read Checkpoint)."""
    ckpt = checkpoints.read_backbone(str(path), **kw)
    args = evaluate.resolve(evaluate.parse_args(["--ckpt", str(path)]), ckpt.args, ckpt.state)
    net, _ = models.build_backbone(args.arch, args.cifar_stem)
    net.load_state_dict(ckpt.state)  # strict: every key, none left over
    with torch.no_grad():
        return net.eval()(x), ckpt


# ---------------------------------------------------------------- every layout

@pytest.mark.parametrize("library", WRITERS)
def test_layout_loads_every_backbone_key_and_gives_its_features(library, tmp_path, monkeypatch):
    path, nets = WRITERS[library](tmp_path, monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    for name, source in nets.items():  # DINO, CARP: the student, the teacher; others: the one
        got, ckpt = read_into_backbone(path, x, weights=name or None)
        torch.testing.assert_close(got, features(source, x), rtol=1e-4, atol=1e-5)
        assert ckpt.args == {"arch": "resnet18"}
    layout = checkpoints.find_layout(checkpoints.load_checkpoint(str(path), keys=()))[0]
    assert (layout.networks is not None) == (library in ("DINO", "CARP"))
    default = checkpoints.read_backbone(str(path))
    if layout.networks:
        assert default.weights == f"{layout.name}, teacher"
        assert all(torch.equal(default.state[k], v) for k, v in checkpoints.read_backbone(
            str(path), weights="teacher").state.items())
    else:
        assert default.weights == layout.name


def test_resnet50_state_dict_with_fc(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    x = torch.randn(1, 3, 32, 32)
    got, ckpt = read_into_backbone(tmp_path / "resnet50.pth", x)
    assert ckpt.args == {"arch": "resnet50"} and "fc.weight" not in ckpt.state
    torch.testing.assert_close(got, features(net, x), rtol=1e-4, atol=1e-5)


def test_solo_learn_cifar_stem_pads_by_two(tmp_path, capsys):
    path, nets = solo_learn(tmp_path, cifar=True)
    x = torch.randn(2, 3, 8, 8)
    ckpt = checkpoints.read_backbone(str(path))
    assert "solo-learn pads its CIFAR stem's 3x3 conv1 by 2 pixels" in capsys.readouterr().err
    args = evaluate.resolve(evaluate.parse_args(["--ckpt", str(path)]), ckpt.args, ckpt.state)
    assert args.cifar_stem  # read from conv1's 3x3 kernel
    net, _ = models.build_backbone(args.arch, args.cifar_stem)
    net.load_state_dict(ckpt.state)  # strict: every key, none left over
    net.conv1.padding = (2, 2)  # with solo-learn's padding the features are solo-learn's own
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), features(nets[""], x), rtol=1e-4, atol=1e-5)


def test_checkpoint_key_picks_an_entry(tmp_path, monkeypatch):
    path, nets = write_dino(tmp_path, monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    got, ckpt = read_into_backbone(path, x, key="student")
    assert ckpt.weights == "entry 'student'"
    torch.testing.assert_close(got, features(nets["student"], x), rtol=1e-4, atol=1e-5)
    message = ("^error: --checkpoint-key model: .* has no such entry; its entries: student, "
               "teacher, optimizer, epoch, args, fp16_scaler, dino_loss$")
    with pytest.raises(SystemExit, match=message):
        checkpoints.read_backbone(str(path), key="model")
    with pytest.raises(SystemExit, match="--checkpoint-key epoch: that entry .* holds no ResNet"):
        checkpoints.read_backbone(str(path), key="epoch")


def test_unknown_layout_lists_the_layouts_and_its_keys(tmp_path):
    torch.save({"net": {"encoder.weight": torch.zeros(2)}, "epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as exc:
        checkpoints.read_backbone(str(tmp_path / "other.pt"))
    message = str(exc.value.code)
    assert message.startswith(f"error: {tmp_path / 'other.pt'} is in none of the layouts evaluate")
    assert all(layout.name in message for layout in checkpoints.LAYOUTS)
    assert message.endswith("its top-level keys: net, epoch") and "\n" not in message


def test_only_the_allowed_globals_load(tmp_path):
    # a pathlib.Path in the args (some DINO forks keep one): a class no layout needs, refused
    args = argparse.Namespace(arch="resnet18", output_dir=pathlib.Path("out"))
    torch.save({"teacher": DDP(multi_crop_wrapper(resnet18(0))).state_dict(), "args": args},
               tmp_path / "path.pth")
    with pytest.raises(SystemExit, match=r"^error: cannot read checkpoint .*path\.pth: it holds "
                                         r"pathlib\.\w*Path beside"):
        checkpoints.read_backbone(str(tmp_path / "path.pth"))


# ---------------------------------------------------------------- student and teacher of a run.pt

@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    run_main([*CARL, "--teacher", "ema", "--epochs", "1", "--out-dir", str(out)])
    return out


def backbone_of(network_state):
    return {k[len("backbone."):]: v for k, v in network_state.items() if k.startswith("backbone.")}


def test_weights_student_and_teacher_of_a_run(ema_run):
    saved = torch.load(ema_run / "run.pt", weights_only=True)
    student, teacher = backbone_of(saved["model"]), backbone_of(saved["teacher"])
    assert not torch.equal(student["conv1.weight"], teacher["conv1.weight"])
    for weights, expected in ((None, teacher), ("teacher", teacher), ("student", student)):
        ckpt = checkpoints.read_backbone(str(ema_run / "run.pt"), weights)
        assert ckpt.weights == (weights or "teacher") and ckpt.args == saved["args"]
        assert ckpt.state.keys() == expected.keys()
        assert all(torch.equal(ckpt.state[k], v) for k, v in expected.items())
    by_key = checkpoints.read_backbone(str(ema_run / "run.pt"), key="model")
    assert by_key.weights == "entry 'model'" and by_key.state.keys() == student.keys()


def test_evaluate_says_and_records_which_weights(ema_run, capsys):
    for flags, weights in (([], "teacher"), (["--weights", "student"], "student")):
        evaluate.main(["--ckpt", str(ema_run / "run.pt"), "--protocol", "knn", "--knn-k", "20",
                       *TINY, *flags])
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith(f"evaluating {ema_run / 'run.pt'} ({weights}; resnet18, cifar stem")
        with open(ema_run / "eval.jsonl") as f:
            assert json.loads(f.readlines()[-1])["weights"] == weights


def test_weights_teacher_of_a_run_without_one(ema_run, tmp_path):
    saved = torch.load(ema_run / "run.pt", weights_only=True)
    saved["teacher"] = None  # what train.py writes for --teacher none
    torch.save(saved, tmp_path / "run.pt")
    assert checkpoints.read_backbone(str(tmp_path / "run.pt")).weights == "student"
    message = (f"^error: --weights teacher: {tmp_path / 'run.pt'} holds no EMA teacher \\(the run "
               f"had --teacher none\\); --weights student evaluates its one network$")
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--ckpt", str(tmp_path / "run.pt"), "--weights", "teacher"])


def test_weights_on_a_file_with_one_network(ema_run):
    with pytest.raises(SystemExit, match=r"^error: --weights student: .*backbone\.pt \(torchvision "
                                         r"ResNet state dict\) holds one network; --weights picks"):
        evaluate.main(["--ckpt", str(ema_run / "backbone.pt"), "--weights", "student"])
    with pytest.raises(SystemExit, match=r"^error: --checkpoint-key not allowed with argument "
                                         r"--weights$"):  # one or the other
        evaluate.parse_args(["--ckpt", "x", "--weights", "student", "--checkpoint-key", "model"])


def test_evaluate_a_dino_checkpoint(tmp_path, monkeypatch, capsys):
    path, _ = write_dino(tmp_path, monkeypatch)
    evaluate.main(["--ckpt", str(path), "--protocol", "knn", "--knn-k", "20", *TINY])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"evaluating {path} (CARP / DINO checkpoint.pth, teacher; resnet18, "
                            f"imagenet stem, pretrained on unknown) on synthetic")
    with open(tmp_path / "eval.jsonl") as f:
        record = json.loads(f.readline())
    assert (record["weights"], record["ckpt_epoch"]) == ("CARP / DINO checkpoint.pth, teacher", 100)
