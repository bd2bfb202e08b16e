"""Hand-run benchmark (not collected by pytest): MaskSplit training pairs per second per CPU core.

Issue 12's target: >= 60 pairs/s per core at 400x400 (decode, split, two augmented views), through a DataLoader
(datasets.make_loader, as the trainers). workers=0 also prints pairs per CPU-second of the process, which other jobs
on a shared machine disturb much less than wall time. --augment-on device (train_fss.py's default on CUDA): the
loader stops after the crop and flips and draws the rotation, colour jitter, blur and grayscale; those are then
timed on --device (apply_deferred, batched). --compare times the same pairs with torchvision's own kernels
(uint8 throughout) against datasets.py's (same draws), alternating pair by pair in this process.

    python tests/bench_datasets.py                                   # VOC-sized demo images (375-500 px)
    python tests/bench_datasets.py --images VOC2012/JPEGImages --masks VOC2012/SegmentationClassAug \
        --mask-source groundtruth --list VOC2012/ImageSets/Segmentation/train.txt
"""
import argparse
import contextlib
import pathlib
import sys
import tempfile
import time

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import datasets as D  # noqa: E402
from model import configure_backends  # noqa: E402


@contextlib.contextmanager
def torchvision_kernels(ds):
    """ds's pairs made with torchvision's kernels: _view wraps plain tv_tensors, the rotation fills them."""
    rotation = next(t.transforms[0] for t in ds.augmentation[0].transforms
                    if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.RandomRotation))
    saved = D._ViewImage, D._ViewMask, dict(rotation._fill)
    D._ViewImage, D._ViewMask = tv_tensors.Image, tv_tensors.Mask
    rotation._fill.update({tv_tensors.Image: 0, tv_tensors.Mask: D.IGNORE})
    try:
        yield
    finally:
        D._ViewImage, D._ViewMask, rotation._fill = saved


def compare(ds, pairs):
    cpu = {"torchvision": 0.0, "ours": 0.0}
    for i in range(pairs):
        for name in ("torchvision", "ours") if i % 2 else ("ours", "torchvision"):
            with torchvision_kernels(ds) if name == "torchvision" else contextlib.nullcontext():
                start = time.process_time()
                ds[i % len(ds)]
                cpu[name] += time.process_time() - start
    print(f"pairs per CPU-second, {pairs} pairs each, alternating: torchvision's kernels "
          f"{pairs / cpu['torchvision']:.1f}, ours {pairs / cpu['ours']:.1f} ({cpu['torchvision'] / cpu['ours']:.2f}x)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="image folder (default: demo data written to a temp folder)")
    p.add_argument("--masks", help="mask folder")
    p.add_argument("--mask-source", default="pseudo", choices=["pseudo", "groundtruth"])
    p.add_argument("--list", default=None, help="list file of image stems")
    p.add_argument("--image-size", type=int, default=400)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="DataLoader worker counts to time (0 = in the main process: exactly one core)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pairs", type=int, default=320, help="pairs timed per setting (after one warm-up batch)")
    p.add_argument("--compare", action="store_true", help="torchvision's kernels vs ours instead (see above)")
    p.add_argument("--augment-on", nargs="+", choices=D.AUGMENT_ON, default=["loader", "device"],
                   help="where the rotation, colour jitter, blur and grayscale run (train_fss.py --augment-on): each "
                        "is timed; device: the loader draws them, --device applies them to each batch")
    p.add_argument("--device", default="cpu", help="where the batches go, with augment_on=device applied there")
    args = p.parse_args()

    torch.set_num_threads(1)
    configure_backends(torch.device("cpu"))                          # as the scripts: see model.py
    with tempfile.TemporaryDirectory() as tmp:
        if args.images is None:
            demo = D.make_demo_data(tmp, train_images=200, val_images=0, salient_images=0, coco_images=0,
                                    size_range=(375, 500))
            images, masks, source, list_file = demo["voc_images"], demo["voc_masks"], "groundtruth", None
        else:
            images, masks, source, list_file = args.images, args.masks, args.mask_source, args.list
        for augment_on in ["loader"] if args.compare else args.augment_on:
            ds = D.MaskSplitPairs(images, masks, list_file=list_file, image_size=args.image_size, mask_source=source,
                                  augment_on=augment_on)
            print(f"{len(ds)} images from {images} ({source} masks), {args.image_size}x{args.image_size}, "
                  f"batch {args.batch_size}, torch threads per worker 1, augmented on the {augment_on}")
            ds[0]                                                           # warm-up
            if args.compare:
                return compare(ds, args.pairs)
            for workers in args.workers:
                batches = time_loader(ds, workers, args, keep=8 if augment_on == "device" else 0)
            if augment_on == "device":
                time_deferred(batches, torch.device(args.device))


def time_loader(ds, workers, args, keep=0):
    """Pairs/s of the loader alone (the batches' pixels are not touched); returns the first `keep` batches (kept
    batches hold memory the loader would otherwise reuse: a few only)."""
    order = torch.utils.data.BatchSampler(range(len(ds)), args.batch_size, drop_last=False)
    loader = D.make_loader(ds, torch.device("cpu"), workers, batch_sampler=order)
    done, start, batches = 0, None, []
    while done < args.pairs:
        for batch in loader:
            if start is None:                                   # warm-up batch: workers started
                start, cpu = time.perf_counter(), time.process_time()
                continue
            done += batch["query_img"].shape[0]
            if len(batches) < keep:
                batches.append(batch)
            if done >= args.pairs:
                break
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    cores = max(workers, 1)
    in_process = f", {done / cpu:.1f} pairs per CPU-second" if workers == 0 else ""
    print(f"  workers={workers}: {done / seconds:.1f} pairs/s total, {done / seconds / cores:.1f} pairs/s "
          f"per core{in_process} ({done} pairs in {seconds:.1f} s)")
    return batches


def time_deferred(batches, device):
    """Pairs/s of apply_deferred where the batches land (datasets.views_on_device, as train_step), device
    synchronised; the batches are on the device before the clock starts."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    moved = [{k: v if k.endswith("_steps") or k == "image_id" else v.to(device) for k, v in b.items()}
             for b in batches]
    D.views_on_device(moved[0], device)                                 # warm-up
    sync()
    start = time.perf_counter()
    for batch in moved:
        D.views_on_device(batch, device)
    sync()
    seconds, pairs = time.perf_counter() - start, sum(len(b["query_img"]) for b in moved)
    print(f"  deferred steps on {device}: {pairs / seconds:.1f} pairs/s ({pairs} pairs in {seconds:.2f} s)")


if __name__ == "__main__":
    main()
