"""Saliency quality of stages 1-2, measured against ground truth (never used in training): MAE, max / mean F-beta
(beta^2 = 0.3) and S-measure of 8-bit saliency maps against masks with the same stems.

    python tests/saliency_metrics.py --pred runs/deepusps/prob --gt SOD/masks [--list FILE] [--out FILE]
"""
import argparse
import os
import pathlib
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from datasets import foreground_counts, list_images, load_binary_mask, load_image  # noqa: E402
from model import HelpFormatter, check_output, exits_on_bad_input, write_json  # noqa: E402

BETA2 = 0.3  # F-beta weight of precision, beta^2 = 0.3 (Achanta et al. 2009, the saliency convention)


def precision_recall(pred, gt):
    """pred uint8 [H,W] (0..255), gt bool [H,W] -> (precision, recall) float64 arrays [256], one per threshold t
    (salient = pred >= t, t = 0..255). An empty prediction has precision 0; an empty ground truth recall 0."""
    pred = np.asarray(pred, dtype=np.uint8)
    fg = np.bincount(pred[gt], minlength=256)[::-1].cumsum()[::-1]  # ground-truth pixels with pred >= t
    bg = np.bincount(pred[~gt], minlength=256)[::-1].cumsum()[::-1]
    detected = fg + bg
    precision = np.divide(fg, detected, out=np.zeros(256), where=detected > 0)
    recall = fg / gt.sum() if gt.any() else np.zeros(256)
    return precision, recall


def f_beta_curve(precision, recall, beta2=BETA2):
    """F-beta per threshold from (dataset-mean) precision and recall arrays."""
    num = (1 + beta2) * precision * recall
    den = beta2 * precision + recall
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _matlab_round(v):
    return int(np.floor(v + 0.5))


def _object_score(values):
    if values.size == 0:
        return 0.0
    mu = values.mean()
    sigma = values.std(ddof=1) if values.size > 1 else 0.0
    return 2 * mu / (mu * mu + 1 + sigma + 1e-12)


def _region_ssim(pred, gt):
    n = pred.size
    if n == 0:
        return 0.0
    x, y = pred.mean(), gt.mean()
    sx = ((pred - x) ** 2).sum() / (n - 1 + 1e-12)
    sy = ((gt - y) ** 2).sum() / (n - 1 + 1e-12)
    sxy = ((pred - x) * (gt - y)).sum() / (n - 1 + 1e-12)
    alpha, beta = 4 * x * y * sxy, (x * x + y * y) * (sx + sy)
    if alpha != 0:
        return alpha / (beta + 1e-12)
    return 1.0 if beta == 0 else 0.0


def s_measure(pred, gt, alpha=0.5):
    """Structure measure (Fan et al., ICCV 2017): alpha * object-aware + (1 - alpha) * region-aware similarity.
    pred float [H,W] in [0,1], gt bool [H,W]."""
    pred = np.asarray(pred, dtype=np.float64)
    y = gt.mean()
    if y == 0:
        return float(1 - pred.mean())
    if y == 1:
        return float(pred.mean())
    s_object = y * _object_score(pred[gt]) + (1 - y) * _object_score(1 - pred[~gt])
    h, w = gt.shape
    total = gt.sum()
    cx = _matlab_round((np.arange(1, w + 1) * gt.sum(0)).sum() / total)  # centroid, 1-based as in the reference
    cy = _matlab_round((np.arange(1, h + 1) * gt.sum(1)).sum() / total)
    g = gt.astype(np.float64)
    s_region = 0.0
    for rows, cols, weight in ((slice(0, cy), slice(0, cx), cx * cy), (slice(0, cy), slice(cx, w), (w - cx) * cy),
                               (slice(cy, h), slice(0, cx), cx * (h - cy)),
                               (slice(cy, h), slice(cx, w), (w - cx) * (h - cy))):
        s_region += weight / (h * w) * _region_ssim(pred[rows, cols], g[rows, cols])
    return float(max(alpha * s_object + (1 - alpha) * s_region, 0.0))


def saliency_metrics(pairs):
    """pairs: iterable of (uint8 [H,W] prediction, bool [H,W] ground truth) of the same size -> dict with MAE, max and
    mean F-beta (F-beta of the dataset-mean precision / recall at 256 thresholds; max and mean over thresholds),
    S-measure (mean over images) and the image count."""
    mae, s, precision, recall, n = 0.0, 0.0, np.zeros(256), np.zeros(256), 0
    for pred, gt in pairs:
        p, r = precision_recall(pred, gt)
        precision, recall = precision + p, recall + r
        prob = np.asarray(pred, dtype=np.float64) / 255
        mae += np.abs(prob - gt).mean()
        s += s_measure(prob, gt)
        n += 1
    if n == 0:
        raise ValueError("saliency_metrics: no images")
    f = f_beta_curve(precision / n, recall / n)
    return {"mae": mae / n, "max_fbeta": float(f.max()), "mean_fbeta": float(f.mean()), "s_measure": s / n,
            "images": n}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--pred", required=True, help="folder of predicted saliency maps (8-bit PNG, 0..255)")
    p.add_argument("--gt", required=True, help="folder of ground-truth masks (1-bit, palette or 8-bit PNG)")
    p.add_argument("--list", help="optional file of stems to evaluate")
    p.add_argument("--out", help="metrics JSON (default PRED/saliency_metrics.json)")
    return p.parse_args(argv)


def _read_prediction(path, size):
    """8-bit map at the ground truth's size (bilinear when the sizes differ) -> uint8 [H,W]."""
    pil = load_image(path).convert("L")
    if pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


@exits_on_bad_input
def main(argv=None):
    args = parse_args(argv)
    out = check_output(args.out or os.path.join(args.pred, "saliency_metrics.json"))
    gts = list_images(args.gt, args.list)
    preds = {p.stem: p for p in list_images(args.pred)}
    missing = [g.stem for g in gts if g.stem not in preds]
    if missing:
        raise SystemExit(f"error: {len(missing)} prediction(s) missing in {args.pred}, e.g. {missing[:3]}")
    foreground_counts(gts, args.gt)
    masks = (load_binary_mask(g) for g in gts)
    pairs = ((_read_prediction(preds[g.stem], m.shape), m) for g, m in zip(gts, masks))
    pairs = tqdm(pairs, total=len(gts), desc="saliency")
    metrics = saliency_metrics(pairs)
    metrics.update(pred=os.fspath(args.pred), gt=os.fspath(args.gt))
    write_json(metrics, out)
    print(f"{metrics['images']} images  MAE {metrics['mae']:.4f}  max F-beta {metrics['max_fbeta']:.4f}  "
          f"mean F-beta {metrics['mean_fbeta']:.4f}  S-measure {metrics['s_measure']:.4f}  -> {out}")
    return metrics

if __name__ == "__main__":
    main()
