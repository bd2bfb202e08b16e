"""Stage 4: episodic training of the prototype network (paper sections 3.2, 3.3, 4 "Implementation Details").

    python train_fss.py --images VOC2012/JPEGImages --masks pseudo_masks --voc-root VOC2012 --out runs/fss  # train_aug
    python train_fss.py --mask-source gt --voc-root VOCdevkit/VOC2012 --out runs/gt       # Table 2 "groundtruth"
    python train_fss.py --supervised --voc-root VOCdevkit/VOC2012 --fold 0 --out runs/sup  # Table 2 "Supervised"
    python train_fss.py ... --resume                                                       # continue exactly

Every episode is built from a single image: MaskSplit cuts its mask into a support half and a query half, the
image is augmented twice, the loss is pixel-wise cross-entropy on the query with the support half ignored.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import (IGNORE, MaskSplitPairs, RunBatches, SupervisedPairs, fold_train_ids, make_loader,
                      training_views, voc_paths, voc_image_set)
from masksplit import MaskSplit
from model import (BACKBONES, FSSNet, FiniteGuard, HelpFormatter, add_device_flags, append_line, check_apart,
                   exits_on_bad_input, load_training_state, mixed_precision, nonnegative_float, nonnegative_int,
                   positive_float, positive_int, restore_rng, resume_checkpoint, save_checkpoint, start_run,
                   training_state, trim_log, unit_float, write_json)

# flags that may change on --resume; every other flag must match the checkpoint's run
RESUME_FREE = ("resume", "max_steps", "epochs", "workers", "device", "deterministic", "log_every")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--images", help="image folder (self-supervised training on pseudo-masks)")
    data.add_argument("--masks", help="pseudo-mask folder: 0/255 PNGs named like the images")
    data.add_argument("--list", help="file of image ids to train on (default: every image of --images; with "
                                     "--voc-root: train_aug, VOC 2012 + SBD, datasets.voc_image_set)")
    data.add_argument("--mask-source", choices=["pseudo", "gt"], default="pseudo",
                      help="gt: union of the VOC ground-truth class masks (Table 2's 'groundtruth' rows)")
    data.add_argument("--voc-root", help="PASCAL VOC 2012 tree: for --mask-source gt, --supervised and --fold; "
                                         "with pseudo-masks it sets the default --list")
    data.add_argument("--supervised", action="store_true",
                      help="standard fold-based supervised pairs (Table 2's 'Supervised' row); needs --fold")
    data.add_argument("--fold", type=int, choices=[0, 1, 2, 3], help="test fold left out: by --supervised, or "
                      "(self-supervised, --voc-root) train only on images without its classes (Table 2 'train: fold')")
    net = p.add_argument_group("network (paper section 3.3)")
    net.add_argument("--backbone", choices=BACKBONES, default="resnet101",
                     help="resnet101 (paper), resnet50, efficientnet_lite0 (CPU), *_deepstem (the authors' code)")
    net.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a state dict")
    net.add_argument("--backbone-bn", choices=["frozen", "batch"], default="frozen",
                     help="frozen: eval-mode BatchNorm (paper: all layers frozen); batch: batch stats (authors' code)")
    opt = p.add_argument_group("optimisation (paper section 4)")
    opt.add_argument("--image-size", type=positive_int, default=400, help="query/support side (section 4: 400)")
    opt.add_argument("--batch-size", type=positive_int, default=16, help="episodes per step (section 4: 16)")
    opt.add_argument("--epochs", type=positive_int, default=100, help="paper: 100 on PASCAL, 20 on COCO")
    opt.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate")
    opt.add_argument("--weight-decay", type=nonnegative_float, default=1e-5, help="Adam weight decay (section 4)")
    split = p.add_argument_group("MaskSplit (paper section 3.2, Table 1)")
    split.add_argument("--split", choices=["vertical", "horizontal", "mixed", "none"], default="vertical",
                       help="Vsplit, Hsplit, MixedSplit, or none (whole mask is support and query: Table 1 row 1)")
    split.add_argument("--max-shift", type=nonnegative_int, default=40, help="slope: line shift range in px (0 = flat)")
    split.add_argument("--no-alternate", action="store_true", help="support is always the right/bottom half")
    split.add_argument("--split-prob", type=unit_float, default=1.0, help="probability of splitting (Table 1's prob)")
    split.add_argument("--split-line", choices=["paper", "official"], default="paper",
                       help="official: the line of the authors' public code, which differs from the paper")
    split.add_argument("--reject", choices=["split", "image"], default="split",
                       help="a support or query half under 512 px: split = draw the split again (up to 10 times, "
                            "then the mask is left unsplit); image = the authors' code: draw another image")
    split.add_argument("--no-aug", action="store_true", help="no augmentation (Table 1's 'aug' off)")
    split.add_argument("--rotation-border", choices=["fill", "reflect"], default="fill",
                       help="pixels a rotation brings in: fill = black, ignored by the loss and background in the "
                            "support mask; reflect = the authors' code (BORDER_REFLECT_101 on image and mask)")
    run = p.add_argument_group("run")
    run.add_argument("--max-steps", type=positive_int, help="stop after this many steps (default: all epochs)")
    run.add_argument("--seed", type=int, default=0, help="random seed (same seed, same run on the CPU)")
    add_device_flags(run, deterministic=True)
    run.add_argument("--log-every", type=positive_int, default=10, help="steps between log.jsonl lines")
    run.add_argument("--out", default="runs/fss", help="output folder: last.pt, log.jsonl, args.json")
    run.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.pt")
    args = p.parse_args(argv)
    if args.supervised and (args.voc_root is None or args.fold is None):
        p.error("--supervised needs --voc-root and --fold")
    if args.mask_source == "gt" and not args.supervised and args.voc_root is None:
        p.error("--mask-source gt needs --voc-root")
    if args.fold is not None and args.voc_root is None:
        p.error("--fold needs --voc-root (its class masks tell which images hold test-fold classes)")
    if args.mask_source == "pseudo" and not args.supervised and (args.images is None or args.masks is None):
        p.error("pass --images DIR --masks DIR, or --mask-source gt --voc-root DIR, or --supervised --voc-root DIR "
                "--fold i")
    return args


def build_dataset(args):
    augment = dict(image_size=args.image_size, augment=not args.no_aug, seed=args.seed,
                   rotation_border=args.rotation_border)
    if args.supervised:
        return SupervisedPairs(args.voc_root, args.fold, image_set=args.list or "train_aug", **augment)
    # both halves need 512 px (MaskSplit's min_pixels; the authors' 2 * 16 * 16); --reject split: MaskSplit redraws
    min_pixels = MaskSplit().min_pixels
    if args.reject == "image":  # the authors' code: MaskSplit draws once and the dataset draws another image
        augment.update(redraw_image_below=min_pixels)
        min_pixels = 0
    if args.split == "none":  # Table 1's first row: only augmentations, the whole mask is support and query
        masksplit = MaskSplit(prob=0.0, min_pixels=min_pixels)
    else:
        masksplit = MaskSplit(direction=args.split, max_shift=args.max_shift, alternate=not args.no_alternate,
                              prob=args.split_prob, line=args.split_line, min_pixels=min_pixels)
    images, masks, list_file = args.images, args.masks, args.list
    if args.voc_root is not None:
        image_set = list_file or "train_aug"  # section 4: VOC 2012 plus SBD's extra annotations (PASCAL-5i)
        # fold-based self-supervised training (Table 2): no image with a test-fold class
        list_file = (fold_train_ids(args.voc_root, args.fold, image_set=image_set) if args.fold is not None
                     else voc_image_set(args.voc_root, image_set))
    if args.mask_source == "gt":  # Table 2's "groundtruth": the union of the class masks
        images, masks = (voc_paths(args.voc_root)[k] for k in ("images", "masks"))
    return MaskSplitPairs(images, masks, list_file=list_file, masksplit=masksplit,
                          mask_source="groundtruth" if args.mask_source == "gt" else "pseudo", **augment)


def backbone_format(device):
    """The backbone's memory layout: channels_last on CUDA (cuDNN's tensor-core convolutions work in NHWC, and the
    backbone holds most of the FLOPs), NCHW on the CPU; the head is NCHW everywhere (FSSNet.extract)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def train_step(net, optimizer, batch, augmentation, device, autocast, scaler, fmt=torch.contiguous_format):
    """One optimiser step on a batch of MaskSplit pairs, augmented where it lands (datasets.training_views; images in
    the backbone's layout fmt) -> the loss as a tensor on the device (reading it waits for the GPU: only to log)."""
    query, target, support, support_mask = training_views(batch, augmentation, device)
    query, support = query.contiguous(memory_format=fmt), support.contiguous(memory_format=fmt)
    with autocast():
        logits = net(query, support[:, None], support_mask[:, None])
    # pixel-wise cross-entropy; IGNORE (255) = the support half of the query and pixels outside the image (3.2)
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


@exits_on_bad_input
def main(argv=None):
    args = parse_args(argv)
    check_apart({"--out": args.out}, {"--images": args.images, "--masks": args.masks, "--list": args.list,
                                      "--voc-root": args.voc_root})
    out, device = start_run(args)
    checkpoint_path, log_path = out / "last.pt", out / "log.jsonl"
    state, step = None, 0
    if args.resume and checkpoint_path.is_file():
        state = resume_checkpoint(checkpoint_path, "fss", args, RESUME_FREE)
    elif args.resume:  # killed before its first checkpoint: nothing to continue, start afresh
        print(f"--resume: no {checkpoint_path} yet, starting from step 0")
    dataset = build_dataset(args)
    fmt = backbone_format(device)
    net = FSSNet(args.backbone, args.weights, backbone_bn=args.backbone_bn).to(device)  # the network (section 3.3)
    net.backbone.to(memory_format=fmt)
    optimizer = torch.optim.Adam(net.trainable_parameters(), lr=args.lr, weight_decay=args.weight_decay)  # section 4
    autocast, scaler = mixed_precision(device)
    if state is not None:  # --resume: continue from the checkpoint, its random state included
        load_training_state(state, net, optimizer, scaler)
        restore_rng(state["rng"])
        step = state["step"]
    trim_log(log_path, step)  # drop log lines of steps after the checkpoint (all of them when starting afresh)
    write_json(vars(args), out / "args.json")
    batches = RunBatches(len(dataset), args.batch_size, args.seed, step, args.max_steps, args.epochs)
    steps_per_epoch, total = batches.per_epoch, batches.total
    net.train()  # the backbone stays in eval mode (FrozenBackbone)
    bar = tqdm(total=total, initial=step, desc="train_fss", dynamic_ncols=True)
    loader = make_loader(dataset, device, args.workers, batch_sampler=batches)
    guard = FiniteGuard()
    since = tick = time.time()
    waited, pairs, logged = 0.0, 0, step
    for batch in loader:
        waited += time.time() - tick  # time the step waited for the loader
        loss = train_step(net, optimizer, batch, dataset.augmentation, device, autocast, scaler, fmt)
        step += 1
        guard.record(step, loss)
        pairs += len(batch["query_img"])
        bar.update(1)
        if step % args.log_every == 0 or step == total:
            guard.check(step, net)
            loss = loss.item()  # waits for the GPU
            rate = pairs / (time.time() - since)
            append_line(log_path, {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": loss,
                                   "pairs_per_s": rate, "data_s": waited / (step - logged)})
            bar.set_postfix(epoch=(step - 1) // steps_per_epoch, loss=f"{loss:.4f}", pairs_per_s=f"{rate:.2f}")
            since, waited, pairs, logged = time.time(), 0.0, 0, step
        if step % steps_per_epoch == 0 or step == total:  # epoch end or --max-steps: last.pt resumes exactly here
            guard.check(step, net)
            save_checkpoint(checkpoint_path, kind="fss", config=net.config,
                            **training_state(net.state_dict(), optimizer, scaler), epoch=step // steps_per_epoch,
                            step=step, args=vars(args))
        tick = time.time()
    bar.close()
    print(f"done: {step} steps, checkpoint {checkpoint_path}")


if __name__ == "__main__":
    main()
