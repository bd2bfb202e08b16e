"""Hand-run benchmark (not collected by pytest) of the two halves of a training pair's augmentation.

loader:  MaskSplit training pairs per second through a DataLoader (datasets.make_loader, as train_fss.py): decode,
         split, and per view the crop and flips (stock torchvision) and the draw of the rest. workers=0 also prints
         pairs per CPU-second of the process, which other jobs on a shared machine disturb much less than wall time.
augment: the host's cost of the rest (datasets.training_views: rotation, colour jitter, blur, grayscale applied to
         the batch where it lands, and the ImageNet normalisation) for one batch of --pairs pairs of --size px on
         one CPU thread: every aten operation torch's profiler records (nested ones included) and the median time
         of --repeats calls. A GPU step waits on this host work before its kernels can run.

    python tests/bench_datasets.py augment                            # 16 pairs of 64 px
    python tests/bench_datasets.py loader                             # VOC-sized demo images (375-500 px)
    python tests/bench_datasets.py loader --images VOC2012/JPEGImages --masks VOC2012/SegmentationClassAug \
        --mask-source groundtruth --list VOC2012/ImageSets/Segmentation/train.txt
"""
import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import datasets as D  # noqa: E402
import demo_data  # noqa: E402
from model import configure_backends  # noqa: E402


def bench_augment(args):
    """aten operations and median milliseconds of training_views on one batch of random views."""
    device = torch.device(args.device)
    augmentation, rng, b, s = D.Augmentation(args.size), np.random.default_rng(0), args.pairs, args.size
    batch = {key: torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8) for key in ("query_img", "support_img")}
    batch.update(query_target=torch.randint(0, 2, (b, s, s), dtype=torch.uint8),
                 support_mask=torch.randint(0, 2, (b, s, s), dtype=torch.uint8),
                 query_params=torch.stack([augmentation.draw(rng) for _ in range(b)]),
                 support_params=torch.stack([augmentation.draw(rng) for _ in range(b)]))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        D.training_views(batch, augmentation, device)
        sync()
    for _ in range(10):                                              # warm-up (and the cached constants)
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    operations = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.thread_time()
        run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.thread_time() - cpu)
    print(f"augment {b} pairs of {s} px on {device}, {torch.get_num_threads()} thread(s): {operations} aten operations, "
          f"{1000 * statistics.median(times):.2f} ms median of {args.repeats} (min {1000 * min(times):.2f}), "
          f"CPU time of the thread {1000 * statistics.median(cpu_times):.2f} ms median")


def bench_loader(args):
    with tempfile.TemporaryDirectory() as tmp:
        if args.images is None:
            demo = demo_data.make_demo_data(tmp, train_images=200, val_images=0, salient_images=0, coco_images=0,
                                    size_range=(375, 500))
            images, masks, source, list_file = demo["voc_images"], demo["voc_masks"], "groundtruth", None
        else:
            images, masks, source, list_file = args.images, args.masks, args.mask_source, args.list
        ds = D.MaskSplitPairs(images, masks, list_file=list_file, image_size=args.size, mask_source=source)
        print(f"{len(ds)} images from {images} ({source} masks), {args.size}x{args.size}, batch {args.pairs}, "
              f"torch threads per worker 1")
        ds[0]                                                            # warm-up
        for workers in args.workers:
            time_loader(ds, workers, args)


def time_loader(ds, workers, args):
    """Pairs/s of the loader alone (the batches' pixels are not touched)."""
    order = torch.utils.data.BatchSampler(range(len(ds)), args.pairs, drop_last=False)
    loader = D.make_loader(ds, torch.device("cpu"), workers, batch_sampler=order)
    done, start = 0, None
    while done < args.total:
        for batch in loader:
            if start is None:                                   # warm-up batch: workers started
                start, cpu = time.perf_counter(), time.process_time()
                continue
            done += batch["query_img"].shape[0]
            if done >= args.total:
                break
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    in_process = f", {done / cpu:.1f} pairs per CPU-second" if workers == 0 else ""
    print(f"  workers={workers}: {done / seconds:.1f} pairs/s total, {done / seconds / max(workers, 1):.1f} pairs/s "
          f"per core{in_process} ({done} pairs in {seconds:.1f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["augment", "loader"])
    p.add_argument("--size", type=int, help="view side in pixels (default: augment 64, loader 400)")
    p.add_argument("--pairs", type=int, default=16, help="pairs per batch")
    p.add_argument("--repeats", type=int, default=200, help="augment: timed calls")
    p.add_argument("--device", default="cpu", help="augment: where the batch lands (cuda: device synchronised)")
    p.add_argument("--images", help="loader: image folder (default: demo data written to a temp folder)")
    p.add_argument("--masks", help="loader: mask folder")
    p.add_argument("--mask-source", default="pseudo", choices=["pseudo", "groundtruth"])
    p.add_argument("--list", default=None, help="loader: list file of image stems")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="loader: DataLoader worker counts")
    p.add_argument("--total", type=int, default=320, help="loader: pairs timed per setting, after a warm-up batch")
    args = p.parse_args()
    args.size = args.size or (64 if args.what == "augment" else 400)
    torch.set_num_threads(1)
    configure_backends(torch.device(args.device))                    # as the scripts do: see model.py
    {"augment": bench_augment, "loader": bench_loader}[args.what](args)


if __name__ == "__main__":
    main()
