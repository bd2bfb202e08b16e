"""train_fss.py and `evaluate.py fss` on the demo data (CPU, 64 px, random backbone weights)."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train_fss
from datasets import FewShotEpisodes, load_mask, save_png, voc_image_set
from demo_data import make_demo_data
from evaluate import FewShotMetric
from model import load_checkpoint, load_network


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("demo")
    mp.setenv("MASKSPLIT_CACHE", str(root / "cache"))
    paths = make_demo_data(root / "data")
    yield paths
    mp.undo()


def train(demo, out, *extra):
    """train_fss.py on the CPU, where the same seed gives the same numbers (CUDA's do not: README, On a GPU)."""
    train_fss.main(["--mask-source", "gt", "--voc-root", str(demo["voc"]), "--backbone", "efficientnet_lite0",
                    "--weights", "none", "--image-size", "64", "--batch-size", "4", "--workers", "0",
                    "--log-every", "1", "--device", "cpu", "--out", str(out), *extra])
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def checkpoint(demo, tmp_path_factory):
    """A short run on 6 training images (2 steps per epoch) that crosses epoch boundaries."""
    out = tmp_path_factory.mktemp("run")
    stems = voc_image_set(demo["voc"], "train")[:6]
    (out / "six.txt").write_text("\n".join(stems) + "\n")
    log = train(demo, out / "straight", "--list", str(out / "six.txt"), "--max-steps", "5")
    return out, log


def test_metric_on_hand_made_predictions():
    metric = FewShotMetric()
    update = lambda c, pred, target: metric.add(c, evaluate.episode_counts(pred, target).tolist())  # noqa: E731
    target = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [255, 255, 0, 0]])
    pred = torch.tensor([[1, 0, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])  # 255 pixels do not count
    assert update(3, pred, target) == (2, 6)
    assert update(3, torch.ones(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long)) == (16, 16)
    two = torch.zeros(4, 4, dtype=torch.long)
    two[0, :2] = 1
    assert update(5, torch.zeros(4, 4, dtype=torch.long), two) == (0, 2)
    r = metric.summary()
    assert r["per_class"] == {"3": pytest.approx(18 / 22), "5": 0.0}
    assert r["miou"] == pytest.approx((18 / 22 + 0) / 2)
    assert r["miou_episode_mean"] == pytest.approx(((1 / 3 + 1) / 2 + 0) / 2)
    # background: intersections 8, 0, 14; unions 12, 0, 16.  foreground: 18 / 24
    assert r["fbiou"] == pytest.approx((18 / 24 + 22 / 28) / 2)
    with pytest.raises(ValueError, match="shape"):
        update(3, pred[:2], target)


def test_training_lowers_the_loss(demo, tmp_path):
    log = train(demo, tmp_path, "--max-steps", "24", "--lr", "1e-3", "--no-aug", "--split", "none")
    losses = [line["loss"] for line in log]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["kind"] == "fss" and state["step"] == 24 and state["config"]["backbone"] == "efficientnet_lite0"
    assert json.loads((tmp_path / "args.json").read_text())["max_steps"] == 24


def test_resume_continues_exactly(demo, checkpoint):
    out, straight = checkpoint
    six = str(out / "six.txt")
    train(demo, out / "resumed", "--list", six, "--max-steps", "3")  # stops in the middle of epoch 1
    resumed = train(demo, out / "resumed", "--list", six, "--max-steps", "5", "--resume")
    a, b = load_checkpoint(out / "straight" / "last.pt"), load_checkpoint(out / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 5 and a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [x["loss"] for x in straight] == [x["loss"] for x in resumed]


def evaluate_json(demo, ckpt, out, *extra):
    evaluate.main(["fss", "--checkpoint", str(ckpt), "--voc-root", str(demo["voc"]), "--fold", "0,1", "--runs", "2",
                   "--episodes", "8", "--image-size", "64", "--workers", "0", "--device", "cpu", "--out", str(out),
                   *extra])
    return json.loads(out.read_text())


def test_evaluation_reads_the_device_once_a_chunk_of_episodes(demo, checkpoint, tmp_path, monkeypatch):
    # each read of a device tensor on the host (.cpu(), .item(), int(), ...) waits for the GPU: evaluate.py reads
    # the episodes' counts once per batch of --episode-batch (25: here once per run, 2 folds x 2 runs of 8)
    reads = []
    for name in ("cpu", "item", "tolist", "numpy", "__int__", "__float__"):
        def spy(t, *a, _real=getattr(torch.Tensor, name), _name=name, **k):
            if sys._getframe(1).f_code.co_filename == evaluate.__file__:
                reads.append(_name)
            return _real(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    evaluate_json(demo, checkpoint[0] / "straight" / "last.pt", tmp_path / "r.json")
    assert reads == ["tolist"] * 4


def test_evaluation_is_deterministic_batched_or_not_and_the_cache_is_exact(demo, checkpoint, tmp_path):
    ckpt = checkpoint[0] / "straight" / "last.pt"
    first = evaluate_json(demo, ckpt, tmp_path / "a.json", "--save-episodes", str(tmp_path / "a.jsonl"),
                          "--figure", str(tmp_path / "fig.png"))
    # one episode at a time through the head, and batches that do not divide a run: the same numbers on the CPU
    for name, batch in (("b", "1"), ("c", "3")):
        again = evaluate_json(demo, ckpt, tmp_path / f"{name}.json", "--save-episodes", str(tmp_path / f"{name}.jsonl"),
                              "--episode-batch", batch)
        timing = ("episodes_per_s", "config", "backbone_forwards")
        strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
        assert strip(first) == strip(again)
        assert (tmp_path / "a.jsonl").read_text() == (tmp_path / f"{name}.jsonl").read_text()
    assert set(first) >= {"fold0", "fold1", "mean", "backbone_forwards", "episodes_per_s"}
    for fold in ("fold0", "fold1"):
        for key in ("miou", "miou_std", "fbiou", "miou_episode_mean", "per_class"):
            assert key in first[fold]
    # each distinct image goes through the backbone once per run
    distinct = 0
    for fold in (0, 1):
        for run in range(2):
            ds = FewShotEpisodes("pascal", demo["voc"], fold, episodes=8, seed=run, image_size=64)
            distinct += len({i for e in range(8) for i in [ds.episode_ids(e)[0], *ds.episode_ids(e)[1]]})
    assert first["backbone_forwards"] == distinct < 2 * 2 * 8 * 2
    # the cached features give each episode the logits of the network's own forward
    net = load_network(ckpt, ("fss",), torch.device("cpu"))[0]
    ds = FewShotEpisodes("pascal", demo["voc"], 1, episodes=8, seed=0, image_size=64)
    cache = evaluate.FeatureCache(net, {i: 7 for e in range(8) for i in [ds.episode_ids(e)[0], *ds.episode_ids(e)[1]]})
    with torch.no_grad():
        for e in range(8):
            item = ds[e]
            direct = net(item["query_img"][None], item["support_imgs"][None], item["support_masks"][None])
            torch.testing.assert_close(cache.logits([item], torch.device("cpu")), direct, rtol=0, atol=1e-5)
    # the per-episode file recomputes the standard mIoU
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(lines) == 32 and set(lines[0]) >= {"run", "query", "supports", "class", "intersection", "union"}
    for fold in (0, 1):
        runs = []
        for run in range(2):
            sums = {}
            for x in lines:
                if x["fold"] == fold and x["run"] == run:
                    i, u = sums.get(x["class"], (0, 0))
                    sums[x["class"]] = (i + x["intersection"], u + x["union"])
            runs.append(np.mean([i / u for i, u in sums.values()]))
        assert first[f"fold{fold}"]["miou"] == pytest.approx(np.mean(runs))
    width, height = Image.open(tmp_path / "fig.png").size  # query|support|pred|truth, 2 rows per fold, titles
    assert height == 2 * 11 + 4 * 68 + 4 and width > 4 * 68 + 4


def test_saliency_baseline_uses_the_query_pseudo_mask(demo, tmp_path):
    # every pseudo-mask all foreground: intersection = the query's class pixels, union = its non-ignored pixels
    masks = tmp_path / "masks"
    for stem in voc_image_set(demo["voc"], "val"):
        save_png(np.full(load_mask(demo["voc_masks"] / f"{stem}.png").shape, 255, np.uint8), masks / f"{stem}.png")
    evaluate.main(["fss", "--baseline", "saliency", "--masks", str(masks), "--voc-root", str(demo["voc"]),
                   "--fold", "2", "--runs", "1", "--episodes", "5", "--eval-resolution", "original",
                   "--workers", "0", "--out", str(tmp_path / "r.json"), "--save-episodes", str(tmp_path / "e.jsonl")])
    ds = FewShotEpisodes("pascal", demo["voc"], 2, episodes=5, seed=0, image_size=64)
    for line in (tmp_path / "e.jsonl").read_text().splitlines():
        x = json.loads(line)
        _, mask = ds.load(x["query"], x["class"])
        assert (x["intersection"], x["union"]) == (int((mask == 1).sum()), int((mask != 255).sum()))
    # the all-foreground baseline gives exactly the same episodes
    evaluate.main(["fss", "--baseline", "foreground", "--voc-root", str(demo["voc"]), "--fold", "2", "--runs", "1",
                   "--episodes", "5", "--eval-resolution", "original", "--workers", "0",
                   "--out", str(tmp_path / "f.json"), "--save-episodes", str(tmp_path / "f.jsonl")])
    assert (tmp_path / "f.jsonl").read_text() == (tmp_path / "e.jsonl").read_text()
    with pytest.raises(SystemExit, match="--masks"):
        evaluate.main(["fss", "--baseline", "saliency", "--voc-root", str(demo["voc"]), "--out", str(tmp_path / "x")])


def test_other_training_sources_and_flag_errors(demo, checkpoint, tmp_path):
    # pseudo-masks (a 0/255 mask folder named like the images) with MixedSplit, and supervised fold pairs
    train_fss.main(["--images", str(demo["salient_images"]), "--masks", str(demo["salient_masks"]),
                    "--split", "mixed", "--max-shift", "10", "--backbone", "efficientnet_lite0", "--weights", "none",
                    "--image-size", "64", "--batch-size", "2", "--max-steps", "2", "--workers", "0",
                    "--out", str(tmp_path / "pseudo")])
    train_fss.main(["--supervised", "--voc-root", str(demo["voc"]), "--fold", "1", "--backbone",
                    "efficientnet_lite0", "--weights", "none", "--image-size", "64", "--batch-size", "2",
                    "--max-steps", "2", "--workers", "0", "--out", str(tmp_path / "supervised")])
    for name in ("pseudo", "supervised"):
        assert load_checkpoint(tmp_path / name / "last.pt")["step"] == 2
    with pytest.raises(SystemExit, match="different flags: --lr"):
        train(demo, checkpoint[0] / "straight", "--list", str(checkpoint[0] / "six.txt"), "--max-steps", "6",
              "--lr", "0.5", "--resume")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a run killed before its 1st save
    fresh = train(demo, tmp_path / "fresh", "--list", str(checkpoint[0] / "six.txt"), "--max-steps", "5", "--resume")
    assert [x["loss"] for x in fresh] == [x["loss"] for x in checkpoint[1]]   # starts afresh, same as straight
    with pytest.raises(SystemExit, match="absent.pt"):
        evaluate_json(demo, tmp_path / "absent.pt", tmp_path / "r.json")


def test_coco_episodes_evaluate(demo, checkpoint, tmp_path):
    pytest.importorskip("pycocotools")
    out = tmp_path / "coco.json"
    evaluate.main(["fss", "--checkpoint", str(checkpoint[0] / "straight" / "last.pt"), "--dataset", "coco",
                   "--coco-root", str(demo["coco"]), "--fold", "0", "--runs", "1", "--episodes", "4", "--image-size", "64",
                   "--shots", "2", "--workers", "0", "--out", str(out)])
    r = json.loads(out.read_text())
    assert 0.0 <= r["fold0"]["miou"] <= 1.0 and r["backbone_forwards"] <= 4 * 3


def test_fold_based_self_supervised_training_leaves_out_test_fold_images(demo):
    args = train_fss.parse_args(["--mask-source", "gt", "--voc-root", str(demo["voc"]), "--fold", "1",
                               "--image-size", "64"])
    data = train_fss.build_dataset(args)
    test_classes = set(range(6, 11))
    assert 0 < len(data) < len(voc_image_set(demo["voc"], "train"))
    for path in data.masks:
        assert not test_classes & set(np.unique(load_mask(path)).tolist()), path
    with pytest.raises(SystemExit):
        train_fss.parse_args(["--images", "x", "--masks", "y", "--fold", "1"])  # --fold needs --voc-root
