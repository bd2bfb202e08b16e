"""Stage 1: unsupervised saliency pseudo-labels, DeepUSPS-style (Nguyen et al., NeurIPS 2019); paper section 3.2.

    python saliency_train.py --images DIR [--list FILE] --out DIR [--backbone B --weights W --rounds 3 --epochs 25]
    python saliency_train.py --images DIR --out DIR --priors-only

1. Hand-crafted priors (RBD, MC, DSR) on SLIC superpixels -> OUT/priors/<prior>/<stem>.png (0..255).
2. Phase I, per prior, --rounds rounds of --epochs epochs: a fresh decoder trained on fixed targets (the prior
   binarised at its DeepUSPS threshold in round 1, the previous round's moving average binarised at 0.5 later),
   with DeepUSPS's continuous F-measure loss; after every epoch each image's prediction, through a dense CRF,
   updates a moving average (OUT/refine/<prior>/round<r>/). The last round's network -> OUT/<prior>.pt.
3. Phase II, fusion: one decoder trained on every prior's refined labels (loss averaged over them); its
   predictions (through the CRF) -> OUT/prob/<stem>.png (0..255), OUT/labels/<stem>.png (0/255), OUT/saliency.pt.
No ground truth is read anywhere. --resume continues after the last finished epoch (OUT/last.pt). Differences from
DeepUSPS: the backbone is frozen (features computed once, a bounded fp16 cache) and only the light decoder trains;
the CRF's bilateral kernel is evaluated against a grid of source pixels; no HS prior; no augmentation (see README).
"""
import argparse
import json
import math
import shutil

import numpy as np
import skimage.segmentation
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from datasets import files_digest, image_to_tensor, list_images, load_image, save_png
from model import (BACKBONES, FiniteGuard, HelpFormatter, SaliencyNet, add_device_flags, append_line, check_apart,
                   exits_on_bad_input, load_training_state, mixed_precision, momentum_float, nonnegative_float,
                   positive_float, positive_int, restore_rng, resume_checkpoint, save_checkpoint, seeded_generator,
                   start_run, training_state, trim_log, unit_float, write_json)

PRIORS = ("rbd", "mc", "dsr")
PRIOR_THRESHOLDS = {"mc": 0.31, "hs": 0.36, "dsr": 0.23, "rbd": 0.25}  # DeepUSPS's round-1 binarisation per prior
RESUME_FREE = ("resume", "device", "feature_cache_gb", "priors_only")  # flags --resume may change; the rest must match


# ---- colour space and superpixels ----
def rgb_to_lab(rgb):
    """sRGB in [0, 1], [B,3,H,W] -> CIE L*a*b* (D65 white), [B,3,H,W]."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)  # linear sRGB; m maps it to XYZ
    m = rgb.new_tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    white = rgb.new_tensor([0.950456, 1.0, 1.088754]).view(1, 3, 1, 1)
    t = torch.einsum("ij,bjhw->bihw", m, lin) / white
    f = torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def slic_labels(rgb, n_segments=200, compactness=10.0):
    """SLIC superpixels (Achanta et al., TPAMI 2012; scikit-image's, m = compactness, per image on the CPU): [0,1]
    images [B,3,H,W] -> (labels [B,H,W] int64 on the input's device, k): consecutive 0..k_i-1 per image, k the
    largest k_i. SLIC makes every superpixel one 4-connected piece, so k_i can fall below n_segments."""
    if n_segments < 1:
        raise ValueError(f"superpixels per image (--superpixels) must be at least 1, got {n_segments}")
    raw = [skimage.segmentation.slic(image, n_segments=n_segments, compactness=compactness, max_num_iter=10,
                                     enforce_connectivity=True, convert2lab=True, start_label=0, channel_axis=-1)
           for image in rgb.detach().float().permute(0, 2, 3, 1).cpu().numpy()]
    labels = np.stack([(np.cumsum(np.bincount(r.ravel()) > 0) - 1)[r] for r in raw])  # consecutive 0..k_i-1
    labels = torch.from_numpy(labels).to(rgb.device, torch.int64)
    return labels, int(labels.max()) + 1


def superpixel_graph(rgb, n_segments=200, compactness=10.0):
    """Superpixels of a batch of [0,1] images [B,3,H,W] and their region graph, as a dict of tensors:
    labels [B,H,W], lab / rgb [B,K,3] mean colours, pos [B,K,2] mean (y, x) in [0,1], valid [B,K] (non-empty),
    adj [B,K,K] (4-neighbour touching, no self loops), boundary [B,K] (touches the image border)."""
    b, _, h, w = rgb.shape
    labels, k = slic_labels(rgb, n_segments, compactness)
    flat = labels.flatten(1)
    ys, xs = torch.meshgrid(*(torch.linspace(0, 1, n, device=rgb.device) for n in (h, w)), indexing="ij")
    pix = torch.cat([rgb_to_lab(rgb), rgb, torch.stack([ys, xs]).expand(b, 2, h, w)], 1).flatten(2).transpose(1, 2)
    sums = pix.new_zeros(b, k, pix.shape[-1]).scatter_add_(1, flat[..., None].expand(-1, -1, pix.shape[-1]), pix)
    counts = pix.new_zeros(b, k).scatter_add_(1, flat, torch.ones_like(flat, dtype=pix.dtype))
    means = sums / counts.clamp_min(1)[..., None]
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
    lo, hi = maps.flatten(1).min(1).values.view(-1, 1, 1), maps.flatten(1).max(1).values.view(-1, 1, 1)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def _solve(matrix, rhs, valid):
    """Solve matrix @ x = rhs per batch item, the rows / columns of empty superpixels replaced by identity. One system
    at a time: torch's batched CPU LU fails on some batches whose every system solves alone."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device).expand_as(matrix)
    matrix = torch.where(valid[:, :, None] & valid[:, None, :], matrix, eye)
    return torch.stack([torch.linalg.solve(m, r) for m, r in zip(matrix, torch.where(valid, rhs, 0.0))])


def _valid_min_max(values, valid):
    """Min-max over the non-empty superpixels (dim 1) to [0,1]; the empty ones become 0."""
    lo = torch.where(valid, values, math.inf).min(1, keepdim=True).values
    hi = torch.where(valid, values, -math.inf).max(1, keepdim=True).values
    return torch.where(valid, (values - lo) / (hi - lo).clamp_min(1e-12), 0.0)


# ---- priors ----
def rbd_prior(graph, sigma_clr=10.0, sigma_bndcon=1.0, sigma_spa=0.25, mu=0.1, bg_lambda=1.0):
    """RBD, robust background detection (Zhu et al., CVPR 2014): boundary connectivity from geodesic distances,
    background-weighted contrast, least-squares optimisation; bg_lambda, background weight: paper 1, authors' code 5."""
    valid, adj, bnd, lab = graph["valid"], graph["adj"], graph["boundary"], graph["lab"]
    pair = valid[:, :, None] & valid[:, None, :]
    d_app = torch.cdist(lab, lab)
    # geodesic distances: edges between touching superpixels and between all border superpixels (as in RBD)
    geo = torch.where((adj | (bnd[:, :, None] & bnd[:, None, :])) & pair, d_app, math.inf)
    geo = geo.masked_fill(torch.eye(geo.shape[-1], dtype=torch.bool, device=geo.device), 0.0)
    for k in range(geo.shape[-1]):  # Floyd-Warshall, all items of the batch at once
        geo = torch.minimum(geo, geo[:, :, k:k + 1] + geo[:, k:k + 1, :])
    span = torch.where(pair, torch.exp(-geo ** 2 / (2 * sigma_clr ** 2)), 0.0)
    bnd_con = (span * bnd[:, None, :]).sum(-1) / span.sum(-1).clamp_min(1e-12).sqrt()  # Len_bnd / sqrt(Area)
    w_bg = 1 - torch.exp(-bnd_con ** 2 / (2 * sigma_bndcon ** 2))
    w_spa = torch.exp(-torch.cdist(graph["pos"], graph["pos"]) ** 2 / (2 * sigma_spa ** 2))
    w_ctr = _valid_min_max((d_app * w_spa * w_bg[:, None, :] * valid[:, None, :]).sum(-1), valid)
    # minimise sum w_bg s^2 + sum w_fg (s - 1)^2 + sum_{ij adjacent} w_ij (s_i - s_j)^2
    w_smooth = torch.where(adj & pair, torch.exp(-d_app ** 2 / (2 * sigma_clr ** 2)) + mu, 0.0)
    system = torch.diag_embed(w_smooth.sum(-1) + bg_lambda * w_bg + w_ctr) - w_smooth
    return normalise(to_pixels(_solve(system, w_ctr, valid).clamp(0, 1), graph["labels"]))


def mc_prior(graph, sigma2=0.1):
    """MC, absorbing Markov chain (Jiang et al., ICCV 2013): border superpixels are duplicated as absorbing nodes;
    saliency is the expected time to absorption N @ 1 with N = (I - Q)^-1."""
    valid, adj, bnd, lab = graph["valid"], graph["adj"], graph["boundary"], graph["lab"]
    pair = valid[:, :, None] & valid[:, None, :]
    feat = _valid_min_max(lab, valid[..., None])  # Lab normalised to [0, 1] per image
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
    evals, evecs = (t.to(x.dtype).flip(-1) for t in torch.linalg.eigh(cov.double()))  # descending
    evals = evals.clamp_min(0)
    share = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp_min(1e-12)
    keep = (share - evals / evals.sum(-1, keepdim=True).clamp_min(1e-12)) < energy  # smallest set with >= energy
    u = evecs * keep[:, None, :]
    centred = x - mean
    dense = ((centred - centred @ u @ u.transpose(1, 2)) ** 2).sum(-1)
    n_max = int(bnd.sum(1).max().clamp_min(1))
    order = bnd.float().argsort(dim=1, descending=True, stable=True)[:, :n_max]  # border superpixels first
    templates = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])) * bnd.gather(1, order)[..., None]
    gram = templates @ templates.transpose(1, 2)  # [B,n,n]; padding templates are zero and get zero codes
    lipschitz = torch.linalg.matrix_norm(gram).clamp_min(1e-6).view(-1, 1, 1)  # Frobenius >= spectral norm
    target = x @ templates.transpose(1, 2)
    alpha = torch.zeros_like(target)  # [B,K,n] sparse codes, by ISTA against the border templates
    for _ in range(ista_iters):
        alpha = alpha - (alpha @ gram - target) / lipschitz
        alpha = alpha.sign() * (alpha.abs() - lam / lipschitz).clamp_min(0)
    sparse = ((x - alpha @ templates) ** 2).sum(-1)
    return _valid_min_max(dense, valid), _valid_min_max(sparse, valid)


def dsr_prior(rgb, n_segments=200, scales=(0.5, 1.0, 2.0), lam=0.01, sigma=0.25):
    """DSR, dense and sparse reconstruction (Li et al., ICCV 2013): errors of reconstructing each superpixel from
    the border templates, averaged over superpixel scales, weighted by an object-biased Gaussian. Simplified: no
    k-means context propagation, and the dense / sparse maps are averaged instead of Bayes-integrated."""
    errors = (0, 0)  # dense, sparse: per pixel, averaged over the scales
    for s in scales:
        graph = superpixel_graph(rgb, max(8, round(n_segments * s)))
        errors = [e + to_pixels(x, graph["labels"]) / len(scales) for e, x in zip(errors, _dsr_errors(graph, lam=lam))]
    ys, xs = torch.meshgrid(*(torch.linspace(0, 1, n, device=rgb.device) for n in rgb.shape[-2:]), indexing="ij")
    out = 0
    for err in errors:
        mass = err.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1)
        y0, x0 = ((err * c).flatten(1).sum(1).view(-1, 1, 1) / mass for c in (ys, xs))  # the error's centroid
        gauss = torch.exp(-((ys - y0) ** 2 + (xs - x0) ** 2) / (2 * sigma ** 2))  # object-biased Gaussian
        out = out + normalise(err * gauss) / 2
    return normalise(out)


def compute_priors(rgb, names=PRIORS, n_segments=200, rbd_bg_lambda=1.0):
    """Batch of [0,1] images [B,3,H,W] -> {prior name: saliency maps [B,H,W] in [0,1]}."""
    if unknown := set(names) - set(PRIORS):
        raise ValueError(f"unknown prior(s) {sorted(unknown)}; available: {', '.join(PRIORS)}")
    graph = superpixel_graph(rgb, n_segments) if {"rbd", "mc"} & set(names) else None
    prior = {"rbd": lambda: rbd_prior(graph, bg_lambda=rbd_bg_lambda), "mc": lambda: mc_prior(graph),
             "dsr": lambda: dsr_prior(rgb, n_segments)}
    return {name: prior[name]() for name in names}


# ---- dense CRF (Krähenbühl & Koltun, NeurIPS 2011), as DeepUSPS applies it to every prediction ----
def _symmetric_filter(kernel_apply, q, ones_response):
    """pydensecrf's NORMALIZE_SYMMETRIC: D^-1/2 K D^-1/2 q with D = K 1 (the pixel itself included)."""
    norm = ones_response.clamp_min(1e-20).rsqrt()
    return norm * kernel_apply(norm * q)


def dense_crf(prob, rgb, iters=5, gauss_sxy=3.0, gauss_compat=3.0, bil_sxy=80.0, bil_srgb=13.0, bil_compat=10.0,
              reference_size=432, max_sources=256):
    """Mean-field inference of the fully connected two-label CRF (Potts, symmetric normalisation), DeepUSPS's
    parameters: prob [B,H,W] saliency, rgb [B,3,H,W], both in [0,1] -> refined saliency [B,H,W]. Unary -log p;
    spatial sigmas in pixels of DeepUSPS's 432 px maps, scaled to this size. The bilateral kernel is exact between
    every pixel and a grid of at most max_sources source pixels, each standing for its cell: O(HW x sources)."""
    _, h, w = prob.shape
    scale = max(h, w) / reference_size
    ys, xs = torch.meshgrid(*(torch.arange(n, device=prob.device, dtype=torch.float32) for n in (h, w)), indexing="ij")
    step = max(1, math.ceil(math.sqrt(h * w / max_sources)))
    src = ((ys % step == step // 2) & (xs % step == step // 2)).flatten().nonzero()[:, 0]  # grid of sources
    pos = torch.stack([ys, xs], -1).flatten(0, 1) / (bil_sxy * scale)
    sigma = gauss_sxy * scale  # separable Gaussian kernel, zero outside the image
    radius = max(1, math.ceil(3 * sigma))
    g = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32, device=prob.device) ** 2 / (2 * sigma ** 2))

    def gauss(q):  # [1,H,W] -> Gaussian filter response [1,H,W]
        q = F.conv2d(q[:, None], g.view(1, 1, 1, -1), padding=(0, radius))
        return F.conv2d(q, g.view(1, 1, -1, 1), padding=(radius, 0))[:, 0]
    out = []
    for p, image in zip(prob.float().clamp(1e-5, 1 - 1e-5), rgb.float()):
        f = torch.cat([pos, image.flatten(1).T * (255 / bil_srgb)], 1)
        kernel = f @ f[src].T  # -> exp(-|f_i - f_j|^2 / 2) of every pixel and source, in place (the largest array)
        kernel.sub_(0.5 * (f * f).sum(1, keepdim=True)).sub_(0.5 * (f[src] * f[src]).sum(1)[None])
        kernel = kernel.clamp_(-40, 0).exp_() * step ** 2  # below -40 the kernel is 0 to float precision

        def bil(q):  # [1,H,W] -> bilateral filter response [1,H,W]
            return (kernel @ q.flatten()[src]).view(1, h, w)
        ones = torch.ones(1, h, w, device=p.device)
        ones_bil, ones_gauss = bil(ones), gauss(ones)
        m_bil1, m_gauss1 = _symmetric_filter(bil, ones, ones_bil), _symmetric_filter(gauss, ones, ones_gauss)
        unary_logit = (torch.log(p) - torch.log1p(-p))[None]  # -U(fg) + U(bg)
        q = p[None]
        for _ in range(iters):
            # Potts: label l gains compat x (filtered Q of l); fg - bg, with Q(bg) = 1 - Q(fg) and linear filters
            m_bil = 2 * _symmetric_filter(bil, q, ones_bil) - m_bil1
            m_gauss = 2 * _symmetric_filter(gauss, q, ones_gauss) - m_gauss1
            q = torch.sigmoid(unary_logit + gauss_compat * m_gauss + bil_compat * m_bil)
        out.append(q[0])
    return torch.stack(out)


# ---- DeepUSPS training: per-prior networks with self-supervised label refinement, then fusion ----
def f_measure_loss(prob, target, beta2=1.0, eps=1e-5):
    """DeepUSPS's continuous F-measure loss: 1 - F_beta from soft TP / FP / FN per image, mean over the batch.
    prob, target [B,H,W] in [0,1]; beta2 weighs recall (DeepUSPS: 1 per prior, 4 for the fusion)."""
    tp, fp, fn = (x.flatten(1).sum(1) for x in (prob * target, prob * (1 - target), (1 - prob) * target))
    precision, recall = tp / (tp + fp + eps), tp / (tp + fn + eps)
    return (1 - (1 + beta2) * precision * recall / (beta2 * precision + recall + eps)).mean()


def update_moving_average(average, crf_map, momentum, epoch):
    """DeepUSPS's moving average of the CRF maps after epoch `epoch` (1-based): mva <- momentum * mva + (1 - momentum)
    * crf_map from mva = 0, divided by 1 - momentum^epoch (Adam's bias correction: few epochs are not pulled to 0)."""
    return (momentum * (1 - momentum ** (epoch - 1)) * average + (1 - momentum) * crf_map) / (1 - momentum ** epoch)


def _load_rgb(path, size):
    """Image file -> float tensor [3,size,size] in [0,1] (bilinear resize) and its original (H, W)."""
    image = load_image(path)
    arr = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1), (image.height, image.width)


def _to_png_array(prob, orig_size):
    """Probability map [h,w] in [0,1] -> uint8 array at the original size (bilinear)."""
    prob = F.interpolate(prob[None, None].float(), size=tuple(orig_size), mode="bilinear", align_corners=False)
    return (prob[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def write_priors(paths, out, args, device):
    """The priors of every image not yet written -> OUT/priors/<name>/<stem>.png; OUT/priors/settings.json records
    what made them (prior flags; images' paths, sizes, times): reruns with the same skip done ones, others redo all."""
    made = {"prior_size": args.prior_size, "superpixels": args.superpixels, "rbd_bg_lambda": args.rbd_bg_lambda,
            "images": files_digest(paths)}
    record = out / "priors" / "settings.json"
    if record.is_file() and json.loads(record.read_text()) != made:
        print(f"{out / 'priors'}: made with other settings or images, made again")
        shutil.rmtree(out / "priors")
    write_json(made, record)
    todo = [p for p in paths if not all((out / "priors" / n / f"{p.stem}.png").is_file() for n in args.priors)]
    for idx in tqdm(batches(len(todo), args.batch_size), desc="priors", disable=not todo):
        rgb, sizes = zip(*(_load_rgb(todo[i], args.prior_size) for i in idx))
        maps = compute_priors(torch.stack(rgb).to(device), args.priors, args.superpixels, args.rbd_bg_lambda)
        for name, m in maps.items():
            for i, prior, size in zip(idx, m, sizes):
                save_png(_to_png_array(prior, size), out / "priors" / name / f"{todo[i].stem}.png")


def read_maps(folder, stems, size):
    """Saliency maps OUT/.../<stem>.png (0..255) resized to the training size -> [N,size,size] float in [0,1]."""
    arrays = (np.asarray(load_image(folder / f"{s}.png").convert("L"), dtype=np.float32) / 255 for s in stems)
    return torch.stack([F.interpolate(torch.from_numpy(a)[None, None], size=(size, size), mode="bilinear",
                                      align_corners=False)[0, 0] for a in arrays])


def write_maps(maps, folder, stems):
    """[N,S,S] maps in [0,1] -> folder/<stem>.png (0..255, atomic), at the training size."""
    for m, stem in zip(maps, stems):
        save_png((m.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), folder / f"{stem}.png")


class Features:
    """The frozen backbone's three feature maps of images by index (features[idx]: float [len(idx),C,h,w] on the
    device). The first images' are kept (fp16, on the device) up to cache_bytes, the others recomputed per batch."""

    def __init__(self, net, paths, size, batch_size, device, cache_bytes):
        self.net, self.paths, self.size, self.device = net, paths, size, device
        per_image = sum(f.numel() * 2 for f in self._compute([0]))  # bytes
        self.cached = min(len(paths), int(cache_bytes // per_image))
        bar = tqdm(batches(self.cached, batch_size), desc="features", disable=not self.cached)
        chunks = [self._compute(idx) for idx in bar]
        self.cache = [torch.cat(level) for level in zip(*chunks)] if chunks else None

    @torch.no_grad()
    def _compute(self, idx):
        x = torch.stack([image_to_tensor(load_image(self.paths[i]), self.size) for i in idx]).to(self.device)
        return [f.half() for f in self.net.backbone(x)]

    def __getitem__(self, idx):
        if not all(i < self.cached for i in idx):
            return [f.float() for f in self._compute(idx)]
        index = torch.as_tensor(idx).pin_memory() if self.device.type == "cuda" else torch.as_tensor(idx)
        index = index.to(self.device, non_blocking=True)  # pinned: the host does not wait for the GPU
        return [f[index].float() for f in self.cache]


def batches(n, batch_size, generator=None):
    """Index batches over n images: a seeded permutation with a generator, in order without."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]


@torch.no_grad()
def predict(net, feats, paths, idx, args):
    """Saliency [len(idx),S,S] of the images idx (sigmoid), through the dense CRF with --crf (DeepUSPS)."""
    net.eval()
    pred = torch.sigmoid(net.decode(feats[idx], (args.image_size, args.image_size)).float())
    if args.crf:
        pred = dense_crf(pred, torch.stack([_load_rgb(paths[i], args.image_size)[0] for i in idx]).to(pred.device))
    return pred


def train_epoch(net, optimizer, precision, feats, target_dirs, stems, args, beta2, generator):
    """One epoch on fixed targets: target_dirs, a list of (folder, threshold), one binarised label set each (the loss
    averaged over them); precision: model.mixed_precision's (autocast, scaler). Mean loss (not finite if any was)."""
    autocast, scaler = precision
    net.train()
    size, device, total = args.image_size, next(net.parameters()).device, 0.0
    for idx in batches(len(stems), args.batch_size, generator):
        names = [stems[i] for i in idx]
        targets = [(read_maps(d, names, size) >= t).float().to(device) for d, t in target_dirs]
        with autocast():
            logits = net.decode(feats[idx], (size, size)).float()
        loss = torch.stack([f_measure_loss(torch.sigmoid(logits), t, beta2) if args.loss == "fmeasure"
                            else F.binary_cross_entropy_with_logits(logits, t) for t in targets]).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total = total + loss.detach().double() * len(idx)  # read once an epoch: no wait for the GPU per batch
    return total.item() / len(stems)


def refine(net, feats, paths, args, epoch, previous_dir, out_dir):
    """After epoch `epoch` (1-based): every image's prediction (through the CRF with --crf) updates its moving average
    (previous_dir -> out_dir, PNG files: the average never lives in memory or in the checkpoint)."""
    for idx in batches(len(paths), args.batch_size):
        pred = predict(net, feats, paths, idx, args)
        names = [paths[i].stem for i in idx]
        previous = read_maps(previous_dir, names, args.image_size).to(pred.device) if epoch > 1 else pred
        write_maps(update_moving_average(previous, pred, args.momentum, epoch), out_dir, names)


def decoder_state(net):
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("backbone.")}


def priors_flag(text):
    """--priors: a comma-separated subset of PRIORS -> list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(PRIORS):
        raise argparse.ArgumentTypeError(f"expected a subset of {','.join(PRIORS)}, got {text!r}")
    return names


def prior_thresholds_flag(text):
    """--prior-thresholds: name=value,... (names of PRIORS, values in [0, 1]) -> every prior's threshold."""
    thresholds = dict(PRIOR_THRESHOLDS)
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in PRIORS:
            raise argparse.ArgumentTypeError(f"{item!r}: unknown prior {name!r} (available: {', '.join(PRIORS)})")
        thresholds[name] = unit_float(value)
    return thresholds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    add("--images", required=True, help="folder of unlabelled training images")
    add("--list", help="optional file of image stems to use")
    add("--out", required=True, help="output folder")
    add("--priors", type=priors_flag, default=",".join(PRIORS), help=f"comma-separated subset of {','.join(PRIORS)}")
    add("--priors-only", action="store_true", help="only write OUT/priors/<prior>/<stem>.png")
    add("--prior-size", type=positive_int, default=256, help="priors are computed at this square size")
    add("--superpixels", type=positive_int, default=200, help="SLIC superpixels per image for the priors")
    add("--rbd-bg-lambda", type=nonnegative_float, default=1.0, help="RBD background weight: paper 1, authors' code 5")
    add("--prior-thresholds", type=prior_thresholds_flag, default="",
        help="first-round binarisation per prior, e.g. rbd=0.25,mc=0.31 (default: DeepUSPS's values)")
    add("--backbone", default="resnet101", choices=BACKBONES, help="frozen ImageNet backbone; DeepUSPS: Cityscapes DRN")
    add("--weights", default="imagenet", help="imagenet | none | PATH (backbone weights)")
    add("--image-size", type=positive_int, default=320, help="square training size of the saliency networks")
    add("--rounds", type=positive_int, default=3, help="DeepUSPS refinement rounds per prior (DeepUSPS: 3)")
    add("--epochs", type=positive_int, default=25, help="epochs per refinement round (DeepUSPS: 25)")
    add("--fusion-epochs", type=positive_int, help="epochs of the fusion network (DeepUSPS: 200; None: --epochs)")
    add("--momentum", type=momentum_float, default=0.7, help="moving average: momentum * mva + (1-momentum) * crf")
    add("--threshold", type=unit_float, default=0.5, help="binarisation of the moving averages (rounds 2+)")
    add("--loss", default="fmeasure", choices=("fmeasure", "bce"), help="continuous F-measure (DeepUSPS) or pixel BCE")
    add("--beta2", type=positive_float, default=1.0, help="F-measure loss weight of recall per prior (DeepUSPS 1)")
    add("--fusion-beta2", type=positive_float, default=4.0, help="the same for the fusion network (DeepUSPS 4)")
    add("--crf", action=argparse.BooleanOptionalAction, default=True, help="dense CRF on every prediction (DeepUSPS)")
    add("--batch-size", type=positive_int, default=16, help="images per training step")
    add("--feature-cache-gb", type=nonnegative_float, default=4.0, help="backbone feature cache in GB; rest recomputed")
    add("--lr", type=positive_float, default=1e-3, help="Adam learning rate of the decoder")
    add("--seed", type=int, default=0, help="random seed (same seed, same run)")
    add_device_flags(p, workers=False)
    add("--resume", action="store_true", help="continue from OUT/last.pt at its last finished epoch")
    args = p.parse_args(argv)
    args.fusion_epochs = args.fusion_epochs or args.epochs
    return args


class Progress:
    """Where the run stands, in OUT/last.pt: the last finished (task, epoch), the decoder and optimizer (a task: one
    round of one prior, or the fusion). --resume skips done tasks (their outputs are files), continues the current."""

    def __init__(self, out, args, paths, config, init):
        self.path, self.log_path, self.args, self.paths = out / "last.pt", out / "log.jsonl", args, paths
        self.config, self.init, self.stems = config, init, [p.stem for p in paths]
        self.task, self.epoch, self.state, self.log_lines = 0, 0, None, 0
        if args.resume and self.path.is_file():
            state = resume_checkpoint(self.path, "saliency", args, RESUME_FREE)
            if state.get("stems") != self.stems or state["config"] != config:
                raise ValueError(f"{self.path} belongs to another run (other images or network); use another --out "
                                 f"or drop --resume")
            self.task, self.epoch, self.log_lines, self.state = state["task"], state["epoch"], state["log_lines"], state
            restore_rng(state["rng"])
        trim_log(self.log_path, self.log_lines)  # drop epochs logged after the checkpoint (a kill between the two)

    def train(self, task, net, feats, name, target_dirs, epochs, beta2, refine_to=None):
        """Task number `task`: the seeded decoder trained on fixed targets for `epochs` epochs (or resumed); with
        refine_to = (out, prior, round), the moving averages updated after every epoch (DeepUSPS)."""
        if task < self.task:
            return  # finished before --resume
        args, paths, stems = self.args, self.paths, self.stems
        optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=args.lr)
        autocast, scaler = mixed_precision(next(net.parameters()).device)
        first = self.epoch if task == self.task and self.state is not None else 0
        if first:  # resumed mid-task: the checkpoint holds the decoder
            load_training_state(self.state, net, optimizer, scaler, strict=False)
        else:
            net.load_state_dict(self.init, strict=False)  # every task starts from the same seeded decoder
        generator = seeded_generator(args.seed, task)
        for _ in range(first):  # the batch orders of the finished epochs, as in an uninterrupted run
            torch.randperm(len(paths), generator=generator)
        bar = tqdm(range(first, epochs), desc=name if refine_to is None else f"{name} round {refine_to[2] + 1}")
        guard = FiniteGuard()
        for epoch in bar:
            loss = train_epoch(net, optimizer, (autocast, scaler), feats, target_dirs, stems, args, beta2, generator)
            step = self.log_lines + 1  # an epoch is a step of log.jsonl
            guard.record(step, loss)
            guard.check(step, net)  # before its moving averages and its checkpoint
            bar.set_postfix(loss=f"{loss:.4f}")
            if refine_to is not None:
                refine(net, feats, paths, args, epoch + 1, mva_dir(*refine_to, epoch), mva_dir(*refine_to, epoch + 1))
            append_line(self.log_path, {"step": step, "task": name, "round": (refine_to or (0, 0, 0))[2] + 1,
                                        "epoch": epoch + 1, "loss": loss})
            self.task, self.epoch, self.log_lines = task, epoch + 1, step
            save_checkpoint(self.path, kind="saliency", config=self.config,
                            **training_state(decoder_state(net), optimizer, scaler), task=task, epoch=epoch + 1,
                            log_lines=step, args=vars(args), stems=stems)


def mva_dir(out, name, rnd, epoch):
    """Moving averages of prior `name`'s round rnd (0-based) after `epoch` epochs: two folders used in turn, so that
    a kill while one is written leaves the other, which the checkpoint points to, intact."""
    return out / "refine" / name / f"round{rnd + 1}" / f"mva{epoch % 2}"


@exits_on_bad_input
def main(argv=None):
    args = parse_args(argv)
    check_apart({"--out": args.out}, {"--images": args.images, "--list": args.list})
    out, device = start_run(args)
    paths = list_images(args.images, args.list)
    write_priors(paths, out, args, device)
    if args.priors_only:
        print(f"wrote {len(args.priors)} prior map(s) for {len(paths)} images to {out / 'priors'}")
        return
    torch.manual_seed(args.seed)             # the decoder's initialisation, after the priors whatever they drew
    net = SaliencyNet(args.backbone, args.weights).to(device)
    config = {**net.config, "image_size": args.image_size}
    progress = Progress(out, args, paths, config, decoder_state(net))
    feats = Features(net, paths, args.image_size, args.batch_size, device, args.feature_cache_gb * 2 ** 30)
    # Phase I (DeepUSPS), per prior: rounds on fixed targets, the binarised prior first, then the last round's averages
    task, refined = 0, []
    for name in args.priors:
        targets = (out / "priors" / name, args.prior_thresholds[name])
        for rnd in range(args.rounds):
            progress.train(task, net, feats, name, [targets], args.epochs, args.beta2, refine_to=(out, name, rnd))
            targets = (mva_dir(out, name, rnd, args.epochs), args.threshold)
            task += 1
        if progress.task < task:  # the prior's refined network, for measuring it (a resumed run past it saved it)
            save_checkpoint(out / f"{name}.pt", kind="saliency", config=config, model=net.state_dict(), args=vars(args))
        refined.append(targets)
    # Phase II: the fusion network, trained on every prior's refined labels at once (loss averaged over them)
    progress.train(task, net, feats, "fusion", refined, args.fusion_epochs, args.fusion_beta2)
    save_checkpoint(out / "saliency.pt", kind="saliency", config=config, model=net.state_dict(), args=vars(args))
    for idx in tqdm(batches(len(paths), args.batch_size), desc="write"):
        for i, pr in zip(idx, predict(net, feats, paths, idx, args)):
            arr = _to_png_array(pr, load_image(paths[i]).size[::-1])  # at the image's (H, W)
            save_png(arr, out / "prob" / f"{paths[i].stem}.png")
            save_png(np.where(arr >= 128, 255, 0).astype(np.uint8), out / "labels" / f"{paths[i].stem}.png")
    print(f"wrote {len(paths)} saliency maps to {out / 'prob'} and {out / 'labels'}; network {out / 'saliency.pt'}")


if __name__ == "__main__":
    main()
