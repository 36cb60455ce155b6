"""Augmentation: host (numpy/PIL) and device (JAX) CIFAR crops agree pixel for pixel and in
distribution; Inception crops stay in bounds; Mixup/CutMix mix each example with its mirror."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import augment

PAD = augment.CIFAR_PAD
OFFSETS = [(dy, dx) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]  # 81


# ---- CIFAR crop and flip -------------------------------------------------------------------

def test_cifar_crop_flip_host_matches_device_for_every_offset_and_flip():
    cases = [(dy, dx, flip) for dy, dx in OFFSETS for flip in (False, True)]
    images = np.random.default_rng(0).integers(0, 256, (len(cases), 32, 32, 3), dtype=np.uint8)
    offsets = np.array([(dy, dx) for dy, dx, _ in cases], np.int32)
    flips = np.array([flip for _, _, flip in cases])

    device = np.asarray(augment.cifar_crop_flip(jnp.asarray(images), jnp.asarray(offsets), jnp.asarray(flips)))

    assert device.dtype == np.uint8 and device.shape == images.shape
    for i, (dy, dx, flip) in enumerate(cases):
        host = augment.cifar_crop_flip_host(images[i], dy, dx, flip)
        np.testing.assert_array_equal(device[i], host, err_msg=f'offset ({dy}, {dx}) flip {flip}')


def test_cifar_crop_flip_host_by_hand():
    """Offset (0, 0) takes the top-left corner of the padded image: 4 zero rows and columns."""
    image = np.random.default_rng(1).integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no zeros
    out = augment.cifar_crop_flip_host(image, 0, 0, False)
    assert (out[:PAD] == 0).all() and (out[:, :PAD] == 0).all()
    np.testing.assert_array_equal(out[PAD:, PAD:], image[:-PAD, :-PAD])
    np.testing.assert_array_equal(out[4, 4], image[0, 0])
    np.testing.assert_array_equal(augment.cifar_crop_flip_host(image, 0, 0, True), out[:, ::-1])


def coordinate_image():
    """Channel 0 = row + 1, channel 1 = column + 1 (1..32), channel 2 = 0: a crop reveals its offset."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
    return np.stack([rows + 1, cols + 1, np.zeros_like(rows)], -1).astype(np.uint8)


def category(out):
    """Index in 0..161 of the (dy, dx, flip) that produced `out` from `coordinate_image()`.

    Unflipped, out[r, c] = image[r + dy - 4, c + dx - 4], so out[16, 16] = (13 + dy, 13 + dx);
    flipped, out[r, c] = image[r + dy - 4, 27 - c + dx], so out[16, 16, 1] = 12 + dx and the
    column value decreases to the right."""
    centre = out[16, 16].astype(int)
    flip = out[16, 17, 1] < centre[1]
    dy, dx = centre[0] - 13, centre[1] - (12 if flip else 13)
    assert 0 <= dy <= 2 * PAD and 0 <= dx <= 2 * PAD
    return (dy * (2 * PAD + 1) + dx) * 2 + int(flip)


def test_category_reads_back_every_offset_and_flip():
    """The decoder used by the statistical test below is itself right."""
    image = coordinate_image()
    for dy, dx in OFFSETS:
        for flip in (False, True):
            out = augment.cifar_crop_flip_host(image, dy, dx, flip)
            assert category(out) == (dy * (2 * PAD + 1) + dx) * 2 + int(flip)


def test_cifar_augment_device_and_host_draw_the_same_distribution():
    """Both draw each of the 81 offsets x 2 flips uniformly. 40,000 draws: two independent
    uniform histograms of that size differ by a total variation of about 0.036 (sd 0.002);
    at 20,000 it would be about 0.05, too close to the bound."""
    n, cats = 40_000, 2 * len(OFFSETS)
    image = coordinate_image()

    device_out = np.asarray(augment.cifar_augment(jax.random.key(0), jnp.broadcast_to(image, (n, 32, 32, 3))))
    centre = device_out[:, 16, 16].astype(int)
    flip = device_out[:, 16, 17, 1] < centre[:, 1]
    dy, dx = centre[:, 0] - 13, centre[:, 1] - np.where(flip, 12, 13)
    device_counts = np.bincount((dy * (2 * PAD + 1) + dx) * 2 + flip, minlength=cats)

    rng = np.random.default_rng(0)
    host_counts = np.bincount([category(augment.cifar_augment_host(rng, image)) for _ in range(n)], minlength=cats)

    expected, sigma = n / cats, np.sqrt(n * (1 / cats) * (1 - 1 / cats))
    for name, counts in (('device', device_counts), ('host', host_counts)):
        assert counts.shape == (cats,) and counts.sum() == n, name
        assert (counts > 0).all(), f'{name}: categories never drawn: {np.flatnonzero(counts == 0)}'
        assert np.abs(counts - expected).max() < 5 * sigma, f'{name}: {counts.min()}..{counts.max()} vs {expected:.1f}'
    tv = 0.5 * np.abs(device_counts - host_counts).sum() / n
    assert tv < 0.05, tv


# ---- Inception crop ------------------------------------------------------------------------

def test_inception_crop_box_in_bounds_with_scale_and_ratio():
    height, width = 300, 200
    rng = np.random.default_rng(0)
    boxes = np.array([augment.inception_crop_box(rng, height, width) for _ in range(2000)])
    top, left, h, w = boxes.T

    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # h and w are each rounded to a pixel from exact values with the drawn area and aspect.
    assert ((w + 0.5) * (h + 0.5) >= 0.08 * height * width).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    assert len({tuple(b) for b in boxes}) > 1000
    # The area fraction spans its range, not a corner of it; at most 200 x 267 (0.89) fits
    # this image with the aspect ratio in range.
    fraction = h * w / (height * width)
    assert fraction.min() < 0.15 and fraction.max() > 0.8


def test_inception_crop_box_falls_back_to_clipped_centre_crop():
    rng = np.random.default_rng(0)
    impossible = (2.0, 3.0)  # every attempt asks for more than the whole image
    assert augment.inception_crop_box(rng, 100, 400, scale=impossible) == (0, (400 - 133) // 2, 100, 133)
    assert augment.inception_crop_box(rng, 400, 100, scale=impossible) == ((400 - 133) // 2, 0, 133, 100)
    assert augment.inception_crop_box(rng, 120, 90, scale=impossible) == (0, 0, 120, 90)


def test_inception_augment_host():
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    outs = [augment.inception_augment_host(rng, image, 24) for _ in range(20)]
    assert all(o.shape == (24, 24, 3) and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) == len(outs)

    # Resampling any box of a constant image, flipped or not, gives the same constant.
    constant = np.full((60, 80, 3), (10, 200, 77), np.uint8)
    for _ in range(20):
        out = augment.inception_augment_host(rng, constant, 24)
        np.testing.assert_array_equal(out, np.broadcast_to(constant[0, 0], (24, 24, 3)))


def test_inception_augment_host_flips_about_half():
    """Left half 0, right half 255: a mirrored crop is brighter on its left."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255
    rng = np.random.default_rng(0)
    flipped, differ = 0, 0
    for _ in range(400):
        out = augment.inception_augment_host(rng, image, 16).astype(int)
        left, right = out[:, :8].mean(), out[:, 8:].mean()
        differ += left != right
        flipped += left > right
    # Nearly every crop straddles or sits on one side; only straddling ones show the flip.
    assert differ > 100 and 0.35 < flipped / differ < 0.65


# ---- evaluation and stream views -----------------------------------------------------------

def test_center_crop_host():
    image = np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    out = augment.center_crop_host(image, 224, 0.875)  # 224 / 0.875 = 256: no rescaling
    np.testing.assert_array_equal(out, image[16:240, 144:368])

    small = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = augment.center_crop_host(small, 32, 0.875)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_train_and_eval_views():
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)

    plain = augment.train_view(rng, image, 'none', 32)
    assert plain.shape == (32, 32, 3)
    np.testing.assert_array_equal(plain, augment.resize(image, 32))

    # 'cifar' keeps the size and yields one of the 162 crops and flips of the resized image.
    cifar = augment.train_view(rng, image, 'cifar', 32)
    assert cifar.shape == (32, 32, 3)
    assert any(np.array_equal(cifar, augment.cifar_crop_flip_host(plain, dy, dx, flip))
               for dy, dx in OFFSETS for flip in (False, True))

    assert augment.train_view(rng, image, 'inception', 24).shape == (24, 24, 3)
    assert augment.eval_view(image, 'inception', 24, 0.875).shape == (24, 24, 3)
    np.testing.assert_array_equal(augment.eval_view(image, 'cifar', 32, 0.875), plain)


# ---- decode --------------------------------------------------------------------------------

def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format='PNG')
    return buffer.getvalue()


def test_decode():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    decoded = augment.decode(png_bytes(rgb), 'rgb.png')
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, rgb)

    grey = rgb[..., 0]
    decoded = augment.decode(png_bytes(grey), 'grey.png')
    assert decoded.shape == (7, 9, 3)
    for c in range(3):
        np.testing.assert_array_equal(decoded[..., c], grey)

    with pytest.raises(augment.CorruptImageError, match='broken-17.jpg'):
        augment.decode(b'not an image at all', 'broken-17.jpg')


# ---- Mixup and CutMix ----------------------------------------------------------------------

N, SIZE = 8, 16


def id_batch():
    """x[i] = i everywhere, one-hot targets of class i: the partner of i is N-1-i, a different class."""
    x = jnp.broadcast_to(jnp.arange(N, dtype=jnp.float32)[:, None, None, None], (N, SIZE, SIZE, 3))
    return x, jax.nn.one_hot(jnp.arange(N), N)


def check_targets(targets, lam):
    """Row i is lam on class i and 1 - lam on class N-1-i."""
    expected = lam * np.eye(N) + (1 - lam) * np.eye(N)[::-1]
    np.testing.assert_allclose(targets, expected, atol=1e-6)
    np.testing.assert_allclose(targets.sum(1), 1, atol=1e-6)


def is_cutmix(x, x_mixed, targets):
    """True if every example keeps its own pixels outside one shared rectangle and takes its
    partner's inside it, with lam (its own class weight) the fraction kept."""
    x, x_mixed, targets = np.asarray(x), np.asarray(x_mixed), np.asarray(targets)
    own, partner = x_mixed == x, x_mixed == x[::-1]
    if not (own | partner).all():
        return False
    lam = targets[0, 0]
    check_targets(targets, lam)
    box = partner[0, :, :, 0]
    assert (partner == box[None, :, :, None]).all(), 'the box differs between examples or channels'
    np.testing.assert_allclose(box.mean(), 1 - lam, atol=1e-6)
    if box.any():
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all(), 'the pasted region is not a rectangle'
    return True


def is_mixup(x, x_mixed, targets):
    """True if every example is lam * itself + (1 - lam) * its partner, lam read from the targets."""
    lam = float(targets[0, 0])
    if not np.allclose(x_mixed, lam * x + (1 - lam) * x[::-1], atol=1e-5):
        return False
    check_targets(np.asarray(targets), lam)
    return True


def test_mixup():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(N, SIZE, SIZE, 3)), jnp.float32)
    targets = jax.nn.one_hot(jnp.arange(N), N)
    lams = []
    for seed in range(4):
        x_mixed, t = augment.mix(jax.random.key(seed), x, targets, 0.2, 0.0)
        assert is_mixup(np.asarray(x), np.asarray(x_mixed), np.asarray(t))
        lams.append(float(t[0, 0]))
    assert len(set(lams)) == len(lams) and all(0 < lam < 1 for lam in lams)


def test_cutmix():
    x, targets = id_batch()
    lams = []
    for seed in range(8):
        x_mixed, t = augment.mix(jax.random.key(seed), x, targets, 0.0, 1.0)
        assert is_cutmix(x, x_mixed, t), f'seed {seed}: pixels from neither the example nor its partner'
        lams.append(float(t[0, 0]))
    assert min(lams) < 1, 'no key pasted a box'


def test_mixup_or_cutmix_when_both_are_set():
    x, targets = id_batch()
    kinds = []
    for seed in range(16):
        x_mixed, t = augment.mix(jax.random.key(seed), x, targets, 0.2, 1.0)
        cutmix, mixup = is_cutmix(x, x_mixed, t), is_mixup(np.asarray(x), np.asarray(x_mixed), np.asarray(t))
        assert cutmix or mixup, f'seed {seed}: neither a mixup nor a cutmix'
        kinds.append('cutmix' if cutmix else 'mixup')
    assert set(kinds) == {'cutmix', 'mixup'}, kinds


def test_mix_under_jit_matches_eager():
    """With both alphas set, one compiled function holds both the mixup and the cutmix path."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(N, SIZE, SIZE, 3)), jnp.float32)
    targets = jax.nn.one_hot(jnp.arange(N), N)
    jitted = jax.jit(augment.mix, static_argnums=(3, 4))
    for seed in range(6):
        eager = augment.mix(jax.random.key(seed), x, targets, 0.2, 1.0)
        compiled = jitted(jax.random.key(seed), x, targets, 0.2, 1.0)
        for a, b in zip(eager, compiled):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f'seed {seed}')
