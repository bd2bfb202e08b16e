"""Numbers comparable with the paper (issue 14): one mask resize everywhere, and the authors' behaviours behind
flags whose defaults change nothing. Small fixtures written here in the real layouts."""
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
import demo_data
import evaluate
import model
from evaluate import FewShotMetric, episode_counts


def write_voc(root, labels, image_set="val"):
    """VOC2012 tree: palette masks `labels` {stem: uint8 [H,W]}, random JPEG images of the same sizes, an image set list."""
    voc = pathlib.Path(root) / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    for stem, label in labels.items():
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, label.shape + (3,), dtype=np.uint8)).save(
            voc / "JPEGImages" / f"{stem}.jpg", quality=95)
        mask = Image.fromarray(label, "P")
        mask.putpalette(demo_data.voc_palette())
        D.save_png(mask, voc / "SegmentationClassAug" / f"{stem}.png")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / f"{image_set}.txt").write_text("\n".join(labels) + "\n")
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
            label[demo_data._boundary(label, 1)] = 255
            labels[f"img_{c:02d}_{j}"] = label
    return labels


@pytest.mark.parametrize("size", [50, 64, 160, 400])
def test_a_mask_resized_along_every_path_scores_iou_one_against_itself(size):
    rng = np.random.default_rng(size)
    for _ in range(5):
        h, w = int(rng.integers(90, 500)), int(rng.integers(90, 500))
        label = (rng.random((h // 7 + 1, w // 9 + 1)) < 0.4).repeat(7, 0).repeat(9, 1)[:h, :w].astype(np.uint8)
        label[rng.random((h, w)) < 0.02] = 255                          # ignored pixels
        truth = D.resize_mask(label, (size, size))                             # the query mask of an episode
        for pred in (D.resize_mask(label == 1, (size, size)),             # a pseudo-mask (bool, numpy)
                     D.resize_mask(torch.from_numpy(label == 1).long(), (size, size)),
                     D.resize_mask(label == 1, (size, size))):                 # a support mask
            metric = FewShotMetric()
            inter, union = metric.add(1, episode_counts(pred, truth).tolist())
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
        evaluate.main(["fss", "--baseline", "saliency", "--masks", str(masks), "--voc-root", str(voc), "--fold", "0",
                       "--runs", "1", "--episodes", "12", "--image-size", size, "--eval-resolution", resolution,
                       "--workers", "0", "--out", str(out)])
        r = json.loads(out.read_text())["fold0"]
        assert r["miou"] == r["miou_episode_mean"] == r["fbiou"] == 1.0, (size, r)


# ---- the authors' behaviours, each behind a flag whose default is ours ----

def block_label(h, w, blocks):
    """Label [h, w] with rectangles {class: (top, left, height, width)}."""
    label = np.zeros((h, w), np.uint8)
    for c, (t, left, bh, bw) in blocks.items():
        label[t:t + bh, left:left + bw] = c
    return label


def test_episode_sampling_image_draws_an_image_then_any_class_present(tmp_path):
    labels = {f"a{k}": block_label(100, 100, {1: (0, 0, 60, 60), 2: (80, 80, 10, 20)}) for k in range(4)}
    labels.update({f"b{k}": block_label(100, 100, {2: (10, 10, 55, 55)}) for k in range(3)})
    voc = write_voc(tmp_path, labels)
    default = D.FewShotEpisodes("pascal", voc, 0, episodes=300, seed=3, image_size=32)
    pair = D.FewShotEpisodes("pascal", voc, 0, episodes=300, seed=3, image_size=32, sampling="pair")
    image = D.FewShotEpisodes("pascal", voc, 0, episodes=300, seed=3, image_size=32, sampling="image")
    ids = lambda ds: [ds.episode_ids(i) for i in range(len(ds))]  # noqa: E731
    assert ids(default) == ids(pair)
    # the default is the (image, class) draw it always was: a candidate uniformly, then the supports
    candidates = sorted([(s, 1) for s in labels if s[0] == "a"] + [(s, 2) for s in labels if s[0] == "b"],
                        key=lambda sc: (sc[1], sc[0]))
    for i, (query, supports, c) in enumerate(ids(default)):
        rng = np.random.default_rng([3, i])
        assert (query, c) == candidates[int(rng.integers(len(candidates)))]
        assert query[0] == "ab"[c - 1]                                   # class 2 of an "a" image is too small
    pairs = [(q, c) for q, _, c in ids(image)]
    assert {("a0", 2), ("a0", 1), ("b0", 2)} <= set(pairs)                # any class present in the query image
    queries = [q for q, _ in pairs]
    assert abs(sum(q[0] == "a" for q in queries) / len(queries) - 4 / 7) < 0.08   # images uniformly
    assert all(s[0] == "b" for q, supports, c in ids(image) if c == 2 for s in supports)  # supports >= 2048 px
    with pytest.raises(ValueError, match="pair list"):
        D.FewShotEpisodes("pascal", voc, 0, sampling="image", pair_list=tmp_path / "x.txt")
    # evaluate.py --episode-sampling image: other episodes; without it, those of the default
    runs = {}
    for name, extra in (("none", []), ("pair", ["--episode-sampling", "pair"]), ("image", ["--episode-sampling",
                                                                                              "image"])):
        evaluate.main(["fss", "--baseline", "foreground", "--voc-root", str(voc), "--fold", "0", "--runs", "1",
                       "--episodes", "40", "--image-size", "32", "--workers", "0", "--out", str(tmp_path / "r.json"),
                       "--save-episodes", str(tmp_path / f"{name}.jsonl"), *extra])
        runs[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert runs["none"] == runs["pair"] != runs["image"]


def test_rotation_border_and_reject_flags_of_train_fss(tmp_path):
    import train_fss
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    for k in range(6):                                             # image 0: a 300 px mask, no split has 512 px halves
        Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)).save(images.mkdir(exist_ok=True) or
                                                                                 images / f"im{k}.jpg")
        side = 17 if k == 0 else 60
        D.save_png(block_label(90, 100, {255: (10, 15, side, side + (side == 17))}) == 255, masks / f"im{k}.png")
    base = ["--images", str(images), "--masks", str(masks), "--image-size", "48", "--seed", "1"]

    def items(*extra):
        data = train_fss.build_dataset(train_fss.parse_args(base + list(extra)))
        pairs = [data[i] for i in range(len(data))]
        for pair in pairs:                                         # the query target as train_step sees it
            pair["query_target"] = D.training_views(torch.utils.data.default_collate([pair]), data.augmentation,
                                                    torch.device("cpu"))[1][0]
        return pairs

    default, fill, reflect = items(), items("--rotation-border", "fill"), items("--rotation-border", "reflect")
    for a, b in zip(default, fill):
        assert all(torch.equal(a[k], b[k]) for k in ("query_img", "query_target", "support_img", "support_mask"))
    # --split none: 255 in the query target only where a rotation brought in pixels from outside the image
    outside = lambda xs: sum(int((x["query_target"] == 255).sum()) for x in xs)  # noqa: E731
    assert outside(items("--split", "none")) > 0 == outside(items("--split", "none", "--rotation-border", "reflect"))
    assert outside(reflect) > 0                                    # the support half stays ignored
    # a mask whose halves are too small: left unsplit (ours, default) or replaced by another image (--reject image)
    ours, theirs = items()[0], items("--reject", "image")[0]
    assert ours["image_id"] == "im0" and theirs["image_id"] != "im0"
    assert [x["image_id"] for x in items("--reject", "split")] == [x["image_id"] for x in default]


def test_coco_masks_repri_style(tmp_path):
    pytest.importorskip("pycocotools")
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "val2014" / "COCO_val2014_000000000001.jpg")
    crowd = np.zeros((40, 60), bool)
    crowd[30:38, 40:58] = True
    ann = {"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 40, "width": 60}],
           "categories": [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 200.0, "bbox": [0, 0, 40, 20],
                "segmentation": [[2, 2, 12.7, 2, 12.7, 12.7, 2, 12.7], [20, 2, 30, 2, 30, 12, 20, 12]]},
               {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": float(crowd.sum()),
                "bbox": [40, 30, 18, 8], "segmentation": demo_data._rle_uncompressed(crowd)}]}
    model.write_json(ann, root / "annotations" / "instances_val2014.json")
    full = D.load_mask(D.render_coco_masks(root) / "COCO_val2014_000000000001.png")
    repri = D.load_mask(D.render_coco_masks(root, style="repri")
                        / "COCO_val2014_000000000001.png")
    car = 2                                                        # category 3 is the second in sorted id order
    assert (full[5, 25], full[5, 5], full[34, 50]) == (car, car, 255)  # both polygons, crowd ignored
    assert (repri[5, 25], repri[5, 5], repri[34, 50]) == (0, car, 0)   # the first polygon only, crowd background
    assert repri[12, 12] == car and repri[13, 13] == 0                 # vertices truncated to integers, filled
