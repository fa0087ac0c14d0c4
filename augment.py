"""View pipelines, in two implementations that make the same views.

- PIL (`pretrain_views`, `eval_view`, `train_view`): torchvision transforms on one PIL image at a
  time, run in the DataLoader workers.
- Batched (`batch_pretrain_views`, `eval_batch`, `batch_train_view`): the same views of a whole
  uint8 batch at once on the training device (GPU, or CPU on a CPU run), with per-sample random
  parameters drawn from a torch.Generator, torch ops only and no host-device synchronisation.
  Each op matches torchvision.transforms.functional on float tensors, and the random parameters
  follow torchvision's samplers; the PIL path differs only by rounding to uint8 between ops, by
  PIL's own colour maths, and by antialiasing crops larger than the output (the batched crop
  does not).
Both read their settings from the tables `VIEWS` and `TRAIN_VIEW`.

- CARL (thesis 5.8.3, SimCLR-style): random resized crop (8%-100% of the area), flip,
  colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=0.5). Both views alike.
- CARP (thesis Listing 3, BYOL-style, asymmetric): crop 15%-92.5%, flip, strong colour
  jitter (p=0.8), grayscale (p=0.2); blur p=1.0 / 0.1 and solarize p=0.0 / 0.2 for views 1 / 2.
- neurips23 (the published CARP code's, DINO's): crop 20%-100%, flip, colour jitter (0.4, 0.4,
  0.2, 0.1; p=0.8), grayscale (p=0.2); blur p=1.0 / 0.1 and solarize p=0.0 / 0.2 for views 1 / 2.
Multi-crop: views past the first two global crops alternate their settings; local crops are view
1's pipeline with their own crop scale, blur p=0.5 and no solarisation (the published code's
local crops), made at their own (smaller) size.
Blur is sized to the image: the kernel is ~10% of the side (odd, >= 3) and sigma is the thesis's
0.1-2.0 px at 224 px scaled by side / 224, so it takes the same share of a 32 px CIFAR image as of
an ImageNet crop (unscaled, up to 2 px on a 32 px image would blur 7x harder). At 32 px that all
but switches blur off, as SimCLR's CIFAR setup does; the thesis does not say how it sized its blur
for CIFAR.
"""
import math

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

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
    "neurips23": dict(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2,
                      blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
}
# local crops' blur probability (the published CARP code; SwAV's multi-crop alike)
LOCAL_BLUR_P = 0.5
# train_view's (the supervised heads'): RandomResizedCrop's default scale and flip only
TRAIN_VIEW = dict(scale=(0.08, 1.0), jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0,
                  blur_p=0.0, solarize_p=0.0)
RATIO = (3 / 4, 4 / 3)  # crop aspect ratio range (RandomResizedCrop's default)
FLIP_P = 0.5
SOLARIZE_THRESHOLD = 128  # of 255: pixels at or above it are inverted


def blur_kernel_sigma(size):
    """Blur sized to the image (see above): (odd kernel size, (sigma min, sigma max))."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    scale = size / 224
    return kernel, (0.1 * scale, 2.0 * scale)


def view_settings(kind, global_crops=2, local_crops=0, local_scale=None):
    """One settings dict per view of kind "carl", "carp" or "neurips23" (VIEWS), read by both
    implementations: the global crops (alternating view 1 / view 2 settings), then the local
    crops."""
    v = VIEWS[kind]
    common = dict(jitter=v["jitter"], jitter_p=v["jitter_p"], gray_p=v["gray_p"])
    views = [dict(common, scale=v["scale"], blur_p=v["blur_p"][i % 2],
                  solarize_p=v["solarize_p"][i % 2])
             for i in range(global_crops)]
    if local_crops:
        views += [dict(common, scale=tuple(local_scale), blur_p=LOCAL_BLUR_P,
                       solarize_p=0.0)] * local_crops
    return views


# ---------------------------------------------------------------- PIL, in the DataLoader workers

def _finish(dataset):
    mean, std = MEAN_STD.get(dataset, IMAGENET_STATS)
    return [T.ToTensor(), T.Normalize(mean, std)]


def _blur(size, p):
    kernel, sigma = blur_kernel_sigma(size)
    return T.RandomApply([T.GaussianBlur(kernel, sigma=sigma)], p=p)


def pil_view(size, dataset, *, scale, jitter, jitter_p, gray_p, blur_p, solarize_p):
    """One view's PIL pipeline from its settings (view_settings): img -> (3, size, size) float32."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, ratio=RATIO, antialias=True),
        T.RandomHorizontalFlip(FLIP_P),
        T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
        T.RandomGrayscale(p=gray_p),
        _blur(size, p=blur_p),
        *([T.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p)] if solarize_p > 0 else []),
        *_finish(dataset),
    ])


class MultiViews:
    """img -> [view 1, view 2, ...], each from its own pipeline."""

    def __init__(self, views):
        self.views = views

    def __call__(self, img):
        return [view(img) for view in self.views]


def pretrain_views(kind, size, dataset, global_crops=2, local_crops=0, local_size=None,
                   local_scale=None):
    """The PIL views of one image for pretraining: global crops at `size`, local ones at
    `local_size`."""
    settings = view_settings(kind, global_crops, local_crops, local_scale)
    sizes = [size] * global_crops + [local_size] * local_crops
    return MultiViews([pil_view(s, dataset, **v) for s, v in zip(sizes, settings)])


def eval_resize(size):
    """eval_view's short side: size * 8/7 (ImageNet's 256 for 224), or size for small images."""
    return size if size <= 64 else round(size * 8 / 7)


def stored_square(size):
    """PIL image -> how a tree of mixed image sizes is held for the device loader: eval_view's
    resize, then a square of the short side, placed so that eval_batch's centre crop of it (no
    second resize) is exactly eval_view's crop; random crops then come from that square, not the
    whole image."""
    short = eval_resize(size)

    def centre(extent):  # T.CenterCrop's offset of a `size` crop
        return int(round((extent - size) / 2.0))

    def fit(img):
        img = TF.resize(img, short, antialias=True)
        width, height = img.size
        return TF.crop(img, centre(height) - centre(short), centre(width) - centre(short),
                       short, short)
    return fit


def eval_view(size, dataset):
    """Deterministic: resize the short side to size * 8/7 (ImageNet's 256 for 224), centre crop.
    Small images (<= 64 px) are only resized to `size`, since their objects fill the frame."""
    return T.Compose([T.Resize(eval_resize(size), antialias=True), T.CenterCrop(size),
                      *_finish(dataset)])


def train_view(size, dataset):
    """Light augmentation for supervised heads (the linear-aug probe, fine-tuning):
    random resized crop and flip."""
    return T.Compose([T.RandomResizedCrop(size, scale=TRAIN_VIEW["scale"], ratio=RATIO,
                                          antialias=True),
                      T.RandomHorizontalFlip(FLIP_P), *_finish(dataset)])


# ---------------------------------------------------------------- batched, on the training device
# Images are (B, 3, H, W) float in [0, 1]; per-sample parameters are (B,) tensors. Each view's
# random numbers are drawn in one call from a torch.Generator, as (B, UNIFORMS) uniforms on its
# device, and turned into parameters by plain tensor maths; steps that apply with a probability are
# computed for the whole batch and picked per sample with torch.where, so nothing waits on the
# device, and the whole pipeline after the draw is one function of (images, uniforms) that
# torch.compile can fuse (on a GPU, hundreds of small kernels otherwise bound its speed by their
# launches). Ops are written with elementwise maths, slicing and grid_sample (no conv, whose cuDNN
# algorithm choice under cudnn.benchmark could change the bits), so a seed gives the same views.

ATTEMPTS = 10  # RandomResizedCrop's tries before its fallback
# The columns of a view's uniforms: (name, width)
DRAWS = (("area", ATTEMPTS), ("aspect", ATTEMPTS), ("top", 1), ("left", 1), ("flip", 1),
         ("jitter", 1), ("order", 4), ("brightness", 1), ("contrast", 1), ("saturation", 1),
         ("hue", 1), ("gray", 1), ("blur", 1), ("sigma", 1), ("solarize", 1))
UNIFORMS = sum(width for _, width in DRAWS)


def draw_uniforms(n, g, views=None):
    """(n, UNIFORMS) uniforms in [0, 1) on g's device, or (views, n, UNIFORMS) for several views."""
    shape = (n, UNIFORMS) if views is None else (views, n, UNIFORMS)
    return torch.rand(shape, generator=g, device=g.device)


def split_uniforms(u):
    """(n, UNIFORMS) -> {name: (n,) or (n, width)} by DRAWS (views of u: no copies)."""
    parts = u.split([width for _, width in DRAWS], dim=1)
    return {name: part.squeeze(1) if width == 1 else part
            for (name, width), part in zip(DRAWS, parts)}


def to_float(x):
    """uint8 -> float32 in [0, 1], as T.ToTensor; float input is taken to be in [0, 1] already."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def _between(u, low, high):
    return u * (high - low) + low  # uniform in [0, 1) -> uniform in [low, high)


def _column(values, device):
    """(1, C, 1, 1) float32 from python floats, filled on the device (no host-to-device copy)."""
    return torch.stack([torch.full((), v, device=device) for v in values]).view(1, -1, 1, 1)


def _per_sample(factor):
    return factor.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), to broadcast over an image batch


def crop_boxes(u, height, width, scale, ratio):
    """T.RandomResizedCrop.get_params for n images of height x width at once, from split_uniforms'
    area, aspect (n, ATTEMPTS each), top and left (n,): each sample tries ATTEMPTS boxes (area
    fraction uniform in scale, log aspect ratio uniform in log(ratio)) and keeps the first that
    fits, else takes torchvision's fallback (central crop, ratio clamped). Returns
    (top, left, h, w), each (n,) int64."""
    target = height * width * _between(u["area"], *scale)  # (n, ATTEMPTS)
    aspect = torch.exp(_between(u["aspect"], math.log(ratio[0]),
                                math.log(ratio[1])))  # (n, ATTEMPTS)
    w = torch.round(torch.sqrt(target * aspect)).long()  # (n, ATTEMPTS)
    h = torch.round(torch.sqrt(target / aspect)).long()  # (n, ATTEMPTS)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, ATTEMPTS)
    # index of the first box that fits (argmax takes the first maximum); `found` where any does
    first = fits.byte().argmax(1, keepdim=True)  # (n, 1)
    found = fits.any(1)  # (n,)
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
    top = torch.minimum((u["top"] * (height - h + 1)).long(), height - h)
    left = torch.minimum((u["left"] * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def resized_crop(img, top, left, h, w, size, flip=None):
    """Per sample TF.resized_crop(img, top, left, h, w, [size, size], antialias=True), then TF.hflip
    where flip (bool, (B,)), as one bilinear F.grid_sample. Matches torchvision up to float rounding
    when upsampling (crop <= size, the normal case on small images): there antialiasing changes
    nothing. Downscaling (crop > size) has no antialias here (plain bilinear), so it aliases a
    little."""
    B, _, H, W = img.shape
    # (size,) output pixel centres in [0, 1]
    centres = (torch.arange(size, device=img.device) + 0.5) / size

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
    grid = torch.stack([xs[:, None, :].expand(B, size, size),
                        ys[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(img):
    r, g, b = img.unbind(1)
    # TF.rgb_to_grayscale's weights
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # (B, 1, H, W)


def grayscale(img):
    """TF.rgb_to_grayscale(img, num_output_channels=3)."""
    return _gray(img).expand_as(img)


def adjust_hue(img, factor):
    """TF.adjust_hue with a (B,) factor in [-0.5, 0.5]: rotate the hue in HSV space, computed for
    the three channels at once (the fewer ops, the fewer kernel launches on a GPU)."""
    value, largest = img.max(1)  # each (B, H, W): the largest channel, and which it is
    chroma = value - img.amin(1)
    # hue in sixths of a turn: 2 i + (next channel - the one after) / chroma, for the largest
    # channel i (ties give the same hue); grey pixels (chroma 0) keep any hue, so only avoid
    # 0 / 0 there
    sixths = ((img.roll(-1, 1) - img.roll(-2, 1))
              / chroma.clamp(min=torch.finfo(img.dtype).tiny)[:, None])
    # (B, 3, H, W)
    sixths = sixths + torch.arange(0.0, 6.0, 2.0, device=img.device).view(1, 3, 1, 1)
    hue = sixths.gather(1, largest[:, None]) + 6 * _per_sample(factor)  # (B, 1, H, W), rotated
    # back to RGB: channel n (5, 3, 1 for r, g, b) is value - chroma * clamp(min(k, 4 - k), 0, 1),
    # with k = (n + hue) mod 6
    k = (hue + torch.arange(5.0, 0.0, -2.0, device=img.device).view(1, 3, 1, 1)) % 6  # (B, 3, H, W)
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # ColorJitter's op ids 0-3


def color_jitter(img, brightness, contrast, saturation, hue, order, apply=None):
    """ColorJitter with per-sample (B,) factors, applied in each sample's order ((B, 4), a
    permutation of the op ids of JITTER_OPS, as ColorJitter's fn_idx), only where apply ((B,) bool,
    None: all). Brightness, contrast and saturation each blend the image with a target (black, the
    mean of its grayscale, its grayscale), so one blend per step does whichever of them each sample
    takes there, with factor 1 (exactly no change) for samples with nothing to blend. Hue, the
    costly op, is computed once: each sample's blends before its hue (up to three steps), the hue
    rotation, then its blends after it (up to three)."""
    factors = torch.stack([brightness, contrast, saturation,
                           torch.ones_like(brightness)], 1)  # (B, 4)
    if apply is not None:
        order = torch.where(apply[:, None], order, 4)  # 4: no op at any step
    is_hue = order == 3  # (B, 4): True at the step of each jittered sample's hue
    hue_step = is_hue.byte().argmax(1, keepdim=True)  # (B, 1): 0 if not jittered (all steps 4)
    steps = torch.arange(4, device=img.device)  # (4,)
    # (B, 6, 1, 1, 1): each sample's blend ops before its hue (steps 0-2), then after it
    # (steps 1-3); 4: none; the trailing dims broadcast over an image batch
    ops = torch.cat([torch.where(steps[:3] < hue_step, order[:, :3], 4),
                     torch.where(steps[1:] > hue_step, order[:, 1:], 4)], 1)[:, :, None, None, None]
    # per blend: its factor, whether its target is the gray image (saturation), and the mean of the
    # gray image as a 0/1 weight (contrast; brightness blends with 0); each (B, 6, 1, 1, 1)
    factor = factors.gather(1, ops.clamp(max=3).flatten(1)).view(ops.shape)
    to_gray, contrast_weight = ops == 2, (ops == 1).float()
    for step in range(6):
        if step == 3:
            img = torch.where(_per_sample(is_hue.any(1)), adjust_hue(img, hue), img)
        gray = _gray(img)  # (B, 1, H, W)
        # (B, 1, H, W): the gray image, its mean (contrast) or 0 (brightness; none: unused at
        # factor 1)
        target = torch.where(to_gray[:, step], gray,
                             gray.mean((1, 2, 3), keepdim=True) * contrast_weight[:, step])
        # lerp's weight 1 gives img exactly
        img = torch.lerp(target, img, factor[:, step]).clamp(0, 1)
    return img


def gaussian_blur(img, kernel_size, sigma):
    """TF.gaussian_blur(img, [k, k], [sigma, sigma]) with a (B,) sigma: the same normalised Gaussian
    kernel and reflect padding, applied separably (rows, then columns) as sums of shifted slices."""
    half = kernel_size // 2
    x = torch.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size,
                       device=img.device)
    kernel = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)  # (B, k)
    taps = [_per_sample(t)
            for t in (kernel / kernel.sum(1, keepdim=True)).unbind(1)]  # k of (B, 1, 1, 1)
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
    """One view's pipeline for a batch, as pil_view: parameters() turns each sample's
    uniforms into its random parameters, apply() makes the views from them; a call does both from
    one draw of g."""

    def __init__(self, size, dataset, *, scale, jitter, jitter_p, gray_p, blur_p, solarize_p):
        self.size, self.scale, self.jitter = size, scale, jitter
        self.jitter_p, self.gray_p = jitter_p, gray_p
        self.blur_p, self.solarize_p = blur_p, solarize_p
        self.kernel, self.sigma = blur_kernel_sigma(size)
        self.mean, self.std = MEAN_STD.get(dataset, IMAGENET_STATS)

    def parameters(self, u, height, width):
        """u (n, UNIFORMS) -> parameters for n images of height x width: a dict of (n,) tensors
        ((n, 4) for order). Steps with probability p apply where their uniform is below p (as
        RandomApply: never at p = 0, always at p = 1)."""
        u = split_uniforms(u)
        top, left, h, w = crop_boxes(u, height, width, self.scale, RATIO)
        b, c, s, hue = self.jitter  # ColorJitter's ranges: [max(0, 1 - x), 1 + x], hue [-hue, hue]
        return dict(
            top=top, left=left, height=h, width=w,
            flip=u["flip"] < FLIP_P,
            jitter=u["jitter"] < self.jitter_p,
            # (n, 4): a random permutation, as ColorJitter's randperm(4)
            order=u["order"].argsort(dim=1, stable=True),
            brightness=_between(u["brightness"], max(0, 1 - b), 1 + b),
            contrast=_between(u["contrast"], max(0, 1 - c), 1 + c),
            saturation=_between(u["saturation"], max(0, 1 - s), 1 + s),
            hue=_between(u["hue"], -hue, hue),
            gray=u["gray"] < self.gray_p,
            blur=u["blur"] < self.blur_p,
            sigma=_between(u["sigma"], *self.sigma),
            solarize=u["solarize"] < self.solarize_p,
        )

    def apply(self, img, p):
        """img (B, 3, H, W) float in [0, 1] or uint8 -> (B, 3, size, size) float32, normalised."""
        x = resized_crop(to_float(img), p["top"], p["left"], p["height"], p["width"], self.size,
                         p["flip"])
        if self.jitter_p > 0:  # a setting, not a tensor: skips the work when the step never applies
            x = color_jitter(x, p["brightness"], p["contrast"], p["saturation"], p["hue"],
                             p["order"], p["jitter"])
        if self.gray_p > 0:
            x = torch.where(_per_sample(p["gray"]), grayscale(x), x)
        if self.blur_p > 0:
            x = torch.where(_per_sample(p["blur"]), gaussian_blur(x, self.kernel, p["sigma"]), x)
        if self.solarize_p > 0:
            x = torch.where(_per_sample(p["solarize"]), solarize(x), x)
        return normalize(x, self.mean, self.std)

    def __call__(self, img, g):
        return self.apply(img, self.parameters(draw_uniforms(img.shape[0], g), *img.shape[-2:]))


class BatchViews:
    """(x, g) -> [view 1, view 2, ...]: x (B, 3, H, W) uint8 on the device, g a torch.Generator on
    that device; each view (B, 3, its size, its size) float32, normalised, every view cut from the
    same stored images. One draw of random numbers per call (one row of uniforms per view and
    image); everything after it is make(), a pure function of (x, uniforms), which compile() hands
    to torch.compile."""

    def __init__(self, views):
        self.views = views  # BatchView per view
        self.make_views = self.make

    def make(self, x, u):
        """x (B, 3, H, W) uint8, u (V, B, UNIFORMS) -> V views."""
        img = to_float(x)
        H, W = img.shape[-2:]
        return [view.apply(img, view.parameters(u_v, H, W)) for view, u_v in zip(self.views, u)]

    def compile(self):
        """Fuse make() into a few kernels (fixed shapes: every training batch has the same)."""
        self.make_views = torch.compile(self.make, dynamic=False)
        return self

    def __call__(self, x, g):
        return self.make_views(x, draw_uniforms(x.shape[0], g, views=len(self.views)))


def batch_train_view(size, dataset):
    """The batched train_view: (x (B, 3, H, W) uint8, g) -> (B, 3, size, size) float32,
    normalised."""
    return BatchView(size, dataset, **TRAIN_VIEW)


def batch_pretrain_views(kind, size, dataset, global_crops=2, local_crops=0, local_size=None,
                         local_scale=None):
    """The batched pretrain_views: the same views, made on the device from a batch of stored
    images."""
    settings = view_settings(kind, global_crops, local_crops, local_scale)
    sizes = [size] * global_crops + [local_size] * local_crops
    return BatchViews([BatchView(s, dataset, **v) for s, v in zip(sizes, settings)])


def eval_batch(x, size, dataset):
    """eval_view on a batch: x (B, 3, H, W) uint8 (or float in [0, 1]) -> (B, 3, size, size)
    float32, normalised. Resizes (bilinear, antialiased, as T.Resize on tensors) only when the shape
    changes."""
    img = to_float(x)
    H, W = img.shape[-2:]
    short = eval_resize(size)
    # T.Resize(short): the short side to `short`, the long one scaled and truncated as
    # torchvision does
    rh, rw = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    if (rh, rw) != (H, W):
        img = F.interpolate(img, size=(rh, rw), mode="bilinear", align_corners=False,
                            antialias=True)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))  # T.CenterCrop
    mean, std = MEAN_STD.get(dataset, IMAGENET_STATS)
    return normalize(img[..., top:top + size, left:left + size], mean, std)
