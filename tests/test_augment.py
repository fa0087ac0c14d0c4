"""View pipelines: output shapes, the CARP asymmetry, and blur sized to the image."""
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import augment


def find(pipeline, cls):
    """Transforms of type cls inside a Compose, looking into RandomApply."""
    found = []
    for t in pipeline.transforms:
        inner = t.transforms if isinstance(t, T.RandomApply) else [t]
        found += [(t, x) for x in inner if isinstance(x, cls)]
    return found


@pytest.mark.parametrize("method", ["carl", "carp"])
@pytest.mark.parametrize("size", [32, 96])
def test_views_have_the_asked_size(method, size):
    img = Image.new("RGB", (size + 8, size + 8), (120, 60, 200))
    a, b = augment.pretrain_views(method, size, "cifar10")(img)
    assert a.shape == b.shape == (3, size, size)
    assert a.dtype == torch.float32


def test_carp_views_are_asymmetric():
    views = augment.pretrain_views("carp", 32, "cifar10")
    (blur_1, _), = find(views.first, T.GaussianBlur)
    (blur_2, _), = find(views.second, T.GaussianBlur)
    assert (blur_1.p, blur_2.p) == (1.0, 0.1)
    assert [t.p for t in views.first.transforms if isinstance(t, T.RandomSolarize)] == [0.0]
    assert [t.p for t in views.second.transforms if isinstance(t, T.RandomSolarize)] == [0.2]


@pytest.mark.parametrize("method", ["carl", "carp"])
@pytest.mark.parametrize("size,kernel", [(224, 23), (96, 9), (32, 3)])
def test_blur_is_sized_to_the_image(method, size, kernel):
    views = augment.pretrain_views(method, size, "cifar10")
    blurs = find(views.first, T.GaussianBlur) + find(views.second, T.GaussianBlur)
    assert len(blurs) == 2
    for _, blur in blurs:
        assert blur.kernel_size == (kernel, kernel)
        assert blur.sigma == pytest.approx([0.1 * size / 224, 2.0 * size / 224])
