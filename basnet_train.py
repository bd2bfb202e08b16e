"""Stage 2: BAS-Net (Qin et al., CVPR 2019) trained on the DeepUSPS saliency labels (paper section 3.2).

    python basnet_train.py --images DIR --masks DIR [--list FILE] --out DIR --max-steps N [--weights imagenet|none|PATH]

Labels: saliency_train.py's 0/255 maps (OUT/labels), no human annotation. As in BAS-Net: resize 256, random crop 224,
horizontal flip, Adam lr 1e-3, batch 8, hybrid loss on all 8 outputs. Writes OUT/last.pt (atomic, every --save-every
steps and at the end) and OUT/log.jsonl; a non-finite loss or weight stops the run unsaved (model.FiniteGuard).
"""
import argparse

import torch
from tqdm import tqdm

from datasets import RunBatches, SalientObjects, make_loader
from model import (BASNET_ENCODERS, BASNet, FiniteGuard, HelpFormatter, add_device_flags, append_line, check_apart,
                   exits_on_bad_input, hybrid_loss, load_training_state, mixed_precision, positive_float,
                   positive_int, restore_rng, resume_checkpoint, save_checkpoint, seeded_generator, start_run,
                   training_state, trim_log)

# flags that may change on --resume; every other flag must match the checkpoint's run
RESUME_FREE = ("resume", "max_steps", "workers", "device", "deterministic", "log_every", "save_every")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--masks", required=True, help="folder of 0/255 saliency labels named like the images")
    p.add_argument("--list", help="optional file of image stems to use")
    p.add_argument("--out", required=True, help="output folder (last.pt, log.jsonl)")
    p.add_argument("--max-steps", type=positive_int, default=400000, help="training steps (BAS-Net: 400k)")
    p.add_argument("--image-size", type=positive_int, default=256, help="pre-crop resize and test-time size (BAS-Net)")
    p.add_argument("--crop", type=positive_int, default=224, help="random crop (BAS-Net 224)")
    p.add_argument("--no-flip", action="store_true", help="disable the random horizontal flip")
    p.add_argument("--batch-size", type=positive_int, default=8, help="BAS-Net: 8")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (BAS-Net: 1e-3)")
    p.add_argument("--weights", default="imagenet", help="encoder weights: imagenet (BAS-Net) | none | PATH")
    p.add_argument("--encoder", default="resnet34", choices=BASNET_ENCODERS, help="resnet34 (BAS-Net); "
                   "efficientnet_lite0: the encoder whose ImageNet weights work offline (CPU recipe; not in the paper)")
    p.add_argument("--width", type=positive_float, default=1.0, help="channel width of everything after the encoder "
                   "(1: BAS-Net); < 1 only with the Lite0 encoder (CPU recipe; not in the paper)")
    p.add_argument("--save-every", type=positive_int, default=500, help="steps between checkpoints")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log.jsonl lines")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same run)")
    add_device_flags(p, deterministic=True)
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.pt")
    args = p.parse_args(argv)
    if args.crop > args.image_size:
        p.error(f"--crop {args.crop} is larger than --image-size {args.image_size}")
    return args


def crop_and_flip(images, masks, crop, flip, generator):
    """Random crop (crop x crop) and horizontal flip, per item, from a seeded generator. New tensors."""
    size, pairs = images.shape[-1], []
    for img, msk in zip(images, masks):
        y, x = torch.randint(0, size - crop + 1, (2,), generator=generator).tolist()
        img, msk = img[:, y:y + crop, x:x + crop], msk[y:y + crop, x:x + crop]
        if flip and torch.rand((), generator=generator) < 0.5:
            img, msk = img.flip(-1), msk.flip(-1)
        pairs.append((img, msk))
    return torch.stack([img for img, _ in pairs]), torch.stack([msk for _, msk in pairs])[:, None]


@exits_on_bad_input
def main(argv=None):
    args = parse_args(argv)
    check_apart({"--out": args.out}, {"--images": args.images, "--masks": args.masks, "--list": args.list})
    out, device = start_run(args)
    data = SalientObjects(args.images, args.masks, args.list, image_size=args.image_size)
    net = BASNet(args.weights, args.encoder, args.width).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    autocast, scaler = mixed_precision(device)
    zero = torch.zeros((), dtype=torch.float64, device=device)  # float64: the sum a Python float would give
    step, running, logged = 0, zero, 0        # the loss summed since the last log line, at step `logged`
    if args.resume and (out / "last.pt").is_file():
        state = resume_checkpoint(out / "last.pt", "basnet", args, RESUME_FREE)
        load_training_state(state, net, optimizer, scaler)
        restore_rng(state["rng"])
        step, running, logged = state["step"], zero + state["running"], state["logged"]
    log_path = out / "log.jsonl"
    trim_log(log_path, step)  # drop log lines written after the checkpoint we continue from
    net.train()
    bar = tqdm(range(step, args.max_steps), initial=step, total=args.max_steps, desc="basnet")
    batches = RunBatches(len(data), args.batch_size, args.seed, step, args.max_steps, drop_last=True)
    loader = make_loader(data, device, args.workers, batch_sampler=batches)
    guard = FiniteGuard()
    for it, batch in zip(bar, loader):
        images, masks = (batch[k].to(device, non_blocking=True) for k in ("image", "mask"))
        images, masks = crop_and_flip(images, masks, args.crop, not args.no_flip, seeded_generator(args.seed, it))
        with autocast():
            outputs = net(images)
        loss = hybrid_loss(outputs, masks)  # float32 (SSIM too, whatever the autocast)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step = it + 1
        guard.record(step, loss)
        running = running + loss.detach()
        if step % args.log_every == 0 or step == args.max_steps:
            guard.check(step, net)
            mean = running.item() / (step - logged)  # waits for the GPU: only here, not every step
            append_line(log_path, {"step": step, "loss": mean, "lr": args.lr})
            bar.set_postfix(loss=f"{mean:.4f}")
            running, logged = zero, step
        if step % args.save_every == 0 or step == args.max_steps:
            guard.check(step, net)
            save_checkpoint(out / "last.pt", kind="basnet", config={**net.config, "image_size": args.image_size},
                            **training_state(net.state_dict(), optimizer, scaler), step=step,
                            epoch=step // batches.per_epoch, args=vars(args), running=running.item(), logged=logged)
    print(f"BAS-Net: {step} steps, checkpoint {out / 'last.pt'}")


if __name__ == "__main__":
    main()
