"""Stage 5: evaluation.

    python evaluate.py fss --checkpoint last.pt --voc-root VOC2012 --fold all        # few-shot mIoU (paper section 4)
    python evaluate.py merge fold0.json fold1.json ... --out results.json                # per-fold files, one table
    python evaluate.py predict --checkpoint last.pt --support IMG MASK --query DIR --out DIR  # your own images
"""
import argparse
import contextlib
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from datasets import (EPISODE_SAMPLINGS, FOLDER_DATASETS, IGNORE, FewShotEpisodes, check_same_size, image_to_tensor,
                      list_images, load_binary_mask, load_image, make_loader, resize_mask, save_png)
from model import (IMAGENET_MEAN, IMAGENET_STD, HelpFormatter, add_device_flags, atomic_file, check_apart,
                   check_output, configure_backends, exits_on_bad_input, hold, load_network, mixed_precision,
                   pick_device, positive_int, write_json)


# ---- fss: one-shot / k-shot evaluation (paper section 4) ----


class FewShotMetric:
    """The one implementation of the few-shot numbers, fed one episode at a time (255 = ignored pixels).
    miou_episode_mean: the authors' code's, which made the paper's numbers: per class the mean of the per-episode
        foreground IoU, then the mean over the fold's classes. miou: HSNet's / PFENet's standard: per class the
        intersection summed over the episodes / the union summed over them, averaged over the classes.
    fbiou: the mean of the foreground and the background IoU, each summed over all episodes."""

    def __init__(self):
        self.inter, self.union, self.episode_iou = {}, {}, {}     # per class: sums, and the per-episode IoUs
        self.fb_inter, self.fb_union = np.zeros(2), np.zeros(2)   # [background, foreground]

    def add(self, class_id, counts):
        """One episode's episode_counts, as ints -> the foreground's (intersection, union)."""
        self.fb_inter += counts[0::2]                            # [background, foreground]
        self.fb_union += counts[1::2]
        c, inter, union = int(class_id), counts[2], counts[3]    # the foreground's intersection and union
        self.inter[c], self.union[c] = self.inter.get(c, 0) + inter, self.union.get(c, 0) + union
        if union > 0:  # an episode without foreground in query nor prediction has no IoU
            self.episode_iou.setdefault(c, []).append(inter / union)
        return inter, union

    def summary(self):
        classes = sorted(self.union)
        per_class = {c: self.inter[c] / self.union[c] if self.union[c] else float("nan") for c in classes}
        episode_mean = {c: float(np.mean(self.episode_iou[c])) for c in classes if c in self.episode_iou}
        fb = self.fb_inter / np.maximum(self.fb_union, 1)
        return {
            "miou": float(np.nanmean(list(per_class.values()))) if classes else float("nan"),
            "fbiou": float(fb.mean()),
            "miou_episode_mean": float(np.mean(list(episode_mean.values()))) if episode_mean else float("nan"),
            "per_class": {str(c): v for c, v in per_class.items()},
            "per_class_episode_mean": {str(c): v for c, v in episode_mean.items()},
        }


def episode_counts(pred, target):
    """The intersection and union of the background and of the foreground over the pixels not ignored (255):
    int64 [4] on the masks' device, read by the host once a chunk of episodes (no wait for the GPU per episode)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid, counts = target != IGNORE, []
    for value in (0, 1):                                         # background, foreground
        p, t = (pred == value) & valid, (target == value) & valid
        counts += [(p & t).sum(), (p | t).sum()]
    return torch.stack(counts)


def parse_folds(text, dataset):
    if dataset in FOLDER_DATASETS:              # class folders: one "fold" holding every class
        return [0]
    if text == "all":
        return [0, 1, 2, 3]
    try:
        folds = [int(f) for f in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: --fold must be 0..3, 'all' or a list like 1,2,3, got {text!r}") from None
    if any(f not in (0, 1, 2, 3) for f in folds):
        raise SystemExit(f"error: {dataset} has folds 0..3, got --fold {text}")
    return folds


FSS_DESCRIPTION = """One-shot (k-shot) segmentation on PASCAL-5i or COCO-20i test episodes (paper section 4): 5 runs x
2500 episodes per fold; or on class folders (your own classes, FSS-1000). Prints both mIoU: mIoU-episode (the authors'
code, which produced the paper's numbers: compare with it) and mIoU-summed (the HSNet / PFENet standard), FB-IoU."""


def add_fss_args(p):
    p.add_argument("--checkpoint", help="train_fss.py checkpoint (last.pt); not needed with --baseline saliency")
    p.add_argument("--dataset", choices=["pascal", "coco", *FOLDER_DATASETS], default="pascal",
                   help="PASCAL-5i or COCO-20i (section 4); folders: ROOT/<class>/<name>.jpg with its binary mask "
                        "<name>.png beside it; fss1000: FSS-1000 (that layout), every listed class's image a query once")
    p.add_argument("--voc-root", help="PASCAL VOC 2012 tree (--dataset pascal)")
    p.add_argument("--coco-root", help="COCO root: <image set>/, annotations/instances_<image set>.json")
    p.add_argument("--root", help="folder of class folders (--dataset folders, fss1000)")
    p.add_argument("--class-list", help="file of class folder names to evaluate (fss1000: HSNet's test split, "
                                        "data/splits/fss/test.txt of its repository)")
    p.add_argument("--fold", default="all", help="0, 1, 2, 3, all, or a list like 1,2,3")
    p.add_argument("--shots", type=positive_int, default=1, help="support images per episode (paper: one-shot)")
    p.add_argument("--runs", type=positive_int, default=5, help="runs; run r uses seed + r (paper section 4: 5 runs)")
    p.add_argument("--episodes", type=positive_int, default=2500, help="episodes per run (paper section 4: 2500 tasks)")
    p.add_argument("--seed", type=int, default=0, help="episodes of run r are drawn with seed + r")
    p.add_argument("--coco-folds", choices=["interleaved", "contiguous"], default="interleaved",
                   help="COCO-20i fold i: interleaved {4k+i+1} (HSNet, PFENet, RePRI), contiguous 20i+1..20i+20 (the "
                        "authors' code)")
    p.add_argument("--episode-sampling", choices=EPISODE_SAMPLINGS,
                   help="pair (default; fss1000: every): the query is an (image, class) pair with >= 2048 px of the "
                        "class (class folders: any), drawn uniformly; image: the authors' code: an image holding a "
                        "fold class of >= 2048 px, then a class uniformly among all fold classes present in it, of "
                        "any size; every: each (image, class) pair the query once, --episodes ignored (HSNet's "
                        "FSS-1000: 2,400 episodes)")
    p.add_argument("--coco-masks", choices=["full", "repri"], default="full",
                   help="COCO class masks: full = every polygon, crowd ignored (255); repri = what the authors "
                        "evaluated on (RePRI's script): the first polygon of each object only, crowd as background")
    p.add_argument("--image-set", help="pascal: an ImageSets/Segmentation name or a list file (default val); coco: "
                                       "e.g. val2014 (default: the only annotations/instances_*.json)")
    p.add_argument("--pair-list", help="file (or folder of fold<i>.txt) of '<image id>__<class>' lines restricting "
                                        "the episodes' (image, class) pairs, e.g. HSNet's splits/pascal/val/fold1.txt")
    p.add_argument("--image-size", type=positive_int, default=400, help="query/support side (paper section 4: 400)")
    p.add_argument("--eval-resolution", choices=["resized", "original"], default="resized",
                   help="resized: at --image-size, as the paper's code; original: logits upsampled to the mask's size")
    p.add_argument("--baseline", choices=["saliency", "foreground"],
                   help="no network: saliency = the query's own pseudo-mask is the prediction (Table 3's Saliency* "
                        "row; needs --masks); foreground = every pixel is foreground (a sanity floor, ours)")
    p.add_argument("--masks", help="pseudo-mask folder: the saliency baseline's predictions, a column of --figure")
    p.add_argument("--save-episodes", help="JSON-lines file: one line per episode to recompute the metric")
    p.add_argument("--figure", help="PNG: a grid of episodes like Figure 5, each row with its fold, class and IoU")
    p.add_argument("--figure-episodes", type=positive_int, default=2,
                   help="rows of --figure per evaluated fold (the first episodes of run 0)")
    p.add_argument("--episode-batch", type=positive_int, default=25,
                   help="episodes through the head at once, their counts read by the host at once (no number changes)")
    add_device_flags(p)
    p.add_argument("--out", default="results.json", help="results JSON (per fold, mean over folds, config)")


class FeatureCache:
    """Within one run each distinct image goes through the backbone once: its projected features are kept until the
    last episode that uses it (the episode list is known in advance), then dropped."""

    def __init__(self, net, last_use):
        self.net, self.last_use, self.store, self.forwards = net, last_use, {}, 0

    def get(self, image_id, image, device):
        if image_id not in self.store:
            image = image[None].to(device, non_blocking=True)
            self.store[image_id], self.forwards = self.net.project_features(self.net.extract(image)), self.forwards + 1
        return self.store[image_id]

    def logits(self, items, device):
        """Logits [E, 2, S, S] of a batch of E episodes (their items): the backbone per distinct image, the head once
        for all E; then the features no later episode uses go."""
        query = [self.get(it["query_id"], it["query_img"], device) for it in items]
        support = [self.get(i, img, device) for it in items for i, img in zip(it["support_ids"], it["support_imgs"])]
        masks = torch.cat([it["support_masks"] for it in items]).to(device, non_blocking=True)      # [E * k, S, S]
        prototypes = self.net.prototypes([torch.cat(f) for f in zip(*support)], masks, len(items[0]["support_ids"]))
        logits = self.net.decode([torch.cat(f) for f in zip(*query)], prototypes, items[0]["query_img"].shape[-2:])
        for image_id in [i for i in self.store if self.last_use[i] <= items[-1]["episode"]]:
            del self.store[image_id]
        return logits


def predicted_mask(logits, size):
    """Logits [2, S, S] -> the 0/1 mask [H, W] at `size`, on their device: the logits upsampled bilinearly where
    the sizes differ, then the argmax of the two classes: foreground where its logit is the larger (a tie is
    background, as argmax's first index)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return (logits[1] > logits[0]).long()


def run_episodes(net, ds, args, device, run, log_file, figure_rows):
    """One run over ds's episodes, --episode-batch at a time -> (metric summary, backbone forwards)."""
    last_use = {image_id: i for i in range(len(ds)) for image_id in [ds.episode_ids(i)[0], *ds.episode_ids(i)[1]]}
    cache, metric, batch = FeatureCache(net, last_use), FewShotMetric(), []
    loader = make_loader(ds, device, args.workers, batch_size=None)
    for i, item in enumerate(tqdm(loader, desc=f"fold {ds.fold} run {run}", leave=False)):
        batch.append(item)
        if len(batch) == args.episode_batch or i == len(ds) - 1:
            record(batch, predictions(cache, batch, args, device), metric, ds, args, run, log_file, figure_rows)
            batch = []
    return metric.summary(), cache.forwards


def predictions(cache, batch, args, device):
    """(prediction at the metric's resolution, prediction at --image-size) of each episode of a batch, on `device`:
    the network's (its head once for the whole batch), or a baseline's."""
    if args.baseline is None:
        autocast, _ = mixed_precision(device)
        with torch.no_grad(), autocast():
            logits = cache.logits(batch, device)
    preds = []
    for j, item in enumerate(batch):
        sizes = [target(item, args).shape, item["query_mask"].shape]
        if args.baseline == "foreground":
            preds.append([torch.ones(size, dtype=torch.int64) for size in sizes])
        elif args.baseline == "saliency":  # Saliency* baseline: the query's own pseudo-mask is the prediction,
            # resized by the ground truth's own resize (resize_mask), so a pseudo-mask equal to the truth scores 1
            preds.append([resize_mask(item["query_pseudo_mask"], size) for size in sizes])
        else:
            preds.append([predicted_mask(logits[j], size) for size in sizes])
    return preds


def target(item, args):
    """The ground truth the metric counts on: at --image-size, or at the image's own size (--eval-resolution)."""
    return item["query_mask_orig"] if args.eval_resolution == "original" else item["query_mask"]


def record(batch, preds, metric, ds, args, run, log_file, figure_rows):
    """A batch's episodes into the metric, the log and the figure: their counts read in one copy to the host (no
    wait for the GPU between episodes)."""
    counts = torch.stack([episode_counts(pred, target(item, args).to(pred.device, non_blocking=True))
                          for (pred, _), item in zip(preds, batch)]).tolist()
    for item, (_, pred_small), c in zip(batch, preds, counts):
        inter, union = metric.add(int(item["class_id"]), c)
        if log_file is not None:
            episode = {"run": run, "fold": ds.fold, "episode": item["episode"], "query": item["query_id"],
                       "supports": list(item["support_ids"]), "class": int(item["class_id"])}
            log_file.write(json.dumps({**episode, "intersection": inter, "union": union}) + "\n")
        if args.figure and run == 0 and item["episode"] < args.figure_episodes:
            figure_rows.append((item, pred_small.cpu(), ds.fold, ds.class_name(int(item["class_id"])),
                                inter / max(union, 1)))


def figure_grid(rows, path):
    """Figure 5 style grid, one episode per row (item, prediction, fold, class name, IoU): query | support with its
    mask | saliency (the pseudo-mask, with --masks) | prediction | ground truth under column titles, the row's
    fold, class and IoU (the episode's, as the metric counted it) on its left."""
    from torchvision.utils import draw_segmentation_masks, make_grid

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    to_uint8 = lambda x: (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)  # noqa: E731
    overlay = lambda img, m, color: draw_segmentation_masks(img, m.bool(), alpha=0.5, colors=color)  # noqa: E731
    tiles = []
    for item, pred, *_ in rows:
        query = to_uint8(item["query_img"])
        tiles += [query, overlay(to_uint8(item["support_imgs"][0]), item["support_masks"][0] > 0.5, "blue")]
        if "query_pseudo_mask" in item:
            tiles.append(overlay(query, resize_mask(item["query_pseudo_mask"], pred.shape) == 1, "yellow"))
        tiles += [overlay(query, pred == 1, "red"), overlay(query, item["query_mask"] == 1, "green")]
    titles = ["query", "support"] + ["saliency"] * ("query_pseudo_mask" in rows[0][0]) + ["prediction", "truth"]
    grid = make_grid(tiles, nrow=len(titles), padding=4, pad_value=255)
    side = rows[0][1].shape[-1] + 4                               # a tile and its padding
    font = ImageFont.load_default(size=max(11, side // 14))
    labels = [[f"fold {fold}", name, f"IoU {iou:.2f}"] for _, _, fold, name, iou in rows]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 12 + int(max(measure.textlength(text, font=font) for label in labels for text in label))
    line, top = font.size + 3, 2 * font.size
    canvas = Image.new("RGB", (left + grid.shape[2], top + grid.shape[1]), "white")
    canvas.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((left + 2 + j * side + side // 2, top // 2), title, fill="black", font=font, anchor="mm")
    for i, label in enumerate(labels):
        middle = top + 2 + i * side + side // 2
        for k, text in enumerate(label):
            draw.text((left - 6, middle + (k - 1) * line), text, fill="black", font=font, anchor="rm")
    save_png(canvas, path)


def mean_over_runs(runs):
    """The paper's number of a fold (section 4): the mean, and the standard deviation, over the runs (5 runs of 2500
    episodes, each with its own seed) of each run's mIoU / FB-IoU; per class the mean over the runs."""
    entry = {}
    for key in ("miou", "fbiou", "miou_episode_mean"):
        values = [r[key] for r in runs]
        entry[key], entry[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    for key in ("per_class", "per_class_episode_mean"):
        entry[key] = {c: float(np.mean([r[key][c] for r in runs if c in r[key]]))
                      for c in sorted({c for r in runs for c in r[key]}, key=int)}
    return entry


def run_fold(net, fold, args, device, log_file, figure_rows):
    """The --runs runs of one fold -> (its results entry, backbone forwards, episodes)."""
    runs, forwards, episodes = [], 0, 0
    for run in range(args.runs):
        ds = FewShotEpisodes(dataset=args.dataset, root=dataset_root(args), fold=fold, shots=args.shots,
                             episodes=args.episodes, seed=args.seed + run, image_size=args.image_size,
                             coco_folds=args.coco_folds, pair_list=args.pair_list, pseudo_masks=args.masks,
                             image_set=args.image_set, sampling=args.episode_sampling, coco_masks=args.coco_masks,
                             class_list=args.class_list)
        summary, n = run_episodes(net, ds, args, device, run, log_file, figure_rows)
        runs, forwards, episodes = runs + [summary], forwards + n, episodes + len(ds)
    return {**mean_over_runs(runs), "runs": runs, "class_names": {c: ds.class_name(int(c)) for c in
                                                                  runs[0]["per_class"]}}, forwards, episodes


def dataset_root(args):
    """--voc-root, --coco-root or --root, the one --dataset needs."""
    name = {"pascal": "voc_root", "coco": "coco_root"}.get(args.dataset, "root")
    if getattr(args, name) is None:
        raise SystemExit(f"error: --dataset {args.dataset} needs --{name.replace('_', '-')} DIR")
    if args.dataset == "fss1000" and args.class_list is None:
        raise SystemExit("error: --dataset fss1000 needs --class-list FILE (HSNet's test split of 240 classes, "
                         "data/splits/fss/test.txt of github.com/juhongm999/hsnet)")
    return getattr(args, name)


def run_fss(args):
    if args.baseline == "saliency" and not args.masks:
        raise SystemExit("error: --baseline saliency needs --masks DIR (the pseudo-mask folder)")
    if args.baseline is None and not args.checkpoint:
        raise SystemExit("error: pass --checkpoint last.pt (or --baseline saliency --masks DIR)")
    folds, _ = parse_folds(args.fold, args.dataset), dataset_root(args)
    args.episode_sampling = args.episode_sampling or ("every" if args.dataset == "fss1000" else "pair")
    for path in (args.out, args.save_episodes, args.figure):
        if path:
            check_output(path)
    check_apart({"--out": args.out, "--save-episodes": args.save_episodes, "--figure": args.figure},
                {"--checkpoint": args.checkpoint, "the dataset": dataset_root(args), "--masks": args.masks,
                 "--pair-list": args.pair_list, "--class-list": args.class_list})
    device = pick_device(args.device)
    configure_backends(device)
    net = None if args.baseline else load_network(args.checkpoint, ("fss",), device)[0]
    results, figure_rows, forwards, episodes, start = {}, [], 0, 0, time.time()
    episode_log = atomic_file(args.save_episodes, "w") if args.save_episodes else contextlib.nullcontext()
    with episode_log as log_file:  # a temporary file unique to this run until every episode is in
        for fold in folds:
            results[f"fold{fold}"], n, m = run_fold(net, fold, args, device, log_file, figure_rows)
            forwards, episodes = forwards + n, episodes + m
    results.update(mean=fold_mean(results, folds), backbone_forwards=forwards,
                   episodes_per_s=episodes / (time.time() - start),
                   config={k: v for k, v in vars(args).items() if k != "command"})
    write_json(results, args.out)
    if args.figure:
        figure_grid(figure_rows, args.figure)
    print_table(results, folds)


def fold_mean(results, folds):
    return {key: float(np.mean([results[f"fold{f}"][key] for f in folds]))
            for key in ("miou", "miou_std", "fbiou", "miou_episode_mean", "miou_episode_mean_std")}


# flags that define the numbers: per-fold result files merge only when these agree
PROTOCOL = ("dataset", "shots", "runs", "episodes", "seed", "coco_folds", "image_set", "pair_list", "image_size",
            "eval_resolution", "baseline", "episode_sampling", "coco_masks", "class_list")


def merge_results(paths):
    """Per-fold result files of `evaluate.py fss` (one process per GPU, or per fold-trained model) -> (results,
    folds): the folds side by side, their mean, backbone forwards summed, episodes_per_s of one process doing it
    all, config {"merged": {file: its config}}. ValueError on a fold in two files or on files evaluated with other
    PROTOCOL flags."""
    entries, configs, forwards, episodes, seconds = {}, {}, 0, 0, 0.0
    for path in map(os.fspath, paths):
        try:
            with open(path) as f:
                r = json.load(f)
            config, folds = r["config"], [k for k in r if k.startswith("fold")]
            n = config["runs"] * config["episodes"] * len(folds)
            seconds, forwards = seconds + n / r["episodes_per_s"], forwards + r["backbone_forwards"]
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            raise ValueError(f"{path}: not a results file of `evaluate.py fss` ({type(e).__name__}: {e})") from None
        first_path, first = next(iter(configs.items()), (path, config))
        differ = [k for k in PROTOCOL if config.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"{path} and {first_path} were evaluated with other flags: " + ", ".join(
                f"--{k.replace('_', '-')} {config.get(k)} vs {first.get(k)}" for k in differ))
        for fold in folds:
            if fold in entries:
                raise ValueError(f"{path}: {fold} is also in another file")
            entries[fold] = r[fold]
        configs[path] = config
        episodes += n
    folds = sorted(int(k[len("fold"):]) for k in entries)
    results = {f"fold{f}": entries[f"fold{f}"] for f in folds}
    results.update(mean=fold_mean(results, folds), backbone_forwards=forwards, episodes_per_s=episodes / seconds,
                   config={"merged": configs})
    return results, folds


def run_merge(args):
    check_apart({"--out": args.out}, {"results": args.results})
    check_output(args.out)
    merged, folds = merge_results(args.results)
    write_json(merged, args.out)
    print_table(merged, folds)


METRIC_LEGEND = ("mIoU-episode: per class the mean of the per-episode IoU (the authors' code: compare it with the "
                 "paper's numbers); mIoU-summed: per class summed intersection / summed union (HSNet, PFENet)")


def print_table(results, folds):
    """Both mIoU beside each other (FewShotMetric), the std over runs, FB-IoU; percent."""
    print(METRIC_LEGEND)
    header = ["fold", "mIoU-episode", "std", "mIoU-summed", "std", "FB-IoU"]
    print(" ".join(f"{h:>13}" for h in header))
    for name in [f"fold{f}" for f in folds] + ["mean"]:
        r = results[name]
        values = [r["miou_episode_mean"], r["miou_episode_mean_std"], r["miou"], r["miou_std"], r["fbiou"]]
        print(" ".join(f"{x:>13}" for x in [name] + [f"{100 * v:.1f}" for v in values]))
    if results["config"].get("dataset") in FOLDER_DATASETS:     # class folders: every class's two mIoU
        r = results["fold0"]
        for c, name in r["class_names"].items():
            values = [r["per_class_episode_mean"].get(c, np.nan), r["per_class"][c]]
            print(f"{name[:13]:>13} {100 * values[0]:13.1f} {'':13} {100 * values[1]:13.1f}")
    print(f"backbone forwards {results['backbone_forwards']}, {results['episodes_per_s']:.2f} episodes/s")


# ---- predict: one-shot / k-shot segmentation of your own images ----

PREDICT_DESCRIPTION = """Segment your own query images from one (or k) support images and their masks with a trained
train_fss.py checkpoint: one 0/255 PNG per query, named like it, at its size (--overlay: the prediction in red over
the query). An unreadable query is one error line naming it, and the others are still written; a bad support
(missing file, mask size not its image's, empty mask) stops with one line naming the file."""


def add_predict_args(p):
    p.add_argument("--checkpoint", required=True, help="train_fss.py checkpoint (last.pt)")
    p.add_argument("--support", nargs=2, action="append", required=True, metavar=("IMAGE", "MASK"),
                   help="a support image and its mask (a binary PNG, read as every mask here: README, Bad input); "
                        "repeat for k-shot: the k prototypes are averaged")
    p.add_argument("--query", nargs="+", required=True, help="query image files and/or folders of images")
    p.add_argument("--out", default="predictions", help="folder of the predicted 0/255 masks, <query stem>.png")
    p.add_argument("--overlay", help="folder of overlay PNGs (prediction in red over the query), <query stem>.png")
    p.add_argument("--image-size", type=positive_int, default=400,
                   help="query/support side the network sees (section 4: 400; the size the checkpoint was "
                        "trained at is usually best)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="queries per forward pass")
    add_device_flags(p)


class QueryImages(torch.utils.data.Dataset):
    """predict's queries: {"path", "image" [3,S,S], "size" (H, W)}, or {"path", "error"} (one bad query stops none)."""

    def __init__(self, paths, image_size):
        self.paths, self.image_size = paths, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            image = load_image(path)
        except ValueError as e:
            return {"path": path, "error": str(e)}
        return {"path": path, "image": image_to_tensor(image, self.image_size), "size": (image.height, image.width)}


def query_paths(entries):
    """--query entries (files or folders) -> (image paths, error lines for entries that are neither)."""
    paths, errors = [], []
    for entry in map(pathlib.Path, entries):
        if entry.is_dir():
            paths += list_images(entry)
        elif entry.is_file():
            paths.append(entry)
        else:
            errors.append(f"{entry}: query image or folder not found")
    by_name = {}
    for path in paths:
        if path.stem in by_name and by_name[path.stem] != path:
            raise ValueError(f"{path}: same name as {by_name[path.stem]}, both would write {path.stem}.png")
        by_name[path.stem] = path
    return list(by_name.values()), errors


def load_support(image_path, mask_path, image_size):
    """(image [3,S,S], mask [S,S] float 0/1) of one --support pair, as evaluate's episodes make them."""
    image, mask = load_image(image_path), load_binary_mask(mask_path)
    check_same_size(image, image_path, mask, mask_path)
    if not mask.any():
        raise ValueError(f"{mask_path}: support mask is empty (no foreground pixel): nothing to segment")
    return image_to_tensor(image, image_size), resize_mask(mask, (image_size, image_size)).float()


def overlay_png(path, mask, out):
    """The query at its original size with the predicted mask in red (alpha 0.5)."""
    from torchvision.utils import draw_segmentation_masks

    image = torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)
    save_png(draw_segmentation_masks(image, mask.bool(), alpha=0.5, colors="red").permute(1, 2, 0).numpy(), out)


def run_predict(args):
    supports = [load_support(image, mask, args.image_size) for image, mask in args.support]
    check_apart({"--out": args.out, "--overlay": args.overlay},
                {"--checkpoint": args.checkpoint, "--support": [p for pair in args.support for p in pair],
                 "--query": args.query})
    for folder in (args.out, args.overlay):  # after the supports (a bad one leaves nothing), before the queries
        if folder:
            hold(check_output(folder, folder=True))
    device = pick_device(args.device)
    configure_backends(device)
    paths, errors = query_paths(args.query)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    net = load_network(args.checkpoint, ("fss",), device)[0]
    autocast, _ = mixed_precision(device)
    with torch.no_grad(), autocast():  # the support side once
        support_imgs = torch.stack([img for img, _ in supports]).to(device)
        support_masks = torch.stack([m for _, m in supports]).to(device)
        prototypes = net.prototypes(net.project_features(net.extract(support_imgs)), support_masks,
                                    shots=len(support_masks))
    loader = make_loader(QueryImages(paths, args.image_size), device, args.workers, batch_size=args.batch_size,
                         collate_fn=list)
    written = 0
    with tqdm(total=len(paths), desc="predict", unit="image") as bar:
        for batch in loader:
            good = [q for q in batch if "error" not in q]
            for q in (q for q in batch if "error" in q):
                errors.append(q["error"])
                tqdm.write(f"error: {q['error']}", file=sys.stderr)
            if good:
                queries = torch.stack([q["image"] for q in good]).to(device, non_blocking=True)
                with torch.no_grad(), autocast():
                    logits = net.decode(net.project_features(net.extract(queries)), prototypes, queries.shape[-2:])
                for q, query_logits in zip(good, logits):
                    mask = predicted_mask(query_logits, q["size"]).cpu()
                    name = f"{pathlib.Path(q['path']).stem}.png"
                    save_png(mask.numpy().astype(bool), os.path.join(args.out, name))
                    if args.overlay:
                        overlay_png(q["path"], mask, os.path.join(args.overlay, name))
                    written += 1
            bar.update(len(batch))
    print(f"{written} mask(s) -> {args.out}" + (f", overlays -> {args.overlay}" if args.overlay else ""))
    if errors:
        raise SystemExit(f"error: {len(errors)} quer{'y' if len(errors) == 1 else 'ies'} failed (named above); "
                         f"the other {written} were written")


@exits_on_bad_input
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, summary, description):
        return commands.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)

    add_fss_args(command("fss", "few-shot segmentation mIoU / FB-IoU", FSS_DESCRIPTION))
    merge = command("merge", "per-fold results files of `fss` -> one table",
                    "Join per-fold results files of `evaluate.py fss` (one process per GPU, or per fold-trained "
                    "model) into one table with the mean over the folds; files evaluated with other protocol flags "
                    "are refused.")
    merge.add_argument("results", nargs="+", help="results.json files of `evaluate.py fss`, e.g. one per fold / GPU")
    merge.add_argument("--out", required=True, help="merged results JSON")
    add_predict_args(command("predict", "segment your own images from a support image and its mask",
                             PREDICT_DESCRIPTION))
    args = parser.parse_args(argv)
    {"fss": run_fss, "merge": run_merge, "predict": run_predict}[args.command](args)


if __name__ == "__main__":
    main()
