"""Numbers comparable with the paper (issue 14): one mask resize everywhere, and the authors' behaviours behind
flags whose defaults change nothing. Small fixtures written here in the real layouts."""
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
import evaluate
from evaluate import FewShotMetric


def write_voc(root, labels, split="val"):
    """VOC2012 tree: palette masks `labels` {stem: uint8 [H,W]}, random JPEG images of the same sizes, split list."""
    voc = pathlib.Path(root) / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    for stem, label in labels.items():
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, label.shape + (3,), dtype=np.uint8)).save(
            voc / "JPEGImages" / f"{stem}.jpg", quality=95)
        mask = Image.fromarray(label, "P")
        mask.putpalette(D.voc_palette())
        D.save_png(mask, voc / "SegmentationClassAug" / f"{stem}.png")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(labels) + "\n")
    return voc


def blob_labels(classes, per_class=2, seed=0):
    """One irregular object per image (>= 2048 px, 255 on its boundary), odd image sizes."""
    rng = np.random.default_rng(seed)
    labels = {}
    for c in classes:
        for j in range(per_class):
            h, w = int(rng.integers(87, 131)), int(rng.integers(93, 141))
            yy, xx = np.mgrid[:h, :w]
            cy, cx, r = h / 2 + rng.uniform(-8, 8), w / 2 + rng.uniform(-8, 8), rng.uniform(30, 38)
            angle = np.arctan2(yy - cy, xx - cx)
            inside = np.hypot(yy - cy, xx - cx) < r * (1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6)))
            label = np.where(inside, c, 0).astype(np.uint8)
            label[D._boundary(label, 1)] = 255
            labels[f"img_{c:02d}_{j}"] = label
    return labels


@pytest.mark.parametrize("size", [50, 64, 160, 400])
def test_a_mask_resized_along_every_path_scores_iou_one_against_itself(size):
    rng = np.random.default_rng(size)
    for _ in range(5):
        h, w = int(rng.integers(90, 500)), int(rng.integers(90, 500))
        label = (rng.random((h // 7 + 1, w // 9 + 1)) < 0.4).repeat(7, 0).repeat(9, 1)[:h, :w].astype(np.uint8)
        label[rng.random((h, w)) < 0.02] = 255                          # ignored pixels
        truth = D.mask_to_tensor(label, size)                             # the query mask of an episode
        for pred in (D.resize_mask(label == 1, (size, size)),             # a pseudo-mask (bool, numpy)
                     D.resize_mask(torch.from_numpy(label == 1).long(), (size, size)),
                     D.mask_to_tensor(label == 1, size)):                 # a support mask
            metric = FewShotMetric()
            inter, union = metric.update(1, pred, truth)
            assert inter == union > 0 and metric.summary()["miou"] == 1.0
        # the resize keeps the caller's array and dtype, any leading dimensions
        assert D.resize_mask(torch.from_numpy(label)[None], (size, size)).shape == (1, size, size)


@pytest.mark.parametrize("resolution", ["resized", "original"])
def test_saliency_baseline_with_the_truth_as_pseudo_masks_scores_one(tmp_path, resolution):
    labels = blob_labels(range(1, 6))
    voc = write_voc(tmp_path, labels)
    masks = tmp_path / "pseudo"
    for stem, label in labels.items():
        D.save_png(label == label[label < 255].max(), masks / f"{stem}.png")
    for size in ("50", "64"):
        out = tmp_path / f"r{size}.json"
        evaluate.main(["fss", "--baseline", "saliency", "--masks", str(masks), "--root", str(voc), "--fold", "0",
                       "--runs", "1", "--episodes", "12", "--image-size", size, "--eval-resolution", resolution,
                       "--workers", "0", "--out", str(out)])
        r = json.loads(out.read_text())["fold0"]
        assert r["miou"] == r["miou_episode_mean"] == r["fbiou"] == 1.0, (size, r)
