"""Stage 3: object pseudo-masks for MaskSplit training (paper section 3.2): run the trained BAS-Net (or a DeepUSPS
saliency network) over PASCAL / COCO images.

    python make_pseudomasks.py --checkpoint last.pt --images DIR [--list FILE] --out DIR [--save-prob DIR] [--shard k/n]

Post-processing as in MaskContrast: threshold 0.5, drop 4-connected regions under 1% of the image, no mask (logged)
when under 1% remains. Masks: 0/255 PNGs named like the images, atomic. A rerun with the same checkpoint and settings
(OUT/settings.json) skips images done (written or logged as maskless): an interrupted run resumes; others are refused.
"""
import argparse
import hashlib
import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from datasets import SalientObjects, class_folders, images_without_mask, make_loader, save_png
from model import (HelpFormatter, add_device_flags, append_line, check_apart, check_output, configure_backends,
                   exits_on_bad_input, hold, load_network, mixed_precision, pick_device, positive_int, unit_float,
                   write_json)


def remove_small_regions(mask, min_pixels):
    """Bool mask [H,W] (torch) without its 4-connected regions of fewer than min_pixels pixels: a new bool tensor on
    the mask's device. Regions from scipy.ndimage.label on the CPU (its default cross structure: 4-connectivity)."""
    regions, _ = ndimage.label(mask.cpu().numpy())  # 0 off the mask, 1..n the regions
    keep = np.bincount(regions.ravel(), minlength=1) >= min_pixels
    keep[0] = False
    return torch.from_numpy(keep[regions]).to(mask.device)


def postprocess(prob, threshold=0.5, min_fraction=0.01):
    """Probability map [H,W] -> bool mask on its device, or None when under min_fraction (MaskContrast, section 3.2)."""
    min_pixels = min_fraction * prob.numel()
    mask = remove_small_regions(prob >= threshold, min_pixels)
    return mask if mask.sum() >= min_pixels else None


def parse_shard(text):
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like k/n, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= k < n")
    return k, n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="basnet_train.py's last.pt (or saliency_train.py's saliency.pt)")
    p.add_argument("--images", required=True, help="folder of the images to mask (e.g. VOC2012/JPEGImages)")
    p.add_argument("--class-folders", action="store_true", help="--images holds class folders (evaluate.py fss "
                   "--dataset folders): every class folder's images, masks OUT/<class>/<name>.png")
    p.add_argument("--out", required=True, help="folder for the 0/255 masks")
    p.add_argument("--list", help="optional file of image stems")
    p.add_argument("--save-prob", help="also write the raw probability maps (0..255) here")
    p.add_argument("--threshold", type=unit_float, default=0.5, help="salient = probability >= this")
    p.add_argument("--min-fraction", type=unit_float, default=0.01,
                   help="drop regions under this fraction of the image; no mask when under it in total")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="k/n: every n-th image from the k-th (0 <= k < n)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    add_device_flags(p)
    return p.parse_args(argv)


def claim_settings(out, settings):
    """One set of settings per folder (the checkpoint's contents, the images, the post-processing), recorded in its
    settings.json by the first run; a rerun with others, or into PNGs this script did not write, is a ValueError."""
    path = out / "settings.json"
    if not path.is_file() and any(out.glob("*.png")):
        raise ValueError(f"{out} holds PNGs that make_pseudomasks.py did not write (no settings.json); pass another "
                         f"folder")
    if path.is_file():
        try:
            done = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{path}: not a JSON file") from None
        if differ := [f"{k} {done.get(k)} -> {v}" for k, v in settings.items() if done.get(k) != v]:
            raise ValueError(f"{out} holds pseudo-masks of other settings ({', '.join(differ)}); pass another --out, "
                             f"or empty the folder to redo them")
    else:
        write_json(settings, path)


@exits_on_bad_input
def main(argv=None):
    args = parse_args(argv)
    check_apart({"--out": args.out, "--save-prob": args.save_prob},
                {"--checkpoint": args.checkpoint, "--images": args.images, "--list": args.list})
    out = check_output(args.out, folder=True)
    prob_dir = check_output(args.save_prob, folder=True) if args.save_prob else None
    device = pick_device(args.device)
    configure_backends(device)
    net, checkpoint = load_network(args.checkpoint, ("basnet", "saliency"), device)
    size, kind = checkpoint["config"]["image_size"], checkpoint["kind"]
    digest = hashlib.sha1()
    with open(args.checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    made = {"checkpoint_sha1": digest.hexdigest(), "images": str(pathlib.Path(args.images).resolve())}
    claim_settings(out, {**made, "threshold": args.threshold, "min_fraction": args.min_fraction})
    if prob_dir:
        claim_settings(prob_dir, made)
    images = {i: p for folder in class_folders(args.images).values() for i, p, _ in folder} if args.class_folders \
        else args.images
    data = SalientObjects(images, list_file=args.list, image_size=size)
    k, n = args.shard
    shard, log_path = range(k, len(data), n), out / f"log_shard{k}of{n}.jsonl"
    log_path.touch()
    hold(log_path)                                    # one process per shard
    no_mask, mine = images_without_mask(out), [data.ids[i] for i in shard]
    done = {i for i in mine if i in no_mask or (out / f"{i}.png").is_file()}       # a mask, or logged as without
    todo = [j for j, i in zip(shard, mine) if i not in done or (prob_dir and not (prob_dir / f"{i}.png").is_file())]
    loader = make_loader(torch.utils.data.Subset(data, todo), device, args.workers, batch_size=args.batch_size)
    autocast, _ = mixed_precision(device)  # as in training
    written = 0
    for batch in tqdm(loader, desc=f"pseudo-masks {k}/{n}"):
        with torch.no_grad(), autocast():
            logits = net(batch["image"].to(device, non_blocking=True))
        probs = torch.sigmoid((logits[0][:, 0] if kind == "basnet" else logits).float())  # [B,S,S]
        for prob, stem, (h, w) in zip(probs, batch["image_id"], batch["orig_size"].tolist()):
            prob = F.interpolate(prob[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            if prob_dir:
                save_png((prob.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), prob_dir / f"{stem}.png")
            mask = postprocess(prob, args.threshold, args.min_fraction)
            if mask is not None:
                save_png(mask.cpu().numpy().astype(np.uint8) * 255, out / f"{stem}.png")
                written += 1
            if stem not in done:                      # (redone for its probability map only: logged already)
                append_line(log_path, {"image": stem, "written": mask is not None,
                                       "fraction": float((prob >= args.threshold).float().mean())})
    print(f"shard {k}/{n}: {written} masks written, {len(todo) - written} images without a mask (under "
          f"{args.min_fraction:.0%} salient), {len(shard) - len(todo)} already done; log {log_path}")


if __name__ == "__main__":
    main()
