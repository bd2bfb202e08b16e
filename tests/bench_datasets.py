"""Hand-run benchmark (not collected by pytest): MaskSplit training pairs per second per CPU core.

Issue 12's target: >= 60 pairs/s per core at 400x400 (decode, split, two augmented views), through a DataLoader
(datasets.make_loader, as the trainers). workers=0 also prints pairs per CPU-second of the process, which other jobs
on a shared machine disturb much less than wall time.

    python tests/bench_datasets.py                                   # VOC-sized demo images (375-500 px)
    python tests/bench_datasets.py --images VOC2012/JPEGImages --masks VOC2012/SegmentationClassAug \
        --mask-source groundtruth --list VOC2012/ImageSets/Segmentation/train.txt
"""
import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import datasets as D  # noqa: E402


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
    args = p.parse_args()

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images is None:
            demo = D.make_demo_data(tmp, train_images=200, val_images=0, salient_images=0, coco_images=0,
                                    size_range=(375, 500))
            images, masks, source, list_file = demo["voc_images"], demo["voc_masks"], "groundtruth", None
        else:
            images, masks, source, list_file = args.images, args.masks, args.mask_source, args.list
        ds = D.MaskSplitPairs(images, masks, list_file=list_file, image_size=args.image_size, mask_source=source,
                              cache_dir=pathlib.Path(tmp) / "cache")
        print(f"{len(ds)} images from {images} ({source} masks), {args.image_size}x{args.image_size}, "
              f"batch {args.batch_size}, torch threads per worker 1")
        for workers in args.workers:
            order = torch.utils.data.BatchSampler(range(len(ds)), args.batch_size, drop_last=False)
            loader = D.make_loader(ds, torch.device("cpu"), workers, batch_sampler=order)
            done, start = 0, None
            while done < args.pairs:
                for batch in loader:
                    if start is None:                                   # warm-up batch: workers started
                        start, cpu = time.perf_counter(), time.process_time()
                        continue
                    done += batch["query_img"].shape[0]
                    if done >= args.pairs:
                        break
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            cores = max(workers, 1)
            in_process = f", {done / cpu:.1f} pairs per CPU-second" if workers == 0 else ""
            print(f"workers={workers}: {done / seconds:.1f} pairs/s total, {done / seconds / cores:.1f} pairs/s "
                  f"per core{in_process} ({done} pairs in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
