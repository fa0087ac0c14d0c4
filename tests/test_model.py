"""model.py: shapes, stems, heads, each method's last part (methods.py builds it), channels_last,
backbone export, the EMA teacher, the queue."""
import argparse

import pytest
import torch
import torch.nn as nn
import torchvision

import checkpoints
import model as models
import train


def model_of(method, num_prototypes=30, arch="resnet18", cifar_stem=True, **flags):
    """The network train.py builds for --method with these flags (the rest at the thesis's)."""
    args = dict(method=method, arch=arch, cifar_stem=cifar_stem, num_prototypes=num_prototypes,
                head="thesis", prototypes="linear", proto_init_gain=1.0, zero_init_residual=False)
    return train.build_model(argparse.Namespace(**{**args, **flags}))


def layer4_shape(m, x):
    out = {}

    def hook(mod, inp, o):
        out["s"] = tuple(o.shape)  # returns None: the output is left alone

    h = m.backbone.layer4.register_forward_hook(hook)
    try:
        y = m([x])[1][0]
    finally:
        h.remove()
    return y, out["s"]


def tv_resnet(arch, cifar_stem):
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_resnet18_cifar_stem_32px_shapes(method):
    torch.manual_seed(0)
    m = model_of(method, 37)
    x = torch.randn(4, 3, 32, 32)
    logits, s4 = layer4_shape(m, x)  # train mode (BatchNorm with a batch of 4)
    assert logits.shape == (4, 37)
    assert s4 == (4, 512, 4, 4)  # stride 8 overall: no stride-2 conv1 and no max-pool
    assert m.backbone(x).shape == (4, 512)
    assert m.head(m.backbone(x)).shape == (4, 128)
    z, out, _ = m([x, x[:, :, :16, :16], x[:, :, :16, :16]])  # a global view and two local ones
    assert ([tuple(t.shape) for t in z] == [(4, 128)] * 3
            and [tuple(t.shape) for t in out] == [(4, 37)] * 3)
    assert m.backbone.conv1.kernel_size == (3, 3) and m.backbone.conv1.stride == (1, 1)
    assert isinstance(m.backbone.maxpool, nn.Identity)
    assert isinstance(m.backbone.fc, nn.Identity)


def imagenet_stem_224px(method, arch, num_prototypes, batch):
    """(model, logits, layer4 output shape) of an eval-mode model without the CIFAR stem at
    224 px."""
    torch.manual_seed(0)
    m = model_of(method, num_prototypes, arch, cifar_stem=False).eval()
    with torch.no_grad():
        logits, s4 = layer4_shape(m, torch.randn(batch, 3, 224, 224))
    return m, logits, s4


def test_resnet18_imagenet_stem_224px_shapes():
    m, logits, s4 = imagenet_stem_224px("carl", "resnet18", 50, batch=2)
    assert logits.shape == (2, 50)
    assert s4 == (2, 512, 7, 7)  # stride 32
    assert m.backbone.conv1.kernel_size == (7, 7) and m.backbone.conv1.stride == (2, 2)
    assert isinstance(m.backbone.maxpool, nn.MaxPool2d)


def test_resnet50_224px_shapes_and_widths():
    m, logits, s4 = imagenet_stem_224px("carp", "resnet50", 30, batch=1)
    assert logits.shape == (1, 30)
    assert s4 == (1, 2048, 7, 7)
    linears = [mod for mod in m.head if isinstance(mod, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(2048, 2048), (2048, 2048),
                                                                  (2048, 128)]
    assert m.out[0].in_features == 128 and m.out[0].out_features == 2048


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="arch"):
        models.build_backbone("resnet34", True)


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_channels_last(method):
    torch.manual_seed(0)
    m = model_of(method, 20).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m([x])[1][0]
        m = m.to(memory_format=torch.channels_last)
        convs = [p for p in m.parameters() if p.ndim == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert not all(p.is_contiguous() for p in convs)  # really changed layout (C > 1)
        out = m([x.to(memory_format=torch.channels_last)])[1][0]
    assert out.shape == (2, 20)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # and a training step works in channels_last
    m.train()
    loss = (m([torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)])[1][0]
            .logsumexp(1).mean())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_carl_assigner_is_one_linear():
    m = model_of("carl", 100)
    assert type(m.out) is nn.Linear and m.prototypes is m.out
    assert (m.out.in_features, m.out.out_features) == (128, 100)
    assert m.out.weight.shape == (100, 128)  # K prototype rows
    assert m.out.bias is None  # thesis eq. 5.2: q_j = <z, c_j>


def test_carp_assigner_is_mlp_with_batchnorm():
    m = model_of("carp", 250)
    a = m.out
    assert isinstance(a, nn.Sequential) and m.prototypes is a[-1]
    kinds = [type(mod) for mod in a]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (a[0].in_features, a[0].out_features) == (128, 512)
    assert a[1].num_features == 512
    assert (a[-1].in_features, a[-1].out_features) == (512, 250)


def test_projection_head_resnet18():
    m = model_of("carl", 10)
    kinds = [type(mod) for mod in m.head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU,
                     nn.Linear]
    linears = [mod for mod in m.head if isinstance(mod, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 512), (512, 512),
                                                                  (512, 128)]
    assert models.EMBED_DIM == 128


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_backbone_state_dict_loads_into_torchvision(cifar_stem):
    torch.manual_seed(0)
    m = model_of("carp", 20, cifar_stem=cifar_stem).eval()
    sd = m.backbone.state_dict()
    tv = tv_resnet("resnet18", cifar_stem)
    res = tv.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"]
    assert res.unexpected_keys == []
    tv.fc = nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 32, 32) if cifar_stem else torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), m.backbone(x))
    # load_backbone_state: from a full model state_dict ('backbone.*' keys) and from a plain export
    full = checkpoints.load_backbone_state(m.state_dict())
    assert full.keys() == sd.keys()
    assert all(torch.equal(full[k], sd[k]) for k in sd)
    assert checkpoints.load_backbone_state(sd).keys() == sd.keys()
    # the stem really differs: the other torchvision stem cannot take these weights
    with pytest.raises(RuntimeError, match="size mismatch"):
        tv_resnet("resnet18", not cifar_stem).load_state_dict(sd, strict=False)


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_proto_init_gain_scales_only_the_prototypes(method):
    torch.manual_seed(0)
    base = model_of(method, 30)
    torch.manual_seed(0)
    scaled = model_of(method, 30, proto_init_gain=4.0)
    protos = (lambda m: m.prototypes)
    assert torch.allclose(protos(scaled).weight, 4.0 * protos(base).weight)
    if method == "carp":  # CARL's prototypes have no bias
        assert torch.allclose(protos(scaled).bias, 4.0 * protos(base).bias)
    others = [k for k in base.state_dict() if not k.startswith("out")]
    assert all(torch.equal(base.state_dict()[k], scaled.state_dict()[k]) for k in others)
    x = torch.randn(8, 3, 32, 32)
    base.eval(), scaled.eval()
    with torch.no_grad():  # the prototypes are the last layer: the logits scale by the gain
        assert torch.allclose(scaled([x])[1][0], 4.0 * base([x])[1][0], atol=1e-5)


# ---------------------------------------------------------------- the other methods' last parts

@pytest.mark.parametrize("method,out_dim", [("simclr", 128), ("mocov2", 128), ("byol", 128),
                                            ("swav", 30)])
def test_baselines_last_parts(method, out_dim):
    torch.manual_seed(0)
    m = model_of(method, 30)
    z, out, _ = m([torch.randn(4, 3, 16, 16)] * 2)
    assert ([tuple(t.shape) for t in z] == [(4, 128)] * 2
            and [tuple(t.shape) for t in out] == [(4, out_dim)] * 2)
    if method in ("simclr", "mocov2"):  # the loss takes z itself
        assert isinstance(m.out, nn.Identity) and torch.equal(z[0], out[0]) and m.prototypes is None
    if method == "byol":  # thesis 5.8.5: the predictor has the projection head's shape
        assert [type(l) for l in m.out] == [type(l) for l in m.head]
        assert [(l.in_features, l.out_features) for l in m.out if isinstance(l, nn.Linear)] == \
            [(128, 512), (512, 512), (512, 128)]
    if method == "swav":  # scores of the unit embedding against unit prototypes: cosines
        assert torch.allclose(z[0].norm(dim=1), torch.ones(4), atol=1e-5)
        assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(30), atol=1e-5)
        assert out[0].abs().max() <= 1 + 1e-5 and m.prototypes.bias is None


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_published_head_and_unit_prototypes(method):
    torch.manual_seed(0)
    m = model_of(method, 40, head="neurips23", prototypes="unit")
    assert [type(l) for l in m.head] == [nn.Linear, nn.BatchNorm1d, nn.GELU] * 2 + [nn.Linear]
    assert [(l.in_features, l.out_features) for l in m.head if isinstance(l, nn.Linear)] == \
        [(512, 2048), (2048, 2048), (2048, 256)]
    # the head ends in the prototypes
    assert m.out is m.prototypes and isinstance(m.out, models.UnitPrototypes)
    x = torch.randn(4, 3, 16, 16)
    z, out, _ = m([x])
    # logits are <z, c / |c|>: each at most |z|, and scaling a prototype's weights changes nothing
    torch.testing.assert_close(out[0],
                               z[0] @ torch.nn.functional.normalize(m.prototypes.weight, dim=1).T)
    assert (out[0].abs() <= z[0].norm(dim=1, keepdim=True) + 1e-4).all()
    with torch.no_grad():
        m.prototypes.weight[:5] *= 7.0
    torch.testing.assert_close(m([x])[1][0], out[0], rtol=1e-4, atol=1e-5)


def test_published_head_init_and_zero_init_residual():
    """The official CARP code's inits: its head's weights of std 0.02 (a normal cut at +-2), biases
    0; its ResNet's residual branches end in a BatchNorm at 0 (every block starts as identity)."""
    torch.manual_seed(0)
    m = model_of("carp", 40, head="neurips23", prototypes="unit", zero_init_residual=True)
    for layer in (l for l in m.head if isinstance(l, nn.Linear)):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert layer.bias is None or not layer.bias.any()
    assert all(not b.bn2.weight.any()
               for layer in (m.backbone.layer1, m.backbone.layer4) for b in layer)
    thesis = model_of("carp", 40)  # the thesis's: PyTorch's inits
    assert thesis.head[0].weight.std().item() > 0.02 and thesis.backbone.layer1[0].bn2.weight.all()


# ---------------------------------------------------------------- EMA teacher and queue

def test_ema_teacher_update_and_no_gradient():
    torch.manual_seed(0)
    student = model_of("byol")
    teacher = models.EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.net.parameters())
    before = [p.clone() for p in teacher.net.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, 0.75)
    for t, b, s in zip(teacher.net.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)  # m * teacher + (1 - m) * student
    z, _, _ = teacher([torch.randn(4, 3, 16, 16)])
    assert not z[0].requires_grad  # no graph: nothing can reach the teacher's weights
    teacher.update(student, 1.0)  # momentum 1: frozen
    teacher.update(student, 0.0)  # momentum 0: a copy of the student
    assert all(torch.equal(t, s) for t, s in zip(teacher.net.parameters(), student.parameters()))


def test_teacher_bn_groups_normalise_shuffled_subsets():
    """MoCo's shuffled BN: each group of the shuffled batch is normalised on its own, then put back
    in order."""
    torch.manual_seed(0)
    student = model_of("mocov2")
    x = torch.randn(8, 3, 16, 16)
    grouped = models.EMATeacher(student, bn_group=4)
    z, _, _ = grouped([x], seed=3)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    by_hand = torch.empty(8, 128)
    for idx in order.split(4):
        by_hand[idx] = grouped.net([x[idx]])[0][0]
    torch.testing.assert_close(z[0], by_hand, rtol=1e-4, atol=1e-4)  # one forward: other float sums
    whole, _, _ = models.EMATeacher(student)([x])
    assert not torch.allclose(z[0], whole[0], atol=1e-3)  # statistics differ from the whole batch's
    assert (torch.equal(grouped([x], seed=3)[0][0], z[0])
            and not torch.equal(grouped([x], seed=4)[0][0], z[0]))
    # a batch no larger than a group still goes in two groups (one would be the query batch's
    # statistics again)
    small, _, _ = models.EMATeacher(student, bn_group=32)([x], seed=3)
    torch.testing.assert_close(small[0], z[0])


def test_teacher_bn_groups_of_a_batch_of_one():
    """A batch of one image (--batch-size 1, or a rank's share of one) is one group of 1: the flags
    check passes and the grouped teacher normalises as the plain one does."""
    assert [models.shuffle_group_size(b, 32) for b in (1, 2, 7, 256)] == [1, 1, 1, 32]
    assert train.parse_args(["--method", "mocov2", "--batch-size", "1"]).batch_size == 1
    torch.manual_seed(0)
    student = model_of("mocov2")
    views = [torch.randn(1, 3, 12, 12), torch.randn(1, 3, 12, 12)]
    grouped, plain = models.EMATeacher(student, bn_group=32), models.EMATeacher(student)
    for got, want in zip(grouped(views, seed=3).z, plain(views).z):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def group_by_group(net, views, order, size):
    """MoCo's shuffled BN by one forward per group: (embeddings, outputs), each a list per view."""
    groups = [net([v[idx] for v in views]) for idx in order.split(size)]
    undo = order.argsort()  # (B,): back to the batch's order
    return [[torch.cat([g[part][v] for g in groups])[undo] for v in range(len(views))]
            for part in (0, 1)]


@pytest.mark.parametrize("batch, size", [(12, 4), (10, 2)])  # 10: the largest divisor up to 4 is 2
def test_teacher_bn_groups_in_one_forward_match_a_forward_per_group(batch, size):
    """The grouped teacher runs its network once for all groups, and gives what one forward per
    group gives: embeddings, outputs and the BatchNorm running statistics (float rounding apart);
    its state_dict keeps the student's keys, the EMA update moves it, in eval mode it is plain."""
    torch.manual_seed(0)
    student = model_of("carp", 7)  # BatchNorm in `out` too
    teacher, plain = models.EMATeacher(student, bn_group=4), models.EMATeacher(student).net
    views = [torch.randn(batch, 3, 12, 12), torch.randn(batch, 3, 12, 12)]
    forwards = []
    teacher.net.backbone.register_forward_hook(lambda *_: forwards.append(1))
    for seed in (3, 4):  # two steps: the running statistics move twice
        got = teacher(views, seed=seed)
        order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))  # (B,)
        want = group_by_group(plain, views, order, size)
        for part in (0, 1):
            for g, w in zip(got[part], want[part]):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert len(forwards) == 2  # one forward a step
    state, expected = teacher.net.state_dict(), plain.state_dict()
    assert list(state) == list(expected) == list(student.state_dict())  # run.pt's, backbone.pt's
    for key in expected:  # running_mean, running_var, num_batches_tracked: as batch // size updates
        torch.testing.assert_close(state[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    x = views[0][:3]
    with torch.no_grad():  # eval mode: the running statistics, as a plain BatchNorm's
        evaluated = teacher.net.eval()([x])[0][0], plain.eval()([x])[0][0]  # (3, D) each
    torch.testing.assert_close(*evaluated, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, 0.0)
    assert all(torch.equal(t, p) for t, p in zip(teacher.net.parameters(), student.parameters()))


def test_queue_keeps_the_last_rows():
    q = models.Queue(6, 2, "cpu")
    assert not q.full and q.filled == 0
    for i in range(4):  # 4 pushes of 2 rows: the first is overwritten by the fourth
        q.push(torch.full((2, 2), float(i)))
    assert q.full and sorted(q.rows[:, 0].tolist()) == [1, 1, 2, 2, 3, 3]
    state = q.state_dict()
    r = models.Queue(6, 2, "cpu")
    r.load_state_dict(state)
    r.push(torch.full((2, 2), 9.0))
    q.push(torch.full((2, 2), 9.0))
    assert torch.equal(r.rows, q.rows) and r.ptr == q.ptr
    moco = models.Queue(8, 4, "cpu", random_fill_seed=0)  # MoCo starts full of random unit keys
    assert moco.full and torch.allclose(moco.rows.norm(dim=1), torch.ones(8))
