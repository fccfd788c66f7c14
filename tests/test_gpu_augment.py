"""mmcl.data.gpu_augment: each sample of a batched augmentation against torchvision's functional ops."""
import math

import pytest
import torch
from conftest import requires_cuda
from torchvision.transforms import functional as TF
from torchvision.transforms import v2

from mmcl.data.gpu_augment import GPUAugment, apply_augment, sample_augment_params

_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _reference(image, params, i, size, jitter):
    """Sample i through torchvision: resized_crop (no antialias), hflip, jitter ops in order, grayscale."""
    top, left, h, w = params.crop[i].tolist()
    out = TF.resized_crop(image, top, left, h, w, list(size), antialias=False)
    if params.flip[i]:
        out = TF.hflip(out)
    if params.jitter[i]:
        for op in params.order[i].tolist():
            if jitter[op] > 0:
                out = _OPS[op](out, float(params.factors[i, op]))
    if params.gray[i]:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    return out


@pytest.mark.parametrize("batch,height,width,size,dtype", [
    (1, 8, 8, (8, 8), torch.float32),       # one sample, no resize
    (7, 23, 31, (17, 13), torch.float32),   # odd sizes, downscale, non-square output
    (5, 11, 9, (29, 37), torch.float64),    # upscale: crop edges must not bleed
])
def test_per_sample_matches_torchvision(batch, height, width, size, dtype):
    jitter = (0.4, 0.4, 0.4, 0.1)
    images = torch.rand(batch, 3, height, width, dtype=dtype)
    gen = torch.Generator().manual_seed(batch)
    params = sample_augment_params(batch, height, width, jitter=jitter, jitter_p=0.7, gray_p=0.3, generator=gen)
    out = apply_augment(images, params, size, jitter)
    assert out.shape == (batch, 3, *size) and out.dtype == dtype
    for i in range(batch):
        ref = _reference(images[i], params, i, size, jitter)
        # Float32 rounding through up to six chained ops (factors up to 1.8); torchvision computes hue
        # in float32 even for float64 input. A wrong parameter shows up as errors of order 0.1.
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0,
                                   msg=lambda m, i=i: f"sample {i} differs: {m}")


def test_every_branch_is_exercised_and_matches():
    """Force each colour op, each order position, flip and grayscale on and off over a batch of 48."""
    jitter = (0.8, 0.8, 0.8, 0.2)
    images = torch.rand(48, 3, 15, 19)
    params = sample_augment_params(48, 15, 19, jitter=jitter, generator=torch.Generator().manual_seed(1))
    params.jitter[:] = True
    params.gray[:] = torch.arange(48) % 5 == 0
    params.flip[:] = torch.arange(48) % 2 == 0
    for op in range(4):
        assert {int(p) for p in params.order[:, op]} == {0, 1, 2, 3}
    out = apply_augment(images, params, (15, 19), jitter)
    for i in range(48):
        torch.testing.assert_close(out[i], _reference(images[i], params, i, (15, 19), jitter), atol=1e-5, rtol=0)
    # Zero strength skips the op, as ColorJitter does (hue 0 would otherwise round-trip through HSV).
    no_hue = (0.4, 0.4, 0.4, 0.0)
    out = apply_augment(images, params, (15, 19), no_hue)
    for i in range(48):
        torch.testing.assert_close(out[i], _reference(images[i], params, i, (15, 19), no_hue), atol=1e-5, rtol=0)


def test_parameter_distribution_follows_random_resized_crop():
    """Crops obey torchvision's constraints, and their statistics match torchvision's own sampler."""
    n, height, width, scale, ratio = 4000, 32, 48, (0.08, 1.0), (3 / 4, 4 / 3)
    params = sample_augment_params(n, height, width, scale=scale, ratio=ratio,
                                   generator=torch.Generator().manual_seed(0))
    top, left, h, w = params.crop.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = (h * w).float() / (height * width)
    # Rounding of h and w lets area and ratio step slightly past the bounds, as in torchvision.
    assert area.min() > scale[0] * 0.7 and area.max() <= 1.0
    reference = torch.tensor([v2.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale),
                                                              list(ratio)) for _ in range(n)])
    ref_area = (reference[:, 2] * reference[:, 3]).float() / (height * width)
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    log_aspect = torch.log(w.float() / h.float())
    ref_log_aspect = torch.log(reference[:, 3].float() / reference[:, 2].float())
    assert abs(log_aspect.mean() - ref_log_aspect.mean()) < 0.02
    for name, p in (("flip", params.flip, ), ("jitter", params.jitter), ("gray", params.gray)):
        expected = {"flip": 0.5, "jitter": 0.8, "gray": 0.2}[name]
        assert abs(p.float().mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / n), name
    lo = torch.tensor([0.6, 0.6, 0.6, -0.1])
    hi = torch.tensor([1.4, 1.4, 1.4, 0.1])
    assert (params.factors >= lo).all() and (params.factors <= hi).all()


def test_module_views_normalisation_and_errors():
    images = (torch.rand(6, 3, 20, 20) * 255).to(torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    aug = GPUAugment(12, mean=mean, std=std)
    gen = torch.Generator().manual_seed(3)
    view1, view2 = aug(images, generator=gen), aug(images, generator=gen)
    assert view1.shape == (6, 3, 12, 12) and not torch.allclose(view1, view2)
    params = sample_augment_params(6, 20, 20, scale=(0.2, 1.0), generator=torch.Generator().manual_seed(3))
    expected = apply_augment(images.float() / 255, params, (12, 12))
    expected = TF.normalize(expected, list(mean), list(std))
    torch.testing.assert_close(view1, expected)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        apply_augment(torch.rand(2, 1, 8, 8), params, (4, 4))
    with pytest.raises(TypeError, match="floating point"):
        apply_augment(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), params, (4, 4))
    with pytest.raises(ValueError, match="params are for 6"):
        apply_augment(torch.rand(2, 3, 8, 8), params, (4, 4))
    with pytest.raises(ValueError, match="scale"):
        sample_augment_params(2, 8, 8, scale=(0.5, 0.1))


@requires_cuda
def test_cuda_matches_cpu():
    images = torch.rand(33, 3, 64, 48)
    params = sample_augment_params(33, 64, 48, generator=torch.Generator().manual_seed(0))
    cpu = apply_augment(images, params, (32, 32))
    cuda = apply_augment(images.cuda(), params, (32, 32))
    assert cuda.is_cuda
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=0)
    # The module on CUDA images with a CPU generator draws the same parameters as on CPU.
    aug = GPUAugment(24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    on_cpu = aug(images, generator=torch.Generator().manual_seed(1))
    on_cuda = aug(images.cuda(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-4, rtol=0)


# The papers' numbers, written out: (crop scale, colour jitter) of each device preset.
_PAPER_PRESETS = {"mocov2": ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1)), "simclr": ((0.08, 1.0), (0.8, 0.8, 0.8, 0.2)),
                  "moco_cifar": ((0.08, 1.0), (0.4, 0.4, 0.4, 0.1))}


@pytest.mark.parametrize("preset", sorted(_PAPER_PRESETS))
def test_device_augment_views_follow_the_preset_table(preset):
    """DeviceAugment (data.augment_on_device): each view is the batched ops with the preset's numbers,
    drawn in order from one generator, from a normalised float view or a uint8 view; other keys pass."""
    from types import SimpleNamespace

    from mmcl.data import DEVICE_PRESETS, VIEW_PRESETS, DeviceAugment

    scale, jitter = _PAPER_PRESETS[preset]
    assert (VIEW_PRESETS[preset].scale, VIEW_PRESETS[preset].jitter) == (scale, jitter)
    proc = SimpleNamespace(image_size=(13, 11), image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
    mean, std = torch.tensor(proc.image_mean).view(1, 3, 1, 1), torch.tensor(proc.image_std).view(1, 3, 1, 1)
    images = torch.rand(5, 3, 17, 19)
    pixels = (images * 255).round().to(torch.uint8)
    out = DeviceAugment(preset, proc, generator=torch.Generator().manual_seed(3))(
        {"view1": (images - mean) / std, "view2": pixels, "num_skipped": 2})
    g = torch.Generator().manual_seed(3)
    for key, source in (("view1", images), ("view2", pixels.float() / 255)):
        params = sample_augment_params(5, 17, 19, scale=scale, jitter=jitter, jitter_p=0.8, gray_p=0.2, flip_p=0.5,
                                       generator=g)
        expected = (apply_augment(source, params, (13, 11), jitter) - mean) / std
        assert out[key].dtype == torch.float32 and out[key].shape == (5, 3, 13, 11)
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-5)
    assert out["num_skipped"] == 2 and DEVICE_PRESETS[preset]["scale"] == scale
    with pytest.raises(ValueError, match="missing"):
        DeviceAugment(preset, proc)({"view1": pixels})
    with pytest.raises(ValueError, match="data.augment_on_device must be one of"):
        DeviceAugment("blur", proc)
