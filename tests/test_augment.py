"""View pipelines: output shapes, the CARP asymmetry, and blur sized to the image; the batched
pipelines against torchvision: each op, the random parameters' distributions, determinism."""
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import augment
from conftest import needs_cxx


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
    (blur_1, _), = find(views.views[0], T.GaussianBlur)
    (blur_2, _), = find(views.views[1], T.GaussianBlur)
    assert (blur_1.p, blur_2.p) == (1.0, 0.1)
    # p = 0: left out
    assert [t.p for t in views.views[0].transforms if isinstance(t, T.RandomSolarize)] == []
    assert [t.p for t in views.views[1].transforms if isinstance(t, T.RandomSolarize)] == [0.2]


@pytest.mark.parametrize("method", ["carl", "carp"])
@pytest.mark.parametrize("size,kernel", [(224, 23), (96, 9), (32, 3)])
def test_blur_is_sized_to_the_image(method, size, kernel):
    views = augment.pretrain_views(method, size, "cifar10")
    blurs = find(views.views[0], T.GaussianBlur) + find(views.views[1], T.GaussianBlur)
    assert len(blurs) == 2
    for _, blur in blurs:
        assert blur.kernel_size == (kernel, kernel)
        assert blur.sigma == pytest.approx([0.1 * size / 224, 2.0 * size / 224])


# ---------------------------------------------------------------- batched views (augment.batch_*)

def gen(seed):
    return torch.Generator().manual_seed(seed)


def sample(view, n, g):
    """A BatchView's parameters for n images of 32 x 32, from one draw of g (as BatchViews
    draws)."""
    return view.parameters(augment.draw_uniforms(n, g), 32, 32)


def per_sample(fn, img, *params):
    """fn applied to each image of a batch with its own python-number parameters."""
    return torch.stack([fn(img[i], *[p[i].item() for p in params]) for i in range(len(img))])


@pytest.fixture
def img():
    return torch.rand(6, 3, 20, 24, generator=gen(0))


@pytest.mark.parametrize("size", [24, 32, 48])
def test_resized_crop_and_flip_match_torchvision(img, size):
    # all crops <= size in both sides: upsampling, where grid_sample and antialias=True agree
    top, left = torch.tensor([0, 3, 5, 0, 10, 2]), torch.tensor([0, 4, 0, 7, 1, 2])
    h, w = torch.tensor([20, 10, 15, 5, 10, 18]), torch.tensor([24, 12, 20, 17, 14, 3])
    flip = torch.tensor([0, 1, 0, 1, 1, 0]).bool()
    out = augment.resized_crop(img, top, left, h, w, size, flip)

    def ref(x, t, l, hh, ww, f):
        x = TF.resized_crop(x, t, l, hh, ww, [size, size], antialias=True)
        return TF.hflip(x) if f else x
    assert out.shape == (6, 3, size, size)
    torch.testing.assert_close(out, per_sample(ref, img, top, left, h, w, flip), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,factors", [
    ("brightness", [0.0, 0.3, 0.7, 1.0, 1.5, 2.0]),
    ("contrast", [0.0, 0.3, 0.7, 1.0, 1.5, 2.0]),
    ("saturation", [0.0, 0.3, 0.7, 1.0, 1.5, 2.0]),
    ("hue", [-0.5, -0.2, 0.0, 0.05, 0.3, 0.5]),
])
def test_colour_ops_match_torchvision(img, name, factors):
    """Each op of color_jitter alone (the others at their no-change factors) against
    torchvision's."""
    factors = {**dict.fromkeys(augment.JITTER_OPS[:3], torch.ones(6)), "hue": torch.zeros(6),
               name: torch.tensor(factors)}
    op = augment.JITTER_OPS.index(name)
    order = torch.tensor([op, *(i for i in range(4) if i != op)]).expand(6, 4)  # (6, 4): op first
    out = augment.color_jitter(img, **factors, order=order)
    torch.testing.assert_close(out, per_sample(getattr(TF, "adjust_" + name), img, factors[name]),
                               atol=1e-5, rtol=0)


def test_color_jitter_follows_each_samples_order(img):
    order = torch.stack([torch.tensor(p) for p in itertools.permutations(range(4))][::4])  # (6, 4)
    b, c, s = (torch.tensor([0.6, 1.4, 0.9, 1.2, 0.5, 1.8]),
               torch.tensor([1.3, 0.5, 1.7, 0.8, 1.1, 0.2]),
               torch.tensor([0.2, 1.6, 0.7, 1.9, 1.0, 0.4]))
    hue = torch.tensor([0.1, -0.1, 0.2, -0.3, 0.05, 0.4])
    apply = torch.tensor([1, 1, 1, 1, 1, 0]).bool()
    out = augment.color_jitter(img, b, c, s, hue, order, apply)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(6):
        ref = img[i]
        for op in order[i].tolist() if apply[i] else []:
            ref = ops[op](ref, [b, c, s, hue][op][i].item())
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    assert torch.equal(out[5], img[5])  # jitter not applied: untouched, bit for bit
    assert not torch.allclose(out[0],
                              augment.color_jitter(img, b, c, s, hue, order[[1, 0, 2, 3, 4, 5]])[0])


def test_grayscale_solarize_normalize_match_torchvision(img):
    torch.testing.assert_close(augment.grayscale(img),
                               TF.rgb_to_grayscale(img, num_output_channels=3))
    out = augment.solarize(img)
    torch.testing.assert_close(out, TF.solarize(img, 128 / 255))
    assert (out != img).any() and (out == img).any()
    mean, std = augment.MEAN_STD["cifar10"]
    torch.testing.assert_close(augment.normalize(img, mean, std), TF.normalize(img, mean, std))


@pytest.mark.parametrize("kernel", [3, 5, 9])
def test_blur_matches_torchvision_per_sample_sigma(img, kernel):
    sigma = torch.tensor([0.05, 0.3, 0.8, 1.5, 3.0, 0.6])
    out = augment.gaussian_blur(img, kernel, sigma)
    ref = per_sample(lambda x, s: TF.gaussian_blur(x, [kernel, kernel], [s, s]), img, sigma)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out[4] - img[4]).abs().max() > 0.05  # the blur does something


@pytest.mark.parametrize("shape,size", [((32, 32), 32), ((40, 48), 32), ((96, 96), 96),
                                        ((120, 100), 96), ((32, 32), 64),
                                        ((32, 39), 32)])  # the last: crop only, 3.5 px off centre
def test_eval_batch_matches_eval_view(shape, size):
    x = torch.randint(0, 256, (3, 3, *shape), dtype=torch.uint8, generator=gen(1))
    out = augment.eval_batch(x, size, "cifar10")
    assert out.shape == (3, 3, size, size) and out.dtype == torch.float32
    pil = torch.stack([
        augment.eval_view(size, "cifar10")(Image.fromarray(x[i].permute(1, 2, 0).numpy()))
        for i in range(3)])
    # PIL rounds its resized image to uint8: at most half a level apart, 1/255 / std after
    # normalising
    assert (out - pil).abs().max() < 1.01 / 255 / min(augment.MEAN_STD["cifar10"][1])
    if size <= 64 and shape == (size, size):  # nothing to resize: the same numbers
        torch.testing.assert_close(out, pil)
    tensor_path = T.Compose([T.Resize(augment.eval_resize(size), antialias=True),
                             T.CenterCrop(size), T.Normalize(*augment.MEAN_STD["cifar10"])])
    torch.testing.assert_close(out, per_sample(lambda z: tensor_path(z.float() / 255), x),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [32, 80, 112])
def test_stored_square_then_eval_batch_is_eval_view(size):
    """A tree of mixed sizes is held as stored_square's squares; eval_batch's centre crop of those
    (no second resize) gives exactly eval_view's pixels, for wide, tall and odd-sided images."""
    rng = np.random.default_rng(0)
    for h, w in [(90, 130), (131, 97), (100, 101), (120, 120)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        # (3, S, S)
        held = torch.from_numpy(np.array(augment.stored_square(size)(img))).permute(2, 0, 1)
        assert held.shape == (3, augment.eval_resize(size), augment.eval_resize(size))
        torch.testing.assert_close(augment.eval_batch(held[None], size, "cifar10")[0],
                                   augment.eval_view(size, "cifar10")(img), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,view,size", [("carl", 0, 32), ("carp", 0, 48), ("carp", 1, 48),
                                            ("train", 0, 32)])
def test_batch_view_applies_its_parameters_as_torchvision_would(kind, view, size):
    """apply() against the same steps done one image at a time with torchvision's functional ops,
    with each step switched on for some samples and off for others (the train view has crop and flip
    only)."""
    n = 12
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen(2))
    bv = (augment.batch_train_view(size, "cifar10") if kind == "train"
          else augment.batch_pretrain_views(kind, size, "cifar10").views[view])
    p = sample(bv, n, gen(3))
    i = torch.arange(n)
    p.update(flip=i % 2 == 0, jitter=i % 3 != 0, gray=i % 4 == 1, blur=i % 2 == 1,
             solarize=i % 3 == 1, sigma=torch.full((n,), bv.sigma[1]))
    out = bv.apply(x, p)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(n):
        box = [p[key][k].item() for key in ("top", "left", "height", "width")]
        ref = TF.resized_crop(x[k].float() / 255, *box, [size, size], antialias=True)
        if p["flip"][k]:
            ref = TF.hflip(ref)
        if p["jitter"][k] and bv.jitter_p > 0:
            for op in p["order"][k].tolist():
                ref = ops[op](ref, p[["brightness", "contrast", "saturation", "hue"][op]][k].item())
        if p["gray"][k] and bv.gray_p > 0:
            ref = TF.rgb_to_grayscale(ref, 3)
        if p["blur"][k] and bv.blur_p > 0:
            ref = TF.gaussian_blur(ref, [bv.kernel] * 2, [bv.sigma[1]] * 2)
        if p["solarize"][k] and bv.solarize_p > 0:
            ref = TF.solarize(ref, 128 / 255)
        ref = TF.normalize(ref, *augment.MEAN_STD["cifar10"])
        torch.testing.assert_close(out[k], ref, atol=1e-4, rtol=0)


# -- the random parameters against torchvision's samplers

N = 20_000


def boxes(H, W, scale, seed):
    """(top, left, h, w) of N crops of an H x W image from augment's sampler."""
    return augment.crop_boxes(augment.split_uniforms(augment.draw_uniforms(N, gen(seed))), H, W,
                              scale, augment.RATIO)


@pytest.mark.parametrize("kind", ["carl", "carp"])
def test_crop_boxes_follow_torchvision(kind):
    scale, H, W = augment.VIEWS[kind]["scale"], 32, 32
    top, left, h, w = boxes(H, W, scale, 4)
    torch.manual_seed(4)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(1, H, W), scale, augment.RATIO)
                        for _ in range(N // 2)]).T  # (4, N / 2): top, left, h, w
    assert ((h >= 1).all() and (h <= H).all() and (w <= W).all() and (top + h <= H).all()
            and (left + w <= W).all())
    for ours, theirs, tol in [((h * w).float() / (H * W),
                               (ref[2] * ref[3]).float() / (H * W), 0.012),  # area
                              ((w / h).log(), (ref[3] / ref[2]).log(), 0.01),  # log aspect ratio
                              (top.float() / H, ref[0].float() / H, 0.01)]:
        assert ours.mean() == pytest.approx(theirs.mean().item(), abs=tol)
        q = torch.tensor([0.1, 0.5, 0.9])
        torch.testing.assert_close(ours.quantile(q), theirs.quantile(q), atol=3 * tol, rtol=0)


def test_crop_fallback_rate_follows_torchvision():
    # 30 x 200: ~40% of samples find no box in 10 tries and take the central 30 x 40 crop
    H, W = 30, 200
    top, left, h, w = boxes(H, W, (0.08, 1.0), 5)
    torch.manual_seed(5)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(1, H, W), (0.08, 1.0),
                                                       augment.RATIO)
                        for _ in range(5000)])
    fallback = (top == 0) & (left == 80) & (h == 30) & (w == 40)
    ref_fallback = (ref == torch.tensor([0, 80, 30, 40])).all(1)
    assert 0.3 < ref_fallback.float().mean() < 0.55
    assert fallback.float().mean() == pytest.approx(ref_fallback.float().mean().item(), abs=0.03)


@pytest.mark.parametrize("kind", ["carl", "carp"])
def test_jitter_factors_follow_colorjitter(kind):
    p = sample(augment.batch_pretrain_views(kind, 32, "cifar10").views[0], N, gen(6))
    jitter = T.ColorJitter(*augment.VIEWS[kind]["jitter"])
    torch.manual_seed(6)
    ref = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
           for _ in range(N // 2)]
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    for i, (name, (low, high)) in enumerate(zip(augment.JITTER_OPS, ranges)):
        ours, theirs = p[name], torch.tensor([r[i + 1] for r in ref])
        assert (low <= ours.min() < low + 0.01 * (high - low)
                and high - 0.01 * (high - low) < ours.max() <= high)
        assert ours.mean() == pytest.approx(theirs.mean().item(), abs=0.02 * (high - low))
        assert ours.std() == pytest.approx(theirs.std().item(), abs=0.02 * (high - low))


def test_jitter_order_is_a_uniform_permutation():
    order = sample(augment.batch_pretrain_views("carl", 32, "cifar10").views[0], N, gen(7))["order"]
    assert (order.sort(1).values == torch.arange(4)).all()
    counts = {}
    for row in order.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == 24
    assert 0.8 * N / 24 < min(counts.values()) and max(counts.values()) < 1.2 * N / 24


@pytest.mark.parametrize("kind,view", [("carl", 0), ("carl", 1), ("carp", 0), ("carp", 1)])
def test_step_probabilities(kind, view):
    """Each step's rate over many samples, against the PIL pipeline's own settings."""
    pil = augment.pretrain_views(kind, 32, "cifar10")
    pil = pil.views[view]
    blur = find(pil, T.GaussianBlur)[0][0].p
    solarize = [t.p for t in pil.transforms if isinstance(t, T.RandomSolarize)] or [0.0]
    jitter = find(pil, T.ColorJitter)[0][0].p
    gray = [t.p for t in pil.transforms if isinstance(t, T.RandomGrayscale)][0]
    bv = augment.batch_pretrain_views(kind, 32, "cifar10")
    p = sample(bv.views[view], N, gen(8))
    for step, expected in [("flip", 0.5), ("jitter", jitter), ("gray", gray), ("blur", blur),
                           ("solarize", solarize[0])]:
        assert p[step].float().mean() == pytest.approx(expected, abs=0.015), step
    low, high = find(pil, T.GaussianBlur)[0][1].sigma
    assert low <= p["sigma"].min() and p["sigma"].max() <= high
    assert p["sigma"].mean() == pytest.approx((low + high) / 2, abs=0.01 * (high - low))


def test_batch_and_pil_views_share_their_settings():
    for kind in ["carl", "carp"]:
        pil = augment.pretrain_views(kind, 32, "cifar10")
        batched = augment.batch_pretrain_views(kind, 32, "cifar10")
        for view, bv in zip(pil.views, batched.views):
            crop, = [t for t in view.transforms if isinstance(t, T.RandomResizedCrop)]
            (_, jitter), = find(view, T.ColorJitter)
            assert tuple(crop.scale) == bv.scale and tuple(crop.ratio) == augment.RATIO
            assert ((jitter.brightness[1] - 1, jitter.hue[1])
                    == pytest.approx((bv.jitter[0], bv.jitter[3])))
    crop, flip = augment.train_view(32, "cifar10").transforms[:2]
    bv = augment.batch_train_view(32, "cifar10")
    assert ((tuple(crop.scale), tuple(crop.ratio), flip.p)
            == (bv.scale, augment.RATIO, augment.FLIP_P))
    assert bv.jitter_p == bv.gray_p == bv.blur_p == bv.solarize_p == 0


# -- the two views of a batch

@pytest.mark.parametrize("kind", ["carl", "carp"])
@pytest.mark.parametrize("shape,size", [((32, 32), 32), ((96, 96), 96), ((32, 32), 64),
                                        ((40, 56), 32)])
def test_batch_views_shape_and_determinism(kind, shape, size):
    x = torch.randint(0, 256, (4, 3, *shape), dtype=torch.uint8, generator=gen(9))
    views = augment.batch_pretrain_views(kind, size, "cifar10")
    a, b = views(x, gen(10))
    assert a.shape == b.shape == (4, 3, size, size) and a.dtype == b.dtype == torch.float32
    a2, b2 = views(x, gen(10))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    a3, b3 = views(x, gen(11))
    assert not torch.equal(a, a3) and not torch.equal(b, b3)
    assert not torch.equal(a, b)
    assert augment.eval_batch(x, size, "cifar10").shape == (4, 3, size, size)


def test_carp_batch_views_are_asymmetric_and_carl_symmetric():
    carp = augment.batch_pretrain_views("carp", 32, "cifar10")
    p1, p2 = sample(carp.views[0], N, gen(12)), sample(carp.views[1], N, gen(12))
    assert p1["blur"].all() and not p1["solarize"].any()
    assert 0.05 < p2["blur"].float().mean() < 0.15 and 0.15 < p2["solarize"].float().mean() < 0.25
    # view 2's solarize shows in its output: the same parameters with solarize off give other images
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen(13))
    # no dark images
    p = {**sample(carp.views[1], 16, gen(14)), "jitter": torch.zeros(16, dtype=bool)}
    changed = (carp.views[1].apply(x, p)
               != carp.views[1].apply(x, {**p, "solarize": torch.zeros(16, dtype=bool)}))
    assert torch.equal(changed.flatten(1).any(1), p["solarize"]) and p["solarize"].any()
    carl = augment.batch_pretrain_views("carl", 32, "cifar10")
    assert vars(carl.views[0]) == vars(carl.views[1])  # the same settings
    q1, q2 = sample(carl.views[0], N, gen(15)), sample(carl.views[1], N, gen(16))
    assert q1["blur"].float().mean() == pytest.approx(q2["blur"].float().mean().item(), abs=0.02)


def test_batch_views_do_not_read_tensor_values_on_the_host(monkeypatch):
    """No .item(), .tolist(), .nonzero(), bool()/int()/float() of a tensor or boolean-mask indexing:
    on a GPU each of those would wait for the device."""
    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value")
    getitem = torch.Tensor.__getitem__

    def no_mask(self, index):
        if any(isinstance(i, torch.Tensor)
               for i in (index if isinstance(index, tuple) else (index,))):
            refuse()
        return getitem(self, index)
    x = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8, generator=gen(17))
    for name in ["item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"]:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch.Tensor, "__getitem__", no_mask)
    for kind in ["carl", "carp"]:
        a, b = augment.batch_pretrain_views(kind, 64, "cifar10")(x, gen(18))
    out = augment.eval_batch(x, 32, "cifar10")
    monkeypatch.undo()
    assert a.shape == (4, 3, 64, 64) and out.shape == (4, 3, 32, 32)


def test_views_are_one_draw_then_a_pure_function():
    """A call draws each view's uniforms once (the generator moves by that one draw) and make() does
    the rest from them alone: the same uniforms give the same views."""
    x = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=gen(19))
    views = augment.batch_pretrain_views("carp", 24, "cifar10")
    g, g_call = gen(20), gen(20)
    u = augment.draw_uniforms(6, g, views=2)  # (2, 6, UNIFORMS)
    assert u.shape == (2, 6, augment.UNIFORMS)
    a, b = views(x, g_call)
    assert torch.equal(g.get_state(), g_call.get_state())
    a2, b2 = views.make(x, u)
    assert torch.equal(a, a2) and torch.equal(b, b2)


@needs_cxx
def test_compiled_views_match_eager():
    """--compile's views (torch.compile of make(), inductor on the CPU here, Triton on a GPU)
    against the eager ones: the same views up to float rounding, CARP's pipeline having every
    step."""
    x = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8, generator=gen(21))
    eager = augment.batch_pretrain_views("carp", 16, "cifar10")
    compiled = augment.batch_pretrain_views("carp", 16, "cifar10").compile()
    for seed in (22, 23):  # the second call reuses the compiled code
        for ours, ref in zip(compiled(x, gen(seed)), eager(x, gen(seed))):
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# -- multi-crop

def test_multicrop_settings_and_shapes_in_both_implementations():
    """2 global crops (view 1 / view 2 settings) + 3 local ones (view 1's with their own scale,
    blur 0.5, no solarisation), the same in the PIL and batched pipelines; each batched view one
    draw, all from one image."""
    settings = augment.view_settings("neurips23", 2, 3, (0.05, 0.2))
    assert [s["scale"] for s in settings] == [(0.2, 1.0)] * 2 + [(0.05, 0.2)] * 3
    assert [s["blur_p"] for s in settings] == [1.0, 0.1, 0.5, 0.5, 0.5]
    assert [s["solarize_p"] for s in settings] == [0.0, 0.2, 0.0, 0.0, 0.0]
    # a third global crop: view 1's
    assert augment.view_settings("carl", 3)[2] == augment.view_settings("carl")[0]
    pil = augment.pretrain_views("neurips23", 32, "cifar10", 2, 3, 16, (0.05, 0.2))
    views = pil(Image.new("RGB", (32, 32), (120, 60, 200)))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    for view, s in zip(pil.views, settings):
        crop, = [t for t in view.transforms if isinstance(t, T.RandomResizedCrop)]
        assert tuple(crop.scale) == s["scale"] and find(view, T.GaussianBlur)[0][0].p == s["blur_p"]
    batched = augment.batch_pretrain_views("neurips23", 32, "cifar10", 2, 3, 16, (0.05, 0.2))
    assert [(v.size, v.scale, v.blur_p, v.solarize_p) for v in batched.views] == \
        [(s, x["scale"], x["blur_p"], x["solarize_p"])
         for s, x in zip([32, 32, 16, 16, 16], settings)]
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen(30))
    out = batched(x, gen(31))
    assert [tuple(v.shape) for v in out] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    u = augment.draw_uniforms(4, gen(31), views=5)  # one row of uniforms per view and image
    assert all(torch.equal(a, b) for a, b in zip(out, batched.make(x, u)))
    small = [(p["height"] * p["width"]).float() / 32 ** 2 for p in
             (v.parameters(u_v, 32, 32) for v, u_v in zip(batched.views[2:], u[2:]))]
    assert all((a <= 0.2 + 0.05).all() for a in small)  # local crops cover 5-20% of the image
