"""Hand-run speed benchmark of the FSS network (not collected by pytest).

    python tests/bench_fss.py step  --backbone resnet101 --image-size 400 --batch-size 2
    python tests/bench_fss.py step  --device cuda --batch-size 16          # the paper's setting, on a GPU
    python tests/bench_fss.py evaluate --voc-root VOCdevkit/VOC2012 --fold 1 --episodes 2500 --image-size 400

step:  one training step of train_fss.py (its train_step: the views' rotation, colour jitter, blur and grayscale
       where the batch lands, forward + backward + Adam, mixed precision on CUDA) against the backbone's inference
       forward on the same two batches (query and support). Times one step on the device, without data loading: a
       table row's time is about its number of steps (README) times train_step_s, when the loader workers keep up
       (train_fss.py's log.jsonl has data_s, the time a step waited for them). On CUDA also in NCHW (*_nchw).
evaluate: `evaluate.py fss` of one fold, one run (without --voc-root: on demo data written to a temporary folder).
Random weights: the speed does not depend on them.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluate  # noqa: E402
from datasets import Augmentation, normalize  # noqa: E402
from demo_data import make_demo_data  # noqa: E402
from model import FSSNet, autocast_dtype, configure_backends, mixed_precision, pick_device, save_checkpoint  # noqa
from train_fss import backbone_format, train_step  # noqa: E402


def timed(fn, repeats, device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step(args):
    device = pick_device(args.device)
    configure_backends(device)
    autocast, scaler = mixed_precision(device)
    b, s = args.batch_size, args.image_size
    batch = {key: torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8) for key in ("query_img", "support_img")}
    batch.update(support_mask=torch.randint(0, 2, (b, s, s), dtype=torch.uint8),      # uint8, as the loader's
                 query_target=torch.randint(0, 2, (b, s, s), dtype=torch.uint8))
    augmentation, rng = Augmentation(s), np.random.default_rng(0)     # each view's steps drawn as the loader draws them
    for key in ("query_params", "support_params"):
        batch[key] = torch.stack([augmentation.draw(rng) for _ in range(b)])
    # train_fss.py's memory format, and on CUDA the other one too (is channels_last worth its GroupNorm copies?)
    formats = [backbone_format(device)] + ([torch.contiguous_format] if device.type == "cuda" else [])
    result = {"backbone": args.backbone, "image_size": s, "batch_size": b, "device": str(device),
              "autocast": str(autocast_dtype(device)), "threads": torch.get_num_threads()}
    for fmt in formats:
        torch.manual_seed(0)
        net = FSSNet(args.backbone, "none").to(device).train()
        net.backbone.to(memory_format=fmt)
        optimizer = torch.optim.Adam(net.trainable_parameters(), lr=1e-4, weight_decay=1e-5)

        @torch.no_grad()
        def backbone_forward():
            with autocast():
                for key in ("query_img", "support_img"):
                    net.extract(normalize(batch[key].to(device) / 255).contiguous(memory_format=fmt))

        forward = timed(backbone_forward, args.repeats, device)
        step = timed(lambda: train_step(net, optimizer, batch, augmentation, device, autocast, scaler, fmt),
                     args.repeats, device)
        name = "" if fmt is formats[0] else "_nchw"
        result.update({f"backbone_forward_s{name}": round(forward, 3), f"train_step_s{name}": round(step, 3),
                       f"ratio{name}": round(step / forward, 3)})
    print(json.dumps(result))


def bench_evaluate(args):
    """`evaluate.py fss` of a random-weight checkpoint on one fold: episodes per second and backbone forwards (the
    feature cache runs the backbone once per distinct image of a run)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = args.voc_root or str(make_demo_data(os.path.join(tmp, "demo"))["voc"])
        ckpt, out = os.path.join(tmp, "random.pt"), os.path.join(tmp, "results.json")
        torch.manual_seed(0)
        net = FSSNet(args.backbone, "none")
        save_checkpoint(ckpt, kind="fss", config=net.config, model=net.state_dict())
        start = time.perf_counter()
        evaluate.main(["fss", "--checkpoint", ckpt, "--voc-root", root, "--fold", str(args.fold), "--runs", "1",
                       "--episodes", str(args.episodes), "--image-size", str(args.image_size),
                       "--workers", str(args.workers), "--device", args.device, "--out", out])
        r = json.load(open(out))
        print(json.dumps({"backbone": args.backbone, "image_size": args.image_size, "episodes": args.episodes,
                          "root": root, "threads": torch.get_num_threads(), "device": args.device,
                          "seconds": round(time.perf_counter() - start, 1), "episodes_per_s": round(r["episodes_per_s"], 2),
                          "backbone_forwards": r["backbone_forwards"]}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["step", "evaluate"])
    p.add_argument("--backbone", default="resnet101", choices=["resnet101", "resnet50", "efficientnet_lite0"])
    p.add_argument("--image-size", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--voc-root", help="VOC tree for evaluate (default: demo data)")
    p.add_argument("--fold", type=int, default=1)
    p.add_argument("--episodes", type=int, default=2500)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cpu | cuda")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"step": bench_step, "evaluate": bench_evaluate}[args.what](args)


if __name__ == "__main__":
    main()
