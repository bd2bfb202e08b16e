"""Saliency priors, DeepUSPS refinement, saliency_train.py end to end (+ resume), saliency metrics (issue 5)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import saliency_metrics
import saliency_train as st


def object_image(size=64, seed=0, box=(18, 44, 22, 48)):
    """A bright yellow object on a plain grey, slightly noisy background; [3,H,W] in [0,1] and its box mask."""
    g = torch.Generator().manual_seed(seed)
    img = 0.35 + 0.04 * torch.rand(3, size, size, generator=g)
    y0, y1, x0, x1 = box
    img[:, y0:y1, x0:x1] = torch.tensor([0.95, 0.85, 0.2]).view(3, 1, 1) + 0.03 * torch.rand(3, y1 - y0, x1 - x0,
                                                                                             generator=g)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return img.clamp(0, 1), mask


def write_images(folder, n=4, size=64):
    folder.mkdir(parents=True)
    masks = {}
    for i in range(n):
        box = (10 + 3 * i, 40 + 2 * i, 14 + 2 * i, 46)
        img, mask = object_image(size, seed=i, box=box)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"im{i}.png")
        masks[f"im{i}"] = mask.numpy()
    return masks


@pytest.mark.parametrize("name", st.PRIORS)
def test_prior_prefers_bright_object(name):
    img0, mask0 = object_image(64, seed=0)
    img1, mask1 = object_image(64, seed=1, box=(8, 30, 30, 56))
    maps = st.compute_priors(torch.stack([img0, img1]), [name], n_segments=60)[name]
    assert maps.shape == (2, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1
    for m, mask in zip(maps, (mask0, mask1)):
        assert m[mask].mean() > m[~mask].mean() + 0.4, (name, m[mask].mean(), m[~mask].mean())


def test_superpixels_connected_consecutive_and_graph_shapes():
    img, _ = object_image(48)
    batch = torch.stack([img, torch.full_like(img, 0.5)])  # the plain image gets more superpixels: padding
    graph = st.superpixel_graph(batch, n_segments=36)
    labels, k = graph["labels"], graph["valid"].shape[1]
    assert labels.shape == (2, 48, 48) and labels.dtype == torch.int64
    assert graph["lab"].shape == graph["rgb"].shape == (2, k, 3) and graph["pos"].shape == (2, k, 2)
    assert graph["valid"].shape == graph["boundary"].shape == (2, k) and graph["adj"].shape == (2, k, k)
    counts = [int(labels[i].max()) + 1 for i in range(2)]
    assert max(counts) == k and counts[0] < counts[1]
    for i, k_i in enumerate(counts):
        assert 18 <= k_i <= 54  # about the 36 asked for
        assert torch.equal(labels[i].unique(), torch.arange(k_i))  # consecutive 0..k_i-1
        assert torch.equal(graph["valid"][i], torch.arange(k) < k_i)  # padding labels are empty
        for label in range(k_i):  # SLIC's connectivity step: each superpixel is one 4-connected piece
            assert ndimage.label((labels[i] == label).numpy())[1] == 1, (i, label)
    adj = graph["adj"]
    assert torch.equal(adj, adj.transpose(1, 2)) and not adj.diagonal(dim1=1, dim2=2).any()
    assert not (adj.any(2) & ~graph["valid"]).any() and not (graph["boundary"] & ~graph["valid"]).any()
    assert torch.equal(graph["boundary"][1].nonzero().flatten(),
                       torch.cat([labels[1, 0], labels[1, -1], labels[1, :, 0], labels[1, :, -1]]).unique())


@pytest.mark.parametrize("size", [1, 4, 7])
def test_image_smaller_than_superpixel_count(size, tmp_path):
    img = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    labels, k = st.slic_labels(img, n_segments=200)
    assert labels.shape == (2, size, size) and 1 <= k <= size * size  # fewer superpixels, at most one per pixel
    maps = st.compute_priors(img, n_segments=200)
    for m in maps.values():
        assert m.shape == (2, size, size) and torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
    with pytest.raises(ValueError, match="at least 1"):
        st.slic_labels(img, n_segments=0)
    write_images(tmp_path / "images", n=2)
    st.main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--priors-only",
             "--prior-size", str(size), "--superpixels", "200"])
    assert len(list((tmp_path / "out" / "priors" / "rbd").iterdir())) == 2


def test_moving_average_is_deepusps_with_bias_correction():
    crf = [torch.full((2, 2), v) for v in (1.0, 0.0, 0.5)]
    avg, raw = None, torch.zeros(2, 2)
    for epoch, c in enumerate(crf, 1):
        before = None if avg is None else avg.clone()
        avg = st.update_moving_average(avg if avg is not None else torch.zeros(2, 2), c, 0.7, epoch)
        raw = 0.7 * raw + 0.3 * c  # DeepUSPS: from zeros
        assert torch.allclose(avg, raw / (1 - 0.7 ** epoch))
        if before is not None:
            assert not torch.equal(before, avg)  # a new tensor; the caller's is untouched
    assert torch.allclose(st.update_moving_average(torch.rand(2, 2), crf[0], 0.7, 1), crf[0])  # epoch 1: the map


def test_f_measure_loss():
    target = torch.zeros(1, 8, 8)
    target[:, 2:6, 2:6] = 1
    assert st.f_measure_loss(target, target) < 1e-3
    assert st.f_measure_loss(1 - target, target) > 0.99
    half = target * 0.5
    # precision 1, recall 0.5: F_1 = 2/3, F with beta2 4 = 5 * 0.5 / (4 + 0.5) = 5/9
    assert abs(st.f_measure_loss(half, target, 1.0).item() - 1 / 3) < 1e-3
    assert abs(st.f_measure_loss(half, target, 4.0).item() - 4 / 9) < 1e-3


def test_dense_crf_sharpens_a_blurred_mask_along_a_colour_edge():
    size = 64
    rgb = torch.full((1, 3, size, size), 0.2)
    rgb[:, 0, :, 32:] = 0.9  # a red right half: the colour edge at x = 32
    truth = torch.zeros(1, size, size)
    truth[:, :, 32:] = 1
    xs = torch.arange(size, dtype=torch.float32)
    blurred = torch.sigmoid((xs - 31.5) / 6).expand(1, size, size).clone()  # the mask, blurred across the edge
    refined = st.dense_crf(blurred, rgb)
    assert refined.shape == blurred.shape and 0 <= refined.min() and refined.max() <= 1
    err_before, err_after = (blurred - truth).abs().mean(), (refined - truth).abs().mean()
    assert err_after < 0.5 * err_before, (err_before, err_after)
    assert torch.equal(blurred, torch.sigmoid((xs - 31.5) / 6).expand(1, size, size))  # input untouched
    flat = torch.full((1, 3, size, size), 0.5)  # without the colour edge nothing is sharpened that much
    assert (st.dense_crf(blurred, flat) - truth).abs().mean() > err_after


def _run(args, tmp_path, out):
    st.main(["--images", str(tmp_path / "images"), "--out", str(out), "--backbone", "efficientnet_lite0",
             "--weights", "none", "--image-size", "32", "--prior-size", "48", "--superpixels", "40",
             "--epochs", "2", "--rounds", "2", "--batch-size", "2", "--device", "cpu", *args])


def test_saliency_train_outputs_and_exact_resume(tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    _run(["--priors-only"], tmp_path, tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p" / "priors").iterdir()) == sorted([*st.PRIORS, "settings.json"])
    assert not (tmp_path / "p" / "labels").exists()
    _run([], tmp_path, tmp_path / "a")
    for sub in ("labels", "prob"):
        files = sorted((tmp_path / "a" / sub).iterdir())
        assert [f.name for f in files] == [f"im{i}.png" for i in range(4)]
        arr = np.asarray(Image.open(files[0]))
        assert arr.shape == (64, 64) and arr.dtype == np.uint8
    assert set(np.unique(np.asarray(Image.open(tmp_path / "a" / "labels" / "im0.png")))) <= {0, 255}
    logs = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 * 2 * 2 + 2  # priors x rounds x epochs + fusion epochs

    _run(["--feature-cache-gb", "0"], tmp_path, tmp_path / "c")  # features recomputed per batch: same maps
    for f in (tmp_path / "a" / "prob").iterdir():
        diff = np.asarray(Image.open(f), dtype=int) - np.asarray(Image.open(tmp_path / "c" / "prob" / f.name))
        assert np.abs(diff).max() <= 1

    calls = {"n": 0}
    real_epoch = st.train_epoch

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # 2nd epoch of the 2nd prior's 1st round: interrupted mid-task
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    monkeypatch.setattr(st, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run([], tmp_path, tmp_path / "b")
    monkeypatch.setattr(st, "train_epoch", real_epoch)
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # as if killed between a log line and its checkpoint
        f.write('{"step": 999, "task": "killed", "epoch": 0}\n')
    _run(["--resume"], tmp_path, tmp_path / "b")
    resumed = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert resumed == logs  # continued, not restarted, and no line of an epoch the checkpoint does not hold
    for sub in ("labels", "prob"):
        for f in (tmp_path / "a" / sub).iterdir():
            assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "b" / sub / f.name)))


def test_precision_recall_by_hand():
    gt = np.zeros((2, 4), dtype=bool)
    gt[:, :2] = True  # 4 salient pixels
    pred = np.array([[200, 100, 100, 0], [200, 0, 0, 0]], dtype=np.uint8)
    p, r = saliency_metrics.precision_recall(pred, gt)
    assert p[0] == 0.5 and r[0] == 1.0  # t=0: everything salient
    assert p[150] == 1.0 and r[150] == 0.5  # only the two 200s
    assert p[100] == pytest.approx(3 / 4) and r[100] == 0.75
    assert p[201] == 0.0 and r[201] == 0.0
    f = saliency_metrics.f_beta_curve(np.array([0.5, 1.0]), np.array([1.0, 0.5]))
    assert f == pytest.approx([1.3 * 0.5 / (0.3 * 0.5 + 1), 1.3 * 0.5 / (0.3 + 0.5)])


def test_metrics_on_hand_made_maps():
    gt = np.zeros((20, 30), dtype=bool)
    gt[5:15, 8:20] = True
    perfect = saliency_metrics.saliency_metrics([(gt.astype(np.uint8) * 255, gt)])
    assert perfect["mae"] == 0 and perfect["max_fbeta"] == pytest.approx(1.0)
    assert perfect["s_measure"] == pytest.approx(1.0, abs=1e-6)
    inverted = saliency_metrics.saliency_metrics([((~gt).astype(np.uint8) * 255, gt)])
    assert inverted["mae"] == 1 and inverted["s_measure"] < 0.1
    blurry = np.where(gt, 180, 60).astype(np.uint8)
    m = saliency_metrics.saliency_metrics([(blurry, gt)])
    assert m["mae"] == pytest.approx(np.mean(np.where(gt, 75, 60)) / 255)
    assert m["max_fbeta"] == pytest.approx(1.0) and m["mean_fbeta"] < 1
    assert 0.5 < m["s_measure"] < 1
    empty = np.zeros((10, 10), dtype=bool)
    assert saliency_metrics.s_measure(np.zeros((10, 10)), empty) == 1.0
    assert saliency_metrics.s_measure(np.full((10, 10), 0.25), empty) == 0.75


def test_saliency_metrics_cli_gt_encodings(tmp_path, capsys):
    gt = np.zeros((24, 32), dtype=bool)
    gt[4:18, 6:20] = True
    pred = np.where(gt, 200, 40).astype(np.uint8)
    pred[0, 0] = 255
    (tmp_path / "pred").mkdir()
    Image.fromarray(pred).save(tmp_path / "pred" / "a.png")
    results = []
    for mode in ("1", "P", "L"):
        d = tmp_path / f"gt_{mode}"
        d.mkdir()
        if mode == "P":
            im = Image.fromarray(gt.astype(np.uint8), mode="L").convert("P")
            im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
        else:
            im = Image.fromarray(gt.astype(np.uint8) * 255).convert(mode)
        im.save(d / "a.png")
        saliency_metrics.main(["--pred", str(tmp_path / "pred"), "--gt", str(d), "--out",
                       str(tmp_path / f"m_{mode}.json")])
        results.append(json.loads((tmp_path / f"m_{mode}.json").read_text()))
    assert "MAE" in capsys.readouterr().out
    for r in results[1:]:
        assert {k: r[k] for k in ("mae", "max_fbeta", "s_measure")} == \
               {k: results[0][k] for k in ("mae", "max_fbeta", "s_measure")}
    assert results[0]["mae"] == pytest.approx(np.abs(pred / 255 - gt).mean())
    (tmp_path / "pred" / "a.png").rename(tmp_path / "pred" / "b.png")
    with pytest.raises(SystemExit, match="missing"):
        saliency_metrics.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt_L")])


def test_an_epoch_never_reads_a_loss_while_its_graph_lives(tmp_path, monkeypatch):
    # .item() waits for the GPU: train_epoch sums its losses on the device and reads the mean once an epoch
    write_images(tmp_path / "images")
    reads, real_epoch, real_item = [], st.train_epoch, torch.Tensor.item

    def counted(t):
        reads[-1] += t.grad_fn is not None
        return real_item(t)

    def epoch(*a, **k):
        reads.append(0)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", counted)
            return real_epoch(*a, **k)

    monkeypatch.setattr(st, "train_epoch", epoch)
    _run(["--priors", "rbd", "--rounds", "1", "--epochs", "1", "--batch-size", "1"], tmp_path, tmp_path / "run")
    assert reads and not any(reads)


def test_targets_fixed_within_a_round_and_next_round_is_binarised_moving_average(tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    seen = []
    real_epoch = st.train_epoch

    def recording(net, opt, precision, feats, target_dirs, stems, args, beta2, generator):
        seen.append([(d, t, st.read_maps(d, stems, args.image_size)) for d, t in target_dirs])
        return real_epoch(net, opt, precision, feats, target_dirs, stems, args, beta2, generator)

    monkeypatch.setattr(st, "train_epoch", recording)
    out = tmp_path / "run"
    _run(["--priors", "rbd", "--rounds", "2", "--epochs", "3"], tmp_path, out)
    assert len(seen) == 2 * 3 + 3  # 2 rounds x 3 epochs, 3 fusion epochs
    round1, round2 = seen[:3], seen[3:6]
    for epochs, folder, thr in ((round1, out / "priors" / "rbd", st.PRIOR_THRESHOLDS["rbd"]),
                                (round2, st.mva_dir(out, "rbd", 0, 3), 0.5)):
        for (d, t, maps), in epochs:  # the same files, the same maps in every epoch of the round
            assert d == folder and t == thr and torch.equal(maps, epochs[0][0][2])
    # round 2 trains on round 1's final moving average (after its 3rd epoch), binarised at 0.5
    final_mva = st.read_maps(st.mva_dir(out, "rbd", 0, 3), [f"im{i}" for i in range(4)], 32)
    assert torch.equal(round2[0][0][2], final_mva)
    assert seen[6][0][0] == st.mva_dir(out, "rbd", 1, 3)  # fusion: the last round's averages
    assert (out / "rbd.pt").is_file() and (out / "saliency.pt").is_file()


def test_resume_after_a_kill_while_writing_moving_averages(tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    _run(["--priors", "mc", "--rounds", "1", "--epochs", "3"], tmp_path, tmp_path / "a")
    calls = {"n": 0}
    real_write = st.write_maps

    def killed(maps, folder, stems):  # dies after 3 batches of an epoch's averages were written
        calls["n"] += 1
        real_write(maps, folder, stems)
        if calls["n"] == 2 * 2 + 1:  # 2 batches per epoch: epoch 3, after its first batch
            raise KeyboardInterrupt

    monkeypatch.setattr(st, "write_maps", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(["--priors", "mc", "--rounds", "1", "--epochs", "3"], tmp_path, tmp_path / "b")
    monkeypatch.setattr(st, "write_maps", real_write)
    _run(["--priors", "mc", "--rounds", "1", "--epochs", "3", "--resume"], tmp_path, tmp_path / "b")
    for sub in ("labels", "prob", "refine/mc/round1/mva1"):
        for f in (tmp_path / "a" / sub).iterdir():
            assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "b" / sub / f.name)))
