"""Augmentation and preprocessing, on the host (numpy/PIL, per example) and on the device (JAX, per batch).

Where an augmentation runs depends on the feed: in-memory feeds ('host', 'device') hold images
already at the training size and augment inside the jitted train step; the 'stream' feed
decodes variable-size images in Grain workers and augments them there. CIFAR augmentation
exists in both places and computes the same pixels from the same offsets and flips. Mixup
and CutMix mix whole batches, so they always run on the device. `check_config` refuses
augmentation and normalisation fields of `config.data` that cannot work together.
"""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from resnet_jax.errors import UserError, check_field_choice, refuse

AUGMENTATIONS = ('none', 'cifar', 'inception')  # data.augment: nothing, pad-crop-flip, random-resized crop
NORMALIZATIONS = ('per_channel', 'per_pixel_mean')  # data.normalize: (x - mean) / std, or x - mean image
CIFAR_PAD = 4
# How the CIFAR crop pads the image, as numpy.pad modes: black (He et al.) or mirrored without repeating the
# edge (Zagoruyko & Komodakis's script); jnp.pad computes the same pixels on the device.
PAD_MODES = {'zero': 'constant', 'reflect': 'reflect'}


def check_config(config) -> None:
    """Refuse augmentation and normalisation fields of config.data that are unknown or do not fit
    together (the feed-dependent limits are checked with the feed)."""
    d = config.data
    check_field_choice('data.augment', d.augment, AUGMENTATIONS)
    if (d.mean is None) != (d.std is None):
        refuse('data.mean', 'set both data.mean and data.std, or neither')
    for field in ('mean', 'std'):
        if d[field] is not None and len(d[field]) != 3:
            refuse(f'data.{field}', f'needs one value per RGB channel, got {d[field]}')
    check_field_choice('data.normalize', d.normalize, NORMALIZATIONS)
    check_field_choice('data.pad_mode', d.pad_mode, tuple(PAD_MODES))
    if d.normalize == 'per_pixel_mean' and d.mean is not None:
        refuse('data.mean', "data.mean/data.std are per-channel values for data.normalize='per_channel'")
    if (d.pad_mode != 'zero' or d.pad_after_normalize) and d.augment != 'cifar':
        refuse('data.pad_mode', f"pad_mode and pad_after_normalize set the 'cifar' crop; data.augment is {d.augment!r}")


# ---- host, one example at a time -----------------------------------------------------------

class CorruptImageError(UserError, ValueError):
    """An image file or record that cannot be decoded; the message names it."""


def decode(data, name: str) -> np.ndarray:
    """uint8 RGB (H, W, 3) from encoded bytes, a file path, or an array (grey and RGBA become RGB)."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return data if data.ndim == 3 and data.shape[-1] == 3 else np.asarray(_as_pil(data).convert('RGB'))
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return np.asarray(im.convert('RGB'))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise CorruptImageError(f'cannot decode image {name}: {type(e).__name__}: {e}') from e


def _as_pil(image: np.ndarray):
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """`image` as size x size (bilinear, antialiased); unchanged if it already is."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(_as_pil(image).resize((size, size), Image.BILINEAR))


def cifar_crop_flip_host(image: np.ndarray, offset_y: int, offset_x: int, flip: bool,
                         pad_mode: str = 'zero') -> np.ndarray:
    """The crop at (offset_y, offset_x) of the image padded by 4 (`PAD_MODES`), mirrored if `flip`."""
    h, w, _ = image.shape
    padded = np.pad(image, [(CIFAR_PAD, CIFAR_PAD), (CIFAR_PAD, CIFAR_PAD), (0, 0)], mode=PAD_MODES[pad_mode])
    crop = padded[offset_y:offset_y + h, offset_x:offset_x + w]
    return np.ascontiguousarray(crop[:, ::-1] if flip else crop)


def cifar_augment_host(rng: np.random.Generator, image: np.ndarray, pad_mode: str = 'zero') -> np.ndarray:
    """He et al.'s CIFAR augmentation of one image on the host (the 'stream' feed), with offsets and flip
    drawn from `rng`; the same pixels as `cifar_augment` on the device."""
    offset_y, offset_x = rng.integers(0, 2 * CIFAR_PAD + 1, 2)
    return cifar_crop_flip_host(image, int(offset_y), int(offset_x), bool(rng.random() < 0.5), pad_mode)


def inception_crop_box(rng: np.random.Generator, height: int, width: int, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style random crop (Szegedy et al. 2015): area a uniform
    fraction of the image in `scale`, aspect ratio log-uniform in `ratio`; after `attempts`
    misses, the centre crop with the aspect ratio clipped to `ratio`."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def inception_augment_host(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """Random-resized crop to size x size (bilinear, antialiased), then a random horizontal flip."""
    top, left, h, w = inception_crop_box(rng, *image.shape[:2])
    out = np.asarray(_as_pil(image).resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def center_crop_host(image: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
    """Evaluation view: shorter side resized to size / crop_fraction, then the central size x size."""
    h, w = image.shape[:2]
    short = int(round(size / crop_fraction))
    scale = short / min(h, w)
    new_h, new_w = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    resized = np.asarray(_as_pil(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def train_view(rng: np.random.Generator, image: np.ndarray, augment: str, size: int,
               pad_mode: str = 'zero') -> np.ndarray:
    """A decoded training image as the 'stream' feed hands it to the step: size x size, augmented."""
    if augment == 'inception':
        return inception_augment_host(rng, image, size)
    image = resize(image, size)
    return cifar_augment_host(rng, image, pad_mode) if augment == 'cifar' else image


def eval_view(image: np.ndarray, augment: str, size: int, crop_fraction: float) -> np.ndarray:
    """A decoded evaluation image: centre crop for ImageNet-style training, else resized to size."""
    return center_crop_host(image, size, crop_fraction) if augment == 'inception' else resize(image, size)


# ---- device, whole batches under jit -------------------------------------------------------

def normalize(images, mean, std):
    """uint8 NHWC images to float32 in [0, 1], minus `mean` (per channel (C,), or per pixel (H, W, C)),
    divided by `std` (per channel)."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)


def cifar_crop_flip(images, offsets, flips, pad_mode: str = 'zero'):
    """`cifar_crop_flip_host` for a batch (uint8 or already normalised): offsets (N, 2) into the 4-padded
    images, flips (N,)."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, [(0, 0), (CIFAR_PAD, CIFAR_PAD), (CIFAR_PAD, CIFAR_PAD), (0, 0)], mode=PAD_MODES[pad_mode])

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def cifar_augment(rng, images, pad_mode: str = 'zero'):
    """He et al.'s CIFAR augmentation: pad by 4 (zeros, or `pad_mode`), random crop back, random
    horizontal flip."""
    crop_rng, flip_rng = jax.random.split(rng)
    offsets = jax.random.randint(crop_rng, (images.shape[0], 2), 0, 2 * CIFAR_PAD + 1)
    return cifar_crop_flip(images, offsets, jax.random.bernoulli(flip_rng, 0.5, (images.shape[0],)), pad_mode)


def mix(rng, x, targets, mixup_alpha, cutmix_alpha):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of each example with its mirror in the batch.

    One mixing weight lam ~ Beta(alpha, alpha) per batch; example i is mixed with example
    N-1-i, images and soft targets alike. CutMix pastes a box of about (1 - lam) of the area
    and sets lam to the area actually kept. With both alphas set, each batch uses one of the
    two with probability 1/2. An alpha may be a traced scalar (a population member's): the
    code for it is then always there, and a member whose alpha is 0 gets lam = 1, its batch
    unchanged, as its standalone run (which has no such code) computes.
    """
    choose_rng, mixup_rng, cutmix_rng, box_rng = jax.random.split(rng, 4)
    n, h, w, _ = x.shape
    partner_x, partner_t = x[::-1], targets[::-1]

    def mixup():
        lam = _mixing_weight(mixup_rng, mixup_alpha)
        return lam * x + (1 - lam) * partner_x, lam

    def cutmix():
        lam = _mixing_weight(cutmix_rng, cutmix_alpha)
        cut_h = (h * jnp.sqrt(1 - lam)).astype(jnp.int32)
        cut_w = (w * jnp.sqrt(1 - lam)).astype(jnp.int32)
        cy, cx = jax.random.randint(box_rng, (2,), 0, jnp.array([h, w]))
        y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
        x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
        rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
        return jnp.where(box, partner_x, x), 1 - (y1 - y0) * (x1 - x0) / (h * w)

    if _may_mix(mixup_alpha) and _may_mix(cutmix_alpha):
        (mx, mlam), (cx_, clam) = mixup(), cutmix()
        use_cutmix = jax.random.bernoulli(choose_rng, 0.5)
        if _traced(mixup_alpha) or _traced(cutmix_alpha):  # a member with one alpha at 0 uses the other
            use_cutmix = jnp.where((mixup_alpha > 0) & (cutmix_alpha > 0), use_cutmix, cutmix_alpha > 0)
        x_mixed, lam = jnp.where(use_cutmix, cx_, mx), jnp.where(use_cutmix, clam, mlam)
    else:
        x_mixed, lam = mixup() if _may_mix(mixup_alpha) else cutmix()
    return x_mixed, lam * targets + (1 - lam) * partner_t


def _traced(alpha) -> bool:
    return not isinstance(alpha, (int, float))


def _may_mix(alpha) -> bool:
    """Whether the step needs the code for this alpha: a traced alpha may be > 0 in some member."""
    return _traced(alpha) or alpha > 0


def _mixing_weight(rng, alpha):
    """lam ~ Beta(alpha, alpha); for a traced alpha, 1 (no mixing) where it is 0."""
    if not _traced(alpha):
        return jax.random.beta(rng, alpha, alpha)
    on = alpha > 0
    safe = jnp.where(on, alpha, 1.0)
    return jnp.where(on, jax.random.beta(rng, safe, safe), 1.0)
