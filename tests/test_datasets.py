"""Tests of datasets.py on small fixtures written here in the real layouts (no downloaded data)."""
import json
import pathlib
import platform
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
import demo_data
import model
from masksplit import MaskSplit

def write_voc(root, labels, image_set="val"):
    """VOC2012 tree with palette masks `labels` {stem: uint8 [H,W]} and random JPEG images of the same size."""
    voc = pathlib.Path(root) / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    for stem, label in labels.items():
        img = rng.integers(0, 256, label.shape + (3,), dtype=np.uint8)
        Image.fromarray(img).save(_mkdir(voc / "JPEGImages") / f"{stem}.jpg", quality=95)
        mask = Image.fromarray(label, "P")
        mask.putpalette(demo_data.voc_palette())
        D.save_png(mask, voc / "SegmentationClassAug" / f"{stem}.png")
    lists = _mkdir(voc / "ImageSets" / "Segmentation")
    (lists / f"{image_set}.txt").write_text("\n".join(labels) + "\n")
    return voc


def _mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def block(h, w, cls, pixels, top=0):
    """Label map with exactly `pixels` pixels of class `cls` (rows from `top`, filled left to right)."""
    label = np.zeros((h, w), np.uint8)
    flat = label[top:].reshape(-1)
    flat[:pixels] = cls
    return label


# ---------------------------------------------------------------------------------------------------------------
# File I/O
# ---------------------------------------------------------------------------------------------------------------

def test_load_image_converts_modes_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    cases = {"gray.png": base.convert("L"), "rgba.png": base.convert("RGBA"), "pal.png": base.convert("P"),
             "cmyk.jpg": base.convert("CMYK"), "rgb.bmp": base, "la.png": base.convert("LA")}
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = D.load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (30, 20), name
    gray = np.asarray(D.load_image(tmp_path / "gray.png"))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 0] == np.asarray(base.convert("L"))).all()
    np.testing.assert_array_equal(np.asarray(D.load_image(tmp_path / "rgba.png")), rgb)


def test_load_image_bad_files_name_the_file(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name in ("trunc.jpg", "junk.png", "missing.jpg"):
        with pytest.raises(ValueError, match=name):
            D.load_image(tmp_path / name)


def test_binary_masks_every_mode(tmp_path):
    truth = np.zeros((12, 16), bool)
    truth[3:9, 2:11] = True
    gray = (truth * 255).astype(np.uint8)
    Image.fromarray(truth).convert("1").save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])).save(tmp_path / "rgba.png")
    pal = Image.fromarray(truth.astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(np.where(truth, 200, 60).astype(np.uint8)).save(tmp_path / "soft.png")   # 8-bit >= 128
    for name in ("one", "gray", "rgb", "rgba", "pal", "soft"):
        got = D.load_binary_mask(tmp_path / f"{name}.png")
        assert got.dtype == bool
        np.testing.assert_array_equal(got, truth, err_msg=name)


def test_class_masks_palette_and_gray(tmp_path):
    label = np.array([[0, 1, 255], [20, 7, 0]], np.uint8)
    pal = Image.fromarray(label, "P")
    pal.putpalette(demo_data.voc_palette())
    pal.save(tmp_path / "p.png")
    Image.fromarray(label).save(tmp_path / "l.png")
    Image.fromarray(np.stack([label] * 3, -1)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(D.load_mask(tmp_path / "p.png"), label)
    np.testing.assert_array_equal(D.load_mask(tmp_path / "l.png"), label)
    with pytest.raises(ValueError, match="rgb.png"):
        D.load_mask(tmp_path / "rgb.png")


def test_list_images_and_atomic_writers(tmp_path):
    folder = tmp_path / "imgs"
    with pytest.raises(ValueError, match="imgs"):
        D.list_images(folder)
    folder.mkdir()
    with pytest.raises(ValueError, match="no images"):
        D.list_images(folder)
    for name in ("b.JPG", "a.png", "c.jpeg", "d.bmp"):
        Image.new("RGB", (4, 4)).save(folder / name, format="PNG" if name.endswith("png") else None)
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in D.list_images(folder)] == ["a.png", "b.JPG", "c.jpeg", "d.bmp"]
    (tmp_path / "list.txt").write_text("c\nb\n\n")
    assert [p.name for p in D.list_images(folder, tmp_path / "list.txt")] == ["b.JPG", "c.jpeg"]
    assert [p.stem for p in D.list_images(folder, ["d"])] == ["d"]
    (tmp_path / "bad.txt").write_text("a\nzzz\n")
    with pytest.raises(ValueError, match="zzz"):
        D.list_images(folder, tmp_path / "bad.txt")
    D.save_png(np.eye(5, dtype=bool), tmp_path / "deep" / "m.png")
    np.testing.assert_array_equal(D.load_binary_mask(tmp_path / "deep" / "m.png"), np.eye(5, dtype=bool))
    model.write_json({"a": 1}, tmp_path / "deep" / "x.json")
    assert json.loads((tmp_path / "deep" / "x.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["m.png", "x.json"]     # no tmp files left
    t = D.image_to_tensor(Image.new("RGB", (30, 20), (124, 116, 104)), 16)
    assert t.shape == (3, 16, 16) and t.abs().max() < 0.02                                  # ~ImageNet mean


# ---------------------------------------------------------------------------------------------------------------
# Folds, candidates, episodes
# ---------------------------------------------------------------------------------------------------------------

def test_fold_definitions():
    assert D.pascal_fold_classes(0) == [1, 2, 3, 4, 5] and D.pascal_fold_classes(3) == [16, 17, 18, 19, 20]
    inter = [D.coco_fold_classes(f, "interleaved") for f in range(4)]
    contig = [D.coco_fold_classes(f, "contiguous") for f in range(4)]
    assert inter[0][:3] == [1, 5, 9] and inter[3][-1] == 80 and inter[1][:2] == [2, 6]
    assert contig[1] == list(range(21, 41))
    for folds in (inter, contig):
        assert sorted(c for f in folds for c in f) == list(range(1, 81))
    with pytest.raises(ValueError):
        D.coco_fold_classes(0, "other")
    with pytest.raises(ValueError):
        D.pascal_fold_classes(4)


@pytest.mark.filterwarnings("ignore:.*give no episodes")
def test_min_pixels_filter_and_episodes(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKSPLIT_CACHE", str(tmp_path / "cache"))   # the cache folder of datasets.cache_dir()
    h = w = 80
    labels = {"a": block(h, w, 1, 2048), "b": block(h, w, 1, 2047), "c": block(h, w, 1, 3000),
              "d": block(h, w, 2, 2100), "e": block(h, w, 2, 4000), "f": block(h, w, 7, 5000),
              "g": block(h, w, 1, 2600, top=10)}
    labels["a"][-1, -5:] = 255                                      # boundary pixels are not counted
    write_voc(tmp_path, labels)
    kw = dict(episodes=40, seed=3, image_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = D.FewShotEpisodes("pascal", tmp_path, fold=0, **kw)
    assert sorted(ep.candidates) == [("a", 1), ("c", 1), ("d", 2), ("e", 2), ("g", 1)]
    assert ep.classes == [1, 2, 3, 4, 5]
    again = D.FewShotEpisodes("pascal", tmp_path / "VOCdevkit", fold=0, **kw)
    assert [ep.episode_ids(i) for i in range(40)] == [again.episode_ids(i) for i in range(40)]
    other = D.FewShotEpisodes("pascal", tmp_path, fold=0, **{**kw, "seed": 4})
    assert [ep.episode_ids(i) for i in range(40)] != [other.episode_ids(i) for i in range(40)]
    for i in range(40):
        q, s, c = ep.episode_ids(i)
        assert s[0] != q and (s[0], c) in ep.candidates and (q, c) in ep.candidates
    item = ep[0]
    q, s, c = ep.episode_ids(0)
    assert (item["query_id"], item["support_ids"], item["class_id"], item["episode"]) == (q, s, c, 0)
    assert item["query_img"].shape == (3, 64, 64) and item["support_imgs"].shape == (1, 3, 64, 64)
    assert item["support_masks"].shape == (1, 64, 64) and item["support_masks"].dtype == torch.float32
    assert item["query_mask"].shape == (64, 64) and item["query_mask"].dtype == torch.int64
    orig = item["query_mask_orig"]
    assert orig.shape == (h, w) and int((orig == 1).sum()) == (labels[q] == c).sum()
    assert set(torch.unique(orig).tolist()) <= {0, 1, 255}
    assert item["support_masks"].sum() > 0
    assert list((tmp_path / "cache").glob("voc-counts-*.json"))                    # candidate index cached
    with pytest.raises(ValueError, match="no class"):
        D.FewShotEpisodes("pascal", tmp_path, fold=1, **kw)                            # class 7 has one image
    two = D.FewShotEpisodes("pascal", tmp_path, fold=0, shots=2, **kw)                # only class 1 has 3 images
    for i in range(10):
        q, s, c = two.episode_ids(i)
        assert c == 1 and len(set(s)) == 2 and q not in s and set(s) | {q} == {"a", "c", "g"}


@pytest.mark.filterwarnings("ignore:.*give no episodes")
def test_hsnet_split_list_and_pseudo_mask(tmp_path):
    labels = {f"im{i}": block(60, 60, 6 + i % 2, 2500) for i in range(4)}
    voc = write_voc(tmp_path, labels)
    lists = _mkdir(tmp_path / "splits" / "val")
    (lists / "fold1.txt").write_text("im0__06\nim2__06\nim1__07\nim3__07\nmissing__06\n")
    for stem, label in labels.items():
        D.save_png(label > 0, tmp_path / "pseudo" / f"{stem}.png")
    with pytest.warns(UserWarning, match="1 of 5"):
        ep = D.FewShotEpisodes("pascal", voc, 1, episodes=6, image_size=32, pair_list=lists,
                               pseudo_masks=tmp_path / "pseudo")
    assert sorted(ep.candidates) == [("im0", 6), ("im1", 7), ("im2", 6), ("im3", 7)]
    item = ep[2]
    q = item["query_id"]
    assert torch.equal(item["query_pseudo_mask"], torch.from_numpy((labels[q] > 0).astype(np.int64)))
    D.save_png(np.ones((61, 60), bool), tmp_path / "pseudo" / f"{q}.png")        # not the size of its image
    with pytest.raises(ValueError, match=f"{q}.png: mask is 60x61"):
        ep[2]
    (lists / "fold2.txt").write_text("im0__03\n")
    with pytest.raises(ValueError, match="not in fold"):
        D.FewShotEpisodes("pascal", voc, 2, pair_list=lists)


@pytest.mark.filterwarnings("ignore:.*give no episodes")
def test_coco_rendering_folds_and_cache(tmp_path, monkeypatch):
    pytest.importorskip("pycocotools")
    root = tmp_path / "coco"
    _mkdir(root / "val2014")
    cat_ids = demo_data.COCO_CATEGORY_IDS                      # 80 ids with gaps; index k+1 for the k-th sorted id
    images, anns = [], []
    for i in range(4):
        Image.new("RGB", (80, 60), (i * 40, 90, 30)).save(root / "val2014" / f"COCO_val2014_{i + 1:012d}.jpg")
        images.append({"id": i + 1, "file_name": f"COCO_val2014_{i + 1:012d}.jpg", "height": 60, "width": 80})
        # a 50x50 square polygon (2500 px) of index 2 (category id 2) and, in images 0/1, index 6 (id 6)
        anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_ids[1], "iscrowd": 0,
                     "area": 2500, "bbox": [0, 0, 50, 50], "segmentation": [[0, 0, 50, 0, 50, 50, 0, 50]]})
        if i < 2:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_ids[5], "iscrowd": 0,
                         "area": 100, "bbox": [60, 0, 10, 10],
                         "segmentation": [[60, 0, 70, 0, 70, 10, 60, 10]]})
    crowd = np.zeros((60, 80), bool)
    crowd[55:, :] = True
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": cat_ids[1], "iscrowd": 1, "area": 400,
                 "bbox": [0, 55, 80, 5], "segmentation": demo_data._rle_uncompressed(crowd)})
    model.write_json({"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": str(c)} for c in reversed(cat_ids)]},
                 root / "annotations" / "instances_val2014.json")
    out = D.render_coco_masks(root)
    m = D.load_mask(out / "COCO_val2014_000000000001.png")
    assert m.shape == (60, 80)
    assert (m == 2).sum() == 2500 and (m == 6).sum() == 100 and (m[55:] == 255).all()
    # both conventions: index 2 is in interleaved fold 1 and contiguous fold 0
    inter = D.FewShotEpisodes("coco", root, 1, episodes=5, image_size=32, min_pixels=2048)
    contig = D.FewShotEpisodes("coco", root, 0, episodes=5, image_size=32, min_pixels=50,
                               coco_folds="contiguous")
    assert {c for _, c in inter.candidates} == {2} and len(inter.candidates) == 4
    assert {c for _, c in contig.candidates} == {2, 6}
    assert inter[0]["query_mask_orig"].shape == (60, 80)
    import pycocotools.coco

    def no_second_render(*a, **k):
        raise AssertionError("COCO masks rendered twice")
    monkeypatch.setattr(pycocotools.coco, "COCO", no_second_render)
    assert D.render_coco_masks(root, "val2014") == out


# ---------------------------------------------------------------------------------------------------------------
# Training pairs and augmentation
# ---------------------------------------------------------------------------------------------------------------

def encoded_pair(tmp_path, size=(90, 120)):
    """Image whose pixels encode their own mask: foreground white, background mid-gray (outside fill is black)."""
    h, w = size
    fg = np.zeros((h, w), bool)
    fg[15:75, 20:100] = True
    fg[40:60, 90:115] = True                                       # asymmetric, so flips matter
    img = np.where(fg[..., None], 255, 128).astype(np.uint8).repeat(3, -1)
    D.save_png(img, tmp_path / "images" / "x.png")
    D.save_png(fg, tmp_path / "masks" / "x.png")
    return tmp_path / "images", tmp_path / "masks"


def decode(img):
    """0 black, 1 gray, 2 white per pixel of a view in [0, 1]."""
    return torch.bucketize(img.mean(0), torch.tensor([0.25, 0.75]))


def augmented(ds, item):
    """An item's two views after the rest of their augmentation (training_views, as train_step), un-normalised."""
    batch = torch.utils.data.default_collate([item])
    query, target, support, support_mask = D.training_views(batch, ds.augmentation, torch.device("cpu"))
    mean, std = torch.tensor(model.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(model.IMAGENET_STD).view(3, 1, 1)
    return query[0] * std + mean, target[0], support[0] * std + mean, support_mask[0]


def test_augmentation_keeps_image_and_targets_aligned(tmp_path):
    images, masks = encoded_pair(tmp_path)
    ds = D.MaskSplitPairs(images, masks, image_size=64, seed=0,
                          jitter_p=0.0, gray_p=0.0, blur_p=0.0, rotation_p=1.0)
    outside_seen = 0
    for epoch in range(6):
        q, t, s, m = augmented(ds, ds[(epoch, 0)])
        q, s = decode(q), decode(s)
        assert set(torch.unique(t).tolist()) <= {0, 1, 255} and set(torch.unique(m).tolist()) <= {0.0, 1.0}
        assert (t == 1).any() and (t == 255).any() and (m == 1).any()
        # agreement between what the pixel shows and its label (bilinear edges excepted)
        assert ((q == 2) == ((t == 1) | ((t == 255) & (q != 0))))[t != 255].float().mean() > 0.93
        assert (q[t == 1] == 2).float().mean() > 0.9                 # query fg shows foreground
        assert (q[t == 0] == 1).float().mean() > 0.9                 # background shows background
        assert (q[t == 255] != 1).float().mean() > 0.9               # 255: support fg (white) or outside (black)
        assert (s[m == 1] == 2).float().mean() > 0.9
        assert (s[s == 0] == 0).all() and (m[s == 0] == 0).float().mean() > 0.9   # outside: support mask 0
        outside_seen += int(((q == 0) & (t == 255)).sum())
    assert outside_seen > 0


def test_full_augmentation_keeps_255_and_is_deterministic(tmp_path):
    images, masks = encoded_pair(tmp_path)
    ds = D.MaskSplitPairs(images, masks, image_size=48, seed=5)
    a, b = ds[0], ds[0]
    for k in ("query_img", "query_target", "query_params", "support_img", "support_mask", "support_params"):
        assert torch.equal(a[k], b[k]), k
    c = ds[(1, 0)]
    assert not torch.equal(a["query_img"], c["query_img"])
    assert all(a[k].dtype == torch.uint8 for k in ("query_img", "query_target", "support_img", "support_mask"))
    assert (a["query_target"] == 255).any() and (augmented(ds, a)[1] == 255).any()
    assert a["query_img"].shape == a["support_img"].shape == (3, 48, 48) and a["image_id"] == "x"
    plain = D.MaskSplitPairs(images, masks, image_size=48, augment=False, masksplit=MaskSplit(prob=0.0))[0]
    assert set(torch.unique(plain["query_target"]).tolist()) == {0, 1}                  # no split: no 255
    assert torch.equal(plain["query_target"], plain["support_mask"])
    assert torch.equal(plain["query_params"], torch.tensor(D.NO_STEP))                  # and no other step


def test_loader_workers_give_the_same_pairs_and_keep_freed_memory(tmp_path):
    images, masks = encoded_pair(tmp_path)
    ds = D.MaskSplitPairs(images, masks, image_size=32, seed=1)
    loaders = [D.make_loader(ds, torch.device("cpu"), n, batch_size=1) for n in (0, 1)]
    a, b = (next(iter(loader)) for loader in loaders)
    assert torch.equal(a["query_img"], b["query_img"]) and torch.equal(a["query_target"], b["query_target"])
    # the item-making processes keep freed memory: glibc takes the settings (a value it refuses returns False)
    assert loaders[1].worker_init_fn is D.init_worker
    if platform.libc_ver()[0] == "glibc":
        assert model.keep_freed_memory()


def test_train_aug_is_every_masked_image_not_in_val(tmp_path):
    labels = {f"t{i}": block(40, 40, 3, 400) for i in range(5)}
    voc = write_voc(tmp_path, labels, image_set="val")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("t1\nt3\n")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("t0\n")     # VOC's own, smaller train split
    assert D.voc_image_set(voc, "train_aug") == ["t0", "t2", "t4"] and D.voc_image_set(voc, "train") == ["t0"]
    assert D.fold_train_ids(voc, 1, image_set="train_aug") == ["t0", "t2", "t4"]
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("t4\nt2\n")  # a list file wins
    assert D.voc_image_set(voc, "train_aug") == ["t4", "t2"]
    (voc / "SegmentationClassAug").rename(voc / "SegmentationClass")         # plain VOC 2012: still derived
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    assert D.voc_image_set(voc, "train_aug") == ["t0", "t2", "t4"]
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(ValueError, match="val.txt"):
        D.voc_image_set(voc, "train_aug")


@pytest.mark.filterwarnings("ignore:.*give no episodes")
def test_images_make_pseudomasks_left_without_mask(tmp_path):
    """make_pseudomasks.py writes no mask for an image under 1% salient and records it in its log: training
    leaves such images out, the Saliency* baseline predicts all background for them; any other missing mask is
    still an error, and a log line cut short by a kill is ignored."""
    labels = {f"im{i}": block(60, 60, 6, 2500) for i in range(4)}
    voc = write_voc(tmp_path, labels)
    pseudo = tmp_path / "pseudo"
    for stem in ("im0", "im2", "im3"):
        D.save_png(labels[stem] > 0, pseudo / f"{stem}.png")
    log = [{"image": "im0", "written": True}, {"image": "im1", "written": False}]
    (pseudo / "log_shard0of2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"image": "im2", "wr')
    (pseudo / "log_shard1of2.jsonl").write_text(json.dumps({"image": "im3", "written": True}) + "\n")
    assert D.images_without_mask(pseudo) == {"im1"} and D.images_without_mask(tmp_path) == set()
    with pytest.warns(UserWarning, match="1 of 4 images are left out"):
        pairs = D.MaskSplitPairs(voc / "JPEGImages", pseudo, image_size=32)
    assert pairs.dropped == ["im1"] and [p.stem for p in pairs.images] == ["im0", "im2", "im3"]
    episodes = D.FewShotEpisodes("pascal", voc, 1, episodes=8, image_size=32,
                                 pseudo_masks=pseudo)
    predicted = {item["query_id"]: int(item["query_pseudo_mask"].sum()) for item in episodes}
    assert predicted["im1"] == 0 and all(v == 2500 for k, v in predicted.items() if k != "im1")
    (pseudo / "im3.png").unlink()                                  # missing, and not recorded as without mask
    with pytest.raises(ValueError, match="im3.png"):
        D.MaskSplitPairs(voc / "JPEGImages", pseudo, image_size=32)


def test_groundtruth_union_source_and_fold_training_ids(tmp_path):
    label = np.zeros((70, 70), np.uint8)
    label[5:30, 5:60] = 3
    label[35:65, 10:40] = 12
    label[30:35, 5:40] = 255
    voc = write_voc(tmp_path, {"g": label, "h": block(70, 70, 8, 3000)}, image_set="train")
    ds = D.MaskSplitPairs(voc / "JPEGImages", voc / "SegmentationClassAug", mask_source="groundtruth",
                          image_size=70, augment=False, masksplit=MaskSplit(prob=0.0))
    t = {ds[i]["image_id"]: ds[i]["query_target"] for i in range(2)}
    assert torch.equal(t["g"], torch.from_numpy(((label > 0) & (label < 255)).astype(np.int64)))
    assert D.fold_train_ids(voc, 0) == ["h"]                 # "g" holds class 3
    assert D.fold_train_ids(voc, 1) == ["g"]                 # "h" holds class 8
    assert D.fold_train_ids(voc, 2) == ["h"]
    assert D.fold_train_ids(voc, 3) == ["g", "h"]


def test_supervised_pairs_exclude_test_fold(tmp_path):
    labels = {f"s{i}": block(64, 64, [2, 2, 9, 9, 9][i], 2500) for i in range(5)}
    labels["s0"][50:, :] = 255
    voc = write_voc(tmp_path, labels, image_set="train")
    with pytest.raises(ValueError, match="val.txt"):        # the default train_aug cannot be derived without val
        D.SupervisedPairs(voc, fold=1)
    ds = D.SupervisedPairs(voc, fold=1, image_size=48, image_set="train")  # fold 1 = 6..10
    assert ds.classes == [c for c in range(1, 21) if c not in range(6, 11)]
    assert len(ds) == 2 and {c for _, c in ds.items} == {2}
    item = ds[0]
    assert item["class_id"] == 2 and item["support_id"] != item["image_id"]
    assert set(torch.unique(item["query_target"]).tolist()) <= {0, 1, 255} and item["support_mask"].sum() > 0
    assert {c for _, c in D.SupervisedPairs(voc, fold=0, image_set="train").items} == {9}
    with pytest.raises(ValueError, match="fold 1"):
        D.SupervisedPairs(voc, fold=1, image_set="train", min_pixels=2501)


def test_salient_objects(tmp_path):
    truth = np.zeros((40, 50), bool)
    truth[10:30, 5:25] = True
    for stem in ("p", "q"):
        Image.new("RGB", (50, 40)).save(_mkdir(tmp_path / "img") / f"{stem}.jpg")
        Image.fromarray(truth).convert("1").save(_mkdir(tmp_path / "gt") / f"{stem}.png")
    ds = D.SalientObjects(tmp_path / "img", tmp_path / "gt", image_size=50)
    item = ds[1]
    assert item["image_id"] == "q" and item["orig_size"].tolist() == [40, 50]
    assert item["mask"].shape == (50, 50) and abs(float(item["mask"].mean()) - truth.mean()) < 0.02
    assert len(D.SalientObjects(tmp_path / "img")) == 2 and "mask" not in D.SalientObjects(tmp_path / "img")[0]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_file(tmp_path):
    images, masks = encoded_pair(tmp_path)
    D.save_png(np.zeros((10, 10, 3), np.uint8) + 200, images / "y.png")
    with pytest.raises(ValueError, match="y.png"):                                      # missing mask
        D.MaskSplitPairs(images, masks)
    mask = np.zeros((11, 10), bool)
    mask[2:8, 2:8] = True
    D.save_png(mask, masks / "y.png")
    ds = D.MaskSplitPairs(images, masks, image_size=16)
    with pytest.raises(ValueError, match=r"y\.png.*10x11"):                              # size mismatch
        ds[1]
    (images / "y.png").write_bytes((images / "x.png").read_bytes()[:200])               # truncated image
    with pytest.raises(ValueError, match="y.png"):
        ds[1]
    D.save_png(np.zeros((11, 10), bool), masks / "y.png")
    with pytest.warns(UserWarning, match="1 of 2"):                                     # empty mask left out
        assert len(D.MaskSplitPairs(images, masks)) == 1
    label = block(60, 60, 1, 2500)
    label[0, 0] = 33                                                                     # unknown class
    voc = write_voc(tmp_path / "v", {"u": label, "w": block(60, 60, 1, 2500)})
    with pytest.raises(ValueError, match=r"u\.png.*unknown class index \[33\]"):
        D.FewShotEpisodes("pascal", voc, 0)
    with pytest.raises(ValueError, match="not a PASCAL VOC tree"):
        D.FewShotEpisodes("pascal", tmp_path / "nowhere", 0)


def test_unreadable_mask_is_an_error_naming_it(tmp_path):
    images, masks = encoded_pair(tmp_path)
    D.save_png(np.zeros((90, 120, 3), np.uint8), images / "z.png")
    (masks / "z.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="z.png"):
        D.MaskSplitPairs(images, masks)


# ---------------------------------------------------------------------------------------------------------------
# Demo data
# ---------------------------------------------------------------------------------------------------------------

def test_demo_data_is_deterministic_fast_and_usable(tmp_path):
    start = time.perf_counter()
    paths = demo_data.make_demo_data(tmp_path / "a", seed=0)
    assert time.perf_counter() - start < 15
    small = dict(train_images=4, val_images=4, salient_images=2, coco_images=3)
    other = demo_data.make_demo_data(tmp_path / "b", seed=0, **small)
    again = demo_data.make_demo_data(tmp_path / "c", seed=0, **small)
    for key in ("voc_images", "voc_masks", "salient_masks"):
        names = sorted(p.name for p in other[key].iterdir())
        assert names and names == sorted(p.name for p in again[key].iterdir())
        assert all((other[key] / n).read_bytes() == (again[key] / n).read_bytes() for n in names)
    assert "DEMO" in (paths["root"] / "README.txt").read_text()
    assert len(D.voc_image_set(paths["voc"], "train")) == 120 and len(D.voc_image_set(paths["voc"], "val")) == 60
    mask = Image.open(paths["voc_masks"] / "demo_val_0000.png")
    assert mask.mode == "P" and 255 in np.asarray(mask)
    for fold in range(4):                                           # one-shot episodes in every PASCAL-5i fold
        ep = D.FewShotEpisodes("pascal", paths["voc"], fold, episodes=20, image_size=32)
        assert {c for _, c in ep.candidates} == set(D.pascal_fold_classes(fold))
    sal = D.SalientObjects(paths["salient_images"], paths["salient_masks"], image_size=32)
    assert len(sal) == 40 and 0.02 < float(sal[0]["mask"].mean()) < 0.6
    pytest.importorskip("pycocotools")
    if True:
        for conv in D.COCO_FOLD_CONVENTIONS:
            for fold in range(4):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ep = D.FewShotEpisodes("coco", paths["coco"], fold, episodes=5, image_size=32,
                                           coco_folds=conv)
                assert len({c for _, c in ep.candidates}) >= 3
