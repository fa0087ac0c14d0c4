"""View pipelines, in two implementations that make the same views.

- PIL (`pretrain_views`, `eval_view`, `train_view`): torchvision transforms on one PIL image at a
  time, run in the DataLoader workers.
- Batched (`batch_pretrain_views`, `eval_batch`): the same views of a whole uint8 batch at once on
  the training device (GPU, or CPU on a CPU run), with per-sample random parameters drawn from a
  torch.Generator, torch ops only and no host-device synchronisation. Each op matches
  torchvision.transforms.functional on float tensors, and the random parameters follow
  torchvision's samplers; the PIL path differs only by rounding to uint8 between ops, by PIL's
  own colour maths, and by antialiasing crops larger than the output (the batched crop does not).
Both read their settings from the table `VIEWS`.

- CARL (thesis 5.8.3, SimCLR-style): random resized crop (8%-100% of the area), flip,
  colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=0.5). Both views alike.
- CARP (thesis Listing 3, BYOL-style, asymmetric): crop 15%-92.5%, flip, strong colour
  jitter (p=0.8), grayscale (p=0.2); blur p=1.0 / 0.1 and solarize p=0.0 / 0.2 for views 1 / 2.
Blur is sized to the image: the kernel is ~10% of the side (odd, >= 3) and sigma is the thesis's
0.1-2.0 px at 224 px scaled by side / 224, so it takes the same share of a 32 px CIFAR image as of
an ImageNet crop (unscaled, up to 2 px on a 32 px image would blur 7x harder). At 32 px that all
but switches blur off, as SimCLR's CIFAR setup does; the issue asks for pipelines sized to the
images, and the thesis does not say how it sized its blur for CIFAR.
"""
import math

import torch
import torch.nn.functional as F
import torchvision.transforms as T

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}

# Settings of each kind of views, read by both implementations. jitter: ColorJitter's
# (brightness, contrast, saturation, hue); blur_p and solarize_p: for (view 1, view 2).
VIEWS = {
    "carl": dict(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                 blur_p=(0.5, 0.5), solarize_p=(0.0, 0.0)),
    "carp": dict(scale=(0.15, 0.925), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2,
                 blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
}
RATIO = (3 / 4, 4 / 3)  # crop aspect ratio range (RandomResizedCrop's default)
FLIP_P = 0.5
SOLARIZE_THRESHOLD = 128  # of 255: pixels at or above it are inverted


def blur_kernel_sigma(size):
    """Blur sized to the image (see above): (odd kernel size, (sigma min, sigma max))."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    scale = size / 224
    return kernel, (0.1 * scale, 2.0 * scale)


# ---------------------------------------------------------------- PIL, in the DataLoader workers

def _finish(dataset):
    mean, std = MEAN_STD.get(dataset, IMAGENET_STATS)
    return [T.ToTensor(), T.Normalize(mean, std)]


def _blur(size, p):
    kernel, sigma = blur_kernel_sigma(size)
    return T.RandomApply([T.GaussianBlur(kernel, sigma=sigma)], p=p)


def _crop_jitter_gray(v, size):
    return [
        T.RandomResizedCrop(size, scale=v["scale"], ratio=RATIO, antialias=True),
        T.RandomHorizontalFlip(FLIP_P),
        T.RandomApply([T.ColorJitter(*v["jitter"])], p=v["jitter_p"]),
        T.RandomGrayscale(p=v["gray_p"]),
    ]


def carl_view(size, dataset):
    v = VIEWS["carl"]
    return T.Compose([*_crop_jitter_gray(v, size), _blur(size, p=v["blur_p"][0]), *_finish(dataset)])


def carp_view(size, dataset, blur_p, solarize_p):
    return T.Compose([
        *_crop_jitter_gray(VIEWS["carp"], size),
        _blur(size, p=blur_p),
        T.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p),
        *_finish(dataset),
    ])


class TwoViews:
    """img -> (view_a, view_b), each (3, size, size)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, img):
        return self.first(img), self.second(img)


def pretrain_views(method, size, dataset):
    if method == "carl":
        view = carl_view(size, dataset)
        return TwoViews(view, view)
    (blur_1, blur_2), (solarize_1, solarize_2) = VIEWS["carp"]["blur_p"], VIEWS["carp"]["solarize_p"]
    return TwoViews(carp_view(size, dataset, blur_p=blur_1, solarize_p=solarize_1),
                    carp_view(size, dataset, blur_p=blur_2, solarize_p=solarize_2))


def _eval_resize(size):
    """eval_view's short side: size * 8/7 (ImageNet's 256 for 224), or size for small images."""
    return size if size <= 64 else round(size * 8 / 7)


def eval_geometry(size):
    """eval_view's resize and centre crop, on a PIL image."""
    return T.Compose([T.Resize(_eval_resize(size), antialias=True), T.CenterCrop(size)])


def eval_view(size, dataset):
    """Deterministic: resize the short side to size * 8/7 (ImageNet's 256 for 224), centre crop.
    Small images (<= 64 px) are only resized to `size`, since their objects fill the frame."""
    return T.Compose([eval_geometry(size), *_finish(dataset)])


def train_view(size, dataset):
    """Light augmentation for supervised heads (the linear-aug probe, fine-tuning):
    random resized crop and flip."""
    return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), *_finish(dataset)])


# ---------------------------------------------------------------- batched, on the training device
# Images are (B, 3, H, W) float in [0, 1]; per-sample parameters are (B,) tensors. Every random
# number comes from the generator g, on g's device, and steps that apply with a probability are
# computed for the whole batch and picked per sample with torch.where, so nothing waits on the
# device. Ops are written with elementwise maths, slicing and grid_sample (no conv, whose cuDNN
# algorithm choice under cudnn.benchmark could change the bits), so a seed gives the same views.

def to_float(x):
    """uint8 -> float32 in [0, 1], as T.ToTensor; float input is taken to be in [0, 1] already."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def _uniform(n, low, high, g):
    return torch.rand(n, generator=g, device=g.device) * (high - low) + low


def _coin(n, p, g):
    """(n,) bool, True with probability p (as RandomApply: never at p=0, always at p=1)."""
    return torch.rand(n, generator=g, device=g.device) < p


def _column(values, device):
    """(1, C, 1, 1) float32 from python floats, filled on the device (no host-to-device copy)."""
    return torch.stack([torch.full((), v, device=device) for v in values]).view(1, -1, 1, 1)


def _per_sample(factor):
    return factor.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), to broadcast over an image batch


def sample_crop_boxes(n, height, width, scale, ratio, g, attempts=10):
    """T.RandomResizedCrop.get_params for n images of height x width at once: each sample draws
    `attempts` boxes (area fraction uniform in scale, log aspect ratio uniform in log(ratio)) and
    keeps the first that fits, else takes torchvision's fallback (central crop, ratio clamped).
    Returns (top, left, h, w), each (n,) int64."""
    area = height * width
    target = area * _uniform((n, attempts), scale[0], scale[1], g)  # (n, attempts)
    aspect = torch.exp(_uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), g))  # (n, attempts)
    w = torch.round(torch.sqrt(target * aspect)).long()  # (n, attempts)
    h = torch.round(torch.sqrt(target / aspect)).long()  # (n, attempts)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, attempts)
    # index of the first box that fits: attempts where none does (clamped for the gather)
    tries = torch.arange(attempts, device=g.device)
    first = torch.where(fits, tries, attempts).amin(1, keepdim=True)  # (n, 1)
    found = first.squeeze(1) < attempts
    first = first.clamp(max=attempts - 1)
    # torchvision's fallback depends only on the image shape, so it is computed in python
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    h = torch.where(found, h.gather(1, first).squeeze(1), fb_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), fb_w)
    # top, left uniform integers in [0, H - h] and [0, W - w] (floor(u * count), kept below count)
    top = torch.minimum((torch.rand(n, generator=g, device=g.device) * (height - h + 1)).long(), height - h)
    left = torch.minimum((torch.rand(n, generator=g, device=g.device) * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def resized_crop(img, top, left, h, w, size, flip=None):
    """Per sample TF.resized_crop(img, top, left, h, w, [size, size], antialias=True), then TF.hflip
    where flip (bool, (B,)), as one bilinear F.grid_sample. Matches torchvision up to float rounding
    when upsampling (crop <= size, the normal case on small images): there antialiasing changes
    nothing. Downscaling (crop > size) has no antialias here (plain bilinear), so it aliases a little."""
    B, _, H, W = img.shape
    centres = (torch.arange(size, device=img.device) + 0.5) / size  # (size,) output pixel centres in [0, 1]

    def source(start, length, extent):
        # F.interpolate's source coordinate (align_corners=False) inside the crop, clamped to the
        # crop's edge pixels so no pixel outside it leaks in; then grid_sample's [-1, 1] units
        inside = (centres * length[:, None] - 0.5).clamp(min=0)  # (B, size)
        inside = torch.minimum(inside, (length - 1)[:, None].float())
        return (2 * (start[:, None] + inside) + 1) / extent - 1  # (B, size)

    xs, ys = source(left, w, W), source(top, h, H)
    if flip is not None:
        xs = torch.where(flip[:, None], xs.flip(1), xs)
    # (B, size, size, 2): (x, y) of each output pixel
    grid = torch.stack([xs[:, None, :].expand(B, size, size), ys[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(img):
    r, g, b = img.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # (B, 1, H, W), TF.rgb_to_grayscale's weights


def grayscale(img):
    """TF.rgb_to_grayscale(img, num_output_channels=3)."""
    return _gray(img).expand_as(img)


def _blend(img, other, factor):
    factor = _per_sample(factor)
    return (factor * img + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(img, factor):
    """TF.adjust_brightness with a (B,) factor."""
    return (_per_sample(factor) * img).clamp(0, 1)


def adjust_contrast(img, factor):
    """TF.adjust_contrast with a (B,) factor: blend with the mean of the grayscale image."""
    return _blend(img, _gray(img).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(img, factor):
    """TF.adjust_saturation with a (B,) factor: blend with the grayscale image."""
    return _blend(img, _gray(img), factor)


def adjust_hue(img, factor):
    """TF.adjust_hue with a (B,) factor in [-0.5, 0.5]: rotate the hue in HSV space, computed for the
    three channels at once (the fewer ops, the fewer kernel launches on a GPU)."""
    value, largest = img.max(1)  # each (B, H, W): the largest channel, and which it is
    chroma = value - img.amin(1)
    # hue in sixths of a turn: 2 i + (next channel - the one after) / chroma, for the largest channel i
    # (ties give the same hue); grey pixels (chroma 0) keep any hue, so only avoid 0 / 0 there
    sixths = (img.roll(-1, 1) - img.roll(-2, 1)) / chroma.clamp(min=torch.finfo(img.dtype).tiny)[:, None]
    sixths = sixths + torch.arange(0.0, 6.0, 2.0, device=img.device).view(1, 3, 1, 1)  # (B, 3, H, W)
    hue = sixths.gather(1, largest[:, None]) + 6 * _per_sample(factor)  # (B, 1, H, W), rotated
    # back to RGB: channel n (5, 3, 1 for r, g, b) is value - chroma * clamp(min(k, 4 - k), 0, 1),
    # with k = (n + hue) mod 6
    k = (hue + torch.arange(5.0, 0.0, -2.0, device=img.device).view(1, 3, 1, 1)) % 6  # (B, 3, H, W)
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # ColorJitter's op ids 0-3


def color_jitter(img, brightness, contrast, saturation, hue, order, apply=None):
    """ColorJitter with per-sample (B,) factors, applied in each sample's order ((B, 4), a permutation
    of the op ids of JITTER_OPS, as ColorJitter's fn_idx), only where apply ((B,) bool, None: all).
    Brightness, contrast and saturation each blend the image with a target (black, the mean of its
    grayscale, its grayscale), so one blend per step does whichever of them each sample takes there,
    with factor 1 (no change) for the others; hue is computed for all and picked with torch.where."""
    blend_factors = torch.stack([brightness, contrast, saturation, torch.ones_like(brightness)], 1)  # (B, 4)
    if apply is not None:
        order = torch.where(apply[:, None], order, 4)  # 4: no op at any step
    for step in range(4):
        op = order[:, step]  # (B,) each sample's op id at this step
        gray = _gray(img)
        target = torch.where(_per_sample(op == 2), gray, gray.mean((1, 2, 3), keepdim=True) * _per_sample(op == 1))
        img = _blend(img, target, blend_factors.gather(1, op.clamp(max=3)[:, None]).squeeze(1))
        img = torch.where(_per_sample(op == 3), adjust_hue(img, hue), img)
    return img


def gaussian_blur(img, kernel_size, sigma):
    """TF.gaussian_blur(img, [k, k], [sigma, sigma]) with a (B,) sigma: the same normalised Gaussian
    kernel and reflect padding, applied separably (rows, then columns) as sums of shifted slices."""
    half = kernel_size // 2
    x = torch.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size, device=img.device)
    kernel = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)  # (B, k)
    taps = [_per_sample(t) for t in (kernel / kernel.sum(1, keepdim=True)).unbind(1)]  # k of (B, 1, 1, 1)
    padded = F.pad(img, (half, half, half, half), mode="reflect")  # (B, C, H + 2 half, W + 2 half)
    H, W = img.shape[-2:]
    rows = sum(t * padded[..., i:i + W] for i, t in enumerate(taps))  # (B, C, H + 2 half, W)
    return sum(t * rows[..., i:i + H, :] for i, t in enumerate(taps))


def solarize(img, threshold=SOLARIZE_THRESHOLD / 255):
    """TF.solarize on a float image: invert the pixels at or above threshold."""
    return torch.where(img >= threshold, 1 - img, img)


def normalize(img, mean, std):
    """TF.normalize with per-channel python floats mean, std."""
    return (img - _column(mean, img.device)) / _column(std, img.device)


class BatchView:
    """One view's pipeline for a batch, as carl_view / carp_view: sample() draws each sample's random
    parameters from a generator, apply() makes the views from them; calling it does both."""

    def __init__(self, size, dataset, *, scale, jitter, jitter_p, gray_p, blur_p, solarize_p):
        self.size, self.scale, self.jitter = size, scale, jitter
        self.jitter_p, self.gray_p, self.blur_p, self.solarize_p = jitter_p, gray_p, blur_p, solarize_p
        self.kernel, self.sigma = blur_kernel_sigma(size)
        self.mean, self.std = MEAN_STD.get(dataset, IMAGENET_STATS)

    def sample(self, n, height, width, g):
        """Parameters for n images of height x width: a dict of (n,) tensors ((n, 4) for order) on g's device."""
        top, left, h, w = sample_crop_boxes(n, height, width, self.scale, RATIO, g)
        b, c, s, hue = self.jitter  # ColorJitter's ranges: [max(0, 1 - x), 1 + x], hue [-hue, hue]
        return dict(
            top=top, left=left, height=h, width=w,
            flip=_coin(n, FLIP_P, g),
            jitter=_coin(n, self.jitter_p, g),
            # (n, 4): a random permutation per sample, as ColorJitter's randperm(4)
            order=torch.rand(n, 4, generator=g, device=g.device).argsort(dim=1, stable=True),
            brightness=_uniform(n, max(0, 1 - b), 1 + b, g),
            contrast=_uniform(n, max(0, 1 - c), 1 + c, g),
            saturation=_uniform(n, max(0, 1 - s), 1 + s, g),
            hue=_uniform(n, -hue, hue, g),
            gray=_coin(n, self.gray_p, g),
            blur=_coin(n, self.blur_p, g),
            sigma=_uniform(n, *self.sigma, g),
            solarize=_coin(n, self.solarize_p, g),
        )

    def apply(self, img, p):
        """img (B, 3, H, W) float in [0, 1] or uint8 -> (B, 3, size, size) float32, normalised."""
        x = resized_crop(to_float(img), p["top"], p["left"], p["height"], p["width"], self.size, p["flip"])
        x = color_jitter(x, p["brightness"], p["contrast"], p["saturation"], p["hue"], p["order"], p["jitter"])
        x = torch.where(_per_sample(p["gray"]), grayscale(x), x)
        if self.blur_p > 0:  # a setting, not a tensor: skips the work when the step never applies
            x = torch.where(_per_sample(p["blur"]), gaussian_blur(x, self.kernel, p["sigma"]), x)
        if self.solarize_p > 0:
            x = torch.where(_per_sample(p["solarize"]), solarize(x), x)
        return normalize(x, self.mean, self.std)

    def __call__(self, img, g):
        return self.apply(img, self.sample(img.shape[0], img.shape[2], img.shape[3], g))


class BatchTwoViews:
    """(x, g) -> (view_a, view_b): x (B, 3, H, W) uint8 on the device, g a torch.Generator on that
    device; each view (B, 3, size, size) float32, normalised."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, x, g):
        img = to_float(x)
        return self.first(img, g), self.second(img, g)


def batch_view(kind, view, size, dataset):
    """The BatchView of view 0 or 1 of kind "carl" or "carp" (settings from VIEWS)."""
    v = VIEWS[kind]
    return BatchView(size, dataset, scale=v["scale"], jitter=v["jitter"], jitter_p=v["jitter_p"],
                     gray_p=v["gray_p"], blur_p=v["blur_p"][view], solarize_p=v["solarize_p"][view])


def batch_pretrain_views(kind, size, dataset):
    """The batched pretrain_views: CARL's two views share one pipeline, CARP's are asymmetric."""
    if kind == "carl":
        view = batch_view(kind, 0, size, dataset)
        return BatchTwoViews(view, view)
    return BatchTwoViews(batch_view("carp", 0, size, dataset), batch_view("carp", 1, size, dataset))


def eval_batch(x, size, dataset):
    """eval_view on a batch: x (B, 3, H, W) uint8 (or float in [0, 1]) -> (B, 3, size, size) float32,
    normalised. Resizes (bilinear, antialiased, as T.Resize on tensors) only when the shape changes."""
    img = to_float(x)
    H, W = img.shape[-2:]
    short = _eval_resize(size)
    # T.Resize(short): the short side to `short`, the long one scaled and truncated as torchvision does
    rh, rw = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    if (rh, rw) != (H, W):
        img = F.interpolate(img, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))  # T.CenterCrop
    mean, std = MEAN_STD.get(dataset, IMAGENET_STATS)
    return normalize(img[..., top:top + size, left:left + size], mean, std)
