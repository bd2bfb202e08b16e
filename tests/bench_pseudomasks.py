"""Hand-run benchmark of make_pseudomasks.postprocess (issue: under 5 ms per 500x375 mask): threshold, drop the
4-connected regions under 1% of the image, None when under 1% remains. Not collected by pytest.

    python tests/bench_pseudomasks.py [--height 375] [--width 500] [--masks 50] [--device cpu]

Probability maps: smooth random blobs plus pixel noise (after the threshold a few large regions and thousands of
small ones).
Median over the masks: on the CPU, CPU time of this process; on CUDA, wall time with the device synchronised (the
mask comes back on it).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
from bench_saliency import device_clock  # noqa: E402  (this folder is on the path of a script run)
from make_pseudomasks import postprocess  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--masks", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = model.pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    blobs = F.interpolate(torch.rand(args.masks, 1, 6, 8, generator=g), size=(args.height, args.width),
                          mode="bilinear", align_corners=False)[:, 0]
    probs = (0.8 * blobs + 0.3 * torch.rand(args.masks, args.height, args.width, generator=g)).to(device)
    clock, kind = device_clock(device)
    postprocess(probs[0])  # warm-up
    times, written = [], 0
    for prob in probs:
        start = clock()
        mask = postprocess(prob)
        times.append((clock() - start) * 1e3)
        written += mask is not None
    print(f"postprocess, {args.height}x{args.width} on {device.type}: {statistics.median(times):.2f} ms {kind} median "
          f"per mask (max {max(times):.2f} ms; {written}/{len(times)} masks kept, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
