"""AssignmentModel (model.py): shapes, stems, heads, assigners, channels_last, backbone export."""
import pytest
import torch
import torch.nn as nn
import torchvision

import model as models


def layer4_shape(m, x):
    out = {}

    def hook(mod, inp, o):
        out["s"] = tuple(o.shape)  # returns None: the output is left alone

    h = m.backbone.layer4.register_forward_hook(hook)
    try:
        y = m(x)
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
    m = models.AssignmentModel(method, "resnet18", cifar_stem=True, num_prototypes=37)
    x = torch.randn(4, 3, 32, 32)
    logits, s4 = layer4_shape(m, x)  # train mode (BatchNorm with a batch of 4)
    assert logits.shape == (4, 37)
    assert s4 == (4, 512, 4, 4)  # stride 8 overall: no stride-2 conv1 and no max-pool
    assert m.backbone(x).shape == (4, 512)
    assert m.head(m.backbone(x)).shape == (4, 128)
    assert m.backbone.conv1.kernel_size == (3, 3) and m.backbone.conv1.stride == (1, 1)
    assert isinstance(m.backbone.maxpool, nn.Identity)
    assert isinstance(m.backbone.fc, nn.Identity)


def imagenet_stem_224px(method, arch, num_prototypes, batch):
    """(model, logits, layer4 output shape) of an eval-mode model without the CIFAR stem at 224 px."""
    torch.manual_seed(0)
    m = models.AssignmentModel(method, arch, cifar_stem=False, num_prototypes=num_prototypes).eval()
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
    assert [(l.in_features, l.out_features) for l in linears] == [(2048, 2048), (2048, 2048), (2048, 128)]
    assert m.assigner[0].in_features == 128 and m.assigner[0].out_features == 2048


def test_unknown_arch_and_method_raise():
    with pytest.raises(ValueError, match="arch"):
        models.AssignmentModel("carl", "resnet34")
    with pytest.raises(ValueError, match="method"):
        models.AssignmentModel("simclr", "resnet18")


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_channels_last(method):
    torch.manual_seed(0)
    m = models.AssignmentModel(method, "resnet18", True, 20).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m = m.to(memory_format=torch.channels_last)
        convs = [p for p in m.parameters() if p.ndim == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert not all(p.is_contiguous() for p in convs)  # really changed layout (C > 1)
        out = m(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 20)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # and a training step works in channels_last
    m.train()
    loss = m(torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_carl_assigner_is_one_linear():
    m = models.AssignmentModel("carl", "resnet18", True, 100)
    assert type(m.assigner) is nn.Linear
    assert (m.assigner.in_features, m.assigner.out_features) == (128, 100)
    assert m.assigner.weight.shape == (100, 128)  # K prototype rows
    assert m.assigner.bias is None  # thesis eq. 5.2: q_j = <z, c_j>


def test_carp_assigner_is_mlp_with_batchnorm():
    m = models.AssignmentModel("carp", "resnet18", True, 250)
    a = m.assigner
    assert isinstance(a, nn.Sequential)
    kinds = [type(mod) for mod in a]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (a[0].in_features, a[0].out_features) == (128, 512)
    assert a[1].num_features == 512
    assert (a[-1].in_features, a[-1].out_features) == (512, 250)


def test_projection_head_resnet18():
    m = models.AssignmentModel("carl", "resnet18", True, 10)
    kinds = [type(mod) for mod in m.head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [mod for mod in m.head if isinstance(mod, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 512), (512, 512), (512, 128)]
    assert models.EMBED_DIM == 128


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_backbone_state_dict_loads_into_torchvision(cifar_stem):
    torch.manual_seed(0)
    m = models.AssignmentModel("carp", "resnet18", cifar_stem, 20).eval()
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
    full = models.load_backbone_state(m.state_dict())
    assert full.keys() == sd.keys()
    assert all(torch.equal(full[k], sd[k]) for k in sd)
    assert models.load_backbone_state(sd).keys() == sd.keys()
    # the stem really differs: the other torchvision stem cannot take these weights
    with pytest.raises(RuntimeError, match="size mismatch"):
        tv_resnet("resnet18", not cifar_stem).load_state_dict(sd, strict=False)


@pytest.mark.parametrize("method", ["carl", "carp"])
def test_proto_init_gain_scales_only_the_prototypes(method):
    torch.manual_seed(0)
    base = models.AssignmentModel(method, "resnet18", True, 30)
    torch.manual_seed(0)
    scaled = models.AssignmentModel(method, "resnet18", True, 30, proto_init_gain=4.0)
    protos = (lambda m: m.assigner if method == "carl" else m.assigner[-1])
    assert torch.allclose(protos(scaled).weight, 4.0 * protos(base).weight)
    if method == "carp":  # CARL's prototypes have no bias
        assert torch.allclose(protos(scaled).bias, 4.0 * protos(base).bias)
    others = [k for k in base.state_dict() if not k.startswith("assigner")]
    assert all(torch.equal(base.state_dict()[k], scaled.state_dict()[k]) for k in others)
    x = torch.randn(8, 3, 32, 32)
    base.eval(), scaled.eval()
    with torch.no_grad():  # the prototypes are the last layer: the logits scale by the gain
        assert torch.allclose(scaled(x), 4.0 * base(x), atol=1e-5)
