"""MaskSplit core (paper section 3.2): split geometry and the loss-ignore masking of the support half."""
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masksplit import MaskSplit, query_target, split_mask


def blob_mask(seed, height=48, width=64):
    """A random union of ellipses, never empty."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    mask = np.zeros((height, width), bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(4, height / 2), rng.uniform(4, width / 2)
        mask |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    mask[height // 2, width // 2] = True
    return mask


def median_column(mask):
    counts = mask.sum(axis=0)
    return int(np.argmax(2 * np.cumsum(counts) >= counts.sum()))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("shift", [0, 5, -13, 40])
def test_halves_are_disjoint_and_cover_the_mask(seed, direction, shift):
    mask = blob_mask(seed)
    for swap in (False, True):
        support, query = split_mask(mask, direction, shift, swap)
        assert support.dtype == np.bool_ and support.shape == mask.shape
        assert not (support & query).any()
        assert np.array_equal(support | query, mask)


@pytest.mark.parametrize("seed", range(8))
def test_shift_zero_splits_at_the_median_column(seed):
    mask = blob_mask(seed)
    support, query = split_mask(mask)                       # support = right, query = left
    m = median_column(mask)
    assert not support[:, : m + 1].any() and not query[:, m + 1 :].any()
    # the left (query) half holds half the foreground, up to the median column's count: T/2 <= left < T/2 + c[m]
    total, left = int(mask.sum()), int(query.sum())
    assert 0 <= 2 * left - total < 2 * int(mask[:, m].sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shift", [1, 7, -9, 40])
def test_pixels_follow_the_paper_line_exactly(seed, shift):
    mask = blob_mask(seed, 37, 53)
    support, query = split_mask(mask, shift=shift)
    m, h = median_column(mask), mask.shape[0]
    for y, x in zip(*np.nonzero(mask)):
        x_line = Fraction(m + shift) - Fraction(2 * shift * int(y), h - 1)   # through (m+s, 0), (m-s, H-1)
        assert support[y, x] == (x > x_line) and query[y, x] == (x <= x_line)


@pytest.mark.parametrize("shift", [0, 3, -6])
def test_official_line_and_its_on_line_pixels(shift):
    mask = blob_mask(11, 41, 50)
    support, query = split_mask(mask, shift=shift, line="official")
    m, h = median_column(mask), mask.shape[0]
    for y, x in zip(*np.nonzero(mask)):
        x_line = Fraction(m - 3 * shift) + Fraction(2 * shift * int(y), h - 1)  # (m-3s, top) to (m-s, bottom)
        assert support[y, x] == (x > x_line) and query[y, x] == (x < x_line)
    assert not (support & query).any()


def test_horizontal_split_is_the_vertical_split_of_the_transpose():
    for seed in range(5):
        mask = blob_mask(seed)
        for shift, swap in [(0, False), (17, True), (-31, False)]:
            support, query = split_mask(mask, "horizontal", shift, swap)
            support_t, query_t = split_mask(mask.T, "vertical", shift, swap)
            assert np.array_equal(support, support_t.T) and np.array_equal(query, query_t.T)


def test_horizontal_support_is_the_bottom_half():
    mask = np.zeros((20, 10), bool)
    mask[4:16, 2:8] = True
    support, query = split_mask(mask, "horizontal")
    assert support[10:].sum() == support.sum() > 0 and query[:10].sum() == query.sum() > 0


def test_swap_exchanges_support_and_query():
    mask = blob_mask(3)
    support, query = split_mask(mask, shift=12)
    support_s, query_s = split_mask(mask, shift=12, swap=True)
    assert np.array_equal(support, query_s) and np.array_equal(query, support_s)


def test_numpy_and_torch_agree_and_keep_their_library():
    mask = blob_mask(5).astype(np.uint8) * 255
    for direction in ("vertical", "horizontal"):
        for line in ("paper", "official"):
            support_np, query_np = split_mask(mask, direction, -7, True, line)
            support_t, query_t = split_mask(torch.from_numpy(mask), direction, -7, True, line)
            assert isinstance(support_np, np.ndarray) and isinstance(support_t, torch.Tensor)
            assert support_t.dtype == torch.bool
            assert np.array_equal(support_np, support_t.numpy()) and np.array_equal(query_np, query_t.numpy())


def test_batch_with_per_item_shift_and_swap_equals_single_calls():
    masks = np.stack([blob_mask(seed) for seed in range(5)])
    shifts, swaps = [0, 4, -9, 40, -40], [False, True, True, False, True]
    for library in (np.asarray, torch.from_numpy):
        for direction in ("vertical", "horizontal"):
            support, query = split_mask(library(masks), direction, shifts, swaps)
            assert support.shape == masks.shape
            for i in range(len(masks)):
                s, q = split_mask(library(masks[i]), direction, shifts[i], swaps[i])
                assert np.array_equal(np.asarray(support[i]), np.asarray(s))
                assert np.array_equal(np.asarray(query[i]), np.asarray(q))
    with pytest.raises(ValueError, match="shift has 2 values"):
        split_mask(masks, shift=[1, 2])


def test_inputs_are_not_modified():
    mask = torch.from_numpy(blob_mask(2))
    before = mask.clone()
    MaskSplit()(mask, torch.Generator().manual_seed(0))
    split_mask(mask, shift=5)
    assert torch.equal(mask, before)


def test_empty_and_malformed_masks_are_rejected():
    with pytest.raises(ValueError, match="all-empty"):
        MaskSplit()(np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        split_mask(np.zeros((2, 2, 2, 2), bool))
    with pytest.raises(ValueError, match="direction"):
        split_mask(np.ones((4, 4), bool), direction="diagonal")
    with pytest.raises(TypeError):
        split_mask([[1, 0]])


def count_draws(masksplit, n, seed=0):
    mask = torch.from_numpy(blob_mask(1))
    generator = torch.Generator().manual_seed(seed)
    return [masksplit.sample(mask, generator)[2] for _ in range(n)]


def assert_frequency(hits, n, p):
    """Binomial frequency within 5 standard deviations."""
    assert abs(hits - n * p) <= 5 * (n * p * (1 - p)) ** 0.5 + 1, (hits, n, p)


def test_prob_frequency():
    draws = count_draws(MaskSplit(prob=0.3, min_pixels=0), 2000)
    assert_frequency(sum(d is not None for d in draws), 2000, 0.3)
    assert all(d is None for d in count_draws(MaskSplit(prob=0.0), 50))
    assert all(d is not None for d in count_draws(MaskSplit(prob=1.0, min_pixels=0), 200))


def test_alternate_and_shift_range():
    draws = count_draws(MaskSplit(min_pixels=0), 2000)
    assert_frequency(sum(d["swap"] for d in draws), 2000, 0.5)
    shifts = {d["shift"] for d in draws}
    assert min(shifts) == -40 and max(shifts) == 40 and shifts == set(range(-40, 41))
    assert not any(d["swap"] for d in count_draws(MaskSplit(alternate=False, min_pixels=0), 300))
    assert {d["shift"] for d in count_draws(MaskSplit(max_shift=0, min_pixels=0), 100)} == {0}


def test_mixed_frequency():
    draws = count_draws(MaskSplit(direction="mixed", min_pixels=0), 2000)
    assert_frequency(sum(d["direction"] == "horizontal" for d in draws), 2000, 0.5)
    assert {d["direction"] for d in count_draws(MaskSplit(direction="horizontal", min_pixels=0), 50)} == {
        "horizontal"}


def test_seeded_determinism_for_both_generator_kinds():
    mask = blob_mask(4)
    ms = MaskSplit(direction="mixed", min_pixels=10)
    for make in (lambda: np.random.default_rng(7), lambda: torch.Generator().manual_seed(7)):
        first, second = make(), make()
        for _ in range(20):
            a, b = ms(mask, first), ms(mask, second)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    runs = [[ms.sample(mask, np.random.default_rng(seed))[2] for seed in range(30)] for _ in range(2)]
    assert runs[0] == runs[1] and len({str(d) for d in runs[0]}) > 5


def test_tiny_mask_falls_back_to_no_split():
    mask = np.zeros((60, 60), bool)
    mask[30:40, 30:40] = True                                 # 100 pixels: halves of ~50 < 512
    support, query, params = MaskSplit().sample(mask, np.random.default_rng(0))
    assert params is None and np.array_equal(support, mask) and np.array_equal(query, mask)
    target = query_target(query, support)
    assert set(np.unique(target)) == {0, 1}                    # no split: nothing is ignored


def test_batch_sampling_gives_one_draw_per_item():
    masks = torch.from_numpy(np.stack([blob_mask(seed) for seed in range(4)]))
    support, query, params = MaskSplit(min_pixels=0).sample(masks, torch.Generator().manual_seed(1))
    assert support.shape == masks.shape and len(params) == 4
    for i, p in enumerate(params):
        s, q = split_mask(masks[i], **p)
        assert torch.equal(support[i], s) and torch.equal(query[i], q)


def test_query_target_values_and_dtypes():
    mask = blob_mask(6)
    support, query = split_mask(mask, shift=3)
    target = query_target(query, support)
    assert target.dtype == np.uint8
    assert (target[query] == 1).all() and (target[support] == 255).all() and (target[~mask] == 0).all()
    target_t = query_target(torch.from_numpy(query), torch.from_numpy(support), ignore_index=-100)
    assert target_t.dtype == torch.int64 and set(target_t.unique().tolist()) == {-100, 0, 1}
    with pytest.raises(ValueError, match="uint8"):
        query_target(query, support, ignore_index=-100)


def test_cross_entropy_ignores_the_support_half():
    mask = torch.from_numpy(blob_mask(8))
    support, query = split_mask(mask, shift=-5, swap=True)
    target = query_target(query, support)[None]
    logits = torch.randn(1, 2, *mask.shape, requires_grad=True)
    loss = F.cross_entropy(logits, target, ignore_index=255)
    loss.backward()
    ignored = target[0] == 255
    assert ignored.sum() > 0
    assert torch.all(logits.grad[0][:, ignored] == 0)
    assert torch.all(logits.grad[0][:, ~ignored].abs().sum(0) > 0)
    per_pixel = F.cross_entropy(logits.detach(), target.clamp(max=1), reduction="none")[0]
    assert torch.allclose(loss, per_pixel[~ignored].mean())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_stay_on_the_device():
    mask = torch.from_numpy(blob_mask(9)).cuda()
    support, query = split_mask(mask, shift=torch.tensor(4).cuda())
    assert support.is_cuda and query.is_cuda
    cpu_support, _ = split_mask(mask.cpu(), shift=4)
    assert torch.equal(support.cpu(), cpu_support)
