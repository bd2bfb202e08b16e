"""Class folders (evaluate.py fss --dataset folders) made from a VOC tree: OUT/<class name>/<id>.jpg (the image's
bytes) and <id>.png (0/255: that class's pixels), one folder per class present in the image set. The README's "Your
own domain" measurement evaluates on such folders made from the real sample's val images.

    python tests/class_folders.py VOCdevkit/VOC2012 OUT [--image-set val]
"""
import argparse
import pathlib
import shutil
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from datasets import VOC_CLASS_NAMES, load_mask, save_png, voc_image_set, voc_paths  # noqa: E402


def voc_class_folders(voc_root, out, image_set="val"):
    """Write the class folders; returns {class name: image count}."""
    paths, out, counts = voc_paths(voc_root), pathlib.Path(out), {}
    for stem in voc_image_set(voc_root, image_set):
        mask = load_mask(paths["masks"] / f"{stem}.png")
        for c in sorted(set(np.unique(mask).tolist()) - {0, 255}):
            folder = out / VOC_CLASS_NAMES[c - 1]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths["images"] / f"{stem}.jpg", folder / f"{stem}.jpg")
            save_png(np.where(mask == c, 255, 0).astype(np.uint8), folder / f"{stem}.png")
            counts[folder.name] = counts.get(folder.name, 0) + 1
    return counts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("voc_root")
    p.add_argument("out")
    p.add_argument("--image-set", default="val")
    args = p.parse_args()
    for name, n in sorted(voc_class_folders(args.voc_root, args.out, args.image_set).items()):
        print(f"{name}: {n} images")
