"""Stage 1: unsupervised saliency pseudo-labels, DeepUSPS-style (Nguyen et al., NeurIPS 2019); paper section 3.2.

    python saliency_train.py --images DIR [--list FILE] --out DIR [--backbone efficientnet_lite0 --weights imagenet
                             --rounds 3 --epochs N --image-size N]
    python saliency_train.py --images DIR --out DIR --priors-only

1. Hand-crafted priors (torch, batched) on SLIC superpixels (scikit-image, per image on the CPU)
   -> OUT/priors/<prior>/<stem>.png (0..255).
2. Per prior: a saliency network trained on the prior binarised at its DeepUSPS threshold (round 1) or at 0.5
   (later rounds); after every epoch each image's target becomes 0.7 * target + 0.3 * prediction.
3. Fusion: one network trained on all refined label sets (loss averaged over them); its predictions on the
   training images -> OUT/prob/<stem>.png (0..255), OUT/labels/<stem>.png (0/255), checkpoint OUT/saliency.pt.
No ground truth is read anywhere. Differences from DeepUSPS: the backbone is frozen (features computed once) and
only the light decoder trains; no HS prior; no dense CRF; no augmentation (see README).
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import skimage.segmentation
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from datasets import image_to_tensor, list_images, load_image, save_png, trim_log
from model import BACKBONES, SaliencyNet, capture_rng, load_checkpoint, pick_device, restore_rng, save_checkpoint

# DeepUSPS's per-prior binarisation thresholds for the first round (Nguyen et al. 2019).
PRIOR_THRESHOLDS = {"mc": 0.31, "hs": 0.36, "dsr": 0.23, "rbd": 0.25}


# ---- colour space and superpixels ----

def rgb_to_lab(rgb):
    """sRGB in [0, 1], [B,3,H,W] -> CIE L*a*b* (D65 white), [B,3,H,W]."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423],
                      [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor([0.950456, 1.0, 1.088754], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    t = torch.einsum("ij,bjhw->bihw", m, lin) / white
    f = torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def segment_mean(values, labels, k):
    """values [B,N,C], labels [B,N] in [0,k) -> (per-segment means [B,k,C], pixel counts [B,k])."""
    b, _, c = values.shape
    sums = values.new_zeros(b, k, c).scatter_add_(1, labels[..., None].expand(-1, -1, c), values)
    counts = values.new_zeros(b, k).scatter_add_(1, labels, torch.ones_like(labels, dtype=values.dtype))
    return sums / counts.clamp_min(1)[..., None], counts


def slic_labels(rgb, n_segments=200, compactness=10.0):
    """SLIC superpixels (Achanta et al., TPAMI 2012), scikit-image's implementation, one image at a time on the CPU:
    [0,1] images [B,3,H,W] -> (labels [B,H,W] int64 on the input's device, k).

    Distance d_lab^2 + (m/S)^2 d_xy^2 in CIE Lab with m = compactness, 10 iterations, and SLIC's connectivity step:
    every superpixel is one 4-connected piece. Labels are consecutive 0..k_i-1 per image; k is the largest k_i of
    the batch (labels k_i..k-1 of an image are empty). The connectivity step merges pieces under half a
    superpixel's size into a neighbour, so k_i can fall below n_segments (115 to 179 of 200 on five 256 px SOD images);
    an image with fewer pixels than n_segments gets at most one superpixel per pixel. For the priors of section 3.2."""
    if n_segments < 1:
        raise ValueError(f"superpixels per image (--superpixels) must be at least 1, got {n_segments}")
    images = rgb.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    labels = []
    for image in images:
        raw = skimage.segmentation.slic(image, n_segments=n_segments, compactness=compactness, max_num_iter=10,
                                        enforce_connectivity=True, convert2lab=True, start_label=0, channel_axis=-1)
        present = np.bincount(raw.ravel()) > 0
        labels.append((np.cumsum(present) - 1)[raw])  # consecutive 0..k_i-1
    labels = torch.from_numpy(np.stack(labels)).to(rgb.device, torch.int64)
    return labels, int(labels.max()) + 1


def superpixel_graph(rgb, n_segments=200, compactness=10.0):
    """Superpixels of a batch of [0,1] images [B,3,H,W] and their region graph, as a dict of tensors:
    labels [B,H,W], lab / rgb [B,K,3] mean colours, pos [B,K,2] mean (y, x) in [0,1], valid [B,K] (non-empty),
    adj [B,K,K] (4-neighbour touching, no self loops), boundary [B,K] (touches the image border)."""
    b, _, h, w = rgb.shape
    lab = rgb_to_lab(rgb)
    labels, k = slic_labels(rgb, n_segments, compactness)
    flat = labels.flatten(1)
    ys = torch.linspace(0, 1, h, device=rgb.device).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w, device=rgb.device).view(1, w).expand(h, w)
    pix = torch.cat([lab, rgb, torch.stack([ys, xs]).expand(b, 2, h, w)], 1).flatten(2).transpose(1, 2)
    means, counts = segment_mean(pix, flat, k)
    adj = torch.zeros(b, k * k, dtype=torch.bool, device=rgb.device)
    for a, c in ((labels[:, :, :-1], labels[:, :, 1:]), (labels[:, :-1, :], labels[:, 1:, :])):
        adj.scatter_(1, (a * k + c).flatten(1), True)
        adj.scatter_(1, (c * k + a).flatten(1), True)
    adj = adj.view(b, k, k) & ~torch.eye(k, dtype=torch.bool, device=rgb.device)
    border = torch.cat([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], 1)
    boundary = torch.zeros(b, k, dtype=torch.bool, device=rgb.device).scatter_(1, border, True)
    return {"labels": labels, "lab": means[..., :3], "rgb": means[..., 3:6], "pos": means[..., 6:],
            "valid": counts > 0, "adj": adj, "boundary": boundary}


def to_pixels(values, labels):
    """Per-superpixel values [B,K] -> per-pixel map [B,H,W]."""
    return values.gather(1, labels.flatten(1)).view(labels.shape)


def normalise(maps):
    """Min-max each map of [B,H,W] to [0,1] (a constant map becomes 0)."""
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def _solve(matrix, rhs, valid):
    """Solve matrix @ x = rhs per batch item, with the rows / columns of empty superpixels replaced by identity."""
    pair = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    matrix = torch.where(pair, matrix, eye.expand_as(matrix))
    return torch.linalg.solve(matrix, torch.where(valid, rhs, 0.0)[..., None]).squeeze(-1)


def _valid_min_max(values, valid):
    lo = torch.where(valid, values, math.inf).min(1, keepdim=True).values
    hi = torch.where(valid, values, -math.inf).max(1, keepdim=True).values
    return torch.where(valid, (values - lo) / (hi - lo).clamp_min(1e-12), 0.0)


# ---- priors ----

def rbd_prior(graph, sigma_clr=10.0, sigma_bndcon=1.0, sigma_spa=0.25, mu=0.1, bg_lambda=1.0):
    """RBD, robust background detection (Zhu et al., CVPR 2014): boundary connectivity from geodesic distances
    on the superpixel graph, background-weighted contrast, then the least-squares saliency optimisation.
    bg_lambda scales the background term: 1 in the paper's objective, 5 in the authors' code."""
    valid, adj, bnd, lab = graph["valid"], graph["adj"], graph["boundary"], graph["lab"]
    pair = valid[:, :, None] & valid[:, None, :]
    d_app = torch.cdist(lab, lab)
    # geodesic distances: edges between touching superpixels and between all border superpixels (as in RBD)
    edges = (adj | (bnd[:, :, None] & bnd[:, None, :])) & pair
    geo = torch.where(edges, d_app, math.inf)
    geo = geo.masked_fill(torch.eye(geo.shape[-1], dtype=torch.bool, device=geo.device), 0.0)
    for k in range(geo.shape[-1]):  # Floyd-Warshall, all items of the batch at once
        geo = torch.minimum(geo, geo[:, :, k:k + 1] + geo[:, k:k + 1, :])
    span = torch.where(pair, torch.exp(-geo ** 2 / (2 * sigma_clr ** 2)), 0.0)
    area = span.sum(-1)
    len_bnd = (span * bnd[:, None, :]).sum(-1)
    bnd_con = len_bnd / area.clamp_min(1e-12).sqrt()
    w_bg = 1 - torch.exp(-bnd_con ** 2 / (2 * sigma_bndcon ** 2))
    w_spa = torch.exp(-torch.cdist(graph["pos"], graph["pos"]) ** 2 / (2 * sigma_spa ** 2))
    w_ctr = _valid_min_max((d_app * w_spa * w_bg[:, None, :] * valid[:, None, :]).sum(-1), valid)
    # minimise sum w_bg s^2 + sum w_fg (s - 1)^2 + sum_{ij adjacent} w_ij (s_i - s_j)^2
    w_smooth = torch.where(adj & pair, torch.exp(-d_app ** 2 / (2 * sigma_clr ** 2)) + mu, 0.0)
    system = torch.diag_embed(w_smooth.sum(-1) + bg_lambda * w_bg + w_ctr) - w_smooth
    sal = _solve(system, w_ctr, valid)
    return normalise(to_pixels(sal.clamp(0, 1), graph["labels"]))


def mc_prior(graph, sigma2=0.1):
    """MC, absorbing Markov chain (Jiang et al., ICCV 2013): border superpixels are duplicated as absorbing nodes;
    saliency is the expected time to absorption N @ 1 with N = (I - Q)^-1."""
    valid, adj, bnd = graph["valid"], graph["adj"], graph["boundary"]
    pair = valid[:, :, None] & valid[:, None, :]
    lab = graph["lab"]
    lo = torch.where(valid[..., None], lab, math.inf).min(1, keepdim=True).values
    hi = torch.where(valid[..., None], lab, -math.inf).max(1, keepdim=True).values
    feat = (lab - lo) / (hi - lo).clamp_min(1e-12)  # Lab normalised to [0, 1] per image
    affinity = torch.exp(-torch.cdist(feat, feat) / sigma2)
    eye = torch.eye(adj.shape[-1], dtype=torch.bool, device=adj.device)
    ring2 = (adj | (adj.float() @ adj.float() > 0)) & ~eye  # neighbours and neighbours of neighbours
    a_tt = torch.where((ring2 | (bnd[:, :, None] & bnd[:, None, :] & ~eye)) & pair, affinity, 0.0)
    # transient node i -> absorbing copy of border node j when j is i itself or in i's 2-ring
    a_ta = torch.where((ring2 | eye) & bnd[:, None, :] & pair, affinity, 0.0)
    degree = (a_tt.sum(-1) + a_ta.sum(-1)).clamp_min(1e-12)
    q = a_tt / degree[..., None]
    absorbed_time = _solve(torch.eye(q.shape[-1], device=q.device) - q, torch.ones_like(degree), valid)
    return normalise(to_pixels(_valid_min_max(absorbed_time, valid), graph["labels"]))


def _dsr_errors(graph, lam=0.01, energy=0.95, ista_iters=200):
    """Dense (PCA of the border templates) and sparse (lasso on the border templates) reconstruction errors."""
    valid, bnd = graph["valid"], graph["boundary"] & graph["valid"]
    lab_scale = torch.tensor([100.0, 256.0, 256.0], device=valid.device)
    x = torch.cat([graph["pos"], graph["lab"] / lab_scale, graph["rgb"]], -1)  # {y, x, L, a, b, R, G, B}
    wb = bnd.float()[..., None]
    n_b = wb.sum(1, keepdim=True).clamp_min(1)
    mean = (x * wb).sum(1, keepdim=True) / n_b
    centred_b = (x - mean) * wb
    cov = centred_b.transpose(1, 2) @ centred_b / n_b
    evals, evecs = torch.linalg.eigh(cov.double())  # ascending
    evals, evecs = evals.to(x.dtype), evecs.to(x.dtype)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    share = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp_min(1e-12)
    keep = (share - evals / evals.sum(-1, keepdim=True).clamp_min(1e-12)) < energy  # smallest set with >= energy
    u = evecs * keep[:, None, :]
    centred = x - mean
    dense = ((centred - centred @ u @ u.transpose(1, 2)) ** 2).sum(-1)
    # sparse codes by ISTA against the border templates
    n_max = int(bnd.sum(1).max().clamp_min(1))
    order = bnd.float().argsort(dim=1, descending=True, stable=True)[:, :n_max]  # border superpixels first
    templates = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])) * bnd.gather(1, order)[..., None]
    gram = templates @ templates.transpose(1, 2)  # [B,n,n]; padding templates are zero and get zero codes
    lipschitz = torch.linalg.matrix_norm(gram).clamp_min(1e-6).view(-1, 1, 1)  # Frobenius >= spectral norm
    target = x @ templates.transpose(1, 2)
    alpha = torch.zeros_like(target)  # [B,K,n]
    for _ in range(ista_iters):
        alpha = alpha - (alpha @ gram - target) / lipschitz
        alpha = alpha.sign() * (alpha.abs() - lam / lipschitz).clamp_min(0)
    sparse = ((x - alpha @ templates) ** 2).sum(-1)
    return _valid_min_max(dense, valid), _valid_min_max(sparse, valid)


def dsr_prior(rgb, n_segments=200, scales=(0.5, 1.0, 2.0), lam=0.01, sigma=0.25):
    """DSR, dense and sparse reconstruction (Li et al., ICCV 2013): errors of reconstructing each superpixel from
    the border templates, averaged over superpixel scales, weighted by an object-biased Gaussian. Simplified: no
    k-means context propagation, and the dense / sparse maps are averaged instead of Bayes-integrated."""
    dense, sparse = 0, 0
    for s in scales:
        graph = superpixel_graph(rgb, max(8, round(n_segments * s)))
        d, sp = _dsr_errors(graph, lam=lam)
        dense = dense + to_pixels(d, graph["labels"]) / len(scales)
        sparse = sparse + to_pixels(sp, graph["labels"]) / len(scales)
    h, w = rgb.shape[-2:]
    ys = torch.linspace(0, 1, h, device=rgb.device).view(1, h, 1)
    xs = torch.linspace(0, 1, w, device=rgb.device).view(1, 1, w)
    out = 0
    for err in (dense, sparse):
        mass = err.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1)
        y0 = (err * ys).flatten(1).sum(1).view(-1, 1, 1) / mass
        x0 = (err * xs).flatten(1).sum(1).view(-1, 1, 1) / mass
        gauss = torch.exp(-((ys - y0) ** 2 + (xs - x0) ** 2) / (2 * sigma ** 2))  # object-biased Gaussian
        out = out + normalise(err * gauss) / 2
    return normalise(out)


PRIORS = ("rbd", "mc", "dsr")


def compute_priors(rgb, names=PRIORS, n_segments=200, rbd_bg_lambda=1.0):
    """Batch of [0,1] images [B,3,H,W] -> {prior name: saliency maps [B,H,W] in [0,1]}."""
    unknown = set(names) - set(PRIORS)
    if unknown:
        raise ValueError(f"unknown prior(s) {sorted(unknown)}; available: {', '.join(PRIORS)}")
    out = {}
    graph = superpixel_graph(rgb, n_segments) if {"rbd", "mc"} & set(names) else None
    for name in names:
        if name == "rbd":
            out[name] = rbd_prior(graph, bg_lambda=rbd_bg_lambda)
        elif name == "mc":
            out[name] = mc_prior(graph)
        else:
            out[name] = dsr_prior(rgb, n_segments)
    return out


# ---- DeepUSPS training: per-prior networks with self-supervised target refinement, then fusion ----

def refine_targets(targets, prediction, momentum=0.7):
    """DeepUSPS moving-average refinement after every epoch: momentum * old target + (1 - momentum) * prediction.
    Returns a new tensor (the caller's targets are not modified)."""
    return momentum * targets + (1 - momentum) * prediction


def _load_rgb(path, size):
    """Image file -> float tensor [3,size,size] in [0,1] (bilinear resize) and its original (H, W)."""
    image = load_image(path)
    arr = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1), (image.height, image.width)


def _to_png_array(prob, orig_size):
    """Probability map [h,w] in [0,1] -> uint8 array at the original size (bilinear)."""
    prob = F.interpolate(prob[None, None].float(), size=tuple(orig_size), mode="bilinear", align_corners=False)
    return (prob[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def write_priors(paths, out, names, size, n_segments, batch_size, device, rbd_bg_lambda=1.0):
    """Compute the priors of every image not yet written -> OUT/priors/<name>/<stem>.png (rerun skips done ones)."""
    todo = [p for p in paths if not all((out / "priors" / n / f"{p.stem}.png").is_file() for n in names)]
    for i in tqdm(range(0, len(todo), batch_size), desc="priors", disable=not todo):
        batch = [_load_rgb(p, size) for p in todo[i:i + batch_size]]
        maps = compute_priors(torch.stack([b[0] for b in batch]).to(device), names, n_segments, rbd_bg_lambda)
        for name, m in maps.items():
            for j, p in enumerate(todo[i:i + batch_size]):
                save_png(_to_png_array(m[j], batch[j][1]), out / "priors" / name / f"{p.stem}.png")


def load_prior_maps(paths, out, name, size):
    """The written prior maps resized to the training size -> [N,size,size] float in [0,1]."""
    maps = []
    for p in paths:
        arr = np.asarray(load_image(out / "priors" / name / f"{p.stem}.png").convert("L"), dtype=np.float32) / 255
        maps.append(F.interpolate(torch.from_numpy(arr)[None, None], size=(size, size), mode="bilinear",
                                  align_corners=False)[0, 0])
    return torch.stack(maps)


class Features:
    """The frozen backbone's three feature maps per image, by index: computed once and kept in memory (default),
    or, with cache=False, recomputed for every batch (for datasets whose features do not fit in memory)."""

    def __init__(self, net, paths, size, batch_size, device, cache=True):
        self.net, self.paths, self.size, self.device = net, paths, size, device
        self.cache = None
        if cache:
            chunks = [self._compute(range(i, min(i + batch_size, len(paths))))
                      for i in tqdm(range(0, len(paths), batch_size), desc="features")]
            self.cache = [torch.cat(level) for level in zip(*chunks)]

    def __len__(self):
        return len(self.paths)

    @torch.no_grad()
    def _compute(self, idx):
        x = torch.stack([image_to_tensor(load_image(self.paths[i]), self.size) for i in idx]).to(self.device)
        return [f.float().cpu() for f in self.net.backbone(x)]

    def __getitem__(self, idx):
        """idx: 1-D index tensor -> list of three [len(idx),C,h,w] tensors on the device."""
        feats = [f[idx] for f in self.cache] if self.cache is not None else self._compute(idx.tolist())
        return [f.to(self.device) for f in feats]


@torch.no_grad()
def predict(net, feats, size, batch_size):
    """Sigmoid saliency [N,size,size] of every image."""
    net.eval()
    order = torch.arange(len(feats))
    return torch.cat([torch.sigmoid(net.decode(feats[order[i:i + batch_size]], (size, size))).float().cpu()
                      for i in range(0, len(feats), batch_size)])


def train_epoch(net, opt, feats, targets, size, batch_size, generator, device):
    """One epoch over the images' features; targets [P,N,S,S] (P label sets, loss averaged over them). Mean loss."""
    net.train()
    order = torch.randperm(len(feats), generator=generator)
    total = 0.0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = net.decode(feats[idx], (size, size))
        tgt = targets[:, idx].to(device)
        loss = torch.stack([F.binary_cross_entropy_with_logits(logits.float(), t) for t in tgt]).mean()
        if not torch.isfinite(loss):
            raise SystemExit(f"error: non-finite loss ({loss.item()}) at batch {i // batch_size}; "
                             f"stopping without writing a checkpoint")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(order)


def decoder_state(net):
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("backbone.")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of unlabelled training images")
    p.add_argument("--list", default=None, help="optional file of image stems to use")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--priors", default=",".join(PRIORS), help=f"comma-separated subset of {','.join(PRIORS)}")
    p.add_argument("--priors-only", action="store_true", help="only write OUT/priors/<prior>/<stem>.png")
    p.add_argument("--prior-size", type=int, default=256, help="priors are computed at this square size")
    p.add_argument("--superpixels", type=int, default=200, help="SLIC superpixels per image for the priors")
    p.add_argument("--rbd-bg-lambda", type=float, default=1.0,
                   help="weight of RBD's background term: 1 as in the RBD paper, 5 in the RBD authors' code")
    p.add_argument("--prior-thresholds", default=None,
                   help="first-round binarisation per prior, e.g. rbd=0.25,mc=0.31 (default: DeepUSPS's values)")
    p.add_argument("--backbone", default="resnet101", choices=BACKBONES)
    p.add_argument("--weights", default="imagenet", help="imagenet | none | PATH (backbone weights)")
    p.add_argument("--image-size", type=int, default=320, help="square training size of the saliency networks")
    p.add_argument("--rounds", type=int, default=3, help="DeepUSPS refinement rounds per prior")
    p.add_argument("--epochs", type=int, default=10, help="epochs per round and for the fusion network")
    p.add_argument("--momentum", type=float, default=0.7, help="target <- momentum * target + (1-momentum) * pred")
    p.add_argument("--threshold", type=float, default=0.5, help="binarisation of refined targets (rounds 2+)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute backbone features every batch instead of keeping them in memory")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the decoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = p.parse_args(argv)
    args.priors = [n.strip() for n in args.priors.split(",") if n.strip()]
    if not args.priors or set(args.priors) - set(PRIORS):
        p.error(f"--priors must be a subset of {','.join(PRIORS)}, got {','.join(args.priors) or 'nothing'}")
    thresholds = dict(PRIOR_THRESHOLDS)
    for item in (args.prior_thresholds or "").split(","):
        if item.strip():
            name, _, value = item.partition("=")
            try:
                thresholds[name.strip()] = float(value)
            except ValueError:
                p.error(f"--prior-thresholds: {item!r} is not name=value")
    args.prior_thresholds = thresholds
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    out = Path(args.out)
    paths = list_images(args.images, args.list)
    write_priors(paths, out, args.priors, args.prior_size, args.superpixels, args.batch_size, device,
                 args.rbd_bg_lambda)
    if args.priors_only:
        print(f"wrote {len(args.priors)} prior map(s) for {len(paths)} images to {out / 'priors'}")
        return

    torch.manual_seed(args.seed)
    net = SaliencyNet(args.backbone, args.weights).to(device)
    init = decoder_state(net)  # every task starts from the same seeded decoder
    size = args.image_size
    config = {**net.config, "image_size": size}
    priors = {n: load_prior_maps(paths, out, n, size) for n in args.priors}
    tasks = [(n, r) for n in args.priors for r in range(args.rounds)] + [("fusion", 0)]
    state = {"task": 0, "epoch": 0, "targets": None, "refined": {}, "optimizer": None, "log_lines": 0}
    ckpt_path, log_path = out / "last.pt", out / "log.jsonl"
    if args.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck["kind"] != "saliency" or ck.get("stems") != [p.stem for p in paths] or ck["config"] != config:
            raise SystemExit(f"error: {ckpt_path} belongs to another run (other images or network); "
                             f"use another --out or drop --resume")
        state = ck["state"]
        restore_rng(ck["rng"])
        net.load_state_dict(ck["model"], strict=False)  # the decoder of the interrupted task (or the fused one)
    trim_log(log_path, state["log_lines"])  # drop epochs logged after the checkpoint (a kill between the two)
    feats = Features(net, paths, size, args.batch_size, device, cache=not args.no_cache)

    while state["task"] < len(tasks):
        name, rnd = tasks[state["task"]]
        if state["targets"] is None:  # a task starts: fresh decoder, its binarised label set(s)
            net.load_state_dict(init, strict=False)
            if name == "fusion":
                state["targets"] = torch.stack([(state["refined"][n] >= args.threshold).float() for n in args.priors])
            elif rnd == 0:
                state["targets"] = (priors[name] >= args.prior_thresholds[name]).float()[None]
            else:
                state["targets"] = (state["refined"][name] >= args.threshold).float()[None]
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=args.lr)
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        generator = torch.Generator().manual_seed(args.seed * 1000 + state["task"])
        for _ in range(state["epoch"]):  # same batch orders as an uninterrupted run
            torch.randperm(len(paths), generator=generator)
        bar = tqdm(range(state["epoch"], args.epochs), desc=name if name == "fusion" else f"{name} round {rnd + 1}")
        for epoch in bar:
            loss = train_epoch(net, opt, feats, state["targets"], size, args.batch_size, generator, device)
            bar.set_postfix(loss=f"{loss:.4f}")
            if name != "fusion":  # DeepUSPS self-supervised refinement of the targets, after every epoch
                pred = predict(net, feats, size, args.batch_size)[None]
                state["targets"] = refine_targets(state["targets"], pred, args.momentum)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": state["log_lines"] + 1, "task": name, "round": rnd + 1,
                                    "epoch": epoch + 1, "loss": loss}) + "\n")
            state.update(epoch=epoch + 1, optimizer=opt.state_dict(), log_lines=state["log_lines"] + 1)
            if epoch + 1 == args.epochs:  # task done
                if name != "fusion":
                    state["refined"][name] = state["targets"][0]
                state.update(task=state["task"] + 1, epoch=0, targets=None, optimizer=None)
            save_checkpoint(ckpt_path, kind="saliency", config=config, model=decoder_state(net), state=state,
                            rng=capture_rng(), args=vars(args), stems=[p.stem for p in paths])

    save_checkpoint(out / "saliency.pt", kind="saliency", config=config, model=net.state_dict(), args=vars(args))
    probs = predict(net, feats, size, args.batch_size)
    for p, prob in zip(tqdm(paths, desc="write"), probs):
        image = load_image(p)
        arr = _to_png_array(prob, (image.height, image.width))
        save_png(arr, out / "prob" / f"{p.stem}.png")
        save_png(np.where(arr >= 128, 255, 0).astype(np.uint8), out / "labels" / f"{p.stem}.png")
    print(f"wrote {len(paths)} saliency maps to {out / 'prob'} and {out / 'labels'}; network {out / 'saliency.pt'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input (unreadable image, missing file): one clear line
        raise SystemExit(f"error: {e}")
