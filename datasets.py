"""Data: everything that reads images and masks (files, the real dataset layouts, the augmentation, MaskSplit
training pairs, few-shot test episodes, loaders); items are dicts with named keys. Imports model.py, never the reverse.
The layouts (README, Data): PASCAL VOC 2012, COCO (rendered once by pycocotools into cached class masks), salient-object
folders, pseudo-mask folders (0/255 PNGs named like the images), class folders (FSS-1000's layout)."""
import codecs
import collections
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import pathlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from masksplit import MaskSplit, query_target
from model import (IMAGENET_MEAN, IMAGENET_STD, atomic_file, keep_freed_memory, release_held, seeded_generator,
                   write_json)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MASK_SUFFIXES = (".png",)
EXIF_ORIENTATION = 0x0112
IGNORE = 255
VOC_CLASSES = 20
VOC_CLASS_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
                   "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
COCO_CLASSES = 80
COCO_FOLD_CONVENTIONS = ("interleaved", "contiguous")
COCO_MASK_STYLES = ("full", "repri")
EPISODE_SAMPLINGS = ("pair", "image", "every")
FOLDER_DATASETS = ("folders", "fss1000")          # a folder per class, each image with its binary mask beside it


# File I/O -------------------------------------------------------------------------------------------------------------

def _open(path, what):
    """Open and fully decode an image file; ValueError naming the file when it is missing or unreadable."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    try:
        with Image.open(path) as img:
            img.load()                                   # truncated files fail here (OSError)
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot read {what} ({err})") from None


def load_image(path):
    """PIL RGB image as displayed: EXIF orientation applied (phone photos), gray, RGBA, CMYK, palette and 16-bit
    images converted. ValueError naming the file when it is missing, unreadable or truncated."""
    img = _open(path, "image")
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):     # 16/32-bit gray: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))   # over black
    return img.convert("RGB") if img.mode != "RGB" else img


def load_mask(path, num_classes=VOC_CLASSES):
    """The one class-index mask reader (VOC, rendered COCO): np.uint8 [H, W] with the stored values (palette
    indices or gray levels); ValueError naming the file for a value outside 0..num_classes and 255 (VOC: 20)."""
    img = _open(path, "mask")
    if img.mode not in ("P", "L"):
        raise ValueError(f"{path}: class mask must be a palette or 8-bit gray PNG, got mode {img.mode!r}")
    mask = np.array(img, dtype=np.uint8)
    bad = np.unique(mask[(mask > num_classes) & (mask != IGNORE)])
    if bad.size:
        raise ValueError(f"{path}: unknown class index {bad.tolist()[:5]} (expected 0..{num_classes} or 255)")
    return mask


def _binary_levels(levels):
    """8-bit levels -> foreground: a 0/1 mask (no level above 1) is its nonzero pixels, any other is >= 128."""
    return levels != 0 if levels.max(initial=0) <= 1 else levels >= 128


def load_binary_mask(path):
    """The one binary-mask reader (salient-object ground truth, BAS-Net labels, pseudo-masks): np.bool_ [H, W].
    Mode '1': as stored. Palette: any nonzero index (the VOC palette's dark colours too). 16/32-bit gray: any nonzero
    value. 8-bit gray: >= 128, or nonzero for a 0/1 mask. RGB / RGBA / CMYK: a gray mask stored in colour (R = G = B
    everywhere) as 8-bit gray, a colour-coded mask any pixel that is not black. Alpha and EXIF orientation ignored."""
    img = _open(path, "mask")
    if img.mode in ("1", "P", "PA", "I;16", "I;16B", "I;16L", "I"):
        return np.asarray(img.convert("L") if img.mode == "1" else img.getchannel(0) if img.mode == "PA" else img) != 0
    if img.mode in ("L", "LA"):
        return _binary_levels(np.asarray(img.getchannel(0), dtype=np.uint8))
    if img.mode in ("RGB", "RGBA", "CMYK"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return _binary_levels(rgb[..., 0]) if (rgb == rgb[..., :1]).all() else rgb.any(-1)
    raise ValueError(f"{path}: unsupported mask mode {img.mode!r}")


def _read_lines(path, what):
    """[(line number, stripped line)] of the non-empty lines of a text file: UTF-8 with or without a BOM, or UTF-16
    with its BOM; ValueError naming the file when it is missing or in another encoding."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: {what} is not UTF-8 text ({err})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _unique(path, entries):
    """entries without repeats (first kept), with a warning naming the file: a repeat would weigh an image twice."""
    counts = collections.Counter(entries)
    repeated = [e for e, n in counts.items() if n > 1]
    if repeated:
        warnings.warn(f"{path}: {len(entries) - len(counts)} repeated entries ignored, e.g. {repeated[:3]}")
    return list(counts)


def _read_list(list_file):
    """Stems of a list file (first whitespace-separated token per non-empty line; paths reduced to stems)."""
    stems = [pathlib.PurePosixPath(line.split()[0]).stem for _, line in _read_lines(list_file, "list file")]
    if not stems:
        raise ValueError(f"{list_file}: list file is empty")
    return _unique(list_file, stems)


def files_by_stem(folder, suffixes, what):
    """{stem: path} of the files of `folder` whose suffix, in any case (.JPG, .Png), is in `suffixes`."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: {what} folder not found")
    found = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in suffixes and p.is_file():
            found.setdefault(p.stem, p)
    return found


def list_images(folder, list_file=None):
    """Sorted image paths of `folder` (IMAGE_SUFFIXES, any case), restricted to the stems of `list_file` (a path or a
    list of stems) when given; ValueError when the folder is missing or empty or a listed stem has no image."""
    by_stem = files_by_stem(folder, IMAGE_SUFFIXES, "image")
    if not by_stem:
        raise ValueError(f"{folder}: no images (.jpg .jpeg .png .bmp) in folder")
    if list_file is None:
        return sorted(by_stem.values())
    stems = _read_list(list_file) if isinstance(list_file, (str, os.PathLike)) else [str(s) for s in list_file]
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise ValueError(f"{list_file if isinstance(list_file, (str, os.PathLike)) else 'list'}: "
                         f"{len(missing)} listed image(s) missing from {folder}, e.g. {missing[:3]}")
    return sorted(by_stem[s] for s in dict.fromkeys(stems))


def save_png(image, path):
    """Write a PNG atomically, parent folders made: a PIL image, or uint8 / bool [H, W] (gray) or [H, W, 3] (RGB)."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            raise ValueError(f"{path}: save_png needs uint8 or bool data, got {arr.dtype}")
        image = Image.fromarray(arr)
    with atomic_file(path) as f:
        image.save(f, format="PNG")


def image_to_tensor(pil, size):
    """PIL image -> float tensor [3, size, size], bilinear resize, ImageNet-normalised."""
    x = TF.resize(TF.pil_to_tensor(pil if pil.mode == "RGB" else pil.convert("RGB")), [size, size], antialias=True)
    return normalize(x.float() / 255)


def resize_mask(mask, size):
    """The one mask resize: an integer or bool mask [..., H, W] (numpy or torch) -> int64 tensor [..., H', W'],
    nearest-exact (each target pixel takes the source pixel under its centre: the grid of the images' bilinear
    resize, so every mask resized along any path lands on the same pixels; plain "nearest" is half a pixel off)."""
    m = torch.from_numpy(np.ascontiguousarray(mask)) if isinstance(mask, np.ndarray) else mask
    if tuple(m.shape[-2:]) == tuple(size):
        return m.long()
    resized = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]).float(), size=tuple(size), mode="nearest-exact")
    return resized.reshape(*m.shape[:-2], *size).long()


def check_same_size(image, image_path, mask, mask_path):
    if mask.shape != (image.height, image.width):
        raise ValueError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                         f"{image_path} is {image.width}x{image.height}")


def cache_dir():
    """Where scans and rendered COCO masks are cached: $MASKSPLIT_CACHE, else ~/.cache/masksplit."""
    return pathlib.Path(os.environ.get("MASKSPLIT_CACHE", pathlib.Path.home() / ".cache" / "masksplit"))


def files_digest(paths, salt=""):
    """The identity of files: a digest of their paths, sizes and modification times (a changed file changes it)."""
    h = hashlib.sha1(salt.encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cached_scan(kind, paths, scan, desc):
    """{stem: scan(path)} for `paths`, cached as JSON under cache_dir() by files_digest (a changed file: rescan)."""
    cache = cache_dir() / f"{kind}-{files_digest(paths, kind)[:20]}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass                                          # unreadable cache: rescan and overwrite
    result = {pathlib.Path(p).stem: scan(p) for p in tqdm(paths, desc=desc, leave=False, disable=len(paths) < 200)}
    try:
        write_json(result, cache)
    except OSError as err:
        warnings.warn(f"could not write cache {cache} ({err}); the scan will be redone next time")
    return result


def foreground_counts(mask_paths, folder, count=None, kind="binary"):
    """{stem: foreground pixels} of the masks (count(path); default: load_binary_mask's), scanned once and cached;
    ValueError naming `folder` when every mask is empty (an encoding read as background, or no saliency found)."""
    count = count or (lambda p: int(load_binary_mask(p).sum()))
    counts = _cached_scan(f"foreground-{kind}", mask_paths, count, "scanning masks")
    if counts and max(counts.values()) <= 0:
        raise ValueError(f"{folder}: every mask is empty (no foreground pixel in {len(counts)} masks)")
    return counts


def _class_counts(num_classes):
    def scan(path):
        counts = np.bincount(load_mask(path, num_classes).ravel(), minlength=256)
        return {str(c): int(counts[c]) for c in range(1, num_classes + 1) if counts[c]}
    return scan


# Layouts --------------------------------------------------------------------------------------------------------------

def voc_paths(root):
    """Locate a VOC 2012 tree. `root` may be VOC2012 itself, VOCdevkit, or a folder holding VOCdevkit.
    Returns {"root", "images", "masks", "lists"}; masks = SegmentationClassAug if present, else SegmentationClass."""
    root = pathlib.Path(root)
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            for name in ("SegmentationClassAug", "SegmentationClass"):
                if (cand / name).is_dir():
                    return {"root": cand, "images": cand / "JPEGImages", "masks": cand / name,
                            "lists": cand / "ImageSets" / "Segmentation"}
            raise ValueError(f"{cand}: no SegmentationClassAug or SegmentationClass folder")
    raise ValueError(f"{root}: not a PASCAL VOC tree (expected JPEGImages under it, under VOC2012, "
                     f"or under VOCdevkit/VOC2012)")


def voc_image_set(root, image_set):
    """Stems of a VOC image set: a name ("train", "val", "train_aug", ...) under ImageSets/Segmentation, or a path.
    "train_aug" without its list file is derived: every image with a class mask that is not in val.txt. With
    SegmentationClassAug that is PASCAL-5i's SBD-augmented training set (paper section 4: VOC 2012 plus Hariharan et
    al.'s extra annotations; 10582 images in the standard download); with only SegmentationClass, VOC's train set."""
    list_path = pathlib.Path(image_set)
    if list_path.is_file():
        return _read_list(list_path)
    paths = voc_paths(root)
    list_path = paths["lists"] / f"{image_set}.txt"
    if image_set == "train_aug" and not list_path.is_file():
        if not (paths["lists"] / "val.txt").is_file():
            raise ValueError(f"{paths['lists'] / 'val.txt'}: not found, and train_aug (every masked image not in "
                             f"val.txt) needs it; pass a list file of training image ids instead")
        val = set(_read_list(paths["lists"] / "val.txt"))
        return sorted(s for s in files_by_stem(paths["masks"], MASK_SUFFIXES, "mask") if s not in val)
    return _read_list(list_path)


def _mask_paths(mask_dir, stems):
    """The mask (.png, any case) of every stem (class folders: "<class>/<stem>"); ValueError naming the folder and a
    few missing ones."""
    by_stem = {}
    for sub in sorted({pathlib.PurePath(s).parent for s in stems}):         # "." but for class folders
        by_stem.update((str(sub / s), p) for s, p in files_by_stem(pathlib.Path(mask_dir, sub), MASK_SUFFIXES,
                                                                      "mask").items())
    missing = [str(pathlib.Path(mask_dir) / f"{s}.png") for s in stems if s not in by_stem]
    if missing:
        raise ValueError(f"{len(missing)} mask(s) missing in {mask_dir}, e.g. {missing[:3]}")
    return [by_stem[s] for s in stems]


def voc_class_counts(root, image_set="val"):
    """{stem: {class_id(str): pixels}} over a VOC image set, computed once and cached."""
    return _cached_scan("voc-counts", _mask_paths(voc_paths(root)["masks"], voc_image_set(root, image_set)),
                        _class_counts(VOC_CLASSES), "scanning VOC masks")


def pascal_fold_classes(fold):
    """PASCAL-5i: fold i = classes 5i+1..5i+5 (paper section 4)."""
    if fold not in range(4):
        raise ValueError(f"PASCAL-5i fold must be 0..3, got {fold}")
    return list(range(5 * fold + 1, 5 * fold + 6))


def coco_fold_classes(fold, convention="interleaved"):
    """COCO-20i: "interleaved" fold i = {4k+i+1} (HSNet, PFENet, RePRI; default), "contiguous" 20i+1..20i+20
    (the authors' code default)."""
    if fold not in range(4):
        raise ValueError(f"COCO-20i fold must be 0..3, got {fold}")
    if convention == "interleaved":
        return [4 * k + fold + 1 for k in range(20)]
    if convention == "contiguous":
        return list(range(20 * fold + 1, 20 * fold + 21))
    raise ValueError(f"coco_folds must be one of {COCO_FOLD_CONVENTIONS}, got {convention!r}")


def fold_train_ids(root, fold, image_set="train"):
    """Stems of a VOC image set with no pixel of a test-fold class (fold-based training, Table 2's "train: fold")."""
    test = {str(c) for c in pascal_fold_classes(fold)}
    counts = voc_class_counts(root, image_set)
    return [s for s in voc_image_set(root, image_set) if not test & counts[s].keys()]


def coco_paths(root, image_set=None):
    """A COCO-format image set: {"images", "annotations", "image_set"}; image_set=None: the one instances_*.json."""
    root = pathlib.Path(root)
    ann_dir = root / "annotations"
    if image_set is None:
        found = sorted(ann_dir.glob("instances_*.json")) if ann_dir.is_dir() else []
        if len(found) != 1:
            raise ValueError(f"{ann_dir}: expected exactly one instances_<image set>.json, found "
                             f"{[p.name for p in found]}; pass the image set's name")
        image_set = found[0].stem[len("instances_"):]
    ann = ann_dir / f"instances_{image_set}.json"
    if not ann.is_file():
        raise ValueError(f"{ann}: COCO annotation file not found")
    if not (root / image_set).is_dir():
        raise ValueError(f"{root / image_set}: COCO image folder not found")
    return {"images": root / image_set, "annotations": ann, "image_set": image_set}


def render_coco_masks(root, image_set=None, style="full"):
    """Render per-image class masks of a COCO image set into PNGs (once; cached) and return the mask folder: categories
    1..80 in sorted category-id order, objects in annotation order (later on top, as label-PNG converters do); those
    without a segmentation (bbox-only) are skipped with a warning. style "full": every polygon of an object (and RLE),
    crowd regions -> 255 where no object is. "repri": the authors' evaluation masks (RePRI's create_masks.py): the
    first polygon of each object only, at integer-truncated vertices (cv2.fillPoly there, PIL here), crowd not drawn."""
    if style not in COCO_MASK_STYLES:
        raise ValueError(f"COCO mask style must be one of {COCO_MASK_STYLES}, got {style!r}")
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise ImportError("COCO needs pycocotools: pip install pycocotools") from None
    paths = coco_paths(root, image_set)
    ann = paths["annotations"]
    out = cache_dir() / f"coco-masks-{paths['image_set']}-{files_digest([ann])[:20]}"
    out = out if style == "full" else out.with_name(f"{out.name}-{style}")
    if (out / "done.json").is_file():
        return out
    with contextlib.redirect_stdout(io.StringIO()):            # pycocotools prints progress
        try:
            coco = COCO(str(ann))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{ann}: not a valid COCO annotation file ({err})") from None
    cat_ids = sorted(coco.getCatIds())
    if len(cat_ids) > 254:
        raise ValueError(f"{ann}: {len(cat_ids)} categories do not fit a uint8 mask")
    index = {c: i + 1 for i, c in enumerate(cat_ids)}
    skipped = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)     # pycocotools vs numpy 2, harmless
        for img_id in tqdm(sorted(coco.getImgIds()), desc="rendering COCO masks", leave=False):
            skipped += _render_coco_image(coco, img_id, index, ann, out, style)
    if skipped:
        warnings.warn(f"{ann}: {len(skipped)} annotation(s) without a segmentation (bbox-only or empty) skipped, "
                      f"e.g. ids {skipped[:3]}")
    write_json({"annotations": str(ann), "categories": cat_ids,
                "names": [coco.loadCats(c)[0]["name"] for c in cat_ids]}, out / "done.json")
    return out


def _render_coco_image(coco, img_id, index, ann, out, style):
    """Write one image's class mask; returns the ids of its annotations without a segmentation (skipped)."""
    info = coco.loadImgs(img_id)[0]
    target = out / f"{pathlib.Path(info['file_name']).stem}.png"
    if target.is_file():
        return []
    mask = np.zeros((info["height"], info["width"]), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))
    skipped = [a.get("id") for a in anns if not a.get("segmentation")]
    anns = [a for a in anns if a.get("segmentation")]
    for a in (a for a in anns if not a.get("iscrowd", 0)):        # annotation order, later on top
        if a["category_id"] not in index:
            raise ValueError(f"{ann}: annotation {a.get('id')} has unknown category {a['category_id']}")
        if style == "full":
            mask[_annotation_mask(coco, a, mask.shape, ann)] = index[a["category_id"]]
            continue
        if not isinstance(a["segmentation"], list):
            raise ValueError(f"{ann}: annotation {a.get('id')} is an RLE object, which RePRI's masks cannot draw")
        canvas = Image.fromarray(mask)
        vertices = np.asarray(a["segmentation"][0], dtype=np.float64).reshape(-1, 2).astype(np.int32)
        ImageDraw.Draw(canvas).polygon([tuple(v) for v in vertices.tolist()], fill=index[a["category_id"]])
        mask = np.asarray(canvas).copy()
    if style == "full":
        for a in (a for a in anns if a.get("iscrowd", 0)):
            mask[_annotation_mask(coco, a, mask.shape, ann) & (mask == 0)] = IGNORE
    save_png(mask, target)
    return skipped


def _annotation_mask(coco, a, shape, ann):
    """Bool mask [H, W] of annotation `a` for an image of `shape`; ValueError if undecodable or of another size."""
    try:
        m = coco.annToMask(a) > 0
    except Exception as err:                                       # pycocotools raises many kinds
        raise ValueError(f"{ann}: annotation {a.get('id')} (image {a.get('image_id')}): cannot decode its "
                         f"segmentation ({type(err).__name__}: {err})") from None
    if m.shape != shape:
        raise ValueError(f"{ann}: annotation {a.get('id')} (image {a.get('image_id')}): segmentation is "
                         f"{m.shape[1]}x{m.shape[0]} (WxH) but the image is {shape[1]}x{shape[0]}")
    return m


def images_without_mask(masks_dir):
    """Stems that make_pseudomasks.py's log_shard*.jsonl in `masks_dir` record as without a pseudo-mask (under its
    --min-fraction salient; MaskContrast leaves such images out); a line cut short by a kill is not a record."""
    records = []
    for log in sorted(pathlib.Path(masks_dir).glob("log_shard*.jsonl")):
        for line in log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return {r["image"] for r in records if not r["written"]}


def class_folders(root, class_list=None):
    """{class name: [(image id "<class>/<stem>", image path, mask path)]} of a folder of class folders: each image
    (.jpg, .jpeg, .bmp) with its binary mask <stem>.png beside it (FSS-1000's layout: <class>/<n>.jpg, <n>.png).
    class_list: a file of class names (e.g. HSNet's FSS-1000 test split), those classes only, in name order."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: class-folder root not found")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_list is not None:
        listed = _unique(class_list, [line for _, line in _read_lines(class_list, "class list")])
        if missing := [c for c in listed if c not in names]:
            raise ValueError(f"{class_list}: {len(missing)} listed class folders not under {root}, e.g. {missing[:3]}")
        names = sorted(listed)
    folders = {}
    for name in names:
        masks = files_by_stem(root / name, MASK_SUFFIXES, "class")
        images = {s: p for s, p in files_by_stem(root / name, IMAGE_SUFFIXES, "class").items()
                  if p.suffix.lower() != ".png"}
        if unmasked := [s for s in images if s not in masks]:
            raise ValueError(f"{images[unmasked[0]]}: no mask {unmasked[0]}.png beside this image")
        folders[name] = [(f"{name}/{s}", images[s], masks[s]) for s in sorted(images)]
    if not any(folders.values()):
        raise ValueError(f"{root}: no class folder with images and masks (<class>/<name>.jpg + <name>.png)")
    return folders


# Augmentation (paper section 3.2: "grayscale, color jitter, horizontal flip, vertical flip, rotate and random resize",
# applied twice to each training image; the parameters' laws are torchvision's) --------------------------------------

ROTATION_BORDERS = ("fill", "reflect")
# the columns of a view's draw (Augmentation.draw): jitter and gray are 0 / 1 (the step taken or not); a view is
# rotated where its angle is not 0 and blurred where its kernel is > 1. NO_STEP: a view that takes none of them.
ANGLE, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, BLUR_KERNEL, BLUR_SIGMA, GRAY = range(9)
NO_STEP = (0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0)


class Augmentation:
    """The two independent views of a training pair (section 3.2), in two places. In the loader, per view:
    crop_and_flip, a random resized crop (scale in `scale`, the authors' 0.5-1.2: draws above 1 cannot fit and are
    drawn again, as torchvision does) and horizontal and vertical flips with p flip_p (augment=False: resize only);
    draw, the rest's parameters with torchvision's laws: rotation uniform in +-rotation degrees with p rotation_p;
    colour jitter with p jitter_p (brightness, contrast, saturation uniform in [1 - jitter, 1 + jitter], hue in
    [-jitter, jitter]); Gaussian blur with p blur_p (kernel one of blur_kernels, sigma uniform in blur_sigma);
    grayscale with p gray_p. Where the batch lands, the whole batch at once: apply, each step on its views.
    rotation_border "fill": pixels a rotation brings in are black, and 255 in the masks (callers map it: ignored in
    the query target, background in the support mask); "reflect": the authors' BORDER_REFLECT_101 (albumentations)."""

    def __init__(self, image_size=400, augment=True, scale=(0.5, 1.2), flip_p=0.5, rotation=90.0, rotation_p=0.5,
                 jitter=0.2, jitter_p=0.5, blur_kernels=(3, 5, 7), blur_sigma=(0.1, 2.0), blur_p=0.5, gray_p=0.4,
                 rotation_border="fill"):
        if rotation_border not in ROTATION_BORDERS:
            raise ValueError(f"rotation_border must be one of {ROTATION_BORDERS}, got {rotation_border!r}")
        self.image_size, self.augment, self.scale, self.flip_p = image_size, augment, scale, flip_p
        self.rotation, self.rotation_p, self.jitter, self.jitter_p = rotation, rotation_p, jitter, jitter_p
        self.blur_kernels, self.blur_sigma, self.blur_p, self.gray_p = blur_kernels, blur_sigma, blur_p, gray_p
        self.reflect = rotation_border == "reflect"

    def crop_and_flip(self, image, mask, rng):
        """uint8 image [3, H, W] and mask [H, W] (torch) -> uint8 [3, S, S] and [S, S]: the image resized
        bilinearly (antialiased), the mask by resize_mask (the same pixel grid)."""
        size = [self.image_size, self.image_size]
        if not self.augment:
            return TF.resize(image, size, antialias=True), resize_mask(mask, size).to(torch.uint8)
        with torch.random.fork_rng(devices=[]):             # torchvision draws the crop from torch's generator
            torch.manual_seed(int(rng.integers(2 ** 62)))
            top, left, h, w = transforms.RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        image = TF.resized_crop(image, top, left, h, w, size, antialias=True)
        mask = resize_mask(mask[top:top + h, left:left + w], size).to(torch.uint8)
        for dim in (-1, -2):                                 # horizontal, then vertical flip
            if rng.random() < self.flip_p:
                image, mask = image.flip(dim), mask.flip(dim)
        return image, mask

    def draw(self, rng):
        """One view's rotation, colour jitter, blur and grayscale -> float32 [9] (ANGLE, ..., GRAY)."""
        angle, jitter, brightness, contrast, saturation, hue, kernel, sigma, gray = NO_STEP
        if self.augment and rng.random() < self.rotation_p:
            angle = rng.uniform(-self.rotation, self.rotation)
        if self.augment and rng.random() < self.jitter_p:
            jitter, (brightness, contrast, saturation) = 1.0, rng.uniform(1 - self.jitter, 1 + self.jitter, 3)
            hue = rng.uniform(-self.jitter, self.jitter)
        if self.augment and rng.random() < self.blur_p:
            kernel, sigma = self.blur_kernels[rng.integers(len(self.blur_kernels))], rng.uniform(*self.blur_sigma)
        gray = float(self.augment and rng.random() < self.gray_p)
        return torch.tensor([angle, jitter, brightness, contrast, saturation, hue, kernel, sigma, gray]).float()

    def apply(self, images, masks, params):
        """A batch of views on its device: uint8 images [B, 3, S, S], uint8 masks [B, S, S], params [B, 9] (draw,
        on the CPU) -> (float images in [0, 1], uint8 masks), in torchvision's order: rotation, colour jitter, blur,
        grayscale. Each step runs on the views that drew it (found on the CPU: no wait), with their own parameters."""
        x, masks = images.to(torch.float32).div_(255), masks.clone()
        on_device = params.to(x.device, non_blocking=True).view(*params.shape, 1, 1, 1)     # [B, 9, 1, 1, 1]

        def take(taken, step, *tensors):
            """tensors[v] = step(*tensors[v], params[v]) for the views v where `taken` (read on the CPU)."""
            if taken.any():
                rows = torch.from_numpy(np.flatnonzero(taken)).to(x.device, non_blocking=True)
                out = step(*(t.index_select(0, rows) for t in tensors), on_device.index_select(0, rows))
                for t, o in zip(tensors, out if isinstance(out, tuple) else (out,)):
                    t.index_copy_(0, rows, o)

        drawn = params.numpy()
        take(drawn[:, ANGLE] != 0, lambda v, m, q: rotate(v, m, q[:, ANGLE], self.reflect), x, masks)
        take(drawn[:, JITTER] == 1, lambda v, q: colour_jitter(v, *q[:, BRIGHTNESS:HUE + 1].unbind(1)), x)
        take(drawn[:, BLUR_KERNEL] > 1,
             lambda v, q: gaussian_blur(v, q[:, BLUR_KERNEL], q[:, BLUR_SIGMA], max(self.blur_kernels)), x)
        take(drawn[:, GRAY] == 1, lambda v, q: luma(v).expand_as(v), x)      # grey in all three channels
        return x, masks


def rotate(x, masks, angle, reflect):
    """Square views x [B, 3, S, S] and their masks [B, S, S] turned about the centre by angle [B, 1, 1, 1] degrees
    (counter-clockwise), the image bilinear, the mask nearest; outside the image: black and 255, or reflected."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate takes square views, got {tuple(x.shape[-2:])}")
    a = torch.deg2rad(angle[:, 0])                                     # [B, 1, 1]
    cos, sin = a.cos(), a.sin()
    # each output pixel's source (x, y) in grid_sample's coordinates (-1, 1: the border pixels' centres)
    u = torch.linspace(-1, 1, x.shape[-1], device=x.device)            # columns
    v = u[:, None]                                                      # rows
    grid = torch.stack([cos * u - sin * v, sin * u + cos * v], -1)     # [B, S, S, 2]
    border = "reflection" if reflect else "zeros"                       # reflection about the border pixels' centres
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode=border, align_corners=True)
    # the mask minus 255, sampled with zeros outside, plus 255: exactly 255 where the image does not cover
    shifted = masks[:, None].float() - IGNORE
    masks = F.grid_sample(shifted, grid, mode="nearest", padding_mode=border, align_corners=True) + IGNORE
    return x, masks[:, 0].to(torch.uint8)


@functools.lru_cache
def _constant(values, device):
    """A per-channel constant [1, 3, 1, 1] on `device`, made once (on the CPU, sent without waiting for the device)."""
    return torch.tensor(values).view(1, 3, 1, 1).to(device, non_blocking=True)


def luma(x):
    """Grey level of images [B, 3, H, W] -> [B, 1, H, W]: torchvision's rgb_to_grayscale (ITU-R 601-2 weights)."""
    return (x * _constant((0.2989, 0.587, 0.114), x.device)).sum(1, keepdim=True)


def blend(x, other, factor):
    """torchvision's _blend, the colour jitter's core: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return torch.lerp(other, x, factor).clamp(0, 1)


def colour_jitter(x, brightness, contrast, saturation, hue):
    """torchvision's ColorJitter with each view's factors [B, 1, 1, 1] (here always in this order)."""
    x = (x * brightness).clamp(0, 1)                           # blended with black
    x = blend(x, luma(x.mean(dim=(2, 3), keepdim=True)), contrast)     # against the mean grey level
    x = blend(x, luma(x), saturation)
    return adjust_hue(x, hue)


def adjust_hue(x, hue):
    """Hue turned by `hue` [B, 1, 1, 1] (in turns), saturation and value kept. HSV hexcone: with value V, chroma C and
    hue H in sixths, channel n = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6, n = 5, 3, 1 for R, G, B."""
    r, g, b = x.unbind(1)
    value = x.amax(1, keepdim=True)
    chroma = value - x.amin(1, keepdim=True)
    # hue in sixths from the largest channel (r, then g, then b; a tie gives the same hue), picked by 0 / 1 weights
    top, c = value[:, 0], chroma[:, 0]
    hue_r, hue_g, hue_b = g - b, torch.add(b - r, c, alpha=2), torch.add(r - g, c, alpha=4)
    not_r, not_g = torch.sign(top - r), torch.sign(top - g)                     # 1 where not the largest, else 0
    h = hue_r + not_r * (hue_g - hue_r + not_g * (hue_b - hue_g))              # grey pixels: 0 (then 0 / eps)
    h = torch.add(h[:, None] / chroma.clamp_min(1e-12), hue, alpha=6)                  # [B, 1, H, W]
    k = h + _constant((5.0, 3.0, 1.0), x.device)
    k = k - 6 * torch.floor(k / 6)                                                      # mod 6
    return value - chroma * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x, kernel, sigma, max_kernel):
    """torchvision's Gaussian blur (reflect padding), each view with its own odd kernel and sigma [B, 1, 1, 1]: one
    max_kernel wide filter, taps beyond a view's kernel weighted 0 (kernel 1: identity); separable: two 1-D passes."""
    b, c, h, w = x.shape
    radius = max_kernel // 2
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)           # taps [k]
    z = t / sigma.view(-1, 1)
    weights = torch.exp(-0.5 * z * z) * (2 * t.abs() < kernel.view(-1, 1))           # [B, k]
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)       # [B * 3, k]: per channel
    x = x.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, [radius, radius, 0, 0], mode="reflect"), weights.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(F.pad(x, [0, 0, radius, radius], mode="reflect"), weights.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


def normalize(images):
    """The networks' input: images in [0, 1], [..., 3, H, W], any device, ImageNet-normalised as torchvision does."""
    return (images - _constant(IMAGENET_MEAN, images.device)[0]) / _constant(IMAGENET_STD, images.device)[0]


def training_views(batch, augmentation, device):
    """A loader's batch of pairs (MaskSplitPairs, SupervisedPairs) -> the network's inputs on `device`: query
    [B, 3, S, S], query_target [B, S, S] int64 (1 fg, 0 bg, 255 ignored), support [B, 3, S, S], support_mask
    [B, S, S] float 0/1. Query and support views go through augmentation.apply as one batch."""
    def both(query_key, support_key, to=device):
        return torch.cat([batch[query_key], batch[support_key]]).to(to, non_blocking=True)
    views, masks = augmentation.apply(both("query_img", "support_img"), both("query_target", "support_mask"),
                                      both("query_params", "support_params", to="cpu"))   # the steps drawn
    query, support = normalize(views).chunk(2)
    query_target, support_mask = masks.chunk(2)
    return query, query_target.long(), support, (support_mask == 1).float()   # 255 outside: background


def _class_target(image_path, mask_path, num_classes, class_id):
    """(PIL image, mask [H,W] uint8: 1 class_id, 255 ignore, 0 other) of a class-index mask, at original resolution."""
    image, mask = load_image(image_path), load_mask(mask_path, num_classes)
    check_same_size(image, image_path, mask, mask_path)
    return image, np.where(mask == IGNORE, IGNORE, mask == class_id).astype(np.uint8)


def _pair(augmentation, query_image, query_tgt, support_image, support_fg, rng):
    """Two independent views (section 3.2) of PIL images (MaskSplit's are one image) with the query target 0/1/255
    and the support mask 0/1 (numpy): cropped and flipped here, the rest drawn (query_params, support_params) for
    training_views to apply where the batch lands. Every draw comes from rng: a pair is a function of its seed."""
    query = TF.pil_to_tensor(query_image)
    support = query if support_image is query_image else TF.pil_to_tensor(support_image)
    query_img, query_target = augmentation.crop_and_flip(query, torch.from_numpy(query_tgt), rng)
    query_params = augmentation.draw(rng)
    support_img, support_mask = augmentation.crop_and_flip(support, torch.from_numpy(support_fg.astype(np.uint8)), rng)
    return {"query_img": query_img, "query_target": query_target, "query_params": query_params,
            "support_img": support_img, "support_mask": support_mask, "support_params": augmentation.draw(rng)}


# Self-supervised training pairs (paper section 3.2) -------------------------------------------------------------------

class MaskSplitPairs(torch.utils.data.Dataset):
    """One training episode per image (section 3.2): MaskSplit on its mask at original resolution, then two
    independent augmentations (support view, query view). images, masks: folders with the same stems (masks .png).
    mask_source: "pseudo" (0/255 pseudo-masks) or "groundtruth" (Table 2's: the union of a class mask's objects).
    masksplit: a MaskSplit (default: the paper's Vsplit, slope 40, alternate, prob 1); prob=0.0 = no split. augment:
    Table 1's "aug". dataset[(e, i)] (or [i], epoch 0): item i of epoch e, a pure function of (seed, e, i), so one
    loader with persistent workers serves a whole run. min_pixels: images with fewer foreground pixels are left out.
    redraw_image_below: 0 (ours): `masksplit` decides (it redraws the split while a half is under its min_pixels,
    then leaves the mask unsplit); N > 0 (the authors' code: 512, with a one-draw MaskSplit of min_pixels 0): a half
    under N pixels draws another image. Items: query_img [3,S,S] uint8, query_target [S,S] uint8 (1 query fg, 255
    support fg, 0 bg), support_img, support_mask [S,S] uint8 0/1; query_params, support_params [9]; image_id."""

    def __init__(self, images, masks, list_file=None, image_size=400, masksplit=None, augment=True, seed=0,
                 mask_source="pseudo", min_pixels=1, redraw_image_below=0, **augment_args):
        if mask_source not in ("pseudo", "groundtruth"):
            raise ValueError(f"mask_source must be 'pseudo' or 'groundtruth', got {mask_source!r}")
        self.mask_source, self.seed, self.redraw_image_below = mask_source, seed, redraw_image_below
        self.masksplit = masksplit if masksplit is not None else MaskSplit()
        self.augmentation = Augmentation(image_size, augment, **augment_args)
        image_paths = list_images(images, list_file)
        no_mask = images_without_mask(masks) if mask_source == "pseudo" else set()
        with_mask = [p for p in image_paths if p.stem not in no_mask]
        mask_paths = _mask_paths(masks, [p.stem for p in with_mask])
        counts = foreground_counts(mask_paths, masks, lambda path: int(self._load_fg(path).sum()), mask_source)
        keep = [i for i, p in enumerate(mask_paths) if counts[p.stem] >= max(min_pixels, 1)]
        self.dropped = sorted({p.stem for p in image_paths} - {with_mask[i].stem for i in keep})
        if self.dropped:
            warnings.warn(f"{masks}: {len(self.dropped)} of {len(image_paths)} images are left out (no mask written "
                          f"by make_pseudomasks.py, or an unreadable mask, or fewer than {max(min_pixels, 1)} "
                          f"foreground pixels), e.g. {self.dropped[:3]}")
        if not keep:
            raise ValueError(f"{masks}: no mask has foreground pixels")
        self.images, self.masks = [with_mask[i] for i in keep], [mask_paths[i] for i in keep]

    def _load_fg(self, path):
        if self.mask_source == "pseudo":
            return load_binary_mask(path)
        mask = load_mask(path, VOC_CLASSES)         # Table 2's "groundtruth": the union of all objects (255: not)
        return (mask > 0) & (mask < IGNORE)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        redrawn, i = 0, index
        while True:
            image, fg = load_image(self.images[i]), self._load_fg(self.masks[i])
            check_same_size(image, self.images[i], fg, self.masks[i])
            support_fg, query_fg = self.masksplit(fg, generator=rng)
            if min(np.count_nonzero(support_fg), np.count_nonzero(query_fg)) >= self.redraw_image_below:
                break
            redrawn += 1                                   # the authors' code: another image
            if redrawn == 1000:
                raise ValueError(f"{self.masks[i].parent}: 1000 images drawn in a row have a MaskSplit half under "
                                 f"{self.redraw_image_below} pixels")
            i = int(rng.integers(len(self)))
        item = _pair(self.augmentation, image, query_target(query_fg, support_fg), image, support_fg, rng)
        item.update(image_id=self.images[i].stem)
        return item


class SupervisedPairs(torch.utils.data.Dataset):
    """Supervised fold-based pairs (Table 2's "Supervised" row): query and support of one training class from two
    images, ground-truth class masks; test-fold classes are never a target (their pixels are background). One item per
    (train image, train class) with >= min_pixels of it; the support: another such image. Augmented as MaskSplitPairs.
    Items: as MaskSplitPairs (query_target 255 = VOC boundary / outside image) plus class_id, support_id."""

    def __init__(self, voc_root, fold, image_size=400, seed=0, image_set="train_aug", augment=True, min_pixels=2048,
                 **augment_args):
        paths = voc_paths(voc_root)
        self.seed, self.augmentation = seed, Augmentation(image_size, augment, **augment_args)
        self.classes = [c for c in range(1, VOC_CLASSES + 1) if c not in pascal_fold_classes(fold)]
        counts = voc_class_counts(voc_root, image_set)
        self.images = {p.stem: p for p in list_images(paths["images"], list(counts))}
        self.masks = files_by_stem(paths["masks"], MASK_SUFFIXES, "mask")
        self.holders = {c: sorted(s for s, cnt in counts.items() if cnt.get(str(c), 0) >= min_pixels)
                        for c in self.classes}
        self.items = [(s, c) for c in self.classes for s in self.holders[c] if len(self.holders[c]) >= 2]
        if not self.items:
            raise ValueError(f"{voc_root}: no training class of fold {fold} has two images with >= "
                             f"{min_pixels} pixels in image set {image_set!r}")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        query_id, c = self.items[index]
        others = [s for s in self.holders[c] if s != query_id]
        support_id = others[int(rng.integers(len(others)))]
        q_img, target = _class_target(self.images[query_id], self.masks[query_id], VOC_CLASSES, c)
        s_img, s_mask = _class_target(self.images[support_id], self.masks[support_id], VOC_CLASSES, c)
        item = _pair(self.augmentation, q_img, target, s_img, s_mask == 1, rng)
        item.update(class_id=c, image_id=query_id, support_id=support_id)
        return item


# Few-shot test episodes (paper section 4) -----------------------------------------------------------------------------

class FewShotEpisodes(torch.utils.data.Dataset):
    """k-shot test episodes (paper section 4). Query candidates: every (image, fold class) with >= min_pixels of the
    class; the supports: k other such images. Episode i is a pure function of (dataset, fold, shots, seed, i).
    dataset, root: "pascal" (the VOC tree; image_set default "val"; pair_list: HSNet's fold<i>.txt or its folder
    restricts the candidates), "coco" (the COCO root; coco_folds, coco_masks: coco_fold_classes, render_coco_masks), or
    "folders" / "fss1000" (class_folders; one fold of every class, min_pixels 1). sampling: "pair" (ours): a candidate
    drawn uniformly; "image" (the authors' code): an image holding a fold class with >= min_pixels, then any fold class
    present in it with `shots` other holders; "every": each candidate once, in order (FSS-1000 as HSNet evaluates it).
    pseudo_masks: a folder (class folders: a tree of them); items then get "query_pseudo_mask" [H,W] int64 0/1 (Table
    3's Saliency*). Items: query_img [3,S,S], query_mask [S,S] int64 (0/1/255), query_mask_orig [H,W] int64,
    support_imgs [k,3,S,S], support_masks [k,S,S] float, class_id int, query_id str, support_ids list[str], episode."""

    def __init__(self, dataset, root, fold, shots=1, episodes=1000, seed=0, image_size=400,
                 coco_folds="interleaved", min_pixels=2048, pair_list=None, image_set=None,
                 pseudo_masks=None, sampling="pair", coco_masks="full", class_list=None):
        if dataset not in ("pascal", "coco") + FOLDER_DATASETS or sampling not in EPISODE_SAMPLINGS:
            raise ValueError(f"dataset: pascal, coco, folders or fss1000; sampling: {EPISODE_SAMPLINGS}; got "
                             f"{dataset!r}, {sampling!r}")
        if pair_list is not None and dataset != "pascal":
            raise ValueError("pair_list is for pascal (HSNet's lists); the other datasets' candidates are scanned")
        if sampling == "image" and (pair_list is not None or dataset in FOLDER_DATASETS):
            raise ValueError(f"sampling 'image' draws the class from class masks; the pair list or class folder "
                             f"of {pair_list or dataset} fixes it")
        if shots < 1 or episodes < 1:
            raise ValueError("shots and episodes must be >= 1")
        self.dataset, self.fold, self.shots, self.seed, self.sampling = dataset, fold, shots, seed, sampling
        self.image_size, self.pseudo_masks = image_size, pseudo_masks
        counts = None
        if dataset in FOLDER_DATASETS:
            candidates = self._open_class_folders(root, class_list)
            min_pixels, self.fold = 1, 0
        elif pair_list is not None:
            self._open_layout(root, fold, image_set, coco_folds, coco_masks)
            candidates = self._listed_candidates(pair_list, fold)
        else:
            stems = self._open_layout(root, fold, image_set, coco_folds, coco_masks)
            missing = [s for s in stems if s not in self.image_paths]
            if missing:
                raise ValueError(f"{self.image_dir}: {len(missing)} image(s) of the list missing, e.g. {missing[:3]}")
            kind = {"pascal": "voc-counts", "coco": "coco-counts"}[dataset]      # shared with voc_class_counts
            counts = _cached_scan(kind, _mask_paths(self.mask_dir, stems), _class_counts(self.num_classes),
                                  "scanning masks")
            candidates = [(s, c) for c in self.classes for s in stems if counts[s].get(str(c), 0) >= min_pixels]
        self.holders = {c: sorted({s for s, c2 in candidates if c2 == c}) for c in {c for _, c in candidates}}
        self.candidates = [(s, c) for s, c in candidates if len(self.holders[c]) > shots]
        thin = sorted(self.class_name(c) for c in self.classes if len(self.holders.get(c, [])) <= shots)
        if thin:
            warnings.warn(f"{dataset} fold {self.fold}: classes {thin} have <= {shots} images with >= {min_pixels} "
                          f"pixels and give no episodes")
        if not self.candidates:
            raise ValueError(f"{dataset} fold {fold} under {root}: no class has {shots + 1} images with >= "
                             f"{min_pixels} pixels, so there is no {shots}-shot episode")
        if sampling == "image":  # per query image, the fold classes present in it that can have supports
            self.present = {s: [c for c in self.classes if counts[s].get(str(c), 0) > 0 and
                                len([h for h in self.holders.get(c, []) if h != s]) >= shots]
                            for s in sorted({s for s, _ in self.candidates})}
            self.query_images = sorted(self.present)
        self._episodes = [self._draw(i) for i in range(len(self.candidates) if sampling == "every" else episodes)]
        if pseudo_masks is not None:            # the queries' pseudo-masks: all there, not all empty
            self.without_pseudo_mask = images_without_mask(pseudo_masks)
            queries = sorted({q for q, _, _ in self._episodes} - self.without_pseudo_mask)
            self.pseudo_paths = dict(zip(queries, _mask_paths(pseudo_masks, queries)))   # named like the image ids
            foreground_counts(list(self.pseudo_paths.values()), pseudo_masks)

    def _open_class_folders(self, root, class_list):
        """Class folders (class_folders): classes 1..N in name order, image ids "<class>/<stem>" -> candidates."""
        folders = class_folders(root, class_list)
        self.names, self.classes = tuple(folders), list(range(1, len(folders) + 1))
        entries = [(i, c, im, m) for c, images in zip(self.classes, folders.values()) for i, im, m in images]
        self.image_paths, self.mask_paths = {e[0]: e[2] for e in entries}, {e[0]: e[3] for e in entries}
        empty = [str(e[3]) for e in tqdm(entries, "reading masks", leave=False, disable=len(entries) < 200)
                 if not load_binary_mask(e[3]).any()]
        if empty:
            warnings.warn(f"{root}: {len(empty)} masks are empty, their images left out, e.g. {empty[:3]}")
        return [(i, c) for i, c, _, m in entries if str(m) not in empty]

    def _open_layout(self, root, fold, image_set, coco_folds, coco_masks):
        """Image and mask folders, classes of the fold and their names; returns the stems of the image set."""
        if self.dataset == "pascal":
            paths = voc_paths(root)
            self.image_dir, self.mask_dir, self.num_classes = paths["images"], paths["masks"], VOC_CLASSES
            self.classes, self.names = pascal_fold_classes(fold), VOC_CLASS_NAMES
            stems = voc_image_set(root, image_set or "val")
        else:
            paths = coco_paths(root, image_set)
            self.image_dir, self.num_classes = paths["images"], COCO_CLASSES
            self.mask_dir = render_coco_masks(root, image_set, coco_masks)
            self.classes = coco_fold_classes(fold, coco_folds)
            self.names = json.loads((self.mask_dir / "done.json").read_text())["names"]
        self.image_paths = {p.stem: p for p in list_images(self.image_dir)}
        self.mask_paths = files_by_stem(self.mask_dir, MASK_SUFFIXES, "mask")
        return sorted(self.mask_paths) if self.dataset == "coco" else stems   # COCO: every rendered mask

    def _listed_candidates(self, pair_list, fold):
        """The (image, class) pairs of an HSNet-style pair list (a file, or a folder holding fold<i>.txt; lines
        `<id>__<cc>`) that have an image and a mask here."""
        list_path = pathlib.Path(pair_list)
        if list_path.is_dir():
            list_path = list_path / f"fold{fold}.txt"
        pairs = []
        for n, line in _read_lines(list_path, "pair list"):
            stem, sep, cls = line.rpartition("__")
            if not sep or not cls.isdigit():
                raise ValueError(f"{list_path}:{n}: expected '<image id>__<class>', got {line!r}")
            pairs.append((stem, int(cls)))
        pairs = _unique(list_path, pairs)
        kept = [(s, c) for s, c in pairs if s in self.image_paths and s in self.mask_paths]
        if len(kept) < len(pairs):
            warnings.warn(f"{list_path}: {len(pairs) - len(kept)} of {len(pairs)} entries have no image "
                          f"or mask under {self.image_dir.parent} and are dropped")
        outside = sorted({c for _, c in kept} - set(self.classes))
        if outside:
            raise ValueError(f"{list_path}: classes {outside} are not in fold {fold} ({self.classes})")
        return sorted(kept, key=lambda sc: (sc[1], sc[0]))

    def _draw(self, i):
        rng = np.random.default_rng([self.seed, i])
        if self.sampling != "image":
            query_id, c = self.candidates[i if self.sampling == "every" else int(rng.integers(len(self.candidates)))]
        else:
            query_id = self.query_images[int(rng.integers(len(self.query_images)))]
            c = self.present[query_id][int(rng.integers(len(self.present[query_id])))]
        others = [s for s in self.holders[c] if s != query_id]
        support_ids = [others[j] for j in rng.choice(len(others), self.shots, replace=False)]
        return query_id, support_ids, c

    def __len__(self):
        return len(self._episodes)

    def class_name(self, class_id):
        """The class's name (VOC's, or the COCO category's) for figures."""
        return self.names[class_id - 1] if class_id <= len(self.names) else f"class {class_id}"

    def episode_ids(self, i):
        """(query_id, [support_ids], class_id) of episode i, without decoding any image."""
        query_id, support_ids, c = self._episodes[i]
        return query_id, list(support_ids), c

    def load(self, image_id, class_id):
        """(PIL image, mask [H,W] uint8: 1 class, 255 ignore, 0 other) at original resolution."""
        image_path, mask_path = self.image_paths[image_id], self.mask_paths[image_id]
        if self.dataset in FOLDER_DATASETS:                  # a binary mask of its folder's class
            image, mask = load_image(image_path), load_binary_mask(mask_path)
            check_same_size(image, image_path, mask, mask_path)
            return image, mask.astype(np.uint8)
        return _class_target(image_path, mask_path, self.num_classes, class_id)

    def __getitem__(self, i):
        query_id, support_ids, c = self.episode_ids(i)
        S = self.image_size
        image, mask = self.load(query_id, c)
        item = {"query_img": image_to_tensor(image, S), "query_mask": resize_mask(mask, (S, S)),
                "query_mask_orig": torch.from_numpy(mask.astype(np.int64))}
        support = [self.load(s, c) for s in support_ids]
        item["support_imgs"] = torch.stack([image_to_tensor(img, S) for img, _ in support])
        item["support_masks"] = torch.stack([resize_mask(m == 1, (S, S)).float() for _, m in support])
        item.update(class_id=c, query_id=query_id, support_ids=support_ids, episode=i)
        if self.pseudo_masks is not None:   # Table 3's Saliency*; all background where make_pseudomasks wrote none
            pm = np.zeros(mask.shape, bool)
            if query_id not in self.without_pseudo_mask:
                pm = load_binary_mask(self.pseudo_paths[query_id])
                check_same_size(image, self.image_paths[query_id], pm, self.pseudo_paths[query_id])
            item["query_pseudo_mask"] = torch.from_numpy(pm.astype(np.int64))
        return item


# Salient-object folders -----------------------------------------------------------------------------------------------

class SalientObjects(torch.utils.data.Dataset):
    """An image folder (or {image id: path}, e.g. of class folders) and optionally a mask folder with the same stems
    (MSRA-B, SOD, ..., images + pseudo-masks). Items: image [3,S,S] (normalised), image_id, orig_size [2] (H, W);
    with masks also mask [S,S] float 0/1."""

    def __init__(self, images_dir, masks_dir=None, list_file=None, image_size=400):
        self.images = list(images_dir.values()) if isinstance(images_dir, dict) else list_images(images_dir, list_file)
        self.ids = list(images_dir) if isinstance(images_dir, dict) else [p.stem for p in self.images]
        self.masks, self.image_size = None, image_size
        if masks_dir is not None:
            self.masks = _mask_paths(masks_dir, self.ids)
            foreground_counts(self.masks, masks_dir)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key               # (epoch, index): the epoch changes nothing here
        image = load_image(self.images[i])
        item = {"image": image_to_tensor(image, self.image_size), "image_id": self.ids[i],
                "orig_size": torch.tensor([image.height, image.width])}
        if self.masks is not None:
            mask = load_binary_mask(self.masks[i])
            check_same_size(image, self.images[i], mask, self.masks[i])
            item["mask"] = resize_mask(mask, (self.image_size, self.image_size)).float()
        return item


class RunBatches:
    """The batch sampler of a whole training run, steps start .. total - 1 (max_steps, or all epochs): epoch e is a
    permutation of the n items drawn from (seed, e) alone, so --resume skips the batches done without loading them;
    cut into per_epoch batches of batch_size (drop_last: without the last incomplete one, unless it is the only
    one), each a list of (epoch, index) keys: one loader with persistent workers serves every epoch."""

    def __init__(self, n, batch_size, seed, start, max_steps=None, epochs=math.inf, drop_last=False):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.per_epoch = max(1, n // batch_size) if drop_last else -(-n // batch_size)
        self.total = min(max_steps or math.inf, epochs * self.per_epoch)    # the run's last step + 1

    def __len__(self):
        return max(0, self.total - self.start)

    def __iter__(self):
        for step in range(self.start, self.total):
            epoch, position = divmod(step, self.per_epoch)
            order = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch)).tolist()
            yield [(epoch, i) for i in order[position * self.batch_size:(position + 1) * self.batch_size]]


def init_worker(worker_id):
    """A DataLoader worker as it starts: keeps its freed memory (model.keep_freed_memory), lets go of its copies of
    the run's locks (model.release_held)."""
    keep_freed_memory()
    release_held()


def make_loader(dataset, device, workers, **batching):
    """The DataLoader of every script (batch_sampler= or batch_size=): persistent workers (init_worker); batches in
    pinned memory for a GPU, whose copy (non_blocking) then overlaps compute. Its own generator: making it draws
    nothing from torch's (a resumed run's RNG states stay an uninterrupted one's)."""
    return torch.utils.data.DataLoader(dataset, num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda", worker_init_fn=init_worker,
                                       generator=torch.Generator(), **batching)
