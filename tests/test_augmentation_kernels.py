"""datasets.py's faster kernels of the augmentation (rotate, gaussian_blur, adjust_hue for a view's image and mask)
against torchvision's own kernels of the same operations: the same draws, the same pixels up to float rounding."""
import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import datasets as D


def scene(seed, size=(96, 112)):
    """A smooth colour image with edges (rounding ties are as rare as in photos) and a blob mask."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    small = torch.rand(3, h // 8, w // 8, generator=g) * 255
    img = TF.resize(small, [h, w], antialias=True).round().clamp(0, 255).to(torch.uint8)
    img[:, h // 3: h // 2, w // 4: w // 2] = torch.tensor([250, 30, 90], dtype=torch.uint8)[:, None, None]
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[0, 10:60, 20:80] = 1
    mask[0, 30:40, 5:100] = 255
    return img, mask


def close(ours, theirs, max_share=2e-3):
    diff = (ours.as_subclass(torch.Tensor).int() - theirs.as_subclass(torch.Tensor).int()).abs()
    return diff.max().item() <= 1 and (diff > 0).float().mean().item() <= max_share


@pytest.mark.parametrize("seed", range(4))
def test_kernels_match_torchvision(seed):
    img, mask = scene(seed)
    rng = np.random.default_rng(seed)
    angle = float(rng.uniform(-90, 90))
    ours = TF.rotate(D._ViewImage(img), angle, interpolation=v2.InterpolationMode.BILINEAR, fill=0)
    assert type(ours) is D._ViewImage and close(ours, TF.rotate(img, angle, v2.InterpolationMode.BILINEAR, fill=0))
    ours = TF.rotate(D._ViewMask(mask), angle, fill=255)
    theirs = TF.rotate(tv_tensors.Mask(mask), angle, fill=255)
    assert type(ours) is D._ViewMask and (ours != theirs).float().mean().item() <= 1e-3
    for k in (3, 5, 7):
        sigma = float(rng.uniform(0.1, 2.0))
        assert close(TF.gaussian_blur(D._ViewImage(img), [k, k], [sigma, sigma]),
                     TF.gaussian_blur(img, [k, k], [sigma, sigma]))
    for factor in (-0.2, float(rng.uniform(-0.2, 0.2)), 0.2):
        assert close(TF.adjust_hue(D._ViewImage(img), factor), TF.adjust_hue(img, factor))


class ExactMask(tv_tensors.Mask):
    """A mask on torchvision's own kernels, except that its random resized crop resizes nearest-exact (torchvision's
    tensor kernel), the grid of datasets.resize_mask; torchvision resizes masks "nearest", half a pixel off."""


@TF.register_kernel(TF.resized_crop, ExactMask)
def _exact_resized_crop(mask, top, left, height, width, size, **_):
    out = TF.resized_crop(mask.as_subclass(torch.Tensor), top, left, height, width, size,
                          interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return tv_tensors.wrap(out, like=mask)


def test_views_draw_what_torchvision_draws():
    # the whole pipeline on _ViewImage / _ViewMask against torchvision's kernels on tv_tensors (whose fill the stock
    # pipeline needs): every parameter drawn the same, so the masks agree and the images differ by rounding only
    mine, _ = D.build_augmentation(64)
    stock, _ = D.build_augmentation(64)
    rotation = next(t.transforms[0] for t in stock.transforms if isinstance(t, v2.RandomApply)
                    and isinstance(t.transforms[0], v2.RandomRotation))
    rotation._fill = {tv_tensors.Image: 0, ExactMask: 255}
    for seed in range(12):
        img, mask = scene(seed)
        torch.manual_seed(seed)
        a_img, a_mask = mine(D._ViewImage(img), D._ViewMask(mask))
        torch.manual_seed(seed)
        b_img, b_mask = stock(tv_tensors.Image(img), ExactMask(mask))
        assert (a_mask.as_subclass(torch.Tensor) != b_mask.as_subclass(torch.Tensor)).float().mean().item() <= 1e-3
        grey_levels = (a_img - b_img).abs() * 0.229 * 255       # normalised back to 0..255 (about)
        assert (grey_levels > 0.5).float().mean().item() <= 2e-3


@pytest.mark.parametrize("seed", range(3))
def test_colour_kernels_give_torchvisions_uint8_values(seed):
    # a view's image holds uint8 values in float after its first step: brightness, contrast, saturation, grayscale
    # and to_dtype on it give exactly what torchvision's kernels give on the uint8 image (no conversions between)
    img, _ = scene(seed)
    rng = np.random.default_rng(seed)
    for view in (D._ViewImage(img), D._ViewImage(img.float())):
        for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
            factor = float(rng.uniform(0.0, 2.0))
            ours = adjust(view, factor)
            assert type(ours) is D._ViewImage and ours.dtype == torch.float32
            assert torch.equal(ours.as_subclass(torch.Tensor), adjust(img, factor).float())
        ours = TF.rgb_to_grayscale(view, num_output_channels=3).as_subclass(torch.Tensor)
        assert torch.equal(ours, TF.rgb_to_grayscale(img, num_output_channels=3).float())
        ours = TF.to_dtype(view, torch.float32, scale=True)
        assert type(ours) is tv_tensors.Image          # no longer uint8 values: the view's kernels let it go
        assert torch.equal(ours.as_subclass(torch.Tensor), TF.to_dtype(img, torch.float32, scale=True))
    assert torch.equal(view.as_subclass(torch.Tensor), img.float())           # the input is left as it was


def test_mask_resize_is_torchs_nearest_exact():
    # resize_mask gathers rows and columns; the pixels are those of interpolate(mode="nearest-exact")
    g = torch.Generator().manual_seed(0)
    for h, w in ((1, 1), (2, 3), (37, 5), (375, 500), (500, 333)):
        mask = torch.randint(0, 256, (2, h, w), dtype=torch.uint8, generator=g)
        for size in ((400, 400), (2, 41), (h, 7), (1, 1), (613, 29)):
            theirs = torch.nn.functional.interpolate(mask[:, None].float(), size=size, mode="nearest-exact")[:, 0]
            assert torch.equal(D.resize_mask(mask, size), theirs.long())


@pytest.mark.parametrize("border", D.ROTATION_BORDERS)
def test_steps_deferred_to_the_device_give_the_loaders_views(border):
    # augment_on="device": the loader stops after the crop and flips and draws the rest; apply_deferred on a batch
    # then gives the views and masks of the loader's path (the same draws, the same kernels), exactly on the CPU
    kinds = {}
    for augment_on in D.AUGMENT_ON:
        augmentation = D.build_augmentation(64, rotation_border=border, augment_on=augment_on)
        views = []
        for seed in range(24):
            img, mask = scene(seed)
            views.append(D._view(augmentation, img, mask[0].numpy(), np.random.default_rng(seed)))
        kinds[augment_on] = views
    loader, device = kinds["loader"], kinds["device"]
    images, masks, steps = (torch.stack([view[i] for view in device]) for i in range(3))
    out, out_masks = D.apply_deferred(images, steps, masks, 255)
    assert set(steps[:, :, 0].unique().long().tolist()) == set(range(len(D.DEFERRED_STEPS) + 1))  # every step
    assert (steps[:, :, 0].amax(1) == 0).any() and (steps[:, 0, 0] == 1).sum() > 6    # none, and rotations
    assert set(steps[steps[:, 0, 0] == 1, 0, 2].tolist()) == {float(border == "reflect")}
    for i, (img, mask, none) in enumerate(loader):
        assert none is None and out[i].dtype == torch.uint8 and out_masks.dtype == torch.uint8
        assert torch.equal(out[i], img) and torch.equal(out_masks[i], mask)
    assert torch.equal(masks, torch.stack([view[1] for view in device]))   # the caller's masks are left as they are


def test_deferred_steps_are_recorded_in_order():
    draws = D._DeferredSteps.blank()
    TF.rotate(draws, 12.5, fill=None)
    TF.adjust_hue(draws, 0.125)
    TF.gaussian_blur(draws, [5, 5], [0.75, 0.75])
    TF.rgb_to_grayscale(draws, num_output_channels=3)
    table = draws.table()
    assert table.shape == (D.DEFERRED_PLACES, 3)
    assert table[:4].tolist() == [[1, 12.5, 1], [5, 0.125, 0], [6, 0.75, 5], [7, 3, 0]] and not table[4:].any()
    with pytest.raises(ValueError, match="square"):
        TF.gaussian_blur(D._DeferredSteps.blank(), [3, 5], [1.0, 1.0])
    assert D.build_augmentation(64, augment=False, augment_on="device")[1] is None      # no step to defer
    views, masks = torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 8, dtype=torch.uint8)
    for bad in ((views.float(), masks), (views, masks[:1]), (views[0], masks)):
        with pytest.raises(ValueError, match="uint8 views"):
            D.apply_deferred(*bad[:1], torch.zeros(2, D.DEFERRED_PLACES, 3), bad[1], 0)
