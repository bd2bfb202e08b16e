"""Speed of the saliency priors and of BAS-Net (run by hand; not collected by pytest).

    python tests/bench_saliency.py [--images DIR] [--size 128] [--batch 16] [--threads 1] [--device cuda]
                                   [--priors-only] [--basnet-encoder efficientnet_lite0 --basnet-width 0.25]
    python tests/bench_saliency.py --memory 200,2000   # peak memory of saliency_train.py on 200 and 2000 images

On the CPU the figures are CPU time of this process; on CUDA, wall time with the device synchronised.
Without --images: smooth random images (SLIC's connectivity step merges the superpixels of pixel noise into a few).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import saliency_train as st  # noqa: E402
from datasets import list_images  # noqa: E402


def device_clock(device):
    """(clock, kind): CPU time of this process on the CPU; on CUDA, wall time with the device synchronised."""
    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.process_time()
    return clock, "CPU" if device.type == "cpu" else "wall"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", default=None, help="real images (default: smooth random images)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--superpixels", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--basnet-crop", type=int, default=64, help="BAS-Net's own training crop is 224")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--basnet-encoder", default="resnet34", choices=model.BASNET_ENCODERS)
    p.add_argument("--basnet-width", type=float, default=1.0, help="BAS-Net --width (< 1: Lite0 encoder only)")
    p.add_argument("--memory", default=None, metavar="N1,N2",
                   help="instead: peak memory of saliency_train.py on N1 and N2 synthetic images, same settings")
    p.add_argument("--train-flags", default="--backbone efficientnet_lite0 --weights none --prior-size 64 "
                   "--image-size 64 --priors rbd --rounds 1 --epochs 1 --batch-size 8 --feature-cache-gb 0.02",
                   help="saliency_train.py flags of the --memory runs")
    p.add_argument("--priors-only", action="store_true", help="skip the BAS-Net timings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        return peak_memory([int(n) for n in args.memory.split(",")], args.train_flags.split())
    device = model.pick_device(args.device)
    clock, kind = device_clock(device)
    if args.images:
        x = torch.stack([st._load_rgb(q, args.size)[0] for q in list_images(args.images)[:args.batch]])
    else:
        x = F.interpolate(torch.rand(args.batch, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                          size=(args.size, args.size), mode="bilinear", align_corners=False)
    x = x.to(device)
    st.compute_priors(x[:2], n_segments=args.superpixels)  # warm-up
    for name in st.PRIORS:
        t = clock()
        st.compute_priors(x, [name], n_segments=args.superpixels)
        print(f"{name}: {(clock() - t) / len(x) * 1000:.0f} ms {kind}/image at {args.size}px "
              f"(batch {len(x)}, {args.threads} thread(s))")
    if args.priors_only:
        return
    net = model.BASNet(weights="none", encoder=args.basnet_encoder, width=args.basnet_width).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    c = args.basnet_crop
    xb, yb = torch.randn(8, 3, c, c, device=device), (torch.rand(8, 1, c, c, device=device) > 0.5).float()
    for i in range(3):
        t = clock()
        loss = model.hybrid_loss(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 2:
            print(f"BAS-Net train step, batch 8 at {c}px: {clock() - t:.2f} s {kind}")
    net.eval()
    with torch.no_grad():
        t = clock()
        net(torch.randn(8, 3, 256, 256, device=device))
        print(f"BAS-Net inference at 256px: {(clock() - t) / 8 * 1000:.0f} ms {kind}/image")


def peak_memory(counts, flags):
    """Peak resident memory of a saliency_train.py run (a child process) on n synthetic 96 px images, per n."""
    import subprocess
    import tempfile

    import numpy as np
    from PIL import Image

    script = Path(__file__).resolve().parents[1] / "saliency_train.py"
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for n in counts:
            images = Path(tmp) / f"images{n}"
            images.mkdir()
            for i in range(n):  # a bright blob on a smooth random background
                img = rng.integers(60, 120, (6, 6, 3)).astype(np.uint8)
                big = np.asarray(Image.fromarray(img).resize((96, 96), Image.BILINEAR)).copy()
                y, x = rng.integers(20, 60, 2)
                big[y:y + 24, x:x + 24] = (230, 200, 40)
                Image.fromarray(big).save(images / f"{i:05d}.png")
            code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__'); "
                    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            run = subprocess.run([sys.executable, "-c", code, str(script), "--images", str(images),
                                  "--out", str(Path(tmp) / f"out{n}"), *flags], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr[-2000:])
            peak = int(run.stdout.split("PEAK_KB")[-1]) / 1024
            print(f"{n} images: peak resident memory {peak:.0f} MB ({' '.join(flags)})")


if __name__ == "__main__":
    main()
