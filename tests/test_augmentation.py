"""The augmentation of section 3.2 (datasets.Augmentation): the loader's crop and flips, each view's draw of the rest,
and that rest applied to the whole batch where it lands (rotation, colour jitter, blur, grayscale), each step
against torchvision's own kernel for the same parameter, view by view."""
import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import datasets as D


def views(n=6, size=48, seed=0):
    """Smooth colour images with edges (float in [0, 1]) and 0/1/255 masks."""
    g = torch.Generator().manual_seed(seed)
    x = TF.resize(torch.rand(n, 3, 6, 6, generator=g), [size, size], antialias=True).clamp(0, 1)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    masks[:, 8:30, 10:40] = 1
    masks[:, 20:26, 4:44] = 255
    return x, masks


def per_view(values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


def test_rotation_is_torchvisions_and_fills_255_or_reflects():
    x, masks = views()
    angles = [0.0, 30.0, -63.0, 90.0, -90.0, 11.5]
    turned, turned_masks = D.rotate(x, masks, per_view(angles), reflect=False)
    pad = 40                                             # numpy's "reflect" padding is OpenCV's BORDER_REFLECT_101
    big = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect"))
    big_masks = torch.from_numpy(np.pad(masks.numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="reflect"))
    reflected, reflected_masks = D.rotate(x, masks, per_view(angles), reflect=True)
    for i, angle in enumerate(angles):
        theirs = TF.rotate(x[i], angle, v2.InterpolationMode.BILINEAR)
        assert (turned[i] - theirs).abs().max() < 1e-4
        assert torch.equal(turned_masks[i], TF.rotate(masks[i][None], angle, fill=255)[0])
        theirs = TF.rotate(big[i], angle, v2.InterpolationMode.BILINEAR)[:, pad:-pad, pad:-pad]
        assert (reflected[i] - theirs).abs().max() < 1e-4
        assert torch.equal(reflected_masks[i], TF.rotate(big_masks[i][None], angle)[0, pad:-pad, pad:-pad])
    assert (turned_masks[2] == 255).sum() > (masks[2] == 255).sum()       # pixels brought in from outside: 255
    assert torch.equal(reflected_masks.unique(), masks.unique())           # reflected: no value is made up
    with pytest.raises(ValueError, match="square"):
        D.rotate(x[..., :40], masks[..., :40], per_view(angles), reflect=False)


def test_colour_jitter_blur_and_grey_are_torchvisions():
    x, _ = views()
    factors = [0.8, 1.0, 1.07, 1.2, 0.93, 1.15]
    hues = [-0.2, 0.0, 0.05, 0.2, -0.11, 0.17]
    for ours, theirs, values in (
            (lambda f: (x * f).clamp(0, 1), TF.adjust_brightness, factors),
            (lambda f: D.blend(x, D.luma(x.mean(dim=(2, 3), keepdim=True)), f), TF.adjust_contrast, factors),
            (lambda f: D.blend(x, D.luma(x), f), TF.adjust_saturation, factors),
            (lambda f: D.adjust_hue(x, f), TF.adjust_hue, hues)):
        out = ours(per_view(values))
        for i, v in enumerate(values):
            assert (out[i] - theirs(x[i], v)).abs().max() < 1e-5, theirs.__name__
    jittered = D.colour_jitter(x, per_view(factors), per_view(factors[::-1]), per_view(factors), per_view(hues))
    for i in range(len(x)):                             # torchvision's order: brightness, contrast, saturation, hue
        theirs = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
            x[i], factors[i]), factors[::-1][i]), factors[i]), hues[i])
        assert (jittered[i] - theirs).abs().max() < 1e-5
    kernels, sigmas = [3, 5, 7, 3, 7, 1], [0.1, 1.3, 2.0, 0.7, 0.4, 1.0]
    blurred = D.gaussian_blur(x, per_view(kernels), per_view(sigmas), 7)
    for i, (k, sigma) in enumerate(zip(kernels, sigmas)):
        theirs = TF.gaussian_blur(x[i], [k, k], [sigma, sigma]) if k > 1 else x[i]
        assert (blurred[i] - theirs).abs().max() < 1e-5
    assert (D.luma(x).expand_as(x) - torch.stack([TF.rgb_to_grayscale(v, 3) for v in x])).abs().max() < 1e-6


def draws(augmentation, n, seed=0):
    rng = np.random.default_rng(seed)
    return torch.stack([augmentation.draw(rng) for _ in range(n)])


def test_draws_follow_torchvisions_laws():
    p, n = draws(D.Augmentation(), 4000), 4000

    def share(taken, expected):
        assert abs(float(taken.float().mean()) - expected) < 5 * (expected * (1 - expected) / n) ** 0.5
    share(p[:, D.ANGLE] != 0, 0.5)
    share(p[:, D.JITTER] == 1, 0.5)
    share(p[:, D.BLUR_KERNEL] > 1, 0.5)
    share(p[:, D.GRAY] == 1, 0.4)
    turned, jittered, blurred = p[p[:, D.ANGLE] != 0], p[p[:, D.JITTER] == 1], p[p[:, D.BLUR_KERNEL] > 1]
    assert turned[:, D.ANGLE].abs().max() <= 90 and turned[:, D.ANGLE].abs().max() > 89
    for column, low, high in ((D.BRIGHTNESS, 0.8, 1.2), (D.CONTRAST, 0.8, 1.2), (D.SATURATION, 0.8, 1.2),
                              (D.HUE, -0.2, 0.2)):
        values = jittered[:, column]
        assert values.min() >= low and values.max() <= high and values.max() - values.min() > 0.95 * (high - low)
    assert set(blurred[:, D.BLUR_KERNEL].tolist()) == {3.0, 5.0, 7.0}
    assert blurred[:, D.BLUR_SIGMA].min() >= 0.1 and blurred[:, D.BLUR_SIGMA].max() <= 2.0
    untouched = p[(p[:, D.JITTER] == 0)]                 # a step not drawn: its identity values
    assert torch.equal(untouched[:, D.BRIGHTNESS:D.HUE + 1].unique(dim=0), torch.tensor([[1.0, 1, 1, 0]]))
    assert torch.equal(draws(D.Augmentation(augment=False), 5), torch.tensor(D.NO_STEP).expand(5, -1))
    assert torch.equal(draws(D.Augmentation(), 50, seed=3), draws(D.Augmentation(), 50, seed=3))


def test_apply_changes_only_the_views_that_drew_a_step():
    images, masks = views(n=40, size=32, seed=2)
    images = (images * 255).round().to(torch.uint8)
    augmentation = D.Augmentation(32)
    p = draws(augmentation, 40, seed=5)
    out, out_masks = augmentation.apply(images, masks, p)
    took_none = (p[:, D.ANGLE] == 0) & (p[:, D.JITTER] == 0) & (p[:, D.BLUR_KERNEL] == 1) & (p[:, D.GRAY] == 0)
    assert 0 < int(took_none.sum()) < 40
    assert torch.equal(out[took_none], images[took_none].float() / 255) and torch.equal(out_masks[took_none],
                                                                                       masks[took_none])
    for i in torch.nonzero(~took_none)[:, 0].tolist():      # every other view: its own steps, alone
        one, one_mask = augmentation.apply(images[i:i + 1], masks[i:i + 1], p[i:i + 1])
        assert (one[0] - out[i]).abs().max() < 1e-5 and torch.equal(one_mask[0], out_masks[i])
    grey = p[:, D.GRAY] == 1
    assert (out[grey][:, 0] == out[grey][:, 2]).all() and not (out[~grey][:, 0] == out[~grey][:, 2]).all()
    assert out_masks.dtype == torch.uint8 and set(out_masks.unique().tolist()) <= {0, 1, 255}


def batch(pairs, size, seed=0):
    augmentation, g = D.Augmentation(size), torch.Generator().manual_seed(seed)
    b = {key: torch.randint(0, 256, (pairs, 3, size, size), dtype=torch.uint8, generator=g)
         for key in ("query_img", "support_img")}
    b.update(query_target=torch.randint(0, 2, (pairs, size, size), dtype=torch.uint8, generator=g),
             support_mask=torch.randint(0, 2, (pairs, size, size), dtype=torch.uint8, generator=g),
             query_params=draws(augmentation, pairs, seed), support_params=draws(augmentation, pairs, seed + 1))
    return b, augmentation


def test_training_views_cost_the_host_few_operations_and_never_wait_for_the_device():
    # a GPU step waits on the host's work of augmenting its batch: tens of operations per step, not thousands
    b, augmentation = batch(16, 64)
    D.training_views(b, augmentation, torch.device("cpu"))              # the constants made once
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        query, target, support, support_mask = D.training_views(b, augmentation, torch.device("cpu"))
    assert sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) <= 400
    assert query.shape == support.shape == (16, 3, 64, 64) and target.dtype == torch.int64
    assert set(support_mask.unique().tolist()) <= {0.0, 1.0} and set(target.unique().tolist()) <= {0, 1, 255}
    # the meta device holds no data: any read of the device's values on the host (a sync on CUDA) would raise
    out = D.training_views(b, augmentation, torch.device("meta"))
    assert [t.device.type for t in out] == ["meta"] * 4 and out[0].shape == query.shape


def test_normalize_is_torchvisions_and_image_to_tensor_uses_it():
    x = torch.rand(2, 3, 5, 7)
    assert torch.equal(D.normalize(x), TF.normalize(x, D.IMAGENET_MEAN, D.IMAGENET_STD))
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    theirs = TF.normalize(TF.resize(image, [16, 16], antialias=True).float() / 255, D.IMAGENET_MEAN, D.IMAGENET_STD)
    assert torch.equal(D.image_to_tensor(TF.to_pil_image(image), 16), theirs)
