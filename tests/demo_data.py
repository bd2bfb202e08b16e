"""Synthetic DEMO data in the real layouts, deterministic: the quick start's data (`bash pipeline.sh`) and the tests'.
Never a benchmark.

    python tests/demo_data.py OUT          # writes OUT/{VOCdevkit, salient, coco}
"""
import json
import pathlib
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from datasets import IGNORE, VOC_CLASSES, save_png  # noqa: E402
from model import atomic_file, write_file, write_json  # noqa: E402

DEMO_SHAPES = ("disc", "square", "triangle", "star", "cross")
DEMO_TEXTURES = ("stripes", "checker", "dots", "blotches")
# real COCO category ids (1..90 with gaps), so the demo split is mapped to 1..80 like the real one
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def voc_palette():
    """The PASCAL VOC colour map (256 RGB entries, flattened)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _demo_polygon(shape, rng, area, center, angle):
    """Vertices [(x, y)] of a demo shape with about `area` pixels."""
    if shape == "disc":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        unit = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        unit = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], float) / np.sqrt(2)
    elif shape == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        unit = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        unit = np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
    else:                                                          # cross
        a = 1 / 3
        unit = np.array([[a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1], [a, -1], [a, -a],
                         [1, -a], [1, a], [a, a]], float)
    x, y = unit[:, 0], unit[:, 1]
    unit_area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = unit @ rot.T * np.sqrt(area / unit_area) + np.asarray(center)
    return [(float(px), float(py)) for px, py in pts]


def _demo_texture(klass, rng, h, w):
    """Float RGB [h, w, 3] in 0..1: the texture (k // 5) in the two colours of demo class k."""
    hue = klass / VOC_CLASSES
    base = np.array([0.5 + 0.45 * np.cos(2 * np.pi * (hue + s)) for s in (0, 1 / 3, 2 / 3)])
    other = 1.0 - 0.8 * base
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(7, 11)
    kind = DEMO_TEXTURES[klass // len(DEMO_SHAPES) % len(DEMO_TEXTURES)]
    if kind == "stripes":
        t = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period) > 0
    elif kind == "checker":
        t = ((xx // (period * 0.8)).astype(int) + (yy // (period * 0.8)).astype(int)) % 2 == 0
    elif kind == "dots":
        t = (np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.45
    else:                                                          # blotches: smooth random field
        coarse = rng.random((h // 12 + 2, w // 12 + 2))
        t = np.kron(coarse, np.ones((12, 12)))[:h, :w] > 0.5
    tex = np.where(t[..., None], base, other).astype(np.float32)
    return np.clip(tex + rng.normal(0, 0.03, (h, w, 3)), 0, 1)


def _demo_background(rng, h, w):
    """Cluttered background: a colour gradient, noise and many small random polygons and lines."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0.15, 0.85, 3), rng.uniform(0.15, 0.85, 3)
    t = ((xx / w) * rng.uniform(-1, 1) + (yy / h) * rng.uniform(-1, 1))[..., None]
    img = np.clip(c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-6) + rng.normal(0, 0.04, (h, w, 3)), 0, 1)
    pil = Image.fromarray((img * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(12, 25))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.3:
            draw.line([(cx, cy), (cx + rng.uniform(-40, 40), cy + rng.uniform(-40, 40))], fill=color,
                      width=int(rng.integers(1, 4)))
        else:
            n, r = int(rng.integers(3, 7)), rng.uniform(4, 12)
            t0 = rng.uniform(0, 2 * np.pi)
            draw.polygon([(cx + r * np.cos(t0 + 2 * np.pi * i / n), cy + r * np.sin(t0 + 2 * np.pi * i / n))
                          for i in range(n)], fill=color)
    return pil


def _demo_scene(rng, classes, size_range=(160, 240), area_range=(3500, 6000)):
    """One demo image: objects of `classes` (demo class ids 0..19) on clutter, the last on top.
    Returns (PIL RGB, label [H,W] uint8 with k+1 per object, polygons [(klass, vertices)])."""
    h, w = (int(rng.integers(size_range[0], size_range[1] + 1)) for _ in range(2))
    image = np.asarray(_demo_background(rng, h, w), dtype=np.float32) / 255.0
    label = np.zeros((h, w), np.uint8)
    polygons = []
    for klass in classes:
        shape = DEMO_SHAPES[klass % len(DEMO_SHAPES)]
        area = min(rng.uniform(*area_range), 0.3 * h * w)
        margin = np.sqrt(area) * 0.8
        center = (rng.uniform(margin, w - margin), rng.uniform(margin, h - margin))
        verts = _demo_polygon(shape, rng, area, center, rng.uniform(0, 2 * np.pi))
        region = Image.new("L", (w, h), 0)
        ImageDraw.Draw(region).polygon(verts, fill=1)
        inside = np.asarray(region, dtype=bool)
        image = np.where(inside[..., None], _demo_texture(klass, rng, h, w), image)
        label[inside] = klass + 1
        polygons.append((klass, verts))
    return Image.fromarray((image * 255 + 0.5).astype(np.uint8)), label, polygons


def _boundary(label, width=2):
    """Pixels within `width` of a label change (VOC marks object boundaries 255)."""
    edge = np.zeros(label.shape, bool)
    for d in range(1, width + 1):
        edge[:, d:] |= label[:, d:] != label[:, :-d]
        edge[:, :-d] |= label[:, d:] != label[:, :-d]
        edge[d:] |= label[d:] != label[:-d]
        edge[:-d] |= label[d:] != label[:-d]
    return edge


def _rle_uncompressed(mask):
    """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.T.ravel().astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"counts": runs, "size": list(mask.shape)}


def _save_jpeg(image, path):
    with atomic_file(path) as f:
        image.save(f, format="JPEG", quality=92)


def _write_demo_voc(rng, paths, train_images, val_images, size_range):
    """The demo's VOC tree: images, palette class masks with 255 boundaries, train / val lists."""
    palette = voc_palette()
    for split, count in (("train", train_images), ("val", val_images)):
        stems = []
        for j in range(count):
            stem = f"demo_{split}_{j:04d}"
            classes = [j % VOC_CLASSES]
            if rng.random() < 0.5:
                classes.insert(0, int(rng.integers(VOC_CLASSES)))
            image, label, _ = _demo_scene(rng, classes, size_range)
            label[_boundary(label)] = IGNORE
            mask = Image.fromarray(label, "P")
            mask.putpalette(palette)
            _save_jpeg(image, paths["voc_images"] / f"{stem}.jpg")
            save_png(mask, paths["voc_masks"] / f"{stem}.png")
            stems.append(stem)
        write_file(paths[f"{split}_list"], ("\n".join(stems) + "\n").encode())


def _write_demo_coco(rng, paths, coco_images, size_range):
    """The demo's COCO split: images and instances JSON (polygons, one crowd RLE per 8 images)."""
    # COCO: category index idx (1..80) = 20 i + j + 1, j = 0..3: each contiguous fold i gets 4 of them and each
    # interleaved fold (idx - 1) % 4 gets 4; demo class for the texture/shape: (idx - 1) % 20
    indices = [20 * i + j + 1 for i in range(4) for j in range(4)]
    coco = {"info": {"description": "masksplit DEMO data (synthetic shapes), not a benchmark", "version": "1"},
            "licenses": [], "images": [], "annotations": [],
            "categories": [{"id": c, "name": f"demo_{k + 1:02d}", "supercategory": "demo"}
                           for k, c in enumerate(COCO_CATEGORY_IDS)]}
    for j in range(coco_images):
        idx = [indices[j % len(indices)]]
        if rng.random() < 0.5:
            idx.insert(0, indices[int(rng.integers(len(indices)))])
        image, label, polygons = _demo_scene(rng, [(i - 1) % VOC_CLASSES for i in idx], size_range)
        image_id = j + 1
        name = f"COCO_val2014_{image_id:012d}.jpg"
        _save_jpeg(image, paths["coco"] / "val2014" / name)
        coco["images"].append({"id": image_id, "file_name": name, "height": image.height, "width": image.width})
        for i, (_, verts) in zip(idx, polygons):
            xs, ys = [v[0] for v in verts], [v[1] for v in verts]
            area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))    # shoelace
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[i - 1],
                "segmentation": [[round(c, 2) for v in verts for c in v]], "iscrowd": 0, "area": area,
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
        if j % 8 == 7:                                              # a crowd region (RLE) in a free corner
            crowd = np.zeros((image.height, image.width), bool)
            crowd[:12, :30] = True
            crowd &= label == 0
            rows, cols = np.nonzero(crowd)
            if rows.size:
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[indices[0] - 1], "segmentation": _rle_uncompressed(crowd),
                    "iscrowd": 1, "area": float(crowd.sum()),
                    "bbox": [float(cols.min()), float(rows.min()), float(np.ptp(cols) + 1), float(np.ptp(rows) + 1)]})
    write_json(coco, paths["coco"] / "annotations" / "instances_val2014.json")


def make_demo_data(root, seed=0, train_images=120, val_images=60, salient_images=40, coco_images=48,
                   size_range=(160, 240)):
    """Write small synthetic DEMO data (not a benchmark) in the real layouts, deterministically:
    - VOCdevkit/VOC2012: JPEGImages, SegmentationClass (VOC palette PNG: 20 shape x texture classes, 255 on
      object boundaries), ImageSets/Segmentation/{train,val}.txt. Image j's main object is of class j % 20, drawn
      last, so every class has >= 3 val images with > 2048 pixels (one-shot episodes in every PASCAL-5i fold).
    - salient/{images,masks}: one object per image, 0/255 gray PNG masks (a salient-object folder pair).
    - coco/val2014 + coco/annotations/instances_val2014.json: polygons, one crowd RLE per 8 images; objects of
      16 categories spread so that every COCO-20i fold has classes in both fold conventions.
    Returns {"root", "voc", "voc_images", "voc_masks", "train_list", "val_list", "salient_images",
    "salient_masks", "coco", "coco_split"}. A finished tree with the same arguments is reused."""
    root = pathlib.Path(root)
    config = {"seed": seed, "train_images": train_images, "val_images": val_images,
              "salient_images": salient_images, "coco_images": coco_images, "size_range": list(size_range),
              "version": 1}
    voc = root / "VOCdevkit" / "VOC2012"
    paths = {"root": root, "voc": voc, "voc_images": voc / "JPEGImages", "voc_masks": voc / "SegmentationClass",
             "train_list": voc / "ImageSets" / "Segmentation" / "train.txt",
             "val_list": voc / "ImageSets" / "Segmentation" / "val.txt",
             "salient_images": root / "salient" / "images", "salient_masks": root / "salient" / "masks",
             "coco": root / "coco", "coco_split": "val2014"}
    marker = root / "DEMO_DATA.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("config") == config:
                return paths
        except ValueError:
            pass
    rng = np.random.default_rng(seed)       # one stream, drawn in this order: VOC, salient objects, COCO
    _write_demo_voc(rng, paths, train_images, val_images, size_range)
    for k in range(salient_images):
        image, label, _ = _demo_scene(rng, [int(rng.integers(VOC_CLASSES))], size_range)
        _save_jpeg(image, paths["salient_images"] / f"demo_salient_{k:04d}.jpg")
        save_png(label > 0, paths["salient_masks"] / f"demo_salient_{k:04d}.png")
    _write_demo_coco(rng, paths, coco_images, size_range)
    write_file(root / "README.txt", b"masksplit DEMO data: synthetic textured shapes written by "
                                    b"datasets.make_demo_data. Not a benchmark.\n")
    write_json({"config": config, "note": "DEMO data, synthetic, not a benchmark",
                "paths": {k: str(v) for k, v in paths.items()}}, marker)
    return paths


if __name__ == "__main__":
    make_demo_data(sys.argv[1])
