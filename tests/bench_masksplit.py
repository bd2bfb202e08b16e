"""Hand-run benchmark of split_mask (issue: at most 1 ms median for one 400x400 mask on one CPU core, and a
vectorised batch of 16 no slower than 16 single calls). Run: python tests/bench_masksplit.py"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from masksplit import split_mask  # noqa: E402


def median_ms(fn, repeats=200):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:400, :400]
    masks = np.stack([((y - rng.uniform(100, 300)) / 90) ** 2 + ((x - rng.uniform(100, 300)) / 120) ** 2 <= 1
                      for _ in range(16)])
    shifts = rng.integers(-40, 41, 16).tolist()
    swaps = (rng.random(16) < 0.5).tolist()
    masks_t = torch.from_numpy(masks)
    print(f"torch {torch.__version__}, 1 thread")
    for name, batch in (("torch", masks_t), ("numpy", masks)):
        single = median_ms(lambda: split_mask(batch[0], shift=shifts[0], swap=swaps[0]))
        loop = median_ms(lambda: [split_mask(batch[i], shift=shifts[i], swap=swaps[i]) for i in range(16)], 50)
        vectorised = median_ms(lambda: split_mask(batch, shift=shifts, swap=swaps), 50)
        print(f"{name}: one 400x400 mask {single:.3f} ms | 16 single calls {loop:.2f} ms | "
              f"one batch-16 call {vectorised:.2f} ms")


if __name__ == "__main__":
    main()
