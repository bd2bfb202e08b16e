"""Stage 2: BAS-Net (Qin et al., CVPR 2019) trained on the DeepUSPS saliency labels (paper section 3.2).

    python basnet_train.py --images DIR --labels DIR [--list FILE] --out DIR --iters N [--weights imagenet|none|PATH]

Labels are the 0/255 maps of saliency_train.py (OUT/labels): no human annotation. Training as in the original:
resize 256, random crop 224, horizontal flip, Adam lr 1e-3, batch 8, hybrid loss on all 8 outputs.
Writes OUT/last.pt (atomic, every --save-every iterations and at the end; --resume continues exactly) and
OUT/log.jsonl. A non-finite loss or weight stops the run before any checkpoint is written (model.FiniteGuard).
"""
import argparse
import json

import torch
from tqdm import tqdm

from datasets import SalientObjects, check_output, default_workers, make_loader, trim_log
from model import (BASNET_ENCODERS, BASNet, FiniteGuard, HelpFormatter, capture_rng, configure_backends, device_flag,
                   hybrid_loss, mixed_precision, nonnegative_int, pick_device, positive_float, positive_int,
                   restore_rng, resume_checkpoint, save_checkpoint)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--labels", required=True, help="folder of 0/255 saliency labels named like the images")
    p.add_argument("--list", default=None, help="optional file of image stems to use")
    p.add_argument("--out", required=True, help="output folder (last.pt, log.jsonl)")
    p.add_argument("--iters", type=positive_int, default=400000, help="training iterations (BAS-Net: 400k)")
    p.add_argument("--size", type=positive_int, default=256,
                   help="resize before cropping, and test-time size (BAS-Net 256)")
    p.add_argument("--crop", type=positive_int, default=224, help="random crop (BAS-Net 224)")
    p.add_argument("--no-flip", action="store_true", help="disable the random horizontal flip")
    p.add_argument("--batch-size", type=positive_int, default=8, help="BAS-Net: 8")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (BAS-Net: 1e-3)")
    p.add_argument("--weights", default="imagenet", help="encoder weights: imagenet (BAS-Net) | none | PATH")
    p.add_argument("--encoder", default="resnet34", choices=BASNET_ENCODERS,
                   help="resnet34 (BAS-Net); efficientnet_lite0: the encoder whose ImageNet weights work offline "
                        "(CPU recipe; not in the paper)")
    p.add_argument("--width", type=positive_float, default=1.0,
                   help="channel width of everything after the encoder (1: BAS-Net); < 1 only with the Lite0 encoder "
                        "(CPU recipe; not in the paper)")
    p.add_argument("--save-every", type=positive_int, default=500, help="checkpoint every N iterations")
    p.add_argument("--log-every", type=positive_int, default=10, help="iterations between log.jsonl lines")
    p.add_argument("--workers", type=nonnegative_int, default=default_workers(),
                   help="DataLoader worker processes (default: usable cores - 1, at most 16; here %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same run)")
    p.add_argument("--device", type=device_flag, default="auto",
                   help="auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--deterministic", action="store_true",
                   help="torch's deterministic algorithms (CUDA; the CPU is deterministic anyway, see README)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = p.parse_args(argv)
    if args.crop > args.size:
        p.error(f"--crop {args.crop} is larger than --size {args.size}")
    return args


def batch_indices(n, batch_size, step, seed):
    """Image indices of iteration `step`: a fresh seeded permutation per pass over the data, so the batches depend
    only on (seed, step) and a resumed run sees exactly the batches of an uninterrupted one."""
    per_epoch = max(1, n // batch_size)  # drop the last incomplete batch
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if n < batch_size:
        return order
    return order[pos * batch_size:(pos + 1) * batch_size]


class StepBatches:
    """Batch sampler yielding batch_indices(...) for iterations start .. iters-1 (lazily), for a DataLoader."""

    def __init__(self, n, batch_size, start, iters, seed):
        self.n, self.batch_size, self.start, self.iters, self.seed = n, batch_size, start, iters, seed

    def __iter__(self):
        for step in range(self.start, self.iters):
            yield batch_indices(self.n, self.batch_size, step, self.seed).tolist()

    def __len__(self):
        return max(0, self.iters - self.start)


def crop_and_flip(images, masks, crop, flip, generator):
    """Random crop (crop x crop) and horizontal flip, per item, from a seeded generator. New tensors."""
    size = images.shape[-1]
    out_i, out_m = [], []
    for img, msk in zip(images, masks):
        y, x = (torch.randint(0, size - crop + 1, (2,), generator=generator)).tolist()
        img, msk = img[:, y:y + crop, x:x + crop], msk[y:y + crop, x:x + crop]
        if flip and torch.rand((), generator=generator) < 0.5:
            img, msk = img.flip(-1), msk.flip(-1)
        out_i.append(img)
        out_m.append(msk)
    return torch.stack(out_i), torch.stack(out_m)[:, None]


# flags that may change on --resume; every other flag must match the checkpoint's run
RESUME_FREE = ("resume", "iters", "workers", "device", "deterministic", "log_every", "save_every")


def main(argv=None):
    args = parse_args(argv)
    out = check_output(args.out, folder=True)
    device = pick_device(args.device)
    configure_backends(device, args.deterministic)
    data = SalientObjects(args.images, args.labels, args.list, image_size=args.size)
    torch.manual_seed(args.seed)
    net = BASNet(args.weights, args.encoder, args.width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    autocast, scaler = mixed_precision(device)
    config = {**net.config, "image_size": args.size}
    step = 0
    if args.resume and (out / "last.pt").is_file():
        ck = resume_checkpoint(out / "last.pt", "basnet", args, RESUME_FREE)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler") and scaler.is_enabled():  # float16 before and now (a disabled scaler saves {})
            scaler.load_state_dict(ck["scaler"])
        restore_rng(ck["rng"])
        step = ck["step"]
    log_path = out / "log.jsonl"
    trim_log(log_path, step)  # drop log lines written after the checkpoint we continue from

    def save():
        guard.check(step, net)
        save_checkpoint(out / "last.pt", kind="basnet", config=config, model=net.state_dict(),
                        optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step,
                        epoch=step // max(1, len(data) // args.batch_size), rng=capture_rng(), args=vars(args))

    net.train()
    bar = tqdm(range(step, args.iters), initial=step, total=args.iters, desc="basnet")
    loader = make_loader(data, device, args.workers,
                         batch_sampler=StepBatches(len(data), args.batch_size, step, args.iters, args.seed))
    zero = torch.zeros((), dtype=torch.float64, device=device)  # float64: the sum a Python float would give
    running, logged, guard = zero, step, FiniteGuard()
    for it, batch in zip(bar, loader):
        gen = torch.Generator().manual_seed(args.seed * 100003 + it)
        images, masks = (batch[k].to(device, non_blocking=True) for k in ("image", "mask"))
        images, masks = crop_and_flip(images, masks, args.crop, not args.no_flip, gen)
        with autocast():
            outputs = net(images)
        loss = hybrid_loss(outputs, masks)  # float32 (SSIM too, whatever the autocast)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step = it + 1
        guard.record(step, loss)
        running = running + loss.detach()
        if step % args.log_every == 0 or step == args.iters:
            guard.check(step, net)
            mean = running.item() / (step - logged)  # waits for the GPU: only here, not every iteration
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": mean, "lr": args.lr}) + "\n")
            bar.set_postfix(loss=f"{mean:.4f}")
            running, logged = zero, step
        if step % args.save_every == 0 or step == args.iters:
            save()
    print(f"BAS-Net: {step} iterations, checkpoint {out / 'last.pt'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input (unreadable image, missing file): one clear line
        raise SystemExit(f"error: {str(e).strip().splitlines()[-1]}")  # from a worker: its last line
